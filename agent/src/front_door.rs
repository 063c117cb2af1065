//! The MQTT front door: the agent owns the client sockets and keeps every publish itself.
//!
//! ```text
//! client ─MQTT 3.1.1/5─▶ front door ─PUBLISH─▶ routing ─▶ buffer writer ─commit─▶ PUBACK/PUBREC
//!                            │ everything else, and a QoS 0 copy of each publish
//!                            ▼
//!                     rumqttd (loopback) ─▶ local subscribers on the gateway
//! ```
//!
//! Invariants:
//! - a QoS 1 PUBACK and a QoS 2 PUBREC are written only after the record's commit (fsync), in
//!   the order the publishes came; a publish the disk cannot take is never acknowledged (MQTT 5:
//!   a PUBACK with reason 0x97; 3.1.1: the connection is closed, the client resends);
//! - a QoS 2 publish is stored once per packet id until its PUBREL; a QoS 1 resend (DUP) of a
//!   publish this session already kept (same packet id, topic and payload) is acknowledged
//!   again, not stored again. Sessions live in the agent's memory: a resend after the agent
//!   restarted is stored again (the window is the agent's uptime);
//! - every topic is kept, `$…` topics included (the durable path does not go through rumqttd's
//!   subscriptions), and rumqttd can no longer skip a record the agent acknowledged;
//! - rumqttd only ever sees client ids of `[0-9a-zn]`, each once, with clean sessions (ids with
//!   `/`, `+`, `#` or `$`, and duplicate ids, crash or confuse it)
//!   and publishes at QoS 0, and those only while a client that subscribed through the door is
//!   connected (a persistent subscriber that is offline misses copies meanwhile);
//! - a client's durable publishing never depends on rumqttd: if rumqttd drops the relay, the
//!   connection goes on without local pub/sub; the door answers PINGREQ and enforces the
//!   keep-alive itself, and a second connection with a client id takes the session over;
//! - once closed, no byte from a client is read, so nothing new is taken; acknowledgements of
//!   what was taken still go out while the buffer commits it;
//! - what one client may cost (its publish rate, what rumqttd retains): see [`limits`].

mod limits;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::access::{Access, Client};
use crate::broker::BrokerError;
use crate::buffer::{NewRecord, Queue, QueueBytes, Receipt, Receipts, WriterCommand};
use crate::config::{MqttConfig, RateLimit, RetainedLimits};
use crate::metrics::Metrics;
use crate::mqtt::{self, Frame, kind};
use crate::routing::Router;

/// A client must send its CONNECT within this time after the TCP connection opens.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most persistent sessions (clean session off) whose publish ids the agent remembers.
const MAX_SESSIONS: usize = 10_000;
/// Most bytes of topics an MQTT 5 client may park behind topic aliases.
const MAX_ALIAS_BYTES: usize = 1 << 20;
/// Frames queued towards one client (or towards rumqttd for it) before their sender waits...
const OUTBOUND_FRAMES: usize = 256;
/// ...or bytes of them (a frame larger than this takes all of it).
const OUTBOUND_BYTES: u32 = 1 << 20;
/// Frames smaller than this queued together towards one peer are written at once.
const COALESCE_BYTES: usize = 64 << 10;
/// Longest a retained publish's copy waits for room towards rumqttd (it is dropped, and
/// counted, after).
const RETAINED_WAIT: Duration = Duration::from_secs(1);
/// How long a closing connection waits for the commits it still has to acknowledge.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// What the front door shares between connections.
pub struct FrontDoor {
    closing: CancellationToken,
    ctx: Arc<Ctx>,
}

struct Ctx {
    /// Held (read) from routing a publish until it is queued for the writer; replaced by a
    /// reload ([`FrontDoor::pause_routing`]).
    routes: tokio::sync::RwLock<Routes>,
    queue: Queue,
    metrics: Metrics,
    /// rumqttd's internal listeners, for MQTT 3.1.1 and 5 clients; `None` when the embedded
    /// broker does not run (`mqtt.enabled: false`: nothing is served then).
    upstream: Option<(SocketAddr, SocketAddr)>,
    /// Largest packet a client may send.
    max_packet: usize,
    /// Publish ids of persistent sessions, by client id.
    sessions: Mutex<HashMap<String, Arc<Mutex<Session>>>>,
    /// Open connections, against `mqtt.max_connections`.
    connections: Arc<tokio::sync::Semaphore>,
    /// Who may connect, publish and subscribe: replaced whole by a reload
    /// ([`FrontDoor::set_access`]), which `access_changed` announces to the open connections.
    access: std::sync::RwLock<Arc<Access>>,
    access_changed: tokio::sync::watch::Sender<u64>,
    /// Counts the reloads that changed the ACL.
    acl_generation: std::sync::atomic::AtomicU64,
    /// The TLS listener's acceptor: replaced by a reload ([`FrontDoor::set_tls`]).
    tls: std::sync::RwLock<Option<tokio_rustls::TlsAcceptor>>,
    /// Password checks (Argon2: CPU and memory) running at once.
    verifying: Arc<tokio::sync::Semaphore>,
    /// The open connection of each client id (its number and how to end it), for takeovers.
    live: Mutex<HashMap<String, (u64, CancellationToken)>>,
    connection_numbers: std::sync::atomic::AtomicU64,
    /// Connections that subscribed through the door and are still open: copies of publishes
    /// go to rumqttd only while there is one (routing them costs it CPU for nobody).
    local_subscribers: std::sync::atomic::AtomicUsize,
    /// Bytes of records queued for the writer.
    queue_bytes: QueueBytes,
    /// Per-client publish rate, if limited.
    rate_limit: Option<RateLimit>,
    /// Largest payload.
    max_payload: usize,
    /// What rumqttd retains, and its bounds.
    retained: Mutex<limits::Retained>,
    retained_limits: RetainedLimits,
}

/// Where other sources hand records to the front door's routing (the upstream broker
/// source): routed and queued as a publish of a connection is.
#[derive(Clone)]
pub struct Intake {
    ctx: Arc<Ctx>,
}

