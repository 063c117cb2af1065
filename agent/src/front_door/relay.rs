//! A connection's relay to rumqttd, the gateway's local pub/sub: opened only once the
//! connection first needs it (a SUBSCRIBE, a copy of a publish for local subscribers or a
//! retained one, the will's copy, an UNSUBSCRIBE or another packet only rumqttd answers), so a
//! client that only publishes while nobody on the gateway subscribes costs rumqttd nothing
//! (about 60 KiB per connection otherwise).
//!
//! The client's CONNACK comes from the door ([`mqtt::connack_accepted`], what rumqttd would
//! say); rumqttd's own, when the relay opens, is not passed on. The relay's CONNECT is the
//! client's, renamed ([`mqtt::rename_client`]). What goes to rumqttd is queued and written once
//! the loopback connection is up, in the background: a connection waits for rumqttd only for
//! room in that bounded queue (copies of publishes never wait: they are dropped, and counted,
//! when it is full; a retained one waits up to `RETAINED_WAIT`). Once the relay is gone
//! (rumqttd unreachable, refusing, or closing it; or its writer failing), [`Relay::gone`] is
//! cancelled, the connection answers the SUBSCRIBEs it had not answered with failures and
//! [`Relay::reset`]s it; the next need opens another, at most every [`RETRY`]. Not covered: a
//! SUBACK rumqttd sent while the client's own queue was full when the relay went is lost, and
//! so is an UNSUBSCRIBE in flight then (neither is answered).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::CLOSE_GRACE;

use super::connection::read_frame;
use super::outbound::{Outbound, pump_when};
use crate::mqtt::{self, kind};

/// How long after a relay went the next one may open (rumqttd refusing must not cost a
/// connection attempt per publish).
const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// The SUBSCRIBEs rumqttd has not answered yet, by packet id: which of their filters it was
/// given (the door puts the refused ones back in place in the SUBACK).
type Subacks = Arc<Mutex<HashMap<u16, Vec<bool>>>>;

/// How the relay is reached and what it relays to.
pub(super) struct Relay {
    upstream: SocketAddr,
    /// The client's CONNECT as rumqttd gets it.
    connect: Bytes,
    /// Towards the client (rumqttd's packets are written there).
    client: Outbound,
    v5: bool,
    max_packet: usize,
    /// Open relays (`agent_mqtt_local_relays`).
    relays: prometheus::IntGauge,
    /// Cancelled once the open relay is gone (rumqttd unreachable, refusing the CONNECT or
    /// closing the relay; or the relay's writer ended).
    gone: CancellationToken,
    subacks: Subacks,
    /// Not opened again before this, after one went.
    retry_at: Option<tokio::time::Instant>,
    /// Towards rumqttd, once opened; the task writing there; its place in the gauge.
    open: Option<(Outbound, tokio::task::JoinHandle<()>, Counted)>,
}

impl Relay {
    pub(super) fn new(
        upstream: SocketAddr,
        connect: Bytes,
        client: Outbound,
        v5: bool,
        max_packet: usize,
        relays: prometheus::IntGauge,
    ) -> Relay {
        Relay {
            upstream,
            connect,
            client,
            v5,
            max_packet,
            relays,
            gone: CancellationToken::new(),
            subacks: Arc::default(),
            retry_at: None,
            open: None,
        }
    }

    /// Cancelled once the open relay is gone: then [`Relay::reset`] it.
    pub(super) fn gone(&self) -> CancellationToken {
        self.gone.clone()
    }

    /// A SUBSCRIBE of packet id `pkid` goes to rumqttd with the filters `keep` says yes to:
    /// its SUBACK gets the others back in place, and it is refused if the relay goes first.
    pub(super) fn awaits_suback(&self, pkid: u16, keep: Vec<bool>) {
        self.subacks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(pkid, keep);
    }

    /// The queue towards rumqttd if the relay is open.
    pub(super) fn if_open(&self) -> Option<&Outbound> {
        self.open.as_ref().map(|(to, ..)| to)
    }

    /// Whether [`Relay::opened`] may be called: the relay is open, or may be opened (not within
    /// [`RETRY`] of the last one going).
    pub(super) fn available(&self) -> bool {
        self.open.is_some()
            || self
                .retry_at
                .is_none_or(|at| tokio::time::Instant::now() >= at)
    }

    /// The queue towards rumqttd, opening the relay if it is not yet.
    pub(super) fn opened(&mut self) -> &Outbound {
        if self.open.is_none() {
            let (to, up) = self.connect();
            self.relays.inc();
            self.open = Some((to, up, Counted(self.relays.clone())));
        }
        &self.open.as_ref().expect("invariant: opened above").0
    }

