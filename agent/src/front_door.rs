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
//!   publish this session already kept (same packet id, topic and payload; among its last
//!   [`KEPT_QOS1`]) is acknowledged again, not stored again. Sessions live in the agent's
//!   memory, at most [`SESSIONS_PER_CONNECTION`] × `mqtt.max_connections` of them: a resend
//!   after the agent restarted is stored again (the window is the agent's uptime);
//! - every topic is kept, `$…` topics included (the durable path does not go through rumqttd's
//!   subscriptions), and rumqttd can no longer skip a record the agent acknowledged;
//! - rumqttd only ever sees client ids of `[0-9a-zn]`, each once, with clean sessions (ids with
//!   `/`, `+`, `#` or `$`, and duplicate ids, crash or confuse it)
//!   and publishes at QoS 0, and those only while a client that subscribed through the door is
//!   connected (a persistent subscriber that is offline misses copies meanwhile);
//! - a client's durable publishing never depends on rumqttd: the door answers CONNECT and
//!   PINGREQ and enforces the keep-alive itself; a connection's relay to rumqttd opens only
//!   once it needs rumqttd (a SUBSCRIBE, a copy for local subscribers or a retained one, the
//!   will's copy, an UNSUBSCRIBE or another packet only rumqttd answers), in the background;
//!   if rumqttd drops it, the connection goes on (a client that subscribed loses its
//!   subscriptions, and further SUBSCRIBEs are refused); a second connection with a client id
//!   takes the session over;
//! - once closed, no byte from a client is read, so nothing new is taken; acknowledgements of
//!   what was taken still go out while the buffer commits it;
//! - what one client may cost (its publish rate, what rumqttd retains): see `limits`.
//!
//! This module accepts connections (bounded by `mqtt.max_connections`) and holds what they
//! share ([`FrontDoor`], the routes, the sessions, who is connected). `connection` is one
//! connection from its CONNECT to its end; `login` says who a client is (TLS, certificates,
//! passwords); `outbound` writes what goes back to a client and sends the acknowledgements it
//! is owed, in order, once their records are committed; `relay` is a connection's link to
//! rumqttd, opened on first need; `limits` bounds what one client may cost.

mod connection;
mod limits;
mod login;
mod outbound;
mod relay;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::access::Access;
use crate::broker::BrokerError;
use crate::buffer::{NewRecord, Queue, QueueBytes, WriterCommand};
use crate::config::{MqttConfig, RateLimit, RetainedLimits};
use crate::metrics::Metrics;
use crate::mqtt::{self, Frame};
use crate::routing::Router;
pub use login::tls_acceptor;

/// A client must send its CONNECT within this time after the TCP connection opens.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Persistent sessions (clean session off) whose publish ids the agent remembers, per
/// connection `mqtt.max_connections` allows (beyond, the least recently used one that no
/// connection holds is forgotten).
const SESSIONS_PER_CONNECTION: usize = 4;
/// QoS 1 publishes a session remembers (packet id and checksum), the last ones kept: a client
/// resends after a reconnect at most what it had in flight (Mosquitto's clients 20 by default,
/// Paho's 10, rumqttc's 100); older resends than this would be stored again.
const KEPT_QOS1: usize = 256;
/// QoS 2 publishes a session holds between PUBREC and PUBREL; a client that leaves more
/// unreleased is disconnected (it keeps what it sent; its PUBRELs free the room).
pub(crate) const MAX_UNRELEASED: usize = 1024;
/// Most bytes of topics an MQTT 5 client may park behind topic aliases.
const MAX_ALIAS_BYTES: usize = 1 << 20;
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
    /// Publish ids of persistent sessions, by client id, with when each was last taken.
    sessions: Mutex<Sessions>,
    /// Counts the sessions taken (their last-use stamps).
    session_uses: std::sync::atomic::AtomicU64,
    /// Most sessions kept: [`SESSIONS_PER_CONNECTION`] × `mqtt.max_connections`.
    max_sessions: usize,
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

/// Persistent sessions by client id, with the stamp of their last use.
type Sessions = HashMap<String, (u64, Arc<Mutex<Session>>)>;

/// What a session remembers of its client's publishes, for exactly-once.
#[derive(Debug, Default)]
struct Session {
    /// QoS 1 publishes kept.
    kept: KeptQos1,
    /// QoS 2 publishes kept and not yet released (PUBREL): at most the 65,535 packet ids.
    unreleased: HashSet<u16>,
}

/// The last [`KEPT_QOS1`] QoS 1 publishes a session kept: (packet id, checksum of topic and
/// payload), oldest first. A client cycling through every packet id over a long connection
/// costs 2 KiB, not a map of 65,535 entries (1 MiB a session, before).
#[derive(Debug, Default)]
struct KeptQos1(std::collections::VecDeque<(u16, u32)>);

