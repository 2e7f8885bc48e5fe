//! What a worker answers on the streams its proxy opens.

use std::sync::Arc;

use bytes::Bytes;
use cocoon_engine::Backend;
use cocoon_net::{Body, error_response, event_stream_response, json, no_route, response};
use cocoon_protocol::{
    GenerateEvent, GenerateRequest, PROTOCOL_VERSION, Payout, ProtocolError, WorkerHello,
    encode_frame, paths,
};
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::config::PriceConfig;
use crate::metrics::WorkerMetrics;
use crate::payouts::PayoutStore;
use crate::sealing::{SealedAnswer, Sealing};

/// Largest generation request accepted from the proxy.
const MAX_REQUEST_BYTES: usize = 8 << 20;

#[derive(Clone)]
pub(crate) struct WorkerService {
    name: Arc<str>,
    backend: Arc<dyn Backend>,
    payouts: Option<Arc<PayoutStore>>,
    /// Read at each hello: the operator may change them while the worker runs.
    prices: Arc<parking_lot::RwLock<PriceConfig>>,
    /// The key of the proxy on this connection: payouts must be signed by it.
    proxy: [u8; 32],
    /// How sealed requests are opened, when this worker is attested.
    sealing: Option<Arc<Sealing>>,
    /// Its current certificate is in every hello.
    identity: Arc<cocoon_tls::Identity>,
    metrics: WorkerMetrics,
    /// Set while the worker stops: new requests are refused.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// Set while its operator has it disabled: new requests are refused the same way.
    paused: Arc<std::sync::atomic::AtomicBool>,
}

impl WorkerService {
    /// The service `worker` runs on each connection.
    pub(crate) fn of(worker: &crate::Worker) -> Self {
        Self {
            name: worker.name.as_str().into(),
            backend: worker.backend.clone(),
            payouts: worker.payouts.clone(),
            prices: worker.prices.clone(),
            proxy: [0; 32],
            sealing: worker.sealing.clone(),
            identity: worker.identity.clone(),
            metrics: worker.metrics.clone(),
            draining: worker.draining.clone(),
            paused: worker.paused.clone(),
        }
    }

    /// This service on a connection to the proxy with key `proxy`.
    pub(crate) fn for_proxy(&self, proxy: [u8; 32]) -> Self {
        Self {
            proxy,
            ..self.clone()
        }
    }

    async fn payout(&self, body: Incoming) -> Response<Body> {
        let payout: Payout = match cocoon_net::read_json(body, 64 * 1024).await {
            Ok(p) => p,
            Err(e) => return error_response(&e),
        };
        let Some(store) = &self.payouts else {
            let e = ProtocolError::invalid("this worker keeps no payouts");
            return error_response(&e);
        };
        let store = store.clone();
        let proxy = self.proxy;
        let contract = match store.contract(&proxy).await {
            Ok(c) => c,
            Err(reason) => return error_response(&ProtocolError::internal(reason)),
        };
        // The store fsyncs: off the async threads.
        let kept =
            tokio::task::spawn_blocking(move || store.offer(&proxy, payout, &contract)).await;
        match kept {
            Ok(Ok(_)) => response(StatusCode::OK, json(&serde_json::json!({}))),
            Ok(Err(reason)) => {
                tracing::warn!(%reason, "refused a payout from the proxy");
                error_response(&ProtocolError::invalid(reason))
            }
            Err(e) => error_response(&ProtocolError::internal(e.to_string())),
        }
    }

