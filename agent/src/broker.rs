//! The embedded MQTT broker (rumqttd) and the link that moves every publish into the buffer.
//!
//! Invariant: every publish the broker hands over becomes exactly one [`WriterCommand::Append`]
//! (routed to one stream); none is filtered out. rumqttd keeps a bounded in-memory log per
//! filter and SILENTLY skips what a lagging reader has not read; so the link reader does nothing
//! but route and hand over, and every record rumqttd skipped is counted (from gaps in its per-filter offsets) and logged as loss.
//!
//! rumqttd acknowledges QoS 1 on receipt, before the record is in SQLite: a crash (not a clean
//! stop) can lose what was received in the current commit window.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ingest_wire::{LossReason, LossReport};
use rumqttd::local::{LinkError, LinkRx};
use rumqttd::{ConnectionSettings, Notification, RouterConfig, ServerSettings};

use crate::buffer::{NewRecord, WriterCommand};
use crate::config::MqttConfig;
use crate::metrics::Metrics;
use crate::routing::Router;

/// Stream label of records rumqttd skipped: they are gone, so their stream is unknown.
pub const OVERFLOW_STREAM: &str = "(unknown)";
/// How long the link must be quiet during shutdown before the reader stops.
const SHUTDOWN_QUIET: Duration = Duration::from_millis(300);
/// Longest the reader keeps draining after shutdown was asked.
const SHUTDOWN_MAX: Duration = Duration::from_secs(5);
/// Longest [`RunningBroker::stop`] may take: the drain, and handing its last record to a queue
/// the writer is emptying.
pub const STOP_BOUND: Duration = Duration::from_secs(6);

/// The broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A listener address cannot be bound. The agent exits; pick a free address.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        /// Config key of the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// rumqttd refused to set up the broker or its link.
    #[error("embedded MQTT broker failed to start: {0}")]
    Start(String),
}

/// The running broker: its internal loopback addresses (clients reach them through the
/// [`crate::gate`]), and the link reader to join on shutdown.
pub struct RunningBroker {
    /// Internal MQTT 3.1.1 address.
    pub internal: SocketAddr,
    /// Internal MQTT 5 address, if MQTT 5 is configured.
    pub internal_v5: Option<SocketAddr>,
    stop: Arc<AtomicBool>,
    reader: std::thread::JoinHandle<()>,
}

impl RunningBroker {
    /// Stops taking records from the broker once it has been quiet briefly, and waits for the
    /// reader, so everything the broker acknowledged so far reaches the buffer queue.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.reader.join();
    }
}

/// Ports the internal rumqttd listeners are picked from: below Linux's ephemeral range
/// (32768–60999), so no outgoing connection (the gate opens one per client) can take the port
/// between the moment it is found free and the moment rumqttd binds it.
const INTERNAL_PORTS: std::ops::Range<u16> = 20_000..26_000;

