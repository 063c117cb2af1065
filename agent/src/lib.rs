//! Edge agent: the gateway end of the pipeline.
//!
//! ```text
//! sensors ─MQTT─▶ front door ─▶ routing ─▶ buffer (SQLite, group commit) ─commit─▶ PUBACK
//!                     └─▶ broker (rumqttd: local subscribers)    batcher (priority, zstd) ─▶ forwarder ─HTTPS─▶ cloud ingest
//! ```
//!
//! Guarantees: a QoS 1/2 publish is acknowledged only once its record is committed (fsync);
//! a record leaves the buffer only when the ingest answered 2xx (or 400: then it is kept as a
//! dead letter), or by policy (quota, TTL, full disk: reported upstream); order is kept per
//! stream; the backlog lives on disk, so memory stays bounded whatever the outage; a full disk
//! never wedges the buffer; a stage that stops stops the agent (exit non-zero), and a clean
//! stop (SIGTERM) loses nothing and ends within [`STOP_BOUND`].

pub mod access;
pub mod bandwidth;
pub mod batcher;
pub mod broker;
pub mod buffer;
pub mod clock;
pub mod config;
pub mod dictionary;
pub mod forwarder;
pub mod front_door;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod retry;
pub mod routing;
pub mod status;
pub mod systemd;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::batcher::Lane;
use crate::broker::BrokerError;
use crate::buffer::{Buffer, BufferError, BufferReader, BufferStream, BufferWriter};
use crate::config::{AgentConfig, BatchTriggers, StreamConfig};
use crate::forwarder::Forwarder;
use crate::front_door::FrontDoor;
use crate::metrics::Metrics;
use crate::routing::{Priority, Router};

