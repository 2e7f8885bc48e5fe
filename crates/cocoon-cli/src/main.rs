//! `cocoon`: the one binary for every role (dev network, worker, proxy, client gateway,
//! ledger) and the operator tools (bench, attest, money commands).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cocoon_cli::attest::{self as attest_cmd, Evidence, VerifyOptions};
use cocoon_cli::backends::build_backend;
use cocoon_cli::bench;
use cocoon_cli::config;
use cocoon_cli::money::{self, AccountOptions, ClientAccount, ClientAction};
use cocoon_client::{ClientConfig, Gateway};
use cocoon_engine::{Backend, LlamaConfig};
use cocoon_ledger::Ledger as _;
use cocoon_llama::LlamaBackend;
use cocoon_proxy::{Proxy, ProxyConfig};
use cocoon_testkit::dev::{DevNetwork, DevOptions};
use cocoon_worker::{ModelRouter, Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// Confidential, decentralized AI inference: worker, proxy and client gateway.
#[derive(Parser)]
#[command(name = "cocoon", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How logs are written to stderr: `text` for people, `json` (one object per line) for
    /// log collectors. Requests are logged once each (target `cocoon::access`: request id,
    /// model, tokens, duration, outcome; never prompt text).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// A running node's state from its operator's listener (`[admin] listen`): ready or why
    /// not, its status, its request counts.
    Status {
        /// The listener, `host:port` (e.g. 127.0.0.1:10444).
        admin: String,
        /// A file whose first line is the listener's bearer token, when it has one.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Run the whole network on this machine: proxy, one worker with the embedded model, and
    /// the OpenAI-compatible gateway. Needs no configuration.
    Dev {
        /// Address of the OpenAI-compatible API.
        #[arg(long, default_value = "127.0.0.1:10000")]
        listen: String,
        /// GGUF model for the worker.
        #[arg(
            long,
            env = "COCOON_MODEL",
            default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
        )]
        model: PathBuf,
        /// Where payments settle: the embedded ledger, or the TON contracts on a local
        /// emulated chain (in memory).
        #[arg(long, value_enum, default_value = "embedded")]
        ledger: cocoon_testkit::dev::DevLedgerKind,
    },
    /// Serve models to a proxy (or, with `withdraw`, claim and withdraw what proxies owe).
    Worker {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<WorkerAction>,
    },
    /// The embedded ledger: serve it, read it, send it a signed operation.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Route requests from clients to workers.
    Proxy {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The client side.
    Client {
        #[command(subcommand)]
        command: ClientCommand,
    },
    /// RA-TLS evidence, offline: make a certificate, show what a certificate or quote
    /// measures, verify one against a policy at a given time.
    Attest {
        #[command(subcommand)]
        command: AttestCommand,
    },
    /// Print a role's configuration file with every default filled in.
    Config {
        #[arg(value_parser = ["worker", "proxy", "client"])]
        role: String,
    },
    /// Measure the network path, the embedded engine (against llama-server), memory per role
    /// and payments, each side by side with its reference, in one run.
    Bench(BenchArgs),
}