impl KeptQos1 {
    /// Keeps `pkid`'s new publish, in place of any older one under the same id (which the
    /// client had its acknowledgement for, or it would not reuse the id).
    fn insert(&mut self, pkid: u16, digest: u32) {
        self.forget(pkid);
        if self.0.len() == KEPT_QOS1 {
            self.0.pop_front();
        }
        self.0.push_back((pkid, digest));
    }

    /// Forgets the publish kept under `pkid` (its commit was refused: a resend of it must be
    /// stored).
    fn forget(&mut self, pkid: u16) {
        if let Some(at) = self.0.iter().position(|(p, _)| *p == pkid) {
            self.0.remove(at);
        }
    }

    /// The checksum kept last under `pkid`.
    fn get(&self, pkid: u16) -> Option<u32> {
        self.0
            .iter()
            .rev()
            .find(|(p, _)| *p == pkid)
            .map(|(_, d)| *d)
    }
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
                max_sessions: SESSIONS_PER_CONNECTION * mqtt.max_connections.max(1),
                session_uses: std::sync::atomic::AtomicU64::new(0),
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
                        None => connection::run(client, None, &ctx, &closing).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(client))
                                .await
                            {
                                Ok(Ok(tls)) => {
                                    let identity = login::certificate_identity(&tls);
                                    connection::run(tls, identity, &ctx, &closing).await
                                }
                                Ok(Err(e)) => Err(e.into()),
                                Err(_) => Err(connection::ConnectionError::ConnectTimeout(
                                    CONNECT_TIMEOUT,
                                )),
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

    /// The session of a persistent client, created if new (one is forgotten past
    /// `max_sessions`).
    fn session(&self, client_id: &str) -> Arc<Mutex<Session>> {
        let mut sessions = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stamp = self
            .session_uses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((used, session)) = sessions.get_mut(client_id) {
            *used = stamp;
            return session.clone();
        }
        if sessions.len() >= self.max_sessions {
            forget_a_session(&mut sessions);
        }
        let session = Arc::new(Mutex::new(Session::default()));
        sessions.insert(client_id.to_owned(), (stamp, session.clone()));
        session
    }
}

/// Forgets the least recently used session no connection holds now (at most
/// `max_connections` are held, and there are [`SESSIONS_PER_CONNECTION`] times more kept, so
/// there is always one). Pure.
fn forget_a_session(sessions: &mut Sessions) {
    let idle = sessions
        .iter()
        .filter(|(_, (_, s))| Arc::strong_count(s) == 1)
        .min_by_key(|(_, (used, _))| *used)
        .map(|(id, _)| id.clone());
    if let Some(id) = idle {
        sessions.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_remembers_its_last_qos1_publishes_only() {
        let mut kept = KeptQos1::default();
        // A long connection cycling through every packet id, twice over.
        for n in 0..140_000u32 {
            kept.insert((n % 65_535 + 1) as u16, n);
        }
        assert_eq!(kept.0.len(), KEPT_QOS1, "bounded");
        let last = 139_999u32;
        assert_eq!(kept.get((last % 65_535 + 1) as u16), Some(last));
        let oldest_kept = last + 1 - KEPT_QOS1 as u32;
        assert_eq!(
            kept.get((oldest_kept % 65_535 + 1) as u16),
            Some(oldest_kept)
        );
        assert_eq!(kept.get(((oldest_kept - 1) % 65_535 + 1) as u16), None);
        // A packet id used again: its newest checksum.
        kept.insert(7, 1);
        kept.insert(7, 2);
        assert_eq!(kept.get(7), Some(2));
        kept.forget(7);
        assert_eq!(
            kept.get(7),
            None,
            "a refused publish is forgotten, and no older one under its id comes back"
        );
    }

    #[test]
    fn a_session_a_connection_holds_is_never_forgotten() {
        let mut sessions = Sessions::new();
        let held = Arc::new(Mutex::new(Session::default()));
        sessions.insert("held".into(), (0, held.clone()));
        for (i, id) in ["old", "newer"].into_iter().enumerate() {
            sessions.insert(id.into(), (i as u64 + 1, Arc::default()));
        }
        forget_a_session(&mut sessions);
        assert!(
            sessions.contains_key("held"),
            "held by a connection, though the oldest"
        );
        assert!(
            !sessions.contains_key("old"),
            "the least recently used idle one goes"
        );
        forget_a_session(&mut sessions);
        forget_a_session(&mut sessions);
        assert!(sessions.contains_key("held") && sessions.len() == 1);
        drop(held);
    }

    #[test]
    fn upstream_ids_are_safe_for_rumqttd_and_stable() {
        for id in ["plant/7/sensor", "a+b#c$d", "", "é".repeat(10_000).as_str()] {
            let up = upstream_id(id);
            assert!(up.chars().all(|c| c.is_ascii_alphanumeric()), "{up}");
            assert_eq!(up, upstream_id(id));
        }
        assert_ne!(upstream_id("a"), upstream_id("b"));
    }
}
