//! Edge agent: the gateway end of the pipeline.
//!
//! ```text
//! sensors ─MQTT─▶ front door ─▶ routing ─┐   (source::mqtt: a site's broker, into the same routing)
//! files ─▶ source::file (lines + position) ─┴▶ buffer writer: transforms, then commit ─▶ PUBACK
//!                     └─▶ broker (rumqttd: local subscribers)          │
//!                                  forwarder (batcher: lanes, scheduler; zstd) ─HTTPS─▶ cloud ingest
//! ```
//!
//! The stages, each a task or thread that stops the agent if it stops: [`front_door`] (MQTT
//! sessions, routing by [`routing`], access by [`access`]), [`source`] (files, a site's broker),
//! the [`buffer`] writer (with [`transform`]), [`forwarder`], and [`broker`] (rumqttd). The
//! forwarder's libraries: [`batcher`] (per-stream lanes and the scheduler), [`retry`] (the
//! contract's answers), [`bandwidth`], [`dictionary`]. Around them: [`config`], [`metrics`],
//! [`reload`] (SIGHUP), [`status`], [`logging`], [`systemd`], [`clock`], [`mqtt`] (the packet
//! codec).
//!
//! Guarantees: a QoS 1/2 publish is acknowledged only once its record is committed (synced);
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
pub mod reload;
pub mod retry;
pub mod routing;
pub mod source;
pub mod status;
pub mod systemd;
pub mod transform;

pub use reload::{Reloaded, check_reload};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::batcher::Lane;
use crate::broker::BrokerError;
use crate::buffer::{Buffer, BufferError, BufferReader, BufferStream, BufferWriter, OpenedStream};
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
    /// A thread could not be started (the system is out of threads or memory).
    #[error("cannot start the {what} thread: {source}")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The buffer's view of the configured streams.
fn buffer_streams(config: &AgentConfig) -> Vec<BufferStream> {
    config
        .streams
        .iter()
        .map(|s| BufferStream {
            name: s.name.clone(),
            priority: s.priority,
            ttl: s.ttl,
        })
        .collect()
}

/// The configured streams' transforms, by index.
fn chains(config: &AgentConfig) -> Vec<transform::Chain> {
    config
        .streams
        .iter()
        .map(|s| transform::Chain::new(s.transforms.clone()))
        .collect()
}

/// The streams in force: the configured ones, then the buffer's orphans (streams no longer
/// configured that still hold records), which drain as bulk.
fn with_orphans(config: &AgentConfig, opened: &[OpenedStream]) -> Vec<StreamConfig> {
    let mut streams = config.streams.clone();
    for orphan in opened.iter().filter(|o| o.orphan) {
        streams.push(StreamConfig {
            name: orphan.name.clone(),
            topics: Vec::new(),
            priority: Priority::Bulk,
            batch: BatchTriggers::internal(std::time::Duration::ZERO),
            ttl: None,
            order: batcher::Order::Fifo,
            zstd_level: config.ingest.zstd_level,
            zstd_dictionary: false,
            transforms: Vec::new(),
        });
    }
    streams
}

/// What starting the forwarder takes beside the config: at the start, and again at a reload
/// that changes streams or the uplink.
struct Uplink {
    device_id: String,
    epoch: u64,
    buffer: std::path::PathBuf,
    token: forwarder::SharedToken,
    client: forwarder::SharedClient,
    commands: buffer::Queue,
    protected: Arc<buffer::Protected>,
    progress: tokio::sync::watch::Receiver<Vec<buffer::StreamProgress>>,
    metrics: Metrics,
    beat: systemd::Beat,
}

