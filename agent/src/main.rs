//! `edge-agent`: run the agent or check a device config.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::io::Write;

use edge_agent::buffer::recovery;
use edge_agent::config::{AgentConfig, check_buffer_volume, resolve_token};
use edge_agent::status::Status;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Edge agent of the IoT gateway: MQTT in, durable buffer, batches to the cloud ingest"
)]
struct Cli {
    /// Log lines as text, or one JSON object per line for log collectors.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: edge_agent::logging::Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// The device's YAML config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config file, including that its token can be read, and exit (0 when valid).
    CheckConfig {
        /// The YAML config to check.
        file: PathBuf,
    },
    /// Print the hash of a password read from standard input, for a line `name:HASH` of the
    /// users file (mqtt.auth.users_file). Argon2id, random salt.
    HashPassword,
    /// How far behind the gateway is: per stream the records waiting, the oldest one's age,
    /// the drain rate and an ETA; the link, the last error, losses; the buffer and the disk.
    /// Asks the running agent (its metrics_listen), else reads the buffer file.
    Status {
        /// The device's YAML config (finds the agent and its buffer).
        #[arg(long, required_unless_present = "buffer")]
        config: Option<PathBuf>,
        /// Read this buffer file instead (a stopped agent's; read-only).
        #[arg(long, conflicts_with = "config")]
        buffer: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a config, then have the running agent reload it (SIGHUP): MQTT users, ACL and
    /// anonymous access, without dropping connections. Exit 1, signalling nothing, when the
    /// config does not validate.
    Reload {
        /// The config the agent runs with.
        #[arg(long)]
        config: PathBuf,
        /// The agent's process id (systemd's $MAINPID); default: every `edge-agent run` of
        /// this config.
        #[arg(long)]
        pid: Option<i32>,
    },
    /// Inspect a buffer file offline (read-only; safe while the agent runs).
    Buffer {
        #[command(subcommand)]
        command: BufferCommand,
    },
}

#[derive(Subcommand)]
enum BufferCommand {
    /// Check integrity and print what it holds; exit 1 when it is corrupt.
    Verify {
        /// The buffer file (buffer.path in the config).
        file: PathBuf,
    },
    /// Print its records (or dead letters) as JSON lines.
    Dump {
        /// The buffer file.
        file: PathBuf,
        /// Print the dead-letter table instead of the records waiting to be sent.
        #[arg(long)]
        dead_letters: bool,
    },
}

/// rumqttd logs every clean client disconnect as an ERROR in its router ("no-connection … is
/// already gone"); ERROR here means an operator must act, so that target is silenced. Broker
/// overflow, the one router event that loses data, is reported by the agent itself.
const DEFAULT_LOG_FILTER: &str = "info,rumqttd=warn,rumqttd::router::routing=off";

fn main() -> ExitCode {
    let cli = Cli::parse();
    edge_agent::logging::init(cli.log_format, DEFAULT_LOG_FILTER);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig { file } => {
            let config = AgentConfig::load(&file)?;
            resolve_token(&file, &config.ingest.token)?;
            edge_agent::forwarder::http_client(&config.ingest)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            check_buffer_volume(&file, &config)?;
            let users = load_users(&config)?;
            println!(
                "{}: valid ({} streams, {} MQTT users)",
                file.display(),
                config.streams.len(),
                users.len()
            );
            Ok(())
        }
        Command::HashPassword => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                anyhow::bail!("no password on standard input");
            }
            println!(
                "{}",
                edge_agent::access::hash_password(password).map_err(anyhow::Error::msg)?
            );
            Ok(())
        }
        Command::Buffer {
            command: BufferCommand::Verify { file },
        } => {
            let report = recovery::verify(&file).map_err(|e| {
                anyhow::anyhow!("{}: cannot be read as a buffer: {e}", file.display())
            })?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if report.integrity != "ok" {
                anyhow::bail!("{}: corrupt: {}", file.display(), report.integrity);
            }
            if report.corrupt_records > 0 {
                anyhow::bail!(
                    "{}: {} records fail their checksum",
                    file.display(),
                    report.corrupt_records
                );
            }
            Ok(())
        }
        Command::Buffer {
            command: BufferCommand::Dump { file, dead_letters },
        } => {
            let mut out = std::io::stdout().lock();
            let mut failed = None;
            recovery::dump(&file, dead_letters, |record| {
                if failed.is_none()
                    && let Err(e) = serde_json::to_writer(&mut out, &record)
                        .map_err(std::io::Error::from)
                        .and_then(|()| out.write_all(b"\n"))
                {
                    failed = Some(e);
                }
            })
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            failed.map_or(Ok(()), |e| Err(e.into()))
        }
        Command::Reload { config: file, pid } => {
            edge_agent::check_reload(&file).map_err(|e| anyhow::anyhow!("{e}"))?;
            let running = agents_running(&file);
            let pids = match pid {
                Some(pid) if running.contains(&pid) => vec![pid],
                Some(pid) => anyhow::bail!(
                    "process {pid} is not an `edge-agent run --config {}`: nothing signalled",
                    file.display()
                ),
                None => running,
            };
            anyhow::ensure!(
                !pids.is_empty(),
                "no `edge-agent run --config {}` is running",
                file.display()
            );
            for pid in pids {
                let target = rustix::process::Pid::from_raw(pid)
                    .ok_or_else(|| anyhow::anyhow!("{pid} is not a process id"))?;
                rustix::process::kill_process(target, rustix::process::Signal::HUP)
                    .map_err(|e| anyhow::anyhow!("cannot signal process {pid}: {e}"))?;
                println!("{}: valid; agent {pid} reloads it", file.display());
            }
            Ok(())
        }
        Command::Status {
            config,
            buffer,
            json,
        } => {
            let status = match (config, buffer) {
                (_, Some(file)) => Status::from_buffer(&file)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?,
                (Some(file), None) => {
                    let config = AgentConfig::load(&file)?;
                    let live = match config.metrics_listen {
                        Some(addr) => ask_running_agent(addr),
                        None => Err("metrics_listen is not set in the config".to_owned()),
                    };
                    match live {
                        Ok(status) => status,
                        Err(why) if !agents_running(&file).is_empty() => anyhow::bail!(
                            "the agent runs but does not answer ({why}); its buffer file is not read under it (`--buffer {}` reads it anyway, read-only)",
                            config.buffer.path.display()
                        ),
                        Err(why) => {
                            eprintln!(
                                "the agent does not answer ({why}): reading its buffer file {}",
                                config.buffer.path.display()
                            );
                            Status::from_buffer(&config.buffer.path).map_err(|e| {
                                anyhow::anyhow!("{}: {e}", config.buffer.path.display())
                            })?
                        }
                    }
                }
                (None, None) => anyhow::bail!("give --config or --buffer"),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.table());
            }
            Ok(())
        }
        Command::Run { config: file } => {
            let mut config = AgentConfig::load(&file)?;
            let token = resolve_token(&file, &config.ingest.token)?;
            edge_agent::forwarder::http_client(&config.ingest)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            config.buffer.reserve_bytes = Some(check_buffer_volume(&file, &config)?);
            let users = load_users(&config)?;
            raise_open_files_limit();
            let buffer_path = config.buffer.path.clone();
            let runtime = tokio::runtime::Runtime::new()?;
            let result = runtime.block_on(async {
                let shutdown = CancellationToken::new();
                let on_signal = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    on_signal.cancel();
                });
                edge_agent::run(config, Some(file), token, users, shutdown).await
            });
            // The stop is already bounded; a blocking task it gave up on must not hold the
            // process (dropping a runtime waits for them forever).
            runtime.shutdown_timeout(std::time::Duration::from_millis(500));
            result?;
            // Every connection is closed now: the next start may skip the full check.
            edge_agent::buffer::recovery::mark_clean(&buffer_path);
            Ok(())
        }
    }
}