/// A free loopback address for an internal listener (rumqttd does not report the port it got,
/// so it cannot be given port 0).
fn internal_addr(key: &'static str) -> Result<SocketAddr, BrokerError> {
    let mut last = None;
    for _ in 0..64 {
        let addr = SocketAddr::from(([127, 0, 0, 1], rand::random_range(INTERNAL_PORTS)));
        match TcpListener::bind(addr) {
            Ok(_) => return Ok(addr),
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, source) = last.expect("invariant: at least one attempt");
    Err(BrokerError::Bind { key, addr, source })
}

fn server(name: &str, listen: SocketAddr, config: &MqttConfig) -> ServerSettings {
    ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: config.max_payload_bytes,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// Starts rumqttd on the configured listeners and the link reader feeding `commands`.
pub fn start(
    config: &MqttConfig,
    router: Router,
    stream_names: Vec<String>,
    commands: crate::buffer::Queue,
    metrics: Metrics,
) -> Result<RunningBroker, BrokerError> {
    // rumqttd listens on loopback only; the gate owns the configured addresses.
    let listen = internal_addr("mqtt.listen")?;
    let listen_v5 = config
        .listen_v5
        .map(|_| internal_addr("mqtt.listen_v5"))
        .transpose()?;
    let rumqttd_config = rumqttd::Config {
        id: 0,
        router: RouterConfig {
            max_connections: config.max_connections,
            max_outgoing_packet_count: 500,
            max_segment_size: config.router_segment_bytes,
            max_segment_count: config.router_segments,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([(
            "v4".to_owned(),
            server("mqtt-v4", listen, config),
        )])),
        v5: listen_v5.map(|a| HashMap::from([("v5".to_owned(), server("mqtt-v5", a, config))])),
        ..rumqttd::Config::default()
    };
    let mut broker = rumqttd::Broker::new(rumqttd_config);
    // Links must exist before the broker starts.
    let (mut link_tx, link_rx) = broker
        .link("edge-agent-buffer")
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    link_tx
        .subscribe("#")
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    wait_listening(listen, "mqtt.listen", 4)?;
    if let Some(v5) = listen_v5 {
        wait_listening(v5, "mqtt.listen_v5", 5)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reader_stop = stop.clone();
    let reader = std::thread::Builder::new()
        .name("mqtt-link".into())
        .spawn(move || {
            read_link(
                link_rx,
                link_tx,
                &router,
                &stream_names,
                &commands,
                &metrics,
                &reader_stop,
            )
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    Ok(RunningBroker {
        internal: listen,
        internal_v5: listen_v5,
        stop,
        reader,
    })
}

/// rumqttd binds in a thread of its own and only logs a failure; so wait here until the port
/// answers an MQTT CONNECT with a CONNACK (a bare TCP probe would make rumqttd log an error).
fn wait_listening(
    addr: SocketAddr,
    key: &'static str,
    protocol_level: u8,
) -> Result<(), BrokerError> {
    let target = if addr.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), addr.port())
    } else {
        addr
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match mqtt_handshake(target, protocol_level) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(BrokerError::Bind {
                    key,
                    addr,
                    source: e,
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// CONNECT (clean session), read the CONNACK, DISCONNECT, wait for the broker to close.
fn mqtt_handshake(target: SocketAddr, protocol_level: u8) -> std::io::Result<()> {
    use std::io::{Read, Write};
    const CLIENT_ID: &[u8] = b"edge-agent-probe";
    let mut variable = vec![0, 4, b'M', b'Q', b'T', b'T', protocol_level, 0x02, 0, 10];
    if protocol_level == 5 {
        variable.push(0); // no properties
    }
    variable.extend_from_slice(&(CLIENT_ID.len() as u16).to_be_bytes());
    variable.extend_from_slice(CLIENT_ID);
    let mut packet = vec![0x10, variable.len() as u8];
    packet.extend(variable);
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(&packet)?;
    let mut header = [0u8; 2];
    stream.read_exact(&mut header)?;
    if header[0] != 0x20 || header[1] > 127 {
        return Err(std::io::Error::other("not an MQTT CONNACK"));
    }
    // Read all of it: closing with unread bytes would reset the connection.
    let mut rest = vec![0u8; header[1] as usize];
    stream.read_exact(&mut rest)?;
    stream.write_all(&[0xE0, 0x00])?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let _ = stream.read_to_end(&mut rest);
    Ok(())
}

fn read_link(
    mut link_rx: LinkRx,
    // Kept alive: dropping the sending half would disconnect the link from the router.
    _link_tx: rumqttd::local::LinkTx,
    router: &Router,
    stream_names: &[String],
    commands: &crate::buffer::Queue,
    metrics: &Metrics,
    stop: &AtomicBool,
) {
    let received: Vec<_> = stream_names
        .iter()
        .map(|n| metrics.records_received.with_label_values(&[n.as_str()]))
        .collect();
    let overflow = metrics
        .records_dropped
        .with_label_values(&[OVERFLOW_STREAM, "broker_overflow"]);
    // rumqttd numbers each record of a filter's log; a gap means it skipped records.
    // The filter's log starts at offset 0: records skipped before the first read count too.
    let mut next_offset: u64 = 0;
    let mut stop_since: Option<Instant> = None;
    let mut last_activity = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            let since = *stop_since.get_or_insert_with(Instant::now);
            if last_activity.elapsed() >= SHUTDOWN_QUIET || since.elapsed() >= SHUTDOWN_MAX {
                return;
            }
        }
        match link_rx.recv_deadline(Instant::now() + Duration::from_millis(50)) {
            Ok(Some(Notification::Forward(forward))) => {
                last_activity = Instant::now();
                if let Some((_, offset)) = forward.cursor {
                    if offset > next_offset {
                        let lost = offset - next_offset;
                        overflow.inc_by(lost);
                        metrics.broker_overflows.inc();
                        let report = LossReport {
                            stream: None,
                            first_seq: None,
                            last_seq: None,
                            count: lost,
                            reason: LossReason::BrokerOverflow,
                            detected_at_ms: crate::clock::now_ms(),
                        };
                        if commands.send(WriterCommand::Loss(report)).is_err() {
                            return;
                        }
                        tracing::error!(
                            lost,
                            "broker overflow: the buffer writer lagged and rumqttd skipped records; raise mqtt.router_segments or lower the load"
                        );
                    }
                    next_offset = offset + 1;
                }
                let topic = match String::from_utf8(forward.publish.topic.to_vec()) {
                    Ok(t) => t,
                    // MQTT topics are UTF-8; rumqttd already checked. Keep the record anyway.
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                };
                let stream = router.route(&topic);
                received[stream].inc();
                let record = NewRecord {
                    stream,
                    topic,
                    payload: Bytes::clone(&forward.publish.payload),
                    received_at_ms: crate::clock::now_ms(),
                    monotonic_ms: crate::clock::monotonic_ms(),
                };
                if commands.send(WriterCommand::Append(record)).is_err() {
                    tracing::error!("buffer writer is gone; the link reader stops");
                    return;
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                // Without this the router never schedules the link again.
                if link_rx.ready().is_err() {
                    return;
                }
            }
            Ok(Some(_)) | Ok(None) => {}
            Err(LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => {}
            Err(e) => {
                tracing::error!(error = %e, "link to the embedded broker failed");
                return;
            }
        }
    }
}