#[derive(Subcommand)]
enum AttestCommand {
    /// Show the measurements (MRTD, RTMRs, image hash) and claims of an RA-TLS certificate
    /// (PEM or DER) or a raw quote. Reads only; verifies nothing.
    Show { file: PathBuf },
    /// Verify a certificate or a raw quote: Intel's signature chain against the collateral,
    /// the TCB status, the image, and for a certificate the quote's binding to its key.
    Verify {
        file: PathBuf,
        #[command(flatten)]
        options: VerifyOptions,
    },
    /// Intel's collateral, which TDX quotes are verified with: fetch it from a PCCS, or show
    /// what a file covers and until when.
    Collateral {
        #[command(subcommand)]
        command: CollateralCommand,
    },
    /// Create (if missing) a development attester key and print its public key and the image
    /// hash it attests.
    DevKey { key_file: PathBuf },
    /// Print the configuration a node of ROLE (`worker`, `proxy`, `client`) with this config
    /// file measures into RTMR3, and its hash: what peers list in `config_hashes`.
    ConfigHash {
        role: String,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Write the certificate a node with this key and attester presents, as PEM.
    Cert {
        /// The node's key (created if missing).
        #[arg(long)]
        key_file: PathBuf,
        /// `worker`, `proxy` or `client`.
        #[arg(long, default_value = "worker")]
        role: String,
        /// `none`, `tdx` (inside a TDX guest) or `dev`.
        #[arg(long, default_value = "tdx")]
        attester: cocoon_tls::AttesterChoice,
        /// The development attester's key, for `--attester dev`.
        #[arg(long)]
        dev_key_file: Option<PathBuf>,
        /// Where to write the PEM; standard output when unset.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CollateralCommand {
    /// Fetch the collateral for platforms (named, or read from quotes or certificates) from a
    /// PCCS or Intel's PCS into a folder: a node's `[collateral] cache_dir`, or files for
    /// `collateral_files`. Collateral older than what the folder holds is refused.
    Fetch(cocoon_cli::collateral::FetchOptions),
    /// Show the platform, the pieces and their dates of a collateral file or of each in a
    /// folder, and whether it is in force now (or `--at`).
    Show {
        path: PathBuf,
        #[arg(long)]
        at: Option<u64>,
    },
}

/// What `cocoon bench` measures, with which binaries.
#[derive(clap::Args)]
struct BenchArgs {
    /// What to measure; all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    sections: Vec<bench::Section>,
    #[arg(
        long,
        env = "COCOON_MODEL",
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: PathBuf,
    /// llama.cpp's server, the engine's reference (scripts/build-llama-server.sh builds
    /// one); the engine is measured without it when missing, and the bench says so.
    #[arg(
        long,
        env = "COCOON_LLAMA_SERVER",
        default_value = "target/llama-server/bin/llama-server"
    )]
    llama_server: PathBuf,
    /// A second reference: llama-server built as llama.cpp's release binaries are
    /// (scripts/build-llama-server.sh --release-like); measured when present.
    #[arg(
        long,
        env = "COCOON_LLAMA_SERVER_RELEASE",
        default_value = "target/llama-server-release/bin/llama-server"
    )]
    llama_server_release: PathBuf,
    /// CPU threads for both engines.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Fewer requests everywhere (about a tenth): a quick look, not figures to quote.
    #[arg(long)]
    quick: bool,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the figure (SVG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// nginx, the reference middlebox of the hops section (Debian's `nginx` package).
    #[arg(long, env = "COCOON_NGINX", default_value = "nginx")]
    nginx: PathBuf,
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Run the local OpenAI-compatible gateway.
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Put TON (e.g. `2.5`) into the contract with the proxy, opening it if needed.
    Deposit {
        amount: String,
        #[command(flatten)]
        account: AccountOptions,
    },
    /// Raise the contract's stake, which guarantees the proxy payment for work in flight.
    Stake {
        amount: String,
        #[command(flatten)]
        account: AccountOptions,
    },
    /// Take TON back out, down to the stake.
    Withdraw {
        amount: String,
        #[command(flatten)]
        account: AccountOptions,
    },
    /// Show the contract: balance, stake, tokens charged, state.
    Balance {
        #[command(flatten)]
        account: AccountOptions,
    },
    /// Close the contract. Through the proxy, everything comes back at once. With
    /// `--unilateral` (the proxy is down), what is above the stake comes back now and the stake
    /// after the close delay: run again with `--finish` then.
    Close {
        #[arg(long, conflicts_with = "finish")]
        unilateral: bool,
        #[arg(long)]
        finish: bool,
        #[command(flatten)]
        account: AccountOptions,
    },
}

