//! Upstream broker source: subscribes to an MQTT broker already on the gateway (a site's
//! Mosquitto) and takes what it publishes as if sensors had published it to the front door
//! (same routing, transforms and buffer).
//!
//! Invariant: a QoS 1 message is acknowledged to the upstream broker only once its record is
//! committed to the buffer. The session is persistent (clean session off, QoS 1
//! subscriptions), so what the broker holds for us while the agent is stopped, crashed or
//! disconnected is delivered when it is back: nothing the broker acknowledged to its
//! publishers is lost. A message redelivered within one run of the agent (after a reconnect,
//! with the DUP flag and the same packet id and content) is not stored twice; one redelivered
//! after the agent crashed between its commit and its acknowledgement is (at least once).
//! The connection is retried for ever, with backoff.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::buffer::{Receipt, Receipts};
use crate::front_door::Intake;

/// Longest wait between two connection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Redeliveries recognised: the last packet ids stored, remembered with the checksum of what
/// they carried (the broker redelivers at most its in-flight window, Mosquitto's
/// `max_inflight_messages`, 20 by default: keep that below this).
const REMEMBERED: usize = 1024;
/// Largest message read from the broker (larger ones, beyond `mqtt.max_payload_bytes`, are
/// acknowledged and dropped); one beyond this closes the connection at each try: set the
/// broker's `message_size_limit` below it.
const MAX_READ_BYTES: usize = 16 << 20;

/// The last [`REMEMBERED`] messages stored, by packet id: (checksum of topic and payload,
/// ticket, connection it came on). The oldest is forgotten first, so those just before a
/// disconnect, the ones the broker may redeliver, are always known. (Clearing all at once, as
/// before, forgot them when the clear fell just before a broker restart, and they were stored
/// twice.) Only redeliveries are matched against it, and a broker redelivers what it holds
/// unacknowledged first when a session resumes: once a connection brings a new message, what
/// earlier connections brought is forgotten, so a packet id the broker reused for a new
/// message (after our acknowledgement) is never taken for the old one.
#[derive(Default)]
struct Remembered {
    by_pkid: HashMap<u16, (u32, u64, u64)>,
    /// (packet id, ticket) in the order stored; an entry whose packet id was stored again
    /// since is stale and skipped.
    order: VecDeque<(u16, u64)>,
}

impl Remembered {
    fn insert(&mut self, pkid: u16, digest: u32, ticket: u64, connection: u64) {
        self.by_pkid.insert(pkid, (digest, ticket, connection));
        self.order.push_back((pkid, ticket));
        while self.order.len() > REMEMBERED {
            if let Some((old, t)) = self.order.pop_front()
                && self
                    .by_pkid
                    .get(&old)
                    .is_some_and(|&(_, current, _)| current == t)
            {
                self.by_pkid.remove(&old);
            }
        }
    }

    /// The (checksum, ticket) stored under `pkid`.
    fn get(&self, pkid: &u16) -> Option<(u32, u64)> {
        self.by_pkid.get(pkid).map(|&(d, t, _)| (d, t))
    }

    /// Forgets the messages whose ticket `refused` says.
    fn forget(&mut self, refused: impl Fn(u64) -> bool) {
        self.by_pkid.retain(|_, &mut (_, t, _)| !refused(t));
    }

    /// Forgets what connections before `connection` brought: its broker is done redelivering.
    fn redelivered_before(&mut self, connection: u64) {
        self.by_pkid.retain(|_, &mut (_, _, c)| c >= connection);
        self.order
            .retain(|(pkid, _)| self.by_pkid.contains_key(pkid));
    }

    /// Forgets everything (the broker lost the session: nothing will be redelivered).
    fn clear(&mut self) {
        self.by_pkid.clear();
        self.order.clear();
    }
}

/// A `sources: - mqtt:` entry, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttSourceConfig {
    /// The broker's host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// Topic filters subscribed to, at QoS 1.
    pub topics: Vec<crate::routing::TopicFilter>,
    /// Our client id there (the persistent session's key).
    pub client_id: String,
    /// User name and password, if the broker wants them (the password read from a file).
    pub credentials: Option<(String, std::path::PathBuf)>,
    /// Largest message taken.
    pub max_payload_bytes: usize,
}

/// The upstream broker source stage.
pub struct MqttSource {
    config: MqttSourceConfig,
    intake: Intake,
}

