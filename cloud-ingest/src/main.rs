//! `cloud-ingest`: run the ingest, check a config, read the embedded log, hash a device token.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cloud_ingest::config::{IngestConfig, SinkConfig};
use cloud_ingest::publish::embedded;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "cloud-ingest",
    version,
    about = "Cloud ingest of the edge gateway"
)]
struct Cli {
    /// Log lines as text, or one JSON object per line for log collectors.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the ingest.
    Run {
        /// The ingest's YAML config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config file and exit (0 when valid).
    CheckConfig {
        /// The YAML config to check.
        file: PathBuf,
    },
    /// Read the embedded log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Print the SHA-256 of a token read from standard input, for `devices[].token_sha256`.
    HashToken,
}

#[derive(Subcommand)]
enum LogCommand {
    /// List topics with their end offsets.
    Topics {
        /// The ingest's YAML config (to find the log).
        #[arg(long)]
        config: PathBuf,
    },
    /// Print records of a topic as JSON lines.
    Read {
        /// The ingest's YAML config (to find the log).
        #[arg(long)]
        config: PathBuf,
        /// Topic name, e.g. iot.demo.telemetry.
        #[arg(long)]
        topic: String,
        /// First offset to read.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Most records to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn embedded_path(config: &std::path::Path) -> anyhow::Result<PathBuf> {
    match IngestConfig::load(config)?.sink {
        SinkConfig::Embedded { path, .. } => Ok(path),
        _ => anyhow::bail!(
            "{}: the sink is not the embedded log; read Kafka or NATS with their own clients",
            config.display()
        ),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let file = config;
            let config = IngestConfig::load(&file)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                let on_signal = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    tracing::info!("shutting down: finishing requests in flight");
                    on_signal.cancel();
                });
                Ok(cloud_ingest::serve(config, Some(file), shutdown).await?)
            })
        }
        Command::CheckConfig { file } => {
            let config = IngestConfig::load(&file)?;
            println!(
                "{}: valid ({} devices)",
                file.display(),
                config.devices.len()
            );
            Ok(())
        }
        Command::Log {
            command: LogCommand::Topics { config },
        } => {
            for t in embedded::topics(&embedded_path(&config)?)? {
                println!("{}\t{}", t.topic, t.end_offset);
            }
            Ok(())
        }
        Command::Log {
            command:
                LogCommand::Read {
                    config,
                    topic,
                    from,
                    limit,
                },
        } => {
            for record in embedded::read(&embedded_path(&config)?, &topic, from, limit)? {
                println!("{}", serde_json::to_string(&record)?);
            }
            Ok(())
        }
        Command::HashToken => {
            let mut token = String::new();
            std::io::stdin().read_to_string(&mut token)?;
            println!(
                "{}",
                hex::encode(cloud_ingest::auth::hash_token(token.trim()))
            );
            Ok(())
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