/// The agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The buffer cannot be opened.
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// The broker cannot start.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The metrics listener cannot be bound.
    #[error("metrics_listen: cannot listen: {0}")]
    Metrics(#[source] std::io::Error),
    /// The TLS certificate or key cannot be used (the message names the key and the file).
    #[error("{0}")]
    Tls(String),
    /// A stop did not finish within [`STOP_BOUND`]; the process exits non-zero.
    #[error("the stop did not finish in time; see the log for what may be lost")]
    Stop,
    /// A stage stopped on its own; the agent stopped and exits non-zero (systemd restarts it).
    #[error("the {0} stopped unexpectedly")]
    StageStopped(&'static str),
}

/// The initial protections: each stream's resume point.
fn protections(lanes: &[Lane]) -> Arc<buffer::Protected> {
    Arc::new(buffer::Protected::new(
        lanes.iter().map(Lane::protection).collect(),
    ))
}

/// Runs the agent until `shutdown`, then stops cleanly: the broker link is drained into the
/// buffer, in-flight requests are abandoned (their records stay buffered), the last group is
/// committed.
pub async fn run(
    config: AgentConfig,
    config_file: Option<std::path::PathBuf>,
    token: String,
    users: access::Users,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let metrics = Metrics::new();
    metrics.set_degraded_after(config.ingest.degraded_after);
    let configured: Vec<BufferStream> = config
        .streams
        .iter()
        .map(|s| BufferStream {
            name: s.name.clone(),
            priority: s.priority,
            ttl: s.ttl,
        })
        .collect();
    let reserve = config.buffer.reserve_bytes.unwrap_or(buffer::RESERVE_BYTES);
    // SIGHUP is taken from here on (a reload asked while the buffer opens waits for the loop
    // below): its default action would end the agent in the middle of a check or salvage.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // Opening may read the whole file (after a crash) or salvage it: systemd is told the start
    // goes on, so its start timeout never kills a check that makes progress.
    let opened = {
        let opening = systemd::Extending::start();
        let opened = Buffer::open_with(
            &config.buffer.path,
            &configured,
            config.buffer.quota_bytes,
            reserve,
        );
        drop(opening);
        opened?
    };
    if let Some(q) = &opened.quarantine {
        let lost: u64 = q.losses.iter().map(|l| l.count).sum();
        tracing::error!(moved_to = %q.moved_to.display(), reason = %q.reason, salvaged = q.salvaged, lost, "buffer file was corrupt: quarantined, intact records salvaged, the rest reported lost (corrupt_buffer)");
        metrics.buffer_quarantined.inc();
        metrics.buffer_salvaged.inc_by(q.salvaged);
        for loss in &q.losses {
            metrics
                .records_dropped
                .with_label_values(&[
                    loss.stream.as_deref().unwrap_or("(unknown)"),
                    loss.reason.as_str(),
                ])
                .inc_by(loss.count);
        }
    }
    let (buffer, epoch, opened) = (opened.buffer, opened.epoch, opened.streams);
    let mut streams = config.streams.clone();
    for orphan in opened.iter().filter(|o| o.orphan) {
        tracing::warn!(stream = %orphan.name, "stream is no longer configured but has buffered records; draining them as bulk");
        streams.push(StreamConfig {
            name: orphan.name.clone(),
            topics: Vec::new(),
            priority: Priority::Bulk,
            batch: BatchTriggers::internal(std::time::Duration::ZERO),
            ttl: None,
            order: batcher::Order::Fifo,
            zstd_level: config.ingest.zstd_level,
            zstd_dictionary: false,
        });
    }
    let names: Vec<String> = streams.iter().map(|s| s.name.clone()).collect();
    // One read connection per request that may be in flight: reads run beside each other.
    let readers = (0..config.ingest.max_in_flight)
        .map(|_| BufferReader::open(&config.buffer.path, &names))
        .collect::<Result<Vec<_>, _>>()?;
    let progress = buffer.progress();
    let now = Instant::now();
    let lanes: Vec<Lane> = opened
        .iter()
        .zip(&streams)
        .zip(&progress)
        .map(|((o, s), p)| {
            Lane::new(
                o.resume_after,
                p.committed_seq > o.resume_after,
                now,
                s.batch.linger,
                s.order,
            )
        })
        .collect();
    let (commands, command_rx) = flume::bounded(config.buffer.queue_records);
    let protected = protections(&lanes);
    let (progress_tx, progress_rx) = tokio::sync::watch::channel(progress);
    let queue_bytes = buffer::QueueBytes::new(config.buffer.queue_bytes);
    let (writer_beat, forwarder_beat) = (
        systemd::Beat::new("buffer writer"),
        systemd::Beat::new("forwarder"),
    );
    let writer = BufferWriter::new(
        buffer,
        command_rx,
        config.buffer.commit_window,
        buffer::space::group_bytes(reserve),
        progress_tx,
        metrics.clone(),
        names.clone(),
        protected.clone(),
    )
    .with_budget(queue_bytes.clone())
    .with_beat(writer_beat.clone());
    let stop_checkpoints = Arc::new(AtomicBool::new(false));
    let checkpointer = buffer::spawn_checkpointer(&config.buffer.path, stop_checkpoints.clone())
        .map_err(|e| AgentError::Broker(BrokerError::Start(e.to_string())))?;
    let writer = std::thread::Builder::new()
        .name("buffer-writer".into())
        .spawn(move || writer.run())
        .map_err(|e| AgentError::Broker(BrokerError::Start(e.to_string())))?;

    let stop_serving = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(AgentError::Metrics)?;
        let local = listener.local_addr().map_err(AgentError::Metrics)?;
        println!("metrics listening on {local}");
        drop(listener);
        let (m, stop, r) = (metrics.clone(), stop_serving.clone(), ready.clone());
        let buffer = config.buffer.path.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(local, m, r, buffer, stop).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }

    let router = Router::new(
        config.streams.iter().map(|s| s.topics.as_slice()),
        config.default_stream,
    );
    // Bind the client-facing listeners first: a taken address is reported before anything runs.
    let listener = front_door::bind(config.mqtt.listen, "mqtt.listen").await?;
    let listener_v5 = match config.mqtt.listen_v5 {
        Some(addr) => Some(front_door::bind(addr, "mqtt.listen_v5").await?),
        None => None,
    };
    let tls = match &config.mqtt.tls {
        Some(t) => Some((
            front_door::bind(t.listen, "mqtt.tls.listen").await?,
            front_door::tls_acceptor(t).map_err(AgentError::Tls)?,
        )),
        None => None,
    };
    let broker = broker::start(&config.mqtt)?;
    let front_door = FrontDoor::new(
        router,
        &names,
        commands.clone(),
        metrics.clone(),
        broker.internal,
        broker.internal_v5,
        &config.mqtt,
        queue_bytes,
        access::Access {
            users,
            allow_anonymous: config.mqtt.auth.allow_anonymous,
            acl: access::Acl::new(config.mqtt.acl.clone()),
        },
    );
    let bound = |l: &tokio::net::TcpListener, key, addr| {
        l.local_addr()
            .map_err(|source| BrokerError::Bind { key, addr, source })
    };
    println!(
        "mqtt listening on {}",
        bound(&listener, "mqtt.listen", config.mqtt.listen)?
    );
    front_door.serve(listener);
    if let (Some(l), Some(addr)) = (listener_v5, config.mqtt.listen_v5) {
        // A second address serving both protocol versions, like the first.
        println!("mqtt5 listening on {}", bound(&l, "mqtt.listen_v5", addr)?);
        front_door.serve(l);
    }
    if let (Some((l, acceptor)), Some(t)) = (tls, &config.mqtt.tls) {
        println!(
            "mqtts listening on {}",
            bound(&l, "mqtt.tls.listen", t.listen)?
        );
        front_door.serve_tls(l, acceptor);
    }
    tracing::info!(device = %config.device_id, streams = streams.len(), buffer = %config.buffer.path.display(), "edge-agent running");

    let token: forwarder::SharedToken = Arc::new(std::sync::RwLock::new(token));
    let forwarder = Forwarder {
        device_id: config.device_id.clone(),
        epoch,
        ingest: config.ingest.clone(),
        token: token.clone(),
        streams,
        lanes,
        schedule: config.schedule,
        readers,
        commands: commands.clone(),
        protected,
        progress: progress_rx,
        metrics,
        beat: forwarder_beat.clone(),
    };
    let stop_forwarding = CancellationToken::new();
    let forwarder = tokio::spawn(forwarder.run(stop_forwarding.clone()));

    ready.store(true, Ordering::Relaxed);
    systemd::notify("READY=1");
    let stop_watchdog = CancellationToken::new();
    tokio::spawn(systemd::watchdog(
        vec![writer_beat, forwarder_beat],
        stop_watchdog.clone(),
    ));
    // Supervision: a stage that stops on its own (the buffer writer, the forwarder, rumqttd)
    // stops the agent, which exits non-zero so systemd restarts it; it never runs half alive.
    // SIGHUP (`systemctl reload`) reloads the MQTT users and ACL from `config_file`.
    let died = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break None,
            stage = stopped_stage(&writer, &forwarder, &broker.thread) => break Some(stage),
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(file) = &config_file {
                    reload(file, &config, &front_door, &token).await;
                }
            }
        }
    };
    ready.store(false, Ordering::Relaxed);
    stop_watchdog.cancel();
    systemd::notify("STOPPING=1");
    match died {
        None => tracing::info!("shutting down: no more MQTT input"),
        Some(stage) => tracing::error!(
            stage,
            "a stage stopped unexpectedly: stopping the agent (exit status 1; systemd restarts it)"
        ),
    }
    front_door.close();
    stop_forwarding.cancel();
    // Each step is bounded, so a stop ends within STOP_BOUND whatever the disk does (systemd's
    // TimeoutStopSec is 30 s): the front door's connections end within their grace (they
    // acknowledge what the writer commits meanwhile), then the writer's last commits.
    drop(front_door);
    let _ = bounded(Duration::from_secs(1), forwarder).await;
    let waiting = commands.len();
    drop(commands);
    let written = bounded(
        buffer::STOP_BOUND,
        tokio::task::spawn_blocking(move || writer.join()),
    )
    .await;
    stop_checkpoints.store(true, Ordering::Relaxed);
    let checkpointed = bounded(
        Duration::from_secs(1),
        tokio::task::spawn_blocking(move || checkpointer.join()),
    )
    .await;
    stop_serving.cancel();
    if !written {
        tracing::error!(
            records_waiting = waiting,
            "stop timed out: records received but not yet committed may be lost"
        );
        return Err(AgentError::Stop);
    }
    if !checkpointed {
        // Everything is committed, but the file may still be written: not a clean stop (the
        // next start checks the whole buffer).
        tracing::warn!("the checkpointer did not stop in time");
        return Err(AgentError::Stop);
    }
    if let Some(stage) = died {
        return Err(AgentError::StageStopped(stage));
    }
    tracing::info!("stopped; everything received is in the buffer");
    Ok(())
}