/// A running forwarder.
struct Forwarding {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Uplink {
    /// Starts a forwarder for the streams in force (`opened`: the configured ones of `config`,
    /// then orphans), each resuming at its oldest record held, with the uplink of `config`;
    /// `protections` (by stream, if any) are ranges that may already be in the log.
    fn start(
        &self,
        config: &AgentConfig,
        opened: &[OpenedStream],
        protections: &[buffer::Protection],
    ) -> Result<Forwarding, BufferError> {
        let streams = with_orphans(config, opened);
        let names: Vec<String> = streams.iter().map(|s| s.name.clone()).collect();
        self.metrics.set_streams(
            &streams
                .iter()
                .map(|s| (s.name.clone(), s.priority))
                .collect::<Vec<_>>(),
        );
        // One read connection per request that may be in flight: reads run beside each other.
        let readers = (0..config.ingest.max_in_flight)
            .map(|_| BufferReader::open(&self.buffer, &names))
            .collect::<Result<Vec<_>, _>>()?;
        // And one for reading a draining stream's next batch while its request is out.
        let ahead_reader = BufferReader::open(&self.buffer, &names)?;
        let progress = self.progress.borrow().clone();
        let now = Instant::now();
        let lanes = opened
            .iter()
            .zip(&streams)
            .zip(&progress)
            .enumerate()
            .map(|(i, ((o, s), p))| {
                let lane = Lane::new(
                    o.resume_after,
                    p.committed_seq > o.resume_after,
                    now,
                    s.batch.linger,
                    s.order,
                );
                match protections.get(i) {
                    Some(p) => lane.may_be_in_log(&p.ranges),
                    None => lane,
                }
            })
            .collect();
        let forwarder = Forwarder {
            device_id: self.device_id.clone(),
            epoch: self.epoch,
            ingest: config.ingest.clone(),
            token: self.token.clone(),
            client: self.client.clone(),
            streams,
            lanes,
            schedule: config.schedule,
            readers,
            ahead_reader: Some(ahead_reader),
            commands: self.commands.clone(),
            protected: self.protected.clone(),
            progress: self.progress.clone(),
            metrics: self.metrics.clone(),
            beat: self.beat.clone(),
        };
        let stop = CancellationToken::new();
        Ok(Forwarding {
            task: tokio::spawn(forwarder.run(stop.clone())),
            stop,
        })
    }
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
    let configured = buffer_streams(&config);
    // The ingest's HTTP client (TLS roots, client certificate) is built before anything opens:
    // a file that cannot be used stops the start at once, and MQTT is not open meanwhile.
    let client = forwarder::http_client(&config.ingest).map_err(AgentError::Tls)?;
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
    for orphan in opened.iter().filter(|o| o.orphan) {
        tracing::warn!(stream = %orphan.name, "stream is no longer configured but has buffered records; draining them as bulk");
    }
    let names: Vec<String> = opened.iter().map(|o| o.name.clone()).collect();
    let progress = buffer.progress();
    let (commands, command_rx) = flume::bounded(config.buffer.queue_records);
    // Each stream's resume point, as a forwarder started now protects it (`Lane::protection`).
    let protected = Arc::new(buffer::Protected::new(
        opened
            .iter()
            .map(|o| buffer::Protection::floor(o.resume_after))
            .collect(),
    ));
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
    .with_gap(config.buffer.commit_gap)
    .with_budget(queue_bytes.clone())
    .with_beat(writer_beat.clone())
    .with_transforms(
        chains(&config),
        transform::Facts::of_this_host(&config.device_id),
    );
    let stop_checkpoints = Arc::new(AtomicBool::new(false));
    let checkpointer = buffer::spawn_checkpointer(&config.buffer.path, stop_checkpoints.clone())
        .map_err(|source| AgentError::Spawn {
            what: "buffer checkpointer",
            source,
        })?;
    let writer = std::thread::Builder::new()
        .name("buffer-writer".into())
        .spawn(move || writer.run())
        .map_err(|source| AgentError::Spawn {
            what: "buffer writer",
            source,
        })?;

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
    // With mqtt.enabled: false, none is bound and rumqttd does not run: the front door only
    // routes what the sources hand in.
    let listeners = match config.mqtt.enabled {
        true => Some(bind_listeners(&config.mqtt).await?),
        false => None,
    };
    let broker = match config.mqtt.enabled {
        true => Some(broker::start(&config.mqtt)?),
        false => None,
    };
    let front_door = FrontDoor::new(
        router,
        &names,
        commands.clone(),
        metrics.clone(),
        broker.as_ref().map(|b| (b.internal, b.internal_v5)),
        &config.mqtt,
        queue_bytes.clone(),
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
    match listeners {
        Some((listener, listener_v5, tls)) => {
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
        }
        None => {
            println!("mqtt disabled: no embedded broker, records come from the sources");
            tracing::info!(
                sources = config.sources.len() + config.mqtt_sources.len(),
                "mqtt.enabled is false: no MQTT listener and no embedded broker"
            );
        }
    }
    tracing::info!(device = %config.device_id, streams = names.len(), buffer = %config.buffer.path.display(), "edge-agent running");

    let uplink = Uplink {
        device_id: config.device_id.clone(),
        epoch,
        buffer: config.buffer.path.clone(),
        token: Arc::new(std::sync::RwLock::new(token)),
        client: Arc::new(std::sync::RwLock::new(client)),
        commands: commands.clone(),
        protected,
        progress: progress_rx,
        metrics,
        beat: forwarder_beat.clone(),
    };
    let mut forwarding = uplink.start(&config, &opened, &[])?;
    // File sources, each resuming at the positions the buffer holds for it.
    let stop_sources = CancellationToken::new();
    let mut sources = Vec::new();
    for spec in &config.sources {
        let saved =
            source::file::saved_positions(&config.buffer.path, &spec.key()).map_err(|source| {
                BufferError::Sqlite {
                    path: config.buffer.path.clone(),
                    source,
                }
            })?;
        let tail = source::file::FileSource::new(
            spec.clone(),
            saved,
            commands.clone(),
            queue_bytes.clone(),
            uplink.metrics.clone(),
        );
        sources.push(tokio::spawn(tail.run(stop_sources.clone())));
    }
    // Upstream brokers: their messages enter through the front door's routing.
    for spec in &config.mqtt_sources {
        let upstream = source::mqtt::MqttSource::new(spec.clone(), front_door.intake());
        sources.push(tokio::spawn(upstream.run(stop_sources.clone())));
    }
    let mut config = config;

    ready.store(true, Ordering::Relaxed);
    systemd::notify("READY=1");
    let stop_watchdog = CancellationToken::new();
    tokio::spawn(systemd::watchdog(
        vec![writer_beat, forwarder_beat],
        stop_watchdog.clone(),
    ));
    // Supervision: a stage that stops on its own (the buffer writer, the forwarder, rumqttd)
    // stops the agent, which exits non-zero so systemd restarts it; it never runs half alive.
    // SIGHUP (`systemctl reload`) reloads the config from `config_file`.
    enum Event {
        Stop,
        Stopped(&'static str),
        Hangup,
    }
    let died = loop {
        let event = tokio::select! {
            // A stop first: a forwarder ended by a reload cut short by it is no failure.
            biased;
            _ = shutdown.cancelled() => Event::Stop,
            stage = stopped_stage(&writer, &forwarding.task, broker.as_ref().map(|b| &b.thread), &sources) => Event::Stopped(stage),
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => Event::Hangup,
        };
        match event {
            Event::Stop => break None,
            Event::Stopped(stage) => break Some(stage),
            Event::Hangup => {
                if let Some(file) = &config_file
                    && let Err(stage) = reload::apply(
                        file,
                        &mut config,
                        reload::Pipeline {
                            front_door: &front_door,
                            uplink: &uplink,
                            forwarding: &mut forwarding,
                            writer: &writer,
                            shutdown: &shutdown,
                        },
                    )
                    .await
                {
                    break Some(stage);
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
    forwarding.stop.cancel();
    // The sources stop reading; what they sent is in the queue, committed below.
    stop_sources.cancel();
    // One deadline for all (aborted past it: they must let go of the writer's queue).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    for source in sources {
        let abort = source.abort_handle();
        if tokio::time::timeout_at(deadline, source).await.is_err() {
            abort.abort();
        }
    }
    // Each step is bounded, so a stop ends within STOP_BOUND whatever the disk does (systemd's
    // TimeoutStopSec is 30 s): the front door's connections end within their grace (they
    // acknowledge what the writer commits meanwhile), then the writer's last commits.
    drop(front_door);
    // (A reload may have awaited it already, if it ended meanwhile.)
    if !forwarding.task.is_finished() {
        let _ = bounded(Duration::from_secs(1), forwarding.task).await;
    }
    let waiting = commands.len();
    // The writer ends once every sender of its queue is gone.
    drop(uplink);
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

/// Which stage stopped on its own, once one does.
async fn stopped_stage(
    writer: &std::thread::JoinHandle<()>,
    forwarder: &tokio::task::JoinHandle<()>,
    broker: Option<&std::thread::JoinHandle<()>>,
    sources: &[tokio::task::JoinHandle<()>],
) -> &'static str {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        for (stopped, stage) in [
            (writer.is_finished(), "buffer writer"),
            (forwarder.is_finished(), "forwarder"),
            (
                broker.is_some_and(|b| b.is_finished()),
                "embedded MQTT broker",
            ),
            (
                sources.iter().any(|s| s.is_finished()),
                "source (file or upstream broker)",
            ),
        ] {
            if stopped {
                return stage;
            }
        }
    }
}

/// The MQTT listener, the MQTT 5 one and the TLS one (with its acceptor), as configured.
type Listeners = (
    tokio::net::TcpListener,
    Option<tokio::net::TcpListener>,
    Option<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
);

/// Binds the front door's listeners.
async fn bind_listeners(mqtt: &config::MqttConfig) -> Result<Listeners, AgentError> {
    let listener = front_door::bind(mqtt.listen, "mqtt.listen").await?;
    let listener_v5 = match mqtt.listen_v5 {
        Some(addr) => Some(front_door::bind(addr, "mqtt.listen_v5").await?),
        None => None,
    };
    let tls = match &mqtt.tls {
        Some(t) => Some((
            front_door::bind(t.listen, "mqtt.tls.listen").await?,
            front_door::tls_acceptor(t).map_err(AgentError::Tls)?,
        )),
        None => None,
    };
    Ok((listener, listener_v5, tls))
}

/// The longest a clean stop takes: the broker's drain, the forwarder's stop, the writer's
/// last commits and the checkpointer, each bounded.
pub const STOP_BOUND: Duration = Duration::from_secs(20);

/// Waits for `task` at most `limit`; whether it ended in time.
async fn bounded<T>(limit: Duration, task: tokio::task::JoinHandle<T>) -> bool {
    tokio::time::timeout(limit, task).await.is_ok()
}
