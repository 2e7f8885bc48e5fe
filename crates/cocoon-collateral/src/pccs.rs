//! A client for the v4 API that Intel's PCS and a PCCS (Intel's caching service, which operators
//! run beside their TDX hosts) both serve. Four GETs make one platform's collateral: the PCK
//! CRL, the TDX TCB info, the TDX QE identity and the root CA's CRL.
//!
//! What comes back is Intel-signed; the transport adds nothing to its trust, which is why a PCCS
//! with a private CA (`ca_file`) is as good as Intel's own service. The signatures are checked
//! where the collateral is used, when a quote is verified with it.

use std::path::Path;
use std::time::Duration;

use cocoon_attest::{Collateral, Platform};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Intel's Provisioning Certification Service: needs no PCCS, but rate-limits.
pub const INTEL_PCS_URL: &str = "https://api.trustedservices.intel.com";

/// Largest body accepted from the service: a PCK CRL of a big CA is a few hundred KiB.
const MAX_BODY: usize = 4 << 20;

/// Why collateral could not be fetched, in words that say where and what.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The service could not be reached or did not answer in time.
    #[error("cannot reach the collateral service at {url}: {reason}")]
    Unreachable {
        /// What was asked for.
        url: String,
        /// The transport's error.
        reason: String,
    },
    /// The service answered with an error status.
    #[error("the collateral service answered {status} for {url}{hint}")]
    Status {
        /// What was asked for.
        url: String,
        /// The HTTP status.
        status: u16,
        /// What the status usually means here (may be empty).
        hint: &'static str,
    },
    /// The answer is not what the v4 API returns.
    #[error("the collateral service's answer for {url} is malformed: {reason}")]
    Malformed {
        /// What was asked for.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The client could not be set up (bad URL, unreadable CA file).
    #[error("collateral service: {0}")]
    Config(String),
}

/// A v4 API client for one PCCS or Intel's PCS.
#[derive(Debug, Clone)]
pub struct PccsClient {
    http: reqwest::Client,
    /// The service's root, without the `/sgx/certification/v4` part.
    base: String,
}

struct Answer {
    body: Vec<u8>,
    headers: reqwest::header::HeaderMap,
}