    /// Whether new requests are refused: the worker stops, or its operator disabled it.
    fn refusing(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
            || self.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) async fn handle(self, req: Request<Incoming>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, paths::HELLO) => {
                let prices = self.prices.read().clone();
                let hello = WorkerHello {
                    protocol_version: PROTOCOL_VERSION,
                    name: self.name.to_string(),
                    models: self
                        .backend
                        .models()
                        .into_iter()
                        .map(|mut card| {
                            card.min_price = prices.price(&card.id);
                            card
                        })
                        .collect(),
                    capacity: self.backend.capacity(),
                    // Disabled by its operator: the proxy routes it nothing new, as while it
                    // stops.
                    draining: self.refusing(),
                    certificate: self.identity.certified_key().cert.first().map(|c| {
                        use base64::Engine as _;
                        base64::engine::general_purpose::STANDARD.encode(c.as_ref())
                    }),
                };
                response(StatusCode::OK, json(&hello))
            }
            (&Method::POST, paths::GENERATE | paths::SEALED) if self.refusing() => error_response(
                &ProtocolError::unavailable(cocoon_protocol::WORKER_DRAINING),
            ),
            (&Method::POST, paths::GENERATE) => self.generate(req.into_body()).await,
            (&Method::POST, paths::SEALED) => self.generate_sealed(req.into_body()).await,
            (&Method::POST, paths::PAYOUT) => self.payout(req.into_body()).await,
            (method, path) => no_route(method, path),
        }
    }

    /// Answers with an error status if the generation fails before its first event (so the
    /// proxy can try elsewhere), else with 200 and the stream of events.
    async fn generate(&self, body: Incoming) -> Response<Body> {
        let request: GenerateRequest = match cocoon_net::read_json(body, MAX_REQUEST_BYTES).await {
            Ok(r) => r,
            Err(e) => return error_response(&e),
        };
        self.answer(request, None).await
    }

    /// [`Self::generate`] for a request sealed to this worker: opened here, answered sealed.
    async fn generate_sealed(&self, body: Incoming) -> Response<Body> {
        let Some(sealing) = &self.sealing else {
            let e = ProtocolError::unavailable(
                "this worker is not attested: it holds no key to open sealed requests",
            );
            return error_response(&e);
        };
        let sealed: cocoon_protocol::SealedRequest =
            match cocoon_net::read_json(body, MAX_REQUEST_BYTES).await {
                Ok(r) => r,
                Err(e) => return error_response(&e),
            };
        let model_hash = self
            .backend
            .models()
            .into_iter()
            .find(|m| m.id == sealed.header.model)
            .and_then(|m| m.model_hash);
        match sealing.open(&sealed, model_hash) {
            Ok(opened) => self.answer(opened.request, Some(opened.answer)).await,
            Err(e) => error_response(&e),
        }
    }

    /// Runs `request` on the backend and streams its events, sealed when `sealed` is given.
    async fn answer(
        &self,
        request: GenerateRequest,
        mut sealed: Option<SealedAnswer>,
    ) -> Response<Body> {
        let mut counted = self.metrics.start(&request.model);
        let shape = crate::shape::Shape::of(&request);
        let mut events = crate::shape::held_to(shape, self.backend.generate(request));
        let first = match events.next().await {
            Some(GenerateEvent::Error { error }) => {
                counted.saw(&GenerateEvent::Error {
                    error: error.clone(),
                });
                let error = match &mut sealed {
                    Some(answer) => answer.refusal(&error),
                    None => error,
                };
                return error_response(&error);
            }
            Some(event) => event,
            None => {
                let e = ProtocolError::internal("backend ended without answering");
                return error_response(&e);
            }
        };
        let (tx, rx) = mpsc::channel::<Bytes>(32);
        tokio::spawn(async move {
            let mut next = Some(first);
            while let Some(event) = next {
                counted.saw(&event);
                // One frame a token; a sealed answer's end is two (its last chunk, then the
                // clear `Done` or error the proxy reads).
                let (frame, then) = match &mut sealed {
                    Some(answer) => answer.seal(event),
                    None => (event, None),
                };
                for frame in std::iter::once(frame).chain(then) {
                    // A send fails when the proxy reset the stream; dropping `events` then
                    // stops the generation.
                    if tx.send(encode_frame(&frame)).await.is_err() {
                        return;
                    }
                }
                // A reset is noticed while the backend is still working on the next token too
                // (a long prefill, a stalled backend), not only at the next send.
                next = tokio::select! {
                    event = events.next() => event,
                    _ = tx.closed() => return,
                };
            }
        });
        event_stream_response(rx)
    }
}