impl Intake {
    /// Routes `topic` and queues its record (waiting for room in the queue); `receipt` is told
    /// once it is committed. `Err`: the buffer writer is gone.
    pub async fn keep(
        &self,
        topic: String,
        payload: Bytes,
        receipt: Option<crate::buffer::Receipt>,
    ) -> Result<(), ()> {
        let routes = self.ctx.routes.read().await;
        let stream = routes.route(&topic);
        let record = NewRecord {
            stream,
            topic,
            payload,
            received_at_ms: crate::clock::now_ms(),
            monotonic_ms: crate::clock::monotonic_ms(),
            attributes: Default::default(),
            receipt,
        };
        let kept = self.ctx.keep(WriterCommand::Append(record)).await;
        drop(routes);
        kept
    }

    /// A message over `mqtt.max_payload_bytes` was dropped (counted as lost).
    pub fn dropped_too_large(&self) {
        self.ctx
            .metrics
            .records_dropped
            .with_label_values(&["(upstream broker)", "too_large"])
            .inc();
    }
}

/// Where publishes go: the stream of each topic, and each stream's
/// `agent_records_received_total`.
pub struct Routes {
    router: Router,
    received: Vec<prometheus::IntCounter>,
}

impl Routes {
    /// Routes by `router` into the streams named `stream_names` (by index).
    pub fn new(router: Router, stream_names: &[String], metrics: &Metrics) -> Routes {
        Routes {
            router,
            received: stream_names
                .iter()
                .map(|n| metrics.records_received.with_label_values(&[n.as_str()]))
                .collect(),
        }
    }

    /// The stream index of `topic`, counted as received.
    fn route(&self, topic: &str) -> usize {
        let stream = self.router.route(topic);
        self.received[stream].inc();
        stream
    }
}

/// What a session remembers of its client's publishes, for exactly-once.
#[derive(Debug, Default)]
struct Session {
    /// QoS 1 publishes kept: packet id → checksum of topic and payload.
    kept: HashMap<u16, u32>,
    /// QoS 2 publishes kept and not yet released (PUBREL).
    unreleased: HashSet<u16>,
}

/// The TLS acceptor for `mqtt.tls`: the certificate chain and key (and the client CAs, for
/// mTLS) read now (start-up I/O); the error names the key and the file.
pub fn tls_acceptor(tls: &crate::config::TlsConfig) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::server::WebPkiClientVerifier;
    let (cert_file, key_file) = (&tls.cert_file, &tls.key_file);
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("mqtt.tls.cert_file: {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "mqtt.tls.cert_file: {}: no PEM certificate in it",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("mqtt.tls.key_file: {}: {e}", key_file.display()))?;
    let builder = tokio_rustls::rustls::ServerConfig::builder();
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let named = |e: &dyn std::fmt::Display| {
                format!("mqtt.tls.client_ca_file: {}: {e}", ca_file.display())
            };
            let mut roots = tokio_rustls::rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(ca_file).map_err(|e| named(&e))? {
                roots
                    .add(ca.map_err(|e| named(&e))?)
                    .map_err(|e| named(&e))?;
            }
            if roots.is_empty() {
                return Err(named(&"no PEM certificate in it"));
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
            let verifier = if tls.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| named(&e))?)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("mqtt.tls: the certificate and key do not go together: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Binds a client-facing listener; the error names the config key.
pub async fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, BrokerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BrokerError::Bind { key, addr, source })
}

/// The stem of the id rumqttd knows a client's relay by: a digest of the client's id, so any id
/// a client may use (with `/`, `+`, `#`, `$`, long, UTF-8) is safe there. Pure.
pub fn upstream_id(client_id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(client_id.as_bytes());
    format!("gw{}", hex::encode(&digest[..15]))
}

impl FrontDoor {
    /// A front door handing publishes to `queue`, relaying the rest to rumqttd, with the
    /// limits of `mqtt`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        router: Router,
        stream_names: &[String],
        queue: Queue,
        metrics: Metrics,
        upstream: Option<(SocketAddr, SocketAddr)>,
        mqtt: &MqttConfig,
        queue_bytes: QueueBytes,
        access: Access,
    ) -> FrontDoor {
        let max_payload = mqtt.max_payload_bytes;
        FrontDoor {
            closing: CancellationToken::new(),
            ctx: Arc::new(Ctx {
                routes: tokio::sync::RwLock::new(Routes::new(router, stream_names, &metrics)),
                queue,
                metrics,
                upstream,
                // Topic, properties and header around the largest payload.
                max_packet: max_payload + 65_536 + 1024,
                sessions: Mutex::new(HashMap::new()),
                connections: Arc::new(tokio::sync::Semaphore::new(mqtt.max_connections)),
                access: std::sync::RwLock::new(Arc::new(access)),
                access_changed: tokio::sync::watch::Sender::new(0),
                tls: std::sync::RwLock::new(None),
                acl_generation: std::sync::atomic::AtomicU64::new(0),
                verifying: Arc::new(tokio::sync::Semaphore::new(2)),
                local_subscribers: std::sync::atomic::AtomicUsize::new(0),
                live: Mutex::new(HashMap::new()),
                connection_numbers: std::sync::atomic::AtomicU64::new(1),
                queue_bytes,
                rate_limit: mqtt.rate_limit,
                max_payload,
                retained: Mutex::default(),
                retained_limits: mqtt.retained,
            }),
        }
    }

    /// Puts `access` in force (a reload): new connections, publishes and subscriptions are
    /// checked against it from now on; an open connection is closed when its credentials are
    /// revoked (its user gone or given another password, or anonymous access turned off), its
    /// groups changed, or it holds a subscription made under an ACL that changed (the client
    /// subscribes again, under the new rules).
    pub fn set_access(&self, access: Access) {
        {
            let mut current = self
                .ctx
                .access
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // The generation moves before the new rules are seen, so a SUBSCRIBE checked
            // against the old rules is never taken for one under the new.
            if format!("{:?}", current.acl) != format!("{:?}", access.acl) {
                self.ctx
                    .acl_generation
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            *current = Arc::new(access);
        }
        self.ctx
            .access_changed
            .send_modify(|generation| *generation += 1);
    }

    /// Holds publishes back while the guard lives (a reload): once it is held, every publish
    /// routed before is in the writer's queue, and none is routed until it is dropped. A new
    /// [`Routes`] set through it is used from then on. Connections stay open meanwhile; their
    /// publishes wait.
    pub async fn pause_routing(&self) -> tokio::sync::RwLockWriteGuard<'_, Routes> {
        self.ctx.routes.write().await
    }

    /// Where other sources hand their records in.
    pub fn intake(&self) -> Intake {
        Intake {
            ctx: self.ctx.clone(),
        }
    }

    /// Serves every connection accepted on `listener` (MQTT 3.1.1 and 5 alike).
    pub fn serve(&self, listener: TcpListener) {
        self.accept(listener, false);
    }

    /// Serves MQTT over TLS on `listener`: the handshake, then the same as [`FrontDoor::serve`].
    pub fn serve_tls(&self, listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
        self.set_tls(acceptor);
        self.accept(listener, true);
    }

    /// Serves new TLS connections with `acceptor` from now on (a reload of the certificate
    /// files); open connections keep theirs.
    pub fn set_tls(&self, acceptor: tokio_rustls::TlsAcceptor) {
        *self
            .ctx
            .tls
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(acceptor);
    }

    /// The accept loop of a listener: over `mqtt.max_connections` a client is answered "server
    /// unavailable"; with `tls`, the handshake counts against the CONNECT timeout.
    fn accept(&self, listener: TcpListener, with_tls: bool) {
        let closing = self.closing.clone();
        let ctx = self.ctx.clone();
        // Refusals answered at once (each may take a TLS handshake); beyond, a refused client
        // is just disconnected.
        let refusing = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSING));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = closing.cancelled() => return,
                };
                let client = match accepted {
                    Ok((client, _)) => client,
                    Err(e) => {
                        // Out of file descriptors, mostly: wait rather than spin.
                        tracing::warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = client.set_nodelay(true);
                let tls = if with_tls {
                    ctx.tls
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone()
                } else {
                    None
                };
                let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
                    ctx.metrics.mqtt_refused.inc();
                    let Ok(turn) = refusing.clone().try_acquire_owned() else {
                        continue;
                    };
                    match &tls {
                        None => {
                            tokio::spawn(async move {
                                refuse(client).await;
                                drop(turn);
                            });
                        }
                        Some(acceptor) => {
                            let acceptor = acceptor.clone();
                            tokio::spawn(async move {
                                if let Ok(Ok(tls)) =
                                    tokio::time::timeout(REFUSE_WITHIN, acceptor.accept(client))
                                        .await
                                {
                                    refuse(tls).await;
                                }
                                drop(turn);
                            });
                        }
                    }
                    continue;
                };
                let (ctx, closing, tls) = (ctx.clone(), closing.clone(), tls.clone());
                ctx.metrics.mqtt_connections.inc();
                tokio::spawn(async move {
                    let ended = match tls {
                        None => connection(client, None, &ctx, &closing).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(client))
                                .await
                            {
                                Ok(Ok(tls)) => {
                                    let identity = certificate_identity(&tls);
                                    connection(tls, identity, &ctx, &closing).await
                                }
                                Ok(Err(e)) => Err(e.into()),
                                Err(_) => Err(ConnectionError::ConnectTimeout(CONNECT_TIMEOUT)),
                            }
                        }
                    };
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "MQTT connection closed");
                    }
                    ctx.metrics.mqtt_connections.dec();
                    drop(permit);
                });
            }
        });
    }

    /// Stops accepting connections and reading client bytes; acknowledgements of what was
    /// taken still go out.
    pub fn close(&self) {
        self.closing.cancel();
    }
}