    /// Connects in the background; frames queued meanwhile go out after the CONNECT.
    fn connect(&self) -> (Outbound, tokio::task::JoinHandle<()>) {
        let (upstream, connect) = (self.upstream, self.connect.clone());
        let (client, subacks) = (self.client.clone(), self.subacks.clone());
        let (v5, limit) = (self.v5, self.max_packet);
        // However the writer ends (unreachable, a failed write, the queue closed), `gone`.
        let guard = self.gone.clone().drop_guard();
        let gone = self.gone.clone();
        pump_when(async move {
            let broker = match TcpStream::connect(upstream).await {
                Ok(broker) => broker,
                Err(e) => {
                    tracing::error!(error = %e, "embedded broker unreachable: no local pub/sub for this connection");
                    return None;
                }
            };
            let _ = broker.set_nodelay(true);
            let (broker_rx, mut broker_tx) = broker.into_split();
            broker_tx.write_all(&connect).await.ok()?;
            let down = tokio::spawn(down(broker_rx, client, gone, subacks, v5, limit));
            Some((broker_tx, (AbortOnDrop(down), guard)))
        })
    }

    /// After [`Relay::gone`]: the SUBACKs refusing the SUBSCRIBEs it had not answered (send
    /// them to the client); the relay is closed, and the next need opens a new one, not within
    /// [`RETRY`].
    pub(super) fn reset(&mut self) -> Vec<Bytes> {
        self.open = None;
        self.gone = CancellationToken::new();
        self.retry_at = Some(tokio::time::Instant::now() + RETRY);
        // The next relay gets a map of its own: a late SUBACK of this one is not passed on.
        let unanswered = std::mem::take(&mut self.subacks);
        let mut unanswered = unanswered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        unanswered
            .drain()
            .map(|(pkid, keep)| mqtt::suback(pkid, &codes_in_place(&keep, None, self.v5), self.v5))
            .collect()
    }

    /// Closes the relay: what was queued is written first, for up to [`CLOSE_GRACE`].
    pub(super) async fn close(self) {
        if let Some((to, mut up, counted)) = self.open {
            drop(to);
            if tokio::time::timeout(CLOSE_GRACE, &mut up).await.is_err() {
                up.abort();
            }
            drop(counted);
        }
    }
}

/// The codes of a SUBACK for a SUBSCRIBE whose filters `keep` says went to rumqttd, which
/// answered `given` for those (`None`: it did not answer): a filter the ACL refused is "not
/// authorized" (MQTT 5; 3.1.1 has one failure code), one rumqttd did not answer a failure.
fn codes_in_place(keep: &[bool], given: Option<Vec<u8>>, v5: bool) -> Vec<u8> {
    let mut given = given.unwrap_or_default().into_iter();
    keep.iter()
        .map(|k| match (k, v5) {
            (true, _) => given.next().unwrap_or(0x80),
            (false, true) => 0x87,
            (false, false) => 0x80,
        })
        .collect()
}

/// One in the open relays' gauge while it lives.
struct Counted(prometheus::IntGauge);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Ends the task when dropped: the reader from rumqttd goes with the relay's writer.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// rumqttd → client, frame by frame, until rumqttd closes the relay or the client is gone (then
/// `gone`; or aborted with the relay's writer). Its CONNACK is not passed on (the door answered
/// the client's CONNECT), nor its PINGRESPs; a SUBACK gets the refused filters put back in
/// place.
async fn down(
    mut broker_rx: tokio::net::tcp::OwnedReadHalf,
    client: Outbound,
    gone: CancellationToken,
    subacks: Subacks,
    v5: bool,
    limit: usize,
) {
    let mut buf = BytesMut::with_capacity(4096);
    let mut connected = false;
    while let Ok(Some(frame)) = read_frame(&mut broker_rx, &mut buf, limit).await {
        if !connected {
            // Success: the second byte of the variable header is 0 in both versions.
            if frame.kind() != kind::CONNACK || frame.body().get(1) != Some(&0) {
                tracing::warn!(
                    "the embedded broker refused this connection's relay: no local pub/sub for it"
                );
                break;
            }
            connected = true;
            continue;
        }
        let frame = match (frame.kind(), mqtt::suback_codes(&frame, v5)) {
            (kind::SUBACK, Ok((pkid, codes))) => {
                let keep = subacks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&pkid);
                // Every SUBSCRIBE sent is in the map: one that is not was answered already.
                let Some(keep) = keep else { continue };
                mqtt::suback(pkid, &codes_in_place(&keep, Some(codes), v5), v5)
            }
            (kind::PINGRESP, _) => continue,
            _ => frame.raw,
        };
        if client.send(frame).await.is_err() {
            break;
        }
    }
    gone.cancel();
}