impl PccsClient {
    /// A client for the service at `url` (a PCCS such as `https://pccs.internal:8081`, or
    /// [`INTEL_PCS_URL`]), trusting `ca_file` (PEM) beside the usual web roots, waiting at most
    /// `timeout` for each answer.
    pub fn new(url: &str, ca_file: Option<&Path>, timeout: Duration) -> Result<Self, FetchError> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| FetchError::Config(format!("pccs_url {url:?}: {e}")))?;
        if !matches!(parsed.scheme(), "https" | "http") {
            return Err(FetchError::Config(format!(
                "pccs_url {url:?}: expected an https:// (or http://) URL"
            )));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout);
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| FetchError::Config(format!("ca_file {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| FetchError::Config(format!("ca_file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(FetchError::Config(format!(
                    "ca_file {}: no certificate in it",
                    path.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| FetchError::Config(e.to_string()))?;
        let base = url
            .trim_end_matches('/')
            .trim_end_matches("/sgx/certification/v4")
            .trim_end_matches("/tdx/certification/v4")
            .to_owned();
        Ok(Self { http, base })
    }

    /// The service's root URL, for messages.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The collateral for `platform`'s TDX quotes, as dcap-qvl verifies with it.
    pub async fn fetch(&self, platform: &Platform) -> Result<Collateral, FetchError> {
        let pck_crl_url = format!(
            "{}/sgx/certification/v4/pckcrl?ca={}&encoding=der",
            self.base, platform.ca
        );
        let pck = self.get(&pck_crl_url, " (no PCK CRL for this CA)").await?;
        let pck_crl_issuer_chain = header(&pck, "SGX-PCK-CRL-Issuer-Chain", &pck_crl_url)?;
        let pck_crl = der_or_hex(pck.body, &pck_crl_url)?;

        let tcb_url = format!(
            "{}/tdx/certification/v4/tcb?fmspc={}",
            self.base, platform.fmspc
        );
        let tcb = self
            .get(
                &tcb_url,
                " (the service knows no TDX platform with this FMSPC)",
            )
            .await?;
        let tcb_info_issuer_chain = header(&tcb, "TCB-Info-Issuer-Chain", &tcb_url)
            .or_else(|_| header(&tcb, "SGX-TCB-Info-Issuer-Chain", &tcb_url))?;
        let (tcb_info, tcb_info_signature) = signed(&tcb.body, "tcbInfo", &tcb_url)?;

        let qe_url = format!("{}/tdx/certification/v4/qe/identity", self.base);
        let qe = self.get(&qe_url, "").await?;
        let qe_identity_issuer_chain = header(&qe, "SGX-Enclave-Identity-Issuer-Chain", &qe_url)?;
        let (qe_identity, qe_identity_signature) = signed(&qe.body, "enclaveIdentity", &qe_url)?;

        let root_ca_crl = self.root_ca_crl().await?;
        Ok(Collateral {
            pck_crl_issuer_chain,
            root_ca_crl,
            pck_crl,
            tcb_info_issuer_chain,
            tcb_info,
            tcb_info_signature,
            qe_identity_issuer_chain,
            qe_identity,
            qe_identity_signature,
            pck_certificate_chain: None,
        })
    }

    /// A PCCS serves the root CA's CRL itself (hex-encoded); Intel's PCS does not, and the CRL
    /// is then where Intel's root certificate (the pinned one, not one the service sent) says
    /// it is.
    async fn root_ca_crl(&self) -> Result<Vec<u8>, FetchError> {
        let url = format!("{}/sgx/certification/v4/rootcacrl", self.base);
        match self.get(&url, "").await {
            Ok(answer) => der_or_hex(answer.body, &url),
            Err(FetchError::Status { status: 404, .. }) => {
                let distribution = crl_url(cocoon_attest::intel_root_ca()).ok_or_else(|| {
                    FetchError::Malformed {
                        url: url.clone(),
                        reason: "no rootcacrl endpoint, and Intel's root certificate names no CRL \
                             distribution point"
                            .into(),
                    }
                })?;
                let answer = self.get(&distribution, "").await?;
                der_or_hex(answer.body, &distribution)
            }
            Err(e) => Err(e),
        }
    }

    async fn get(&self, url: &str, not_found: &'static str) -> Result<Answer, FetchError> {
        let unreachable = |e: reqwest::Error| FetchError::Unreachable {
            url: url.to_owned(),
            reason: error_chain(&e),
        };
        let mut response = self.http.get(url).send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status,
                hint: match status {
                    404 => not_found,
                    429 => " (rate-limited: run a PCCS, or fetch less often)",
                    401 | 403 => " (Intel's PCS asks for an API key on some endpoints: use a PCCS)",
                    _ => "",
                },
            });
        }
        let headers = response.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(FetchError::Malformed {
                    url: url.to_owned(),
                    reason: format!("larger than {MAX_BODY} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { body, headers })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// An issuer-chain header: PEM certificates, percent-encoded.
fn header(answer: &Answer, name: &str, url: &str) -> Result<String, FetchError> {
    let raw = answer
        .headers
        .get(name)
        .ok_or_else(|| FetchError::Malformed {
            url: url.to_owned(),
            reason: format!("no {name} header"),
        })?;
    let decoded = percent_encoding::percent_decode(raw.as_bytes())
        .decode_utf8()
        .map_err(|e| FetchError::Malformed {
            url: url.to_owned(),
            reason: format!("{name}: {e}"),
        })?;
    if !decoded.contains("-----BEGIN CERTIFICATE-----") {
        return Err(FetchError::Malformed {
            url: url.to_owned(),
            reason: format!("{name} holds no PEM certificate"),
        });
    }
    Ok(decoded.into_owned())
}

/// A CRL as DER, or as the hex a PCCS serves it in.
fn der_or_hex(body: Vec<u8>, url: &str) -> Result<Vec<u8>, FetchError> {
    // A DER CRL is a SEQUENCE (0x30); hex text starts with an ASCII digit or letter.
    if body.first() == Some(&0x30) {
        return Ok(body);
    }
    let text = String::from_utf8(body).map_err(|_| FetchError::Malformed {
        url: url.to_owned(),
        reason: "neither a DER CRL nor hex text".into(),
    })?;
    hex::decode(text.trim()).map_err(|e| FetchError::Malformed {
        url: url.to_owned(),
        reason: format!("neither a DER CRL nor hex: {e}"),
    })
}

/// The signed body of a TCB info or QE identity answer, byte for byte as Intel signed it, and
/// its signature. Re-serialising the JSON could change the bytes and break the signature, so the
/// body is taken raw.
fn signed(body: &[u8], field: &str, url: &str) -> Result<(String, Vec<u8>), FetchError> {
    #[derive(Deserialize)]
    struct Signed<'a> {
        #[serde(borrow, rename = "tcbInfo")]
        tcb_info: Option<&'a RawValue>,
        #[serde(borrow, rename = "enclaveIdentity")]
        enclave_identity: Option<&'a RawValue>,
        signature: String,
    }
    let malformed = |reason: String| FetchError::Malformed {
        url: url.to_owned(),
        reason,
    };
    let text = std::str::from_utf8(body).map_err(|e| malformed(e.to_string()))?;
    let parsed: Signed<'_> = serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
    let raw = match field {
        "tcbInfo" => parsed.tcb_info,
        _ => parsed.enclave_identity,
    }
    .ok_or_else(|| malformed(format!("no {field}")))?;
    let signature = hex::decode(&parsed.signature)
        .map_err(|e| malformed(format!("signature is not hex: {e}")))?;
    Ok((raw.get().to_owned(), signature))
}

/// The CRL distribution point a DER certificate names.
fn crl_url(der: &[u8]) -> Option<String> {
    use x509_parser::extensions::{DistributionPointName, GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    cert.extensions().iter().find_map(|ext| {
        let ParsedExtension::CRLDistributionPoints(points) = ext.parsed_extension() else {
            return None;
        };
        points
            .points
            .iter()
            .find_map(|p| match &p.distribution_point {
                Some(DistributionPointName::FullName(names)) => {
                    names.iter().find_map(|n| match n {
                        GeneralName::URI(uri) => Some((*uri).to_owned()),
                        _ => None,
                    })
                }
                _ => None,
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector() -> Collateral {
        cocoon_attest::parse_collateral(cocoon_testdata::TDX.collateral).unwrap()
    }

    #[test]
    fn intels_root_names_where_its_crl_is() {
        assert_eq!(
            crl_url(cocoon_attest::intel_root_ca()).as_deref(),
            Some("https://certificates.trustedservices.intel.com/IntelSGXRootCA.der")
        );
        assert_eq!(crl_url(b"not a certificate"), None);
    }

    #[test]
    fn signed_bodies_are_kept_byte_for_byte() {
        let c = vector();
        // Spaces Intel's serialiser would not write: re-serialising would drop them.
        let tcb = c.tcb_info.replacen(':', ": ", 1);
        let body = format!(
            "{{\"tcbInfo\":{tcb},\"signature\":\"{}\"}}",
            hex::encode(&c.tcb_info_signature)
        );
        let (raw, sig) = signed(body.as_bytes(), "tcbInfo", "u").unwrap();
        assert_eq!(raw, tcb);
        assert_eq!(sig, c.tcb_info_signature);
        assert!(signed(body.as_bytes(), "enclaveIdentity", "u").is_err());
        assert!(signed(b"{\"tcbInfo\":{},\"signature\":\"zz\"}", "tcbInfo", "u").is_err());
    }

    #[test]
    fn crls_come_as_der_or_as_hex() {
        let der = vector().root_ca_crl;
        assert_eq!(der_or_hex(der.clone(), "u").unwrap(), der);
        assert_eq!(
            der_or_hex(hex::encode(&der).into_bytes(), "u").unwrap(),
            der
        );
        assert!(der_or_hex(b"not a crl".to_vec(), "u").is_err());
    }

    #[test]
    fn service_urls_are_normalised_and_checked() {
        let t = Duration::from_secs(1);
        for url in [
            "https://pccs.example:8081",
            "https://pccs.example:8081/",
            "https://pccs.example:8081/sgx/certification/v4",
            "https://pccs.example:8081/tdx/certification/v4/",
        ] {
            assert_eq!(
                PccsClient::new(url, None, t).unwrap().url(),
                "https://pccs.example:8081"
            );
        }
        assert!(PccsClient::new("ftp://pccs.example", None, t).is_err());
        assert!(PccsClient::new("pccs.example", None, t).is_err());
        let missing = PccsClient::new("https://p", Some(Path::new("/nonexistent/ca.pem")), t)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
    }
}