/// Clients over `mqtt.max_connections` answered at once per listener; more are disconnected.
const MAX_REFUSING: usize = 64;

/// How long a client refused for `mqtt.max_connections` has to send its CONNECT (and over
/// TLS, to finish its handshake first).
const REFUSE_WITHIN: Duration = Duration::from_secs(2);

/// Over `mqtt.max_connections`: read the CONNECT (briefly) and answer "server unavailable".
async fn refuse(mut client: impl AsyncRead + AsyncWrite + Unpin) {
    let mut buf = BytesMut::with_capacity(512);
    let read = tokio::time::timeout(REFUSE_WITHIN, client.read_buf(&mut buf)).await;
    let v5 = matches!(read, Ok(Ok(_))) && buf.get(8) == Some(&5);
    let answer: &[u8] = if v5 {
        &[0x20, 3, 0, 0x9F, 0] // connection rate exceeded
    } else {
        &[0x20, 2, 0, 3] // server unavailable
    };
    let _ = client.write_all(answer).await;
    let _ = client.shutdown().await;
}

#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Mqtt(#[from] mqtt::MqttError),
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Protocol(&'static str),
}

/// The sending side of a [`pump`]: bounded in frames and in bytes, so a slow reader holds at
/// most [`OUTBOUND_BYTES`] (or one larger frame) of memory per direction.
#[derive(Clone)]
struct Outbound {
    frames: mpsc::Sender<(Bytes, tokio::sync::OwnedSemaphorePermit)>,
    bytes: Arc<tokio::sync::Semaphore>,
}

impl Outbound {
    fn room(frame: &Bytes) -> u32 {
        u32::try_from(frame.len())
            .unwrap_or(u32::MAX)
            .min(OUTBOUND_BYTES)
    }

    /// Queues `frame`, waiting for room; `Err`: the pump is gone.
    async fn send(&self, frame: Bytes) -> Result<(), ()> {
        let room = self
            .bytes
            .clone()
            .acquire_many_owned(Self::room(&frame))
            .await
            .map_err(|_| ())?;
        self.frames.send((frame, room)).await.map_err(|_| ())
    }

    /// Queues `frame` if there is room now.
    fn try_send(&self, frame: Bytes) -> Result<(), ()> {
        let room = self
            .bytes
            .clone()
            .try_acquire_many_owned(Self::room(&frame))
            .map_err(|_| ())?;
        self.frames.try_send((frame, room)).map_err(|_| ())
    }
}

/// A task writing the frames sent to the returned queue to `sink`, whole and in order, until
/// the queue closes or a write fails; then it shuts `sink` down.
fn pump<W>(mut sink: W) -> (Outbound, tokio::task::JoinHandle<()>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<(Bytes, tokio::sync::OwnedSemaphorePermit)>(OUTBOUND_FRAMES);
    let task = tokio::spawn(async move {
        let mut batch = BytesMut::new();
        let mut rooms = Vec::new();
        while let Some((frame, room)) = rx.recv().await {
            // Frames queued meanwhile go out in the same write (up to 64 KiB).
            let written = if frame.len() >= COALESCE_BYTES {
                sink.write_all(&frame).await
            } else {
                batch.extend_from_slice(&frame);
                rooms.push(room);
                while batch.len() < COALESCE_BYTES {
                    match rx.try_recv() {
                        Ok((next, room)) => {
                            batch.extend_from_slice(&next);
                            rooms.push(room);
                        }
                        Err(_) => break,
                    }
                }
                let written = sink.write_all(&batch).await;
                batch.clear();
                written
            };
            // Their room is free once they are written.
            rooms.clear();
            if written.is_err() {
                break;
            }
        }
        let _ = sink.shutdown().await;
    });
    (
        Outbound {
            frames: tx,
            bytes: Arc::new(tokio::sync::Semaphore::new(OUTBOUND_BYTES as usize)),
        },
        task,
    )
}

