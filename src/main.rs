//! The `txn-sidecar` binary: parses the command line and hands over to the library.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use txn_sidecar::config::{Config, Protocol, Sources};

/// Kafka multi-message transactions for any application.
#[derive(Parser)]
#[command(name = "txn-sidecar", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume, stage and deliver transactions (the sidecar).
    Run(Settings),
    /// Print the effective configuration with secrets redacted, then exit.
    Config(Settings),
    /// Run an embedded Kafka, a sample app, the sidecar and sample transactions.
    Demo,
    /// Write one transaction (tasks + commit) inside a Kafka transaction.
    Produce(ProduceArgs),
    /// Run a sample app that prints every transaction it receives.
    SampleApp {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Path to accept POSTs on.
        #[arg(long, default_value = "/transactions")]
        path: String,
    },
    /// Host librdkafka's mock cluster (an embedded Kafka) until SIGTERM, for tests.
    MockKafka {
        /// Number of brokers.
        #[arg(long, default_value_t = 1)]
        brokers: i32,
        /// Topic to create, as NAME:PARTITIONS; repeatable.
        #[arg(long = "topic")]
        topics: Vec<String>,
        /// File to write the bootstrap servers to once listening.
        #[arg(long)]
        bootstrap_file: Option<PathBuf>,
    },
}

/// The settings of `run`; each also has an env variable and a config-file key.
#[derive(Args, Clone)]
struct Settings {
    /// TOML config file.
    #[arg(long, env = "TXN_SIDECAR_CONFIG")]
    config: Option<PathBuf>,
    /// Bootstrap servers [env TXN_SIDECAR_BROKERS; default localhost:9092].
    #[arg(long)]
    brokers: Option<String>,
    /// Topic(s), comma-separated [env TXN_SIDECAR_TOPIC; required].
    #[arg(long)]
    topic: Option<String>,
    /// Consumer group [env TXN_SIDECAR_GROUP; default txn-sidecar].
    #[arg(long)]
    group: Option<String>,
    /// App endpoint [env TXN_SIDECAR_APP_URL; default http://127.0.0.1:8080/transactions].
    #[arg(long)]
    app_url: Option<String>,
    /// Admin listen address [env TXN_SIDECAR_ADMIN_ADDR; default 127.0.0.1:9464].
    #[arg(long)]
    admin_addr: Option<String>,
    /// Marker protocol: headers or key-prefix [env TXN_SIDECAR_PROTOCOL].
    #[arg(long)]
    protocol: Option<String>,
    /// Dead-letter topic [env TXN_SIDECAR_DLQ_TOPIC; default <topic>.dlq].
    #[arg(long)]
    dlq_topic: Option<String>,
    /// Open-transaction timeout [env TXN_SIDECAR_TXN_TIMEOUT; default 5m].
    #[arg(long)]
    txn_timeout: Option<String>,
    /// On delivery failure: dead-letter or block [env TXN_SIDECAR_ON_FAILURE].
    #[arg(long)]
    on_failure: Option<String>,
    /// Log format: json or text [env TXN_SIDECAR_LOG_FORMAT; default json].
    #[arg(long)]
    log_format: Option<String>,
    /// Any setting by key, e.g. `--set retry.max_attempts=5`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A librdkafka property, as kcat: `-X security.protocol=SASL_SSL`; repeatable.
    #[arg(short = 'X', value_name = "PROP=VALUE")]
    kafka: Vec<String>,
}

impl Settings {
    fn sources(&self) -> Result<Sources, String> {
        let mut flags = BTreeMap::new();
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                flags.insert(k.to_string(), v.clone());
            }
        };
        put("brokers", &self.brokers);
        put("topic", &self.topic);
        put("group", &self.group);
        put("app.url", &self.app_url);
        put("admin.addr", &self.admin_addr);
        put("protocol", &self.protocol);
        put("dlq_topic", &self.dlq_topic);
        put("txn_timeout", &self.txn_timeout);
        put("on_failure", &self.on_failure);
        put("log_format", &self.log_format);
        for kv in &self.set {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
            flags.insert(k.trim().to_string(), v.to_string());
        }
        for kv in &self.kafka {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("-X {kv:?}: expected PROP=VALUE"))?;
            flags.insert(format!("kafka.{}", k.trim()), v.to_string());
        }
        Ok(Sources {
            file: self.config.clone(),
            env: Sources::env_from_process(),
            flags,
        })
    }

    fn load(&self) -> Result<Config, String> {
        let sources = self.sources()?;
        Config::load(&sources).map_err(|e| e.to_string())
    }
}