#[derive(Subcommand)]
enum WorkerAction {
    /// Claim the latest payouts kept in `payout_file`, then withdraw the earnings.
    Withdraw,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Serve the embedded ledger (a redb file) over HTTP.
    Serve {
        #[arg(long, default_value = "ledger.redb")]
        db: PathBuf,
        /// The registry owner's key (created if missing).
        #[arg(long, default_value = "owner.key")]
        owner_key: PathBuf,
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: String,
    },
    /// Print the public key (hex) of a key file, creating the key if missing: what the
    /// registry and contracts know a party by.
    Key { key_file: PathBuf },
    /// Print the whole ledger state as JSON.
    Show {
        #[arg(long, default_value = "http://127.0.0.1:9100")]
        ledger: String,
    },
    /// Send one operation, as JSON (see docs/ledger.md), signed with `--key-file`; e.g.
    /// `'{"proxy_open":{"stake":10000000000}}'`.
    Exec {
        #[arg(long, default_value = "http://127.0.0.1:9100")]
        ledger: String,
        #[arg(long)]
        key_file: PathBuf,
        op: String,
    },
    /// The root owner's code upgrades on TON (docs/contracts.md): `SetCodes` when any of the
    /// contract codes is given (the others stay this build's committed code), `UpgradeRoot`
    /// with `--root-code`. Codes are BOC files, as contracts/build holds them.
    Upgrade {
        /// `ton:<root address>@<toncenter API URL>`.
        #[arg(long)]
        ledger: String,
        /// The root owner's key.
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        proxy_code: Option<PathBuf>,
        #[arg(long)]
        client_code: Option<PathBuf>,
        #[arg(long)]
        worker_code: Option<PathBuf>,
        #[arg(long)]
        root_code: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,llama_cpp_2=warn,llama-cpp-2=warn".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli.command))
}

/// Cancelled on Ctrl-C or SIGTERM.
/// SIGTERM or ctrl-c.
async fn signalled() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Runs `each` on every SIGHUP (what a node reloads), for as long as the process runs.
fn on_hangup(mut each: impl FnMut() + Send + 'static) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP: use the [admin] listener's controls");
            return;
        };
        while hangups.recv().await.is_some() {
            each();
        }
    });
    #[cfg(not(unix))]
    let _ = each;
}

/// On each SIGHUP, reads the proxy's configuration file again and puts in force what may
/// change without a restart; a bad file is refused with the reason in the log, and the
/// configuration in force stays.
fn reload_on_hangup(controls: cocoon_proxy::Controls) {
    on_hangup(move || match controls.reload_file() {
        Ok(changed) if changed.is_empty() => {
            tracing::info!("SIGHUP: the configuration file changes nothing");
        }
        Ok(changed) => tracing::info!(?changed, "SIGHUP: configuration reloaded"),
        Err(error) => tracing::error!(%error, "SIGHUP: reload refused"),
    });
}

/// On each SIGHUP, reads the worker's configuration file again and puts its `[prices]` in
/// force; a file that changes anything else (which takes a restart) is refused with the
/// reason in the log, and the prices in force stay.
fn reload_prices_on_hangup(
    path: std::path::PathBuf,
    started: WorkerConfig,
    set: impl Fn(cocoon_worker::PriceConfig) + Send + Sync + 'static,
) {
    on_hangup(move || {
        let new: WorkerConfig = match config::load(Some(&path)) {
            Ok(c) => c,
            Err(error) => {
                tracing::error!(%error, "SIGHUP: reload refused");
                return;
            }
        };
        let mut rest = new.clone();
        rest.prices = started.prices.clone();
        let same = |c: &WorkerConfig| serde_json::to_value(c).expect("configs serialize");
        if same(&rest) != same(&started) {
            tracing::error!(
                "SIGHUP: reload refused: a worker reloads only [prices]; the rest of its \
                 configuration takes a restart, and the prices in force stay"
            );
            return;
        }
        tracing::info!(prices = ?new.prices, "SIGHUP: prices reloaded");
        set(new.prices);
    });
}