/// Reads frames from `reader` into `buf` until a whole one is there.
async fn read_frame(
    reader: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
    limit: usize,
) -> Result<Option<Frame>, ConnectionError> {
    loop {
        if let Some(frame) = mqtt::next_frame(buf, limit)? {
            return Ok(Some(frame));
        }
        if reader.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// One acknowledgement owed to the client.
#[derive(Debug, Clone, Copy)]
struct Ack {
    /// The ticket it waits for.
    ticket: u64,
    pkid: u16,
    /// PUBACK, PUBREC or PUBCOMP.
    kind: u8,
    /// Whether it acknowledges that ticket's own record (else it only waits its turn).
    own: bool,
    /// MQTT 5 reason code, when not success.
    reason: Option<u8>,
}

/// Acknowledgements waiting for their records' commit, in the order owed.
#[derive(Default)]
struct Owed {
    queue: VecDeque<Ack>,
    /// The last ticket handed out on this connection.
    last: u64,
    /// Tickets whose record the buffer refused, not yet answered.
    refused: HashSet<u64>,
    /// A 3.1.1 client's publish was refused: nothing more is acknowledged on this connection
    /// (it cannot be told; it resends what was not acknowledged).
    gave_up: bool,
}

impl Owed {
    /// An acknowledgement that only waits its turn (nothing of its own to commit).
    fn after_the_rest(&mut self, pkid: u16, kind: u8, reason: Option<u8>) {
        self.queue.push_back(Ack {
            ticket: self.last,
            pkid,
            kind,
            own: false,
            reason,
        });
    }
}

/// The user a verified client certificate names (its subject's Common Name), if the client
/// presented one. `Err`: it did, but it names none (such a client is refused).
fn certificate_identity(
    tls: &tokio_rustls::server::TlsStream<TcpStream>,
) -> Option<Result<String, ()>> {
    let cert = tls.get_ref().1.peer_certificates()?.first()?;
    let name = x509_parser::parse_x509_certificate(cert)
        .ok()
        .and_then(|(_, cert)| {
            cert.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned)
        })
        .filter(|n| !n.is_empty());
    Some(name.ok_or(()))
}

/// One client connection, from its CONNECT to its end. `identity`: what its client
/// certificate says (mTLS), see [`authenticate`].
async fn connection<S>(
    client: S,
    identity: Option<Result<String, ()>>,
    ctx: &Ctx,
    closing: &CancellationToken,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let mut inbound = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(
        CONNECT_TIMEOUT,
        read_frame(&mut client_rx, &mut inbound, ctx.max_packet),
    )
    .await
    .map_err(|_| ConnectionError::ConnectTimeout(CONNECT_TIMEOUT))??;
    let Some(first) = first else { return Ok(()) };
    let connect = mqtt::connect(&first)?;
    let v5 = connect.is_v5();
    let by_certificate = matches!(identity, Some(Ok(_)));
    // One snapshot of the rules for the login, its groups and what a reload compares against;
    // a reload from here on is seen by `access_changed`.
    let mut access_changed = ctx.access_changed.subscribe();
    let login_access = ctx.access();
    let user = match authenticate(ctx, &login_access, &connect, identity).await {
        Ok(user) => user,
        Err((v4_code, v5_reason, why)) => {
            ctx.metrics.mqtt_auth_failures.inc();
            tracing::info!(client_id = %connect.client_id, user = connect.username.as_deref().unwrap_or(""), why, "MQTT connection refused");
            let _ = client_tx
                .write_all(&mqtt::connack_refused(v5, v4_code, v5_reason))
                .await;
            return Ok(());
        }
    };
    let groups = user
        .as_deref()
        .map(|u| login_access.users.groups(u).to_vec())
        .unwrap_or_default();
    // What a reload must keep for this connection to stay: the password entry it logged in
    // with (a certificate login answers to its CA, not to the users file), and its groups.
    let credential = user
        .as_deref()
        .filter(|_| !by_certificate)
        .map(|u| login_access.users.credential(u).map(str::to_owned));
    drop(login_access);
    // The ACL generation of this connection's oldest subscription: rumqttd keeps a
    // subscription once made, so a reload that changes the ACL closes the connection (the
    // client subscribes again, under the new rules).
    let mut subscribed_under: Option<u64> = None;
    let who = Client {
        user: user.as_deref(),
        groups: &groups,
        client_id: &connect.client_id,
    };
    let mut denied_logged = false;
    let mut subscribed = false;
    let Some((v4_addr, v5_addr)) = ctx.upstream else {
        return Err(std::io::Error::other("no embedded broker (mqtt.enabled: false)").into());
    };
    let upstream = if v5 { v5_addr } else { v4_addr };
    // A second connection with this client id takes the session over: the first one ends.
    // Each relay gets an id of its own at rumqttd (the client's digest and this connection's
    // number), with a clean session: rumqttd never sees a duplicate id, whose takeover and
    // will handling dropped unrelated connections and panicked under load.
    let taken_over = CancellationToken::new();
    let me = ctx.take_over(&connect.client_id, &taken_over);
    let broker = TcpStream::connect(upstream).await.map_err(|e| {
        tracing::error!(error = %e, "embedded broker unreachable; MQTT connection refused");
        e
    })?;
    let _ = broker.set_nodelay(true);
    let (mut broker_rx, mut broker_tx) = broker.into_split();
    broker_tx
        .write_all(&mqtt::rename_client(
            &first,
            &connect,
            &format!("{}n{me}", upstream_id(&connect.client_id)),
            connect.keep_alive,
        ))
        .await?;
    // Towards rumqttd through a bounded queue: a stalled broker never holds up the durable
    // path (publish copies are dropped, and counted, when it is full).
    let (to_broker, up) = pump(broker_tx);
    // One writer towards the client: rumqttd's packets and the agent's acknowledgements, each
    // whole, in the order they are queued.
    let (out, writer) = pump(client_tx);
    // rumqttd → client, frame by frame; a SUBACK for a partly denied SUBSCRIBE gets the
    // refusals put back in place.
    let broker_gone = CancellationToken::new();
    let subacks: Arc<Mutex<HashMap<u16, Vec<bool>>>> = Arc::default();
    let down = {
        let out = out.clone();
        let gone = broker_gone.clone();
        let limit = ctx.max_packet;
        let subacks = subacks.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(4096);
            while let Ok(Some(frame)) = read_frame(&mut broker_rx, &mut buf, limit).await {
                let frame = match (frame.kind(), mqtt::suback_codes(&frame, v5)) {
                    (kind::SUBACK, Ok((pkid, codes))) => {
                        let keep = subacks
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .remove(&pkid);
                        match keep {
                            Some(keep) => {
                                let mut given = codes.into_iter();
                                let failure = if v5 { 0x87 } else { 0x80 };
                                let all: Vec<u8> = keep
                                    .iter()
                                    .map(|k| {
                                        if *k {
                                            given.next().unwrap_or(failure)
                                        } else {
                                            failure
                                        }
                                    })
                                    .collect();
                                mqtt::suback(pkid, &all, v5)
                            }
                            None => frame.raw,
                        }
                    }
                    (kind::PINGRESP, _) => continue,
                    _ => frame.raw,
                };
                if out.send(frame).await.is_err() {
                    break;
                }
            }
            gone.cancel();
        })
    };

    // MQTT: no packet for 1.5 × keep-alive and the server closes the connection.
    let idle_limit = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let mut idle_deadline = idle_limit.map(|l| tokio::time::Instant::now() + l);
    let mut broker_alive = true;
    let session = if connect.clean || connect.client_id.is_empty() {
        Arc::new(Mutex::new(Session::default()))
    } else {
        ctx.session(&connect.client_id)
    };
    let receipts = Arc::new(Receipts::default());
    let mut owed = Owed::default();
    let mut aliases: HashMap<u16, Bytes> = HashMap::new();
    let mut alias_bytes = 0usize;
    // The will is kept when the client vanishes: not after its DISCONNECT (but MQTT 5's "with
    // will message"), nor when the agent itself stops.
    let mut will_due = connect.will.is_some();
    let rate = ctx
        .rate_limit
        .map(|r| limits::PublishRate::new(r, ctx.max_payload));
    let mut shed = limits::Shed::default();
    // A malformed packet ends the loop like any other end: the will, the takeover entry and
    // the acknowledgements still owed are seen to below.
    macro_rules! or_end {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => break Err(e.into()),
            }
        };
    }
    let result: Result<(), ConnectionError> = loop {
        let frame = tokio::select! {
            f = read_frame(&mut client_rx, &mut inbound, ctx.max_packet) => f,
            _ = receipts.changed() => {
                if !flush(&mut owed, &receipts, &out, v5, &session).await {
                    break Err(ConnectionError::Protocol("a publish was refused: the buffer's disk is full"));
                }
                continue;
            }
            // rumqttd dropping the relay ends local pub/sub for this client, not its durable
            // publishing: the connection goes on without it.
            _ = broker_gone.cancelled(), if broker_alive => {
                broker_alive = false;
                tracing::debug!(client_id = %connect.client_id, "the embedded broker closed its side of this connection");
                continue;
            }
            _ = taken_over.cancelled() => break Ok(()),
            Ok(()) = access_changed.changed() => {
                let access = ctx.access();
                let revoked = match (&user, &credential) {
                    (None, _) => !access.allow_anonymous,
                    (Some(u), Some(login)) => access.users.credential(u) != login.as_deref(),
                    (Some(_), None) => false,
                } || user
                    .as_deref()
                    .is_some_and(|u| access.users.groups(u) != groups.as_slice())
                    || subscribed_under.is_some_and(|generation| {
                        generation < ctx.acl_generation.load(std::sync::atomic::Ordering::Relaxed)
                    });
                if revoked {
                    tracing::info!(client_id = %connect.client_id, user = user.as_deref().unwrap_or(""), "credentials revoked by a reload: connection closed");
                    will_due = false;
                    break Ok(());
                }
                continue;
            }
            _ = sleep_until(idle_deadline) => break Err(ConnectionError::Protocol("keep-alive expired")),
            _ = closing.cancelled() => {
                will_due = false;
                break Ok(());
            }
        };
        if let Some(limit) = idle_limit {
            idle_deadline = Some(tokio::time::Instant::now() + limit);
        }
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        match frame.kind() {
            kind::PUBLISH => {
                let p = or_end!(mqtt::publish(&frame, v5));
                if p.payload.len() > ctx.max_payload {
                    break Err(ConnectionError::Protocol(
                        "a payload over mqtt.max_payload_bytes",
                    ));
                }
                if let Some(rate) = &rate {
                    if p.qos == 0 {
                        if !rate.admit(p.payload.len()) {
                            ctx.metrics.mqtt_shed.inc();
                            if let Some(n) = shed.count(std::time::Instant::now()) {
                                tracing::warn!(client_id = %connect.client_id, shed = n, total = shed.total, "QoS 0 publishes over mqtt.rate_limit shed (not stored); said at most every 10 s per client");
                            }
                            continue;
                        }
                    } else {
                        // Slowed, never refused: the next packet is read once there is room.
                        tokio::select! {
                            () = rate.wait(p.payload.len()) => {}
                            _ = closing.cancelled() => {
                                will_due = false;
                                break Ok(());
                            }
                            _ = taken_over.cancelled() => break Ok(()),
                        }
                    }
                }
                let topic = match (p.alias, p.topic.is_empty()) {
                    (Some(a), true) => or_end!(
                        aliases
                            .get(&a)
                            .cloned()
                            .ok_or(ConnectionError::Protocol("unknown topic alias"))
                    ),
                    (Some(a), false) => {
                        alias_bytes += p.topic.len();
                        if alias_bytes > MAX_ALIAS_BYTES {
                            break Err(ConnectionError::Protocol("too many topic alias bytes"));
                        }
                        aliases.insert(a, p.topic.clone());
                        p.topic.clone()
                    }
                    (None, _) => p.topic.clone(),
                };
                if topic.is_empty() {
                    break Err(ConnectionError::Protocol("empty topic"));
                }
                let text = String::from_utf8_lossy(&topic).into_owned();
                if !ctx.access().acl.may_publish(&who, &text) {
                    ctx.metrics
                        .mqtt_denied
                        .with_label_values(&["publish"])
                        .inc();
                    if !denied_logged {
                        denied_logged = true;
                        tracing::warn!(client_id = %connect.client_id, user = user.as_deref().unwrap_or(""), topic = %text, "publish denied by mqtt.acl: not stored (said once per connection)");
                    }
                    // MQTT 5 says why; a 3.1.1 client is acknowledged as Mosquitto does, so it
                    // does not resend what will never be kept.
                    match p.qos {
                        1 => owed.after_the_rest(p.pkid, kind::PUBACK, Some(0x87)),
                        2 => owed.after_the_rest(p.pkid, kind::PUBREC, Some(0x87)),
                        _ => {}
                    }
                    if !flush(&mut owed, &receipts, &out, v5, &session).await {
                        break Err(ConnectionError::Protocol("the client is gone"));
                    }
                    continue;
                }
                // Local subscribers get a QoS 0 copy; rumqttd is never waited on for it (but
                // for a retained one, which is state: up to RETAINED_WAIT). Retained
                // publishes go to it whoever is subscribed, within the bounds.
                if let Some(copy) = ctx.local_copy(&frame, &p, &text, v5) {
                    let retained = copy.first().is_some_and(|b| b & 0x01 != 0);
                    let sent = if retained {
                        tokio::time::timeout(RETAINED_WAIT, to_broker.send(copy))
                            .await
                            .is_ok_and(|sent| sent.is_ok())
                    } else {
                        to_broker.try_send(copy).is_ok()
                    };
                    if !sent {
                        ctx.metrics.local_copies_dropped.inc();
                    } else if retained {
                        ctx.retained_sent(&text, p.payload.len());
                    }
                }
                let digest = crate::buffer::checksum(0, 0, &text, &p.payload, None);
                let already = {
                    let mut s = session
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    match p.qos {
                        1 if p.dup && s.kept.get(&p.pkid) == Some(&digest) => true,
                        1 => {
                            s.kept.insert(p.pkid, digest);
                            false
                        }
                        2 => !s.unreleased.insert(p.pkid),
                        _ => false,
                    }
                };
                let ack = match p.qos {
                    1 => Some(kind::PUBACK),
                    2 => Some(kind::PUBREC),
                    _ => None,
                };
                if already {
                    ctx.metrics.mqtt_resends.inc();
                    owed.after_the_rest(p.pkid, ack.unwrap_or(kind::PUBACK), None);
                } else {
                    // Held until the record is queued: a reload never sees it half routed.
                    let routes = ctx.routes.read().await;
                    let stream = routes.route(&text);
                    let receipt = ack.map(|_| {
                        owed.last += 1;
                        Receipt {
                            to: receipts.clone(),
                            ticket: owed.last,
                        }
                    });
                    if let Some(kind) = ack {
                        owed.queue.push_back(Ack {
                            ticket: owed.last,
                            pkid: p.pkid,
                            kind,
                            own: true,
                            reason: None,
                        });
                    }
                    let record = NewRecord {
                        stream,
                        topic: text,
                        payload: p.payload.clone(),
                        received_at_ms: crate::clock::now_ms(),
                        monotonic_ms: crate::clock::monotonic_ms(),
                        attributes: Default::default(),
                        receipt,
                    };
                    let queued = ctx.keep(WriterCommand::Append(record)).await;
                    drop(routes);
                    if queued.is_err() {
                        break Err(ConnectionError::Protocol("the buffer writer is gone"));
                    }
                }
                if !flush(&mut owed, &receipts, &out, v5, &session).await {
                    break Err(ConnectionError::Protocol(
                        "a publish was refused: the buffer's disk is full",
                    ));
                }
            }
            kind::PUBREL => {
                let pkid = or_end!(mqtt::pubrel(&frame));
                session
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .unreleased
                    .remove(&pkid);
                owed.after_the_rest(pkid, kind::PUBCOMP, None);
                if !flush(&mut owed, &receipts, &out, v5, &session).await {
                    break Err(ConnectionError::Protocol(
                        "a publish was refused: the buffer's disk is full",
                    ));
                }
            }
            kind::SUBSCRIBE if !broker_alive => {
                // No relay to the local broker any more: nothing to subscribe with.
                let sub = or_end!(mqtt::subscribe(&frame, v5));
                let codes = vec![0x80; sub.filters.len()];
                if out.send(mqtt::suback(sub.pkid, &codes, v5)).await.is_err() {
                    break Ok(());
                }
            }
            kind::SUBSCRIBE => {
                let sub = or_end!(mqtt::subscribe(&frame, v5));
                let generation = ctx
                    .acl_generation
                    .load(std::sync::atomic::Ordering::Relaxed);
                let keep: Vec<bool> = sub
                    .filters
                    .iter()
                    .map(|f| ctx.access().acl.may_subscribe(&who, f))
                    .collect();
                subscribed_under.get_or_insert(generation);
                let denied = keep.iter().filter(|k| !**k).count();
                if denied > 0 {
                    ctx.metrics
                        .mqtt_denied
                        .with_label_values(&["subscribe"])
                        .inc_by(denied as u64);
                    tracing::warn!(client_id = %connect.client_id, user = user.as_deref().unwrap_or(""), filters = ?sub.filters, "subscription denied by mqtt.acl");
                }
                let forwarded = if denied == 0 {
                    Some(frame.raw.clone())
                } else if denied == keep.len() {
                    let failure = if v5 { 0x87 } else { 0x80 };
                    let codes = vec![failure; keep.len()];
                    if out.send(mqtt::suback(sub.pkid, &codes, v5)).await.is_err() {
                        break Ok(());
                    }
                    None
                } else {
                    // The broker subscribes to the rest; its SUBACK gets the refusals back in place.
                    subacks
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(sub.pkid, keep.clone());
                    Some(mqtt::keep_filters(&frame, &sub, &keep))
                };
                if forwarded.is_some() && !subscribed {
                    subscribed = true;
                    ctx.local_subscribers
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if let Some(f) = forwarded
                    && to_broker.send(f).await.is_err()
                {
                    break Ok(());
                }
            }
            kind::CONNECT => break Err(ConnectionError::Protocol("a second CONNECT")),
            kind::PINGREQ => {
                // Answered here, whatever rumqttd does; passed on so the relay stays alive
                // there too (its PINGRESP is not relayed).
                let _ = to_broker.try_send(frame.raw);
                if out.send(Bytes::from_static(&[0xD0, 0])).await.is_err() {
                    break Ok(());
                }
            }
            _ => {
                let disconnect = frame.kind() == kind::DISCONNECT;
                if disconnect {
                    will_due = v5 && frame.body().first() == Some(&0x04);
                }
                if to_broker.send(frame.raw).await.is_err() || disconnect {
                    break Ok(());
                }
            }
        }
    };
    // Local subscribers get a kept will too (rumqttd never sees a client's will).
    if will_due
        && let Some(will) = &connect.will
        && keep_will(ctx, &who, &connect.client_id, will).await
        && broker_alive
        && ctx
            .local_subscribers
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    {
        let _ = to_broker.try_send(mqtt::publish_qos0(&will.topic, &will.payload, v5));
    }
    if shed.total > 0 {
        tracing::warn!(client_id = %connect.client_id, total = shed.total, "connection ended; QoS 0 publishes it had shed over mqtt.rate_limit");
    }
    if subscribed {
        ctx.local_subscribers
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
    ctx.leave(&connect.client_id, me);
    // What was taken is acknowledged as its commits come in, for a little while.
    let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
    while !owed.queue.is_empty() && tokio::time::Instant::now() < deadline {
        if !flush(&mut owed, &receipts, &out, v5, &session).await {
            break;
        }
        if owed.queue.is_empty() {
            break;
        }
        let _ = tokio::time::timeout_at(deadline, receipts.changed()).await;
    }
    drop(out);
    drop(to_broker);
    let _ = up.await;
    down.abort();
    let _ = writer.await;
    result
}

impl Ctx {
    /// The access in force now.
    fn access(&self) -> Arc<Access> {
        self.access
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A retained copy is on its way to rumqttd: account it ([`limits::Retained::set`]).
    fn retained_sent(&self, topic: &str, payload: usize) {
        let mut retained = self
            .retained
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        retained.set(topic, payload);
        self.metrics
            .mqtt_retained_bytes
            .set(retained.bytes() as i64);
    }

    /// Queues a record for the writer, once its bytes fit the queue's budget.
    async fn keep(&self, record: WriterCommand) -> Result<(), ()> {
        self.queue_bytes.take(&record).await;
        self.queue.send_async(record).await.map_err(|_| ())
    }

    /// The QoS 0 copy of a publish for rumqttd, if it gets one: while a local subscriber is
    /// connected, and for a retained publish the bounds admit ([`limits::Retained`]); a
    /// retained publish over them goes (to live subscribers only) without its retain flag.
    fn local_copy(&self, frame: &Frame, p: &mqtt::Publish, topic: &str, v5: bool) -> Option<Bytes> {
        let live = self
            .local_subscribers
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0;
        let retain = p.retain && {
            let fits = self
                .retained
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .fits(topic, p.payload.len(), self.retained_limits);
            if !fits {
                self.metrics.mqtt_retained_refused.inc();
            }
            fits
        };
        if !live && !retain {
            return None;
        }
        let copy = mqtt::as_qos0(frame, p, topic.as_bytes(), v5);
        if p.retain && !retain {
            let mut copy = BytesMut::from(&copy[..]);
            copy[0] &= !0x01;
            return Some(copy.freeze());
        }
        Some(copy)
    }
}

/// A vanished client's will message goes into the buffer like a publish (the ACL applies;
/// nobody waits for its commit). MQTT 5's will delay is not waited out: the will is kept at
/// once, and the broker's copy reaches local subscribers as rumqttd handles it.
async fn keep_will(ctx: &Ctx, who: &Client<'_>, client_id: &str, will: &mqtt::Will) -> bool {
    if will.topic.is_empty() || !ctx.access().acl.may_publish(who, &will.topic) {
        ctx.metrics
            .mqtt_denied
            .with_label_values(&["publish"])
            .inc();
        tracing::warn!(client_id, topic = %will.topic, "will message denied by mqtt.acl: not stored");
        return false;
    }
    if will.payload.len() > ctx.max_payload {
        tracing::warn!(client_id, topic = %will.topic, bytes = will.payload.len(), "will message over mqtt.max_payload_bytes: not stored");
        return false;
    }
    let routes = ctx.routes.read().await;
    let stream = routes.route(&will.topic);
    ctx.metrics.mqtt_wills.inc();
    tracing::info!(client_id, topic = %will.topic, "client vanished without DISCONNECT: its will message is kept");
    let record = NewRecord {
        stream,
        topic: will.topic.clone(),
        payload: will.payload.clone(),
        received_at_ms: crate::clock::now_ms(),
        monotonic_ms: crate::clock::monotonic_ms(),
        attributes: Default::default(),
        receipt: None,
    };
    ctx.keep(WriterCommand::Append(record)).await.is_ok()
}

/// The user a CONNECT authenticates as (`None`: anonymous), or the CONNACK codes refusing it
/// (MQTT 3.1.1, MQTT 5) and why. A verified client certificate (`identity`) is the user its
/// Common Name names, whatever the password; a CONNECT naming another user is refused.
async fn authenticate(
    ctx: &Ctx,
    access: &Arc<Access>,
    connect: &mqtt::Connect,
    identity: Option<Result<String, ()>>,
) -> Result<Option<String>, (u8, u8, &'static str)> {
    const BAD_CREDENTIALS: (u8, u8) = (4, 0x86);
    const NOT_AUTHORIZED: (u8, u8) = (5, 0x87);
    match identity {
        Some(Ok(user)) if connect.username.as_ref().is_none_or(|u| *u == user) => {
            return Ok(Some(user));
        }
        Some(Ok(_)) => {
            return Err((
                BAD_CREDENTIALS.0,
                BAD_CREDENTIALS.1,
                "the user name is not the one the client certificate names",
            ));
        }
        Some(Err(())) => {
            return Err((
                NOT_AUTHORIZED.0,
                NOT_AUTHORIZED.1,
                "the client certificate has no Common Name to use as the user",
            ));
        }
        None => {}
    }
    match (&connect.username, &connect.password) {
        (Some(user), Some(password)) => {
            let _turn = ctx.verifying.acquire().await;
            let (access, u, p) = (access.clone(), user.clone(), password.clone());
            let ok = tokio::task::spawn_blocking(move || access.users.verify(&u, &p))
                .await
                .unwrap_or(false);
            if ok {
                Ok(Some(user.clone()))
            } else {
                Err((
                    BAD_CREDENTIALS.0,
                    BAD_CREDENTIALS.1,
                    "unknown user or wrong password",
                ))
            }
        }
        (Some(_), None) => Err((
            BAD_CREDENTIALS.0,
            BAD_CREDENTIALS.1,
            "a user name without a password",
        )),
        (None, _) if access.allow_anonymous => Ok(None),
        (None, _) => Err((
            NOT_AUTHORIZED.0,
            NOT_AUTHORIZED.1,
            "anonymous, and mqtt.auth.allow_anonymous is off",
        )),
    }
}

/// Sends every acknowledgement whose record is settled, in order. `false` when a 3.1.1
/// client's publish was refused: it cannot be told, so its connection closes.
async fn flush(
    owed: &mut Owed,
    receipts: &Receipts,
    out: &Outbound,
    v5: bool,
    session: &Mutex<Session>,
) -> bool {
    let (done, refused) = receipts.take();
    if !refused.is_empty() {
        // The session took these packet ids for kept: a resend of one must be stored.
        let mut s = session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ack in owed
            .queue
            .iter()
            .filter(|a| a.own && refused.contains(&a.ticket))
        {
            if ack.kind == kind::PUBREC {
                s.unreleased.remove(&ack.pkid);
            } else {
                s.kept.remove(&ack.pkid);
            }
        }
        owed.refused.extend(refused);
    }
    if owed.gave_up {
        return false;
    }
    // The acknowledgements a commit settles go out in one write (a commit settles hundreds).
    let mut acks = BytesMut::new();
    let mut ok = true;
    while let Some(&ack) = owed.queue.front() {
        if ack.ticket > done {
            break;
        }
        let reason = if ack.own && owed.refused.contains(&ack.ticket) {
            if !v5 {
                owed.gave_up = true;
                ok = false;
                break;
            }
            owed.refused.remove(&ack.ticket);
            Some(0x97) // quota exceeded
        } else if v5 {
            ack.reason
        } else {
            None
        };
        owed.queue.pop_front();
        acks.extend_from_slice(&mqtt::ack(ack.kind, ack.pkid, reason));
    }
    if !acks.is_empty() && out.send(acks.freeze()).await.is_err() {
        return false;
    }
    ok
}

/// Waits until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Ctx {
    /// Registers the connection of `client_id` (not an empty one), ending the one that had it;
    /// returns this connection's number, for [`Ctx::leave`].
    fn take_over(&self, client_id: &str, token: &CancellationToken) -> u64 {
        let n = self
            .connection_numbers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if client_id.is_empty() {
            return n;
        }
        let previous = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(client_id.to_owned(), (n, token.clone()));
        if let Some((_, old)) = previous {
            old.cancel();
        }
        n
    }

    /// The connection number `n` of `client_id` ended (a newer one may hold the id now).
    fn leave(&self, client_id: &str, n: u64) {
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if live.get(client_id).is_some_and(|(m, _)| *m == n) {
            live.remove(client_id);
        }
    }

    /// The session of a persistent client, created if new (the oldest are forgotten past
    /// [`MAX_SESSIONS`]).
    fn session(&self, client_id: &str) -> Arc<Mutex<Session>> {
        let mut sessions = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !sessions.contains_key(client_id)
            && sessions.len() >= MAX_SESSIONS
            && let Some(k) = sessions.keys().next().cloned()
        {
            sessions.remove(&k);
        }
        sessions.entry(client_id.to_owned()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_ids_are_safe_for_rumqttd_and_stable() {
        for id in ["plant/7/sensor", "a+b#c$d", "", "é".repeat(10_000).as_str()] {
            let up = upstream_id(id);
            assert!(up.chars().all(|c| c.is_ascii_alphanumeric()), "{up}");
            assert_eq!(up, upstream_id(id));
        }
        assert_ne!(upstream_id("a"), upstream_id("b"));
    }

    /// Publishes 1 to 3 (packet ids 11 to 13) are settled, the 2nd refused by a full disk.
    async fn refused_second(v5: bool) -> (Vec<u8>, Session, bool, bool) {
        let (client, mut peer) = tokio::io::duplex(1 << 16);
        let (out, pump) = pump(client);
        let receipts = Arc::new(Receipts::default());
        let session = Mutex::new(Session::default());
        let mut owed = Owed::default();
        let mut commands = Vec::new();
        for pkid in [11u16, 12, 13] {
            owed.last += 1;
            owed.queue.push_back(Ack {
                ticket: owed.last,
                pkid,
                kind: kind::PUBACK,
                own: true,
                reason: None,
            });
            session.lock().expect("session").kept.insert(pkid, 7);
            commands.push(WriterCommand::Append(NewRecord {
                stream: 0,
                topic: "t".into(),
                payload: Bytes::new(),
                received_at_ms: 0,
                monotonic_ms: 0,
                attributes: Default::default(),
                receipt: Some(Receipt {
                    to: receipts.clone(),
                    ticket: owed.last,
                }),
            }));
        }
        crate::buffer::settle(&commands[..1], false);
        crate::buffer::settle(&commands[1..2], true);
        crate::buffer::settle(&commands[2..], false);
        let first = flush(&mut owed, &receipts, &out, v5, &session).await;
        // The close grace flushes again: nothing refused may be acknowledged then.
        let again = flush(&mut owed, &receipts, &out, v5, &session).await;
        drop(out);
        pump.await.expect("pump");
        let mut written = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut peer, &mut written)
            .await
            .expect("read");
        (
            written,
            session.into_inner().expect("session"),
            first,
            again,
        )
    }

    #[tokio::test]
    async fn a_refused_publish_is_never_acknowledged_and_its_resend_is_stored() {
        // 3.1.1: the first PUBACK only; the connection ends and no later flush sends more.
        let (written, session, first, again) = refused_second(false).await;
        assert_eq!(written, [0x40, 2, 0, 11]);
        assert!(!first && !again);
        assert!(
            !session.kept.contains_key(&12),
            "the refused id is forgotten: its DUP resend is stored, not acknowledged as kept"
        );
        // MQTT 5: all three answered, the refused one with 0x97.
        let (written, session, first, again) = refused_second(true).await;
        assert_eq!(
            written,
            [0x40, 2, 0, 11, 0x40, 3, 0, 12, 0x97, 0x40, 2, 0, 13]
        );
        assert!(first && again);
        assert!(!session.kept.contains_key(&12));
        assert!(session.kept.contains_key(&13));
    }
}