/// What a reload puts in force, read and checked: the config, its users, its token, and its
/// MQTT TLS acceptor (if it has TLS).
pub type Reloaded = (
    AgentConfig,
    access::Users,
    String,
    Option<tokio_rustls::TlsAcceptor>,
);

/// Reads and checks everything a reload of `file` takes, changing nothing (also what
/// `edge-agent reload` checks before it signals the agent); the error names the key.
pub fn check_reload(file: &std::path::Path) -> Result<Reloaded, String> {
    let config = AgentConfig::load(file).map_err(|e| e.to_string())?;
    let users = match &config.mqtt.auth.users_file {
        Some(users) => access::Users::load(users).map_err(|e| e.to_string())?,
        None => access::Users::default(),
    };
    let token = config::resolve_token(file, &config.ingest.token).map_err(|e| e.to_string())?;
    let tls = config
        .mqtt
        .tls
        .as_ref()
        .map(front_door::tls_acceptor)
        .transpose()?;
    Ok((config, users, token, tls))
}

/// Reloads what can change under running connections from `file`: the MQTT users file, the
/// ACL and anonymous access ([`FrontDoor::set_access`]; open connections stay unless their
/// credentials are revoked), the MQTT TLS certificate files (new connections), and the ingest
/// token. Everything is read and checked before anything changes: a file that fails is
/// refused whole and the running config stays. Other changed settings are named and take
/// effect at the next start.
async fn reload(
    file: &std::path::Path,
    running: &AgentConfig,
    front_door: &FrontDoor,
    token: &forwarder::SharedToken,
) {
    let path = file.to_owned();
    let loaded = tokio::task::spawn_blocking(move || check_reload(&path)).await;
    let (mut new, users, new_token, tls) = match loaded {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "SIGHUP: config refused, the running config stays");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: reload failed");
            return;
        }
    };
    front_door.set_access(access::Access {
        users,
        allow_anonymous: new.mqtt.auth.allow_anonymous,
        acl: access::Acl::new(new.mqtt.acl.clone()),
    });
    if let (Some(acceptor), Some(_)) = (tls, &running.mqtt.tls) {
        front_door.set_tls(acceptor);
    }
    *token
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = new_token;
    // Worked out at start from the volume, not read from the file.
    new.buffer.reserve_bytes = running.buffer.reserve_bytes;
    let mut later = Vec::new();
    let same =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    let mut mqtt = new.mqtt.clone();
    (mqtt.auth, mqtt.acl) = (running.mqtt.auth.clone(), running.mqtt.acl.clone());
    for (name, unchanged) in [
        ("device_id", new.device_id == running.device_id),
        ("ingest", same(&new.ingest, &running.ingest)),
        ("mqtt (other than auth and acl)", same(&mqtt, &running.mqtt)),
        ("buffer", same(&new.buffer, &running.buffer)),
        ("streams", same(&new.streams, &running.streams)),
        (
            "metrics_listen",
            new.metrics_listen == running.metrics_listen,
        ),
    ] {
        if !unchanged {
            later.push(name);
        }
    }
    tracing::info!(
        "SIGHUP: MQTT users, ACL, anonymous access, TLS certificates and ingest token reloaded"
    );
    if !later.is_empty() {
        tracing::warn!(settings = ?later, "SIGHUP: these changed in the file but take effect only at the next start");
    }
}

/// Which stage stopped on its own, once one does.
async fn stopped_stage(
    writer: &std::thread::JoinHandle<()>,
    forwarder: &tokio::task::JoinHandle<()>,
    broker: &std::thread::JoinHandle<()>,
) -> &'static str {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        for (stopped, stage) in [
            (writer.is_finished(), "buffer writer"),
            (forwarder.is_finished(), "forwarder"),
            (broker.is_finished(), "embedded MQTT broker"),
        ] {
            if stopped {
                return stage;
            }
        }
    }
}

/// The longest a clean stop takes: the broker's drain, the forwarder's stop, the writer's
/// last commits and the checkpointer, each bounded.
pub const STOP_BOUND: Duration = Duration::from_secs(20);

/// Waits for `task` at most `limit`; whether it ended in time.
async fn bounded<T>(limit: Duration, task: tokio::task::JoinHandle<T>) -> bool {
    tokio::time::timeout(limit, task).await.is_ok()
}