/// Cancelled at the first signal (the node stops taking work and lets what is in flight
/// finish); a second signal exits at once.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        signalled().await;
        tracing::info!("shutting down (a second signal exits at once)");
        t.cancel();
        signalled().await;
        tracing::warn!("second signal: exiting at once");
        std::process::exit(130);
    });
    token
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev {
            listen,
            model,
            ledger,
        } => {
            let backend: Arc<dyn Backend> = Arc::new(LlamaBackend::load(&LlamaConfig {
                model_path: model,
                ..Default::default()
            })?);
            let model_id = backend.models()[0].id.clone();
            let mut net = DevNetwork::start(
                DevOptions {
                    gateway_listen: listen,
                    ledger,
                    ..Default::default()
                },
                vec![backend],
            )
            .await?;
            net.wait_ready(1, Duration::from_secs(30)).await?;
            let url = net.gateway_url();
            println!(
                "\ncocoon dev network is up (proxy {} key {}).",
                net.proxy_addr, net.proxy_fingerprint
            );
            println!("OpenAI-compatible API: {url}   model: {model_id}\n");
            println!("  curl {url}/chat/completions -H 'Content-Type: application/json' \\");
            println!(
                "    -d '{{\"model\":\"{model_id}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'\n"
            );
            println!(
                "DEVELOPMENT attestation on every hop: dev quotes prove nothing about the machines."
            );
            if let Some(ledger) = net.ledger_url() {
                let client = net.write_client_config()?;
                let kind = match net.chain() {
                    Some(_) => "the TON contracts on a LOCAL EMULATED chain (in memory)",
                    None => "embedded ledger",
                };
                println!(
                    "\nPayments: {kind} at {ledger} (development TON). The gateway's contract holds {} TON, {} staked; each answer's usage shows its cost in nanoton.",
                    money::format_ton(cocoon_testkit::dev::ledger::CLIENT_DEPOSIT),
                    money::format_ton(cocoon_testkit::dev::ledger::CLIENT_STAKE),
                );
                println!("  cocoon client balance -c {}", client.display());
                if net.chain().is_none() {
                    println!("  cocoon ledger show --ledger {ledger}");
                }
                println!();
            }
            println!("Press Ctrl-C to stop.");
            shutdown_on_signal().cancelled().await;
            net.shutdown().await;
            Ok(())
        }
        Command::Worker {
            config,
            action: Some(WorkerAction::Withdraw),
        } => {
            let cfg: WorkerConfig = config::load(config.as_deref())?;
            let report = money::worker_withdraw(&cfg).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Worker {
            config,
            action: None,
        } => {
            let cfg: WorkerConfig = config::load(config.as_deref())?;
            let backends = cfg
                .backends
                .iter()
                .map(build_backend)
                .collect::<anyhow::Result<Vec<_>>>()?;
            let backend: Arc<dyn Backend> = Arc::new(ModelRouter::new(backends)?);
            let (identity, sealing) = cocoon_worker::with_sealing_key(cfg.attester.identity(
                cfg.key_file.as_deref(),
                "cocoon-worker",
                "worker",
                Some(cfg.measured()),
            )?)?;
            let identity = Arc::new(identity);
            println!("worker key fingerprint: {}", identity.fingerprint());
            let collateral = cocoon_collateral::NodeCollateral::prepare(&cfg.collateral)?;
            // With the registry's proxy images, the policy may list none of its own.
            let proxy = cfg
                .proxy_policy
                .registry_images(cfg.payments.proxy_images_from_registry)
                .build_with("proxy_policy", "proxy", &collateral.store)?;
            // Kept until the worker stops: it keeps the proxy policy's collateral current.
            let collateral = collateral.start().await;
            let shutdown = shutdown_on_signal();
            let payouts = money::worker_payouts(&cfg, &identity, shutdown.clone()).await?;
            let registry = money::worker_registry(&cfg, &identity)
                .await?
                .map(|l| (l, Duration::from_secs(cfg.payments.registry_refresh_secs)));
            let mut worker = Worker::new(
                cfg.name.clone(),
                cfg.proxy_addr.clone(),
                backend,
                identity.clone(),
                proxy,
                Duration::from_secs(cfg.max_reconnect_secs.max(1)),
            )
            .with_more_proxies(cfg.more_proxies.clone())
            .with_prices(cfg.prices.clone())
            .with_sealing(sealing.map(Arc::new))
            .with_drain(Duration::from_secs(cfg.drain_secs));
            if let Some(store) = payouts {
                worker = worker.with_payouts(store);
            }
            if let Some(listener) = cfg.admin.bind().await? {
                tracing::info!(addr = %listener.local_addr(), "operator's listener (/, /healthz, /readyz, /metrics, /status)");
                tokio::spawn(worker.admin(listener, collateral.as_ref(), shutdown.clone()));
            }
            if let Some(path) = &config {
                reload_prices_on_hangup(path.clone(), cfg.clone(), worker.price_setter());
            }
            if let Some((ledger, every)) = registry {
                worker = worker.with_registry(ledger, every);
            }
            worker.run(shutdown).await;
            Ok(())
        }
        Command::Status { admin, token_file } => {
            print!(
                "{}",
                cocoon_cli::status::report(&admin, token_file.as_deref()).await?
            );
            Ok(())
        }
        Command::Proxy { config } => {
            let cfg: ProxyConfig = config::load(config.as_deref())?;
            let mut proxy = Proxy::bind(&cfg, money::LEDGERS).await?;
            println!(
                "proxy listening on {} with key fingerprint {}",
                proxy.local_addr(),
                proxy.fingerprint()
            );
            if let Some(path) = config {
                proxy = proxy.with_config_file(path);
                reload_on_hangup(proxy.controls());
            }
            proxy.run(shutdown_on_signal()).await;
            Ok(())
        }
        Command::Client {
            command: ClientCommand::Serve { config },
        } => {
            let cfg: ClientConfig = config::load(config.as_deref())?;
            let gateway = Gateway::bind(&cfg, money::LEDGERS).await?;
            println!(
                "OpenAI-compatible API on http://{}/v1",
                gateway.local_addr()
            );
            gateway.run(shutdown_on_signal()).await?;
            Ok(())
        }
        Command::Client { command } => client_account(command).await,
        Command::Ledger { command } => ledger(command).await,
        Command::Attest { command } => attest(command).await,
        Command::Config { role } => {
            let text = match role.as_str() {
                "worker" => config::print_defaults::<WorkerConfig>()?,
                "proxy" => config::print_defaults::<ProxyConfig>()?,
                _ => config::print_defaults::<ClientConfig>()?,
            };
            print!("{text}");
            Ok(())
        }
        Command::Bench(args) => Box::pin(run_bench(args)).await,
    }
}

