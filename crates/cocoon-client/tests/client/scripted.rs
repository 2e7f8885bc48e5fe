//! A network of one scripted worker, with the gateway's options of a test's own.

use std::sync::Arc;
use std::time::Duration;

use cocoon_testkit::backends::Scripted;
use cocoon_testkit::dev::{DevNetwork, DevOptions};

/// The network with `options`, its worker joined; the worker's double.
pub(crate) async fn start(options: DevOptions) -> (DevNetwork, Arc<Scripted>) {
    let b = Scripted::new(2048);
    let net = DevNetwork::start(options, vec![b.clone()])
        .await
        .expect("the dev network starts");
    net.wait_ready(1, Duration::from_secs(20))
        .await
        .expect("the worker joins");
    (net, b)
}