/// The running agent's `/status`, asked on its `metrics_listen` (a wildcard address is asked
/// on loopback).
fn ask_running_agent(addr: std::net::SocketAddr) -> Result<Status, String> {
    if addr.port() == 0 {
        return Err("metrics_listen has port 0, so its port is not known".into());
    }
    let ip = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => std::net::Ipv4Addr::LOCALHOST.into(),
        ip if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let url = format!(
        "http://{}/status",
        std::net::SocketAddr::new(ip, addr.port())
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(3))
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        let response = client
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url}: {}", response.status()));
        }
        let text = response.text().await.map_err(|e| e.to_string())?;
        serde_json::from_str(&text).map_err(|e| format!("{url}: {e}"))
    })
}

/// The process ids of every `edge-agent run --config FILE` (the same file) on this machine.
fn agents_running(file: &std::path::Path) -> Vec<i32> {
    let wanted = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_owned());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid > 0 && *pid != std::process::id() as i32)
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_run = args.iter().any(|a| *a == b"run");
            let config = args
                .windows(2)
                .find(|w| w[0] == b"--config")
                .map(|w| std::path::PathBuf::from(String::from_utf8_lossy(w[1]).into_owned()));
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
            is_run
                && config.is_some_and(|c| {
                    let c = if c.is_relative() { cwd.join(c) } else { c };
                    std::fs::canonicalize(&c).unwrap_or(c) == wanted
                })
                && args
                    .first()
                    .is_some_and(|a| String::from_utf8_lossy(a).ends_with("edge-agent"))
        })
        .collect()
}

/// The users file the config names (none: no users).
fn load_users(config: &AgentConfig) -> anyhow::Result<edge_agent::access::Users> {
    Ok(match &config.mqtt.auth.users_file {
        Some(file) => edge_agent::access::Users::load(file)?,
        None => edge_agent::access::Users::default(),
    })
}

/// Each MQTT connection takes a few descriptors (the client's, and the relay to the embedded
/// broker on both ends): the soft limit goes up to the hard one, as far as the system allows.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            eprintln!("warning: cannot raise the open files limit: {e}");
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
