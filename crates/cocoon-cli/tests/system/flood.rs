//! A connection flood from real addresses: one IPv6 holder of a /64 (its own network
//! namespace, with an AnyIP route for the whole /64) against an in-process network whose
//! proxy listens on IPv6.

use std::path::Path;
use std::time::Duration;

use crate::common::netns::Lan;
use crate::common::*;
use cocoon_proxy::LimitsConfig;
use cocoon_testkit::backends::Scripted;
use cocoon_testkit::dev::{DevNetwork, DevOptions};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

/// Opens connections to `target port` from `n` addresses of the /64 `prefix`, one each, and
/// sends nothing on them. After a second it prints how many it opened and how many the server
/// has not closed, then holds them for `hold` seconds. The first connection, from the host's
/// own address, is retried while the new link settles.
const FLOOD: &str = r#"
import socket, sys, time
target, port, prefix, n, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
deadline = time.time() + 10
while True:
    try:
        socket.create_connection((target, port), timeout=1).close()
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.2)
time.sleep(0.5)
socks = []
for i in range(1, n + 1):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind((prefix + format(i, "x"), 0))
    s.settimeout(2)
    try:
        s.connect((target, port))
        socks.append(s)
    except OSError:
        s.close()
time.sleep(1)
still = 0
for s in socks:
    s.setblocking(False)
    try:
        if s.recv(1):
            still += 1
    except BlockingIOError:
        still += 1
    except OSError:
        pass
print(len(socks), still, flush=True)
time.sleep(hold)
"#;

/// An IPv6 host holds a whole /64 and can open connections from as many of its addresses as it
/// likes: counted per address, `connections_per_ip` would not bound it. 100 silent connections
/// from 100 addresses of one /64 are held to the cap (4 here): the rest are closed at once.
/// The honest worker, restarted during the flood, joins and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_slash_64_flood_counts_as_one_address() {
    let Some(lan) = Lan::new_or_skip(&["flood"]) else {
        return;
    };
    let (proxy_v6, held) = lan
        .ipv6_slash_64("flood")
        .expect("IPv6 addresses on the test LAN");
    let worker = Scripted::new(2048);
    let mut net = DevNetwork::start(
        DevOptions {
            // Every address, IPv6 and IPv4 alike (the workers and the gateway come over ::1).
            proxy_listen: "[::]:0".into(),
            limits: LimitsConfig {
                connections_per_ip: 4,
                handshaking_connections: 32,
                ..LimitsConfig::default()
            },
            ..test_options()
        },
        vec![worker.clone()],
    )
    .await
    .unwrap();
    net.wait_ready(1, Duration::from_secs(20)).await.unwrap();
    let port = net.proxy_addr.port().to_string();
    let mut flood = lan
        .command("flood", Path::new("python3"))
        .args(["-c", FLOOD, &proxy_v6, &port, &held, "100", "30"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs in the flood's namespace");
    let mut lines = tokio::io::BufReader::new(flood.stdout.take().unwrap()).lines();
    let report = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the flood reports")
        .unwrap()
        .expect("the flood ran");
    let counts: Vec<u32> = report
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let [opened, open] = counts[..] else {
        panic!("{report}")
    };
    assert!(opened >= 4, "{report}");
    assert_eq!(
        open, 4,
        "connections the proxy kept open of {opened}: {report}"
    );

    // While the flood holds its share, the honest worker comes back and serves.
    net.stop_worker_until_gone(0).await;
    net.start_worker_until_joined(0, Duration::from_secs(10))
        .await;
    let answer = reqwest::Client::new()
        .post(format!("{}/chat/completions", net.gateway_url()))
        .json(&chat_body("hello", json!({"max_tokens": 2})))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(worker.served(), 1);
    drop(flood);
}