async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let BenchArgs {
        sections,
        model,
        llama_server,
        llama_server_release,
        threads,
        quick,
        json,
        plot,
        nginx,
    } = args;
    use bench::Section;
    let work = tempfile::Builder::new().prefix("cocoon-bench-").tempdir()?;
    let mut options = bench::BenchOptions {
        sections: if sections.is_empty() {
            vec![
                Section::Path,
                Section::Hops,
                Section::Engine,
                Section::Lookup,
                Section::Memory,
                Section::Payments,
                Section::Load,
                Section::Market,
            ]
        } else {
            sections
        },
        model,
        llama_server: llama_server.is_file().then_some(llama_server),
        llama_server_release: llama_server_release
            .is_file()
            .then_some(llama_server_release),
        path: Default::default(),
        hops: bench::hops::HopsOptions {
            nginx,
            ..Default::default()
        },
        engine: bench::engine::EngineOptions {
            threads,
            ..Default::default()
        },
        lookup: Default::default(),
        payments: bench::payments::PaymentsOptions {
            threads,
            ..Default::default()
        },
        load: Default::default(),
        market: Default::default(),
        work_dir: work.path().to_owned(),
    };
    if quick {
        let p = &mut options.path;
        p.latency_requests /= 10;
        p.throughput_requests /= 10;
        p.stream_requests = 2;
        let h = &mut options.hops;
        h.latency_requests /= 10;
        h.requests /= 10;
        h.stream_requests /= 8;
        options.engine.requests = 2;
        options.engine.requests_per_stream = 1;
        options.lookup.rounds = 2;
        options.payments.requests /= 10;
        options.load.requests /= 10;
        options.market.picks /= 10;
        options.market.quality_picks /= 10;
    }
    let report = match bench::run(&options).await {
        Ok(r) => r,
        Err(e) => {
            // Keep llama-server's and the roles' logs for a look at what failed.
            let kept = work.keep();
            return Err(e.context(format!("bench failed; logs kept in {}", kept.display())));
        }
    };
    print!("{}", bench::table(&report));
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("JSON report written to {}", path.display());
    }
    if let Some(path) = plot {
        let svg = bench::figure(&report)
            .ok_or_else(|| anyhow::anyhow!("the figure needs the path and engine sections"))?;
        std::fs::write(&path, svg)?;
        println!("figure written to {}", path.display());
    }
    Ok(())
}