#[derive(Args)]
struct ProduceArgs {
    /// Bootstrap servers.
    #[arg(long, env = "TXN_SIDECAR_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    /// Topic.
    #[arg(long, env = "TXN_SIDECAR_TOPIC")]
    topic: String,
    /// Transaction id.
    #[arg(long)]
    id: String,
    /// A task value; repeatable, in order.
    #[arg(long = "task")]
    tasks: Vec<String>,
    /// Read task values from a file, one per line (`-` for stdin).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Marker protocol: headers or key-prefix.
    #[arg(long, default_value = "headers")]
    protocol: String,
    /// Write an abort marker instead of a commit.
    #[arg(long)]
    abort: bool,
    /// Kafka `transactional.id` (default: txn-sidecar-produce-<id>).
    #[arg(long)]
    transactional_id: Option<String>,
    /// A librdkafka property; repeatable.
    #[arg(short = 'X', value_name = "PROP=VALUE")]
    kafka: Vec<String>,
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("txn-sidecar: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start runtime: {e}"), 1),
    };
    match cli.command {
        Command::Run(s) => {
            let cfg = match s.load() {
                Ok(c) => c,
                Err(e) => return fail(e, 2),
            };
            txn_sidecar::telemetry::init_logging(cfg.log_format);
            install_panic_logger();
            let result = rt.block_on(txn_sidecar::run(cfg, txn_sidecar::shutdown::signal()));
            txn_sidecar::shutdown::release_runtime(rt);
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "txn-sidecar stopped with an error");
                    fail(e, 1)
                }
            }
        }
        Command::Config(s) => match s.load() {
            Ok(c) => {
                print!("{}", c.redacted_toml());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 2),
        },
        Command::Demo => {
            if std::env::var_os("RUST_LOG").is_none() {
                std::env::set_var("RUST_LOG", "warn");
            }
            txn_sidecar::telemetry::init_logging(txn_sidecar::config::LogFormat::Text);
            match rt.block_on(txn_sidecar::demo::run()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(format!("demo failed: {e}"), 1),
            }
        }
        Command::Produce(a) => match produce(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e, 1),
        },
        Command::SampleApp { listen, path } => {
            let token = tokio_util::sync::CancellationToken::new();
            let t = token.clone();
            rt.spawn(async move {
                txn_sidecar::shutdown::signal().await;
                t.cancel();
            });
            match rt.block_on(txn_sidecar::sample_app::run_printing(listen, &path, token)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("sample app: {e}"), 1),
            }
        }
        Command::MockKafka {
            brokers,
            topics,
            bootstrap_file,
        } => mock_kafka(&rt, brokers, &topics, bootstrap_file),
    }
}

fn produce(a: ProduceArgs) -> Result<(), String> {
    let protocol = match a.protocol.as_str() {
        "headers" => Protocol::Headers,
        "key-prefix" => Protocol::KeyPrefix,
        p => {
            return Err(format!(
                "--protocol: must be \"headers\" or \"key-prefix\", got {p:?}"
            ))
        }
    };
    let mut values: Vec<String> = a.tasks.clone();
    if let Some(f) = &a.file {
        let text = if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("stdin: {e}"))?;
            s
        } else {
            std::fs::read_to_string(f).map_err(|e| format!("--file {}: {e}", f.display()))?
        };
        values.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    if values.is_empty() && !a.abort {
        return Err("no tasks: give --task VALUE (repeatable) or --file".into());
    }
    let mut extra = BTreeMap::new();
    for kv in &a.kafka {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("-X {kv:?}: expected PROP=VALUE"))?;
        extra.insert(k.to_string(), v.to_string());
    }
    let tid = a
        .transactional_id
        .clone()
        .unwrap_or_else(|| format!("txn-sidecar-produce-{}", a.id));
    let p = txn_sidecar::produce::TxnProducer::new(
        &a.brokers,
        &extra,
        &tid,
        protocol,
        txn_sidecar::produce::default_names(),
    )
    .map_err(|e| e.to_string())?;
    let tasks: Vec<_> = values
        .into_iter()
        .map(|v| txn_sidecar::produce::TaskRecord {
            value: v.into_bytes(),
            headers: vec![],
        })
        .collect();
    p.send(&a.topic, &a.id, &tasks, a.abort)
        .map_err(|e| e.to_string())?;
    println!(
        "wrote transaction {} ({} tasks + {}) to {}",
        a.id,
        tasks.len(),
        if a.abort { "abort" } else { "commit" },
        a.topic
    );
    Ok(())
}

fn mock_kafka(
    rt: &tokio::runtime::Runtime,
    brokers: i32,
    topics: &[String],
    file: Option<PathBuf>,
) -> ExitCode {
    let kafka = match txn_sidecar::embedded::EmbeddedKafka::start(brokers) {
        Ok(k) => k,
        Err(e) => return fail(format!("mock cluster: {e}"), 1),
    };
    for t in topics {
        let (name, parts) = match t.split_once(':') {
            Some((n, p)) => match p.parse::<i32>() {
                Ok(p) if p > 0 => (n, p),
                _ => return fail(format!("--topic {t:?}: expected NAME:PARTITIONS"), 2),
            },
            None => (t.as_str(), 1),
        };
        if let Err(e) = kafka.create_topic(name, parts) {
            return fail(format!("create topic {name}: {e}"), 1);
        }
    }
    let bootstrap = kafka.bootstrap_servers();
    if let Some(f) = file {
        let tmp = f.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, &bootstrap).and_then(|_| std::fs::rename(&tmp, &f)) {
            return fail(format!("write {}: {e}", f.display()), 1);
        }
    }
    println!("{bootstrap}");
    rt.block_on(txn_sidecar::shutdown::signal());
    drop(kafka);
    ExitCode::SUCCESS
}

/// Panics are bugs, never input: log them through `tracing` so they reach the log pipeline.
fn install_panic_logger() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(panic = %info, "panic");
        default(info);
    }));
}