impl MqttSource {
    /// A source for `config`, handing its messages to the front door's `intake`.
    pub fn new(config: MqttSourceConfig, intake: Intake) -> MqttSource {
        MqttSource { config, intake }
    }

    /// Subscribes and takes messages until `shutdown`; reconnects for ever.
    pub async fn run(self, shutdown: CancellationToken) {
        let c = &self.config;
        let mut options = MqttOptions::new(c.client_id.clone(), c.host.clone(), c.port);
        // Larger messages than we keep are read (then acknowledged and dropped, counted): one
        // the client could not read would come back at every connection and stall the source.
        let readable = (2 * c.max_payload_bytes).max(MAX_READ_BYTES);
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(readable, 65_536);
        let receipts = Arc::new(Receipts::default());
        let mut ticket = 0u64;
        // Packet id → (checksum of topic and payload, ticket) of what was stored lately.
        let mut stored = Remembered::default();
        let mut connection = 0u64;
        // Tickets the buffer refused (a full disk): never acknowledged, and what they carried
        // is not taken for stored when it comes again.
        let mut refused_tickets: HashSet<u64> = HashSet::new();
        // Every ticket up to this one is settled.
        let mut done = 0u64;
        let mut backoff = Duration::from_millis(100);
        let mut subscribed = false;
        let mut said = false;
        // One client per connection: an acknowledgement never outlives the connection its
        // message came on (a broker restarted may number its messages anew, and a stale
        // acknowledgement would then take one we never had). What was not acknowledged on a
        // connection comes again on the next, and is recognised (or stored again: at least
        // once).
        loop {
            if let Some((user, file)) = &c.credentials {
                // Read at each connection: a password changed on disk is used at the next one.
                match std::fs::read_to_string(file) {
                    Ok(password) => {
                        options.set_credentials(user.clone(), password.trim_end().to_owned());
                    }
                    Err(e) => {
                        if !std::mem::replace(&mut said, true) {
                            tracing::error!(file = %file.display(), error = %e, "upstream broker: cannot read the password file; retried");
                        }
                        tokio::select! {
                            () = tokio::time::sleep(BACKOFF_MAX) => continue,
                            () = shutdown.cancelled() => return,
                        }
                    }
                }
            }
            let (client, mut events) = AsyncClient::new(options.clone(), 1024);
            connection += 1;
            // Until the first new message of this connection, the broker may redeliver.
            let mut redelivering = true;
            // Messages stored, waiting for their commit to be acknowledged...
            let mut waiting: VecDeque<(u64, rumqttc::Publish)> = VecDeque::new();
            // ...and committed, handed to the client as its channel takes them (never waiting
            // inside the loop that polls it).
            let mut ready: VecDeque<rumqttc::Publish> = VecDeque::new();
            let mut connected = false;
            let mut progress = false;
            let ended = loop {
                while let Some(publish) = ready.front() {
                    if client.try_ack(publish).is_err() {
                        break;
                    }
                    ready.pop_front();
                    progress = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = receipts.changed() => {
                        let (settled, refused) = receipts.take();
                        done = settled;
                        if !refused.is_empty() {
                            if refused_tickets.len() > REMEMBERED {
                                refused_tickets.clear();
                            }
                            refused_tickets.extend(refused);
                            stored.forget(|t| refused_tickets.contains(&t));
                        }
                        let mut again = false;
                        let mut still = VecDeque::new();
                        for (t, publish) in waiting.drain(..) {
                            if t > done {
                                still.push_back((t, publish));
                            } else if refused_tickets.contains(&t) {
                                again = true;
                            } else {
                                ready.push_back(publish);
                            }
                        }
                        waiting = still;
                        if again {
                            // Not stored (a full disk): not acknowledged; the next connection
                            // gets it again from the broker.
                            tracing::warn!("upstream broker: messages not stored; reconnecting to have them again");
                            break None;
                        }
                    }
                    event = events.poll() => match event {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            connected = true;
                            said = false;
                            tracing::info!(host = %c.host, port = c.port, session_present = ack.session_present, "upstream broker: connected");
                            if !ack.session_present {
                                stored.clear();
                            }
                            // Subscribed at the first connection of a run (the topics may have
                            // changed), and when the broker lost the session; not at every
                            // reconnect, which would have it send its retained messages again.
                            if !(subscribed && ack.session_present) {
                                let filters = c.topics.iter().map(|t| {
                                    rumqttc::SubscribeFilter::new(t.as_str().to_owned(), QoS::AtLeastOnce)
                                });
                                if client.try_subscribe_many(filters).is_err() {
                                    break None;
                                }
                                subscribed = true;
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(ack))) => {
                            if ack.return_codes.iter().any(|r| matches!(r, rumqttc::SubscribeReasonCode::Failure)) {
                                tracing::error!(host = %c.host, port = c.port, "upstream broker: a subscription was refused (check its ACL for this client)");
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(publish))) => {
                            if publish.payload.len() > c.max_payload_bytes {
                                tracing::error!(topic = %publish.topic, bytes = publish.payload.len(), "upstream broker: message over mqtt.max_payload_bytes: acknowledged and dropped (counted)");
                                self.intake.dropped_too_large();
                                if publish.qos != QoS::AtMostOnce {
                                    ready.push_back(publish);
                                }
                                continue;
                            }
                            let digest = crate::buffer::checksum(0, 0, &publish.topic, &publish.payload, None);
                            if publish.qos == QoS::AtMostOnce {
                                if self.intake.keep(publish.topic, publish.payload, None).await.is_err() {
                                    return;
                                }
                                continue;
                            }
                            if !publish.dup && std::mem::take(&mut redelivering) {
                                stored.redelivered_before(connection);
                            }
                            if publish.dup
                                && let Some((_, first)) =
                                    stored.get(&publish.pkid).filter(|(d, _)| *d == digest)
                            {
                                // Came before and stored (not refused): acknowledged once that
                                // copy is committed.
                                if first <= done {
                                    ready.push_back(publish);
                                } else {
                                    waiting.push_back((first, publish));
                                }
                                continue;
                            }
                            ticket += 1;
                            stored.insert(publish.pkid, digest, ticket, connection);
                            let receipt = Receipt { to: receipts.clone(), ticket };
                            let kept = self
                                .intake
                                .keep(publish.topic.clone(), publish.payload.clone(), Some(receipt))
                                .await;
                            if kept.is_err() {
                                return;
                            }
                            waiting.push_back((ticket, publish));
                        }
                        Ok(_) => {}
                        Err(e) => break Some((e, connected)),
                    },
                }
            };
            drop(client);
            match ended {
                Some((e, true)) => {
                    tracing::warn!(host = %c.host, port = c.port, error = %e, "upstream broker: connection lost; reconnecting");
                }
                Some((e, false)) if !std::mem::replace(&mut said, true) => {
                    tracing::warn!(host = %c.host, port = c.port, error = %e, "upstream broker: cannot connect; retried with backoff");
                }
                Some(_) | None => {}
            }
            // Back to the shortest wait only after a connection that moved messages: one that
            // fails at once (a full disk, a message that cannot be taken) backs off.
            backoff = if progress {
                Duration::from_millis(100)
            } else {
                (backoff * 2).min(BACKOFF_MAX)
            };
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_messages_stored_are_always_remembered() {
        let mut r = Remembered::default();
        // Packet ids wrap around as a broker's do; the last REMEMBERED stay known, whatever
        // the count before.
        for ticket in 1..=70_000u64 {
            r.insert((ticket % 65_535) as u16 + 1, ticket as u32, ticket, 1);
            let first_kept = ticket.saturating_sub(REMEMBERED as u64 - 1).max(1);
            for t in [first_kept, ticket] {
                let pkid = (t % 65_535) as u16 + 1;
                assert_eq!(r.get(&pkid), Some((t as u32, t)), "ticket {t} at {ticket}");
            }
            assert!(r.by_pkid.len() <= REMEMBERED && r.order.len() <= REMEMBERED);
        }
        let forgotten = (70_000 - REMEMBERED as u64) % 65_535;
        assert_eq!(r.get(&(forgotten as u16 + 1)), None);
        // A packet id stored again is remembered with what it carried last.
        r.insert(7, 1, 80_000, 1);
        r.insert(7, 2, 80_001, 1);
        assert_eq!(r.get(&7), Some((2, 80_001)));
        r.forget(|t| t == 80_001);
        assert_eq!(r.get(&7), None);
        // Once a later connection brought a new message, what earlier ones brought is not a
        // redelivery any more (the broker may reuse its packet ids for new messages).
        r.insert(9, 3, 80_002, 2);
        r.insert(10, 4, 80_003, 3);
        r.redelivered_before(3);
        assert_eq!((r.get(&9), r.get(&10)), (None, Some((4, 80_003))));
        assert!(r.order.len() <= 2);
        r.clear();
        assert_eq!(r.get(&10), None);
    }
}