async fn client_account(command: ClientCommand) -> anyhow::Result<()> {
    let (account, action) = match command {
        ClientCommand::Serve { .. } => unreachable!("served above"),
        ClientCommand::Deposit { amount, account } => {
            (account, ClientAction::Deposit(money::parse_ton(&amount)?))
        }
        ClientCommand::Stake { amount, account } => {
            (account, ClientAction::Stake(money::parse_ton(&amount)?))
        }
        ClientCommand::Withdraw { amount, account } => {
            (account, ClientAction::Withdraw(money::parse_ton(&amount)?))
        }
        ClientCommand::Balance { account } => (account, ClientAction::Balance),
        ClientCommand::Close {
            unilateral,
            finish,
            account,
        } => (
            account,
            match (unilateral, finish) {
                (_, true) => ClientAction::FinishClose,
                (true, false) => ClientAction::CloseUnilateral,
                (false, false) => ClientAction::Close,
            },
        ),
    };
    let report = ClientAccount::open(&account).await?.run(action).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

async fn ledger(command: LedgerCommand) -> anyhow::Result<()> {
    match command {
        LedgerCommand::Serve {
            db,
            owner_key,
            listen,
        } => {
            let shutdown = shutdown_on_signal();
            money::serve_ledger(&db, &owner_key, &listen, async move {
                shutdown.cancelled().await
            })
            .await
        }
        LedgerCommand::Key { key_file } => {
            println!(
                "{}",
                hex::encode(money::key_wallet(&key_file)?.public_key())
            );
            Ok(())
        }
        LedgerCommand::Show { ledger } => {
            let state = cocoon_ledger::RemoteLedger::new(&ledger, None)
                .snapshot()
                .await?;
            println!("{}", serde_json::to_string_pretty(&state)?);
            Ok(())
        }
        LedgerCommand::Exec {
            ledger,
            key_file,
            op,
        } => {
            let receipt = money::exec(&ledger, &key_file, &op).await?;
            println!("{}", serde_json::to_string_pretty(&receipt)?);
            Ok(())
        }
        LedgerCommand::Upgrade {
            ledger,
            key_file,
            proxy_code,
            client_code,
            worker_code,
            root_code,
        } => {
            let done = money::upgrade(
                &ledger,
                &key_file,
                money::Codes {
                    proxy: proxy_code,
                    client: client_code,
                    worker: worker_code,
                    root: root_code,
                },
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&done)?);
            Ok(())
        }
    }
}

async fn attest(command: AttestCommand) -> anyhow::Result<()> {
    let report = match command {
        AttestCommand::Show { file } => attest_cmd::show(&Evidence::read(&file)?)?,
        AttestCommand::Verify { file, options } => {
            attest_cmd::verify(&Evidence::read(&file)?, &options)?
        }
        AttestCommand::Collateral {
            command: CollateralCommand::Fetch(options),
        } => cocoon_cli::collateral::fetch(&options).await?,
        AttestCommand::Collateral {
            command: CollateralCommand::Show { path, at },
        } => cocoon_cli::collateral::show(&path, at)?,
        AttestCommand::DevKey { key_file } => attest_cmd::dev_key(&key_file)?,
        AttestCommand::ConfigHash { role, config } => {
            let path = Some(config.as_path());
            let measured = match role.as_str() {
                "worker" => config::load::<WorkerConfig>(path)?.measured(),
                "proxy" => config::load::<cocoon_proxy::ProxyConfig>(path)?.measured(),
                "client" => config::load::<cocoon_client::ClientConfig>(path)?.measured(),
                other => anyhow::bail!("unknown role {other:?}: worker, proxy or client"),
            };
            serde_json::json!({
                "role": role,
                "config_hash": measured.config_hash(),
                "measured": measured.content,
            })
        }
        AttestCommand::Cert {
            key_file,
            role,
            attester,
            dev_key_file,
            out,
        } => {
            let attester = cocoon_tls::AttesterConfig {
                kind: attester,
                dev_key_file,
                dev_mrtd: None,
            };
            let (pem, fingerprint) = attest_cmd::make_certificate(&attester, &key_file, &role)?;
            match out {
                Some(path) => {
                    std::fs::write(&path, pem)?;
                    eprintln!("certificate written to {}", path.display());
                }
                None => print!("{pem}"),
            }
            eprintln!("key fingerprint: {fingerprint}");
            return Ok(());
        }
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
