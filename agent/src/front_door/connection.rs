//! One client connection, from its CONNECT to its end: reading frames, logging in, taking
//! publishes into the buffer and subscriptions to rumqttd, and acknowledging in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::login::authenticate;
use super::outbound::{Ack, Owed, flush, pump};
use super::relay::Relay;
use super::{
    CLOSE_GRACE, CONNECT_TIMEOUT, Ctx, MAX_ALIAS_BYTES, RETAINED_WAIT, Session, limits, upstream_id,
};
use crate::access::Client;
use crate::buffer::{NewRecord, Receipt, Receipts, WriterCommand};
use crate::mqtt::{self, Frame, kind};

/// Why a connection ended early (logged; the client is gone either way).
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Mqtt(#[from] mqtt::MqttError),
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Protocol(&'static str),
}

/// Reads frames from `reader` into `buf` until a whole one is there.
pub(super) async fn read_frame(
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

/// One client connection, from its CONNECT to its end. `identity`: what its client
/// certificate says (mTLS), see [`authenticate`].
pub(super) async fn run<S>(
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
    // One writer towards the client: the door's CONNACK, rumqttd's packets and the agent's
    // acknowledgements, each whole, in the order they are queued.
    let (out, writer) = pump(client_tx);
    let _ = out.send(mqtt::connack_accepted(v5)).await;
    let mut relay = Relay::new(
        upstream,
        mqtt::rename_client(
            &first,
            &connect,
            &format!("{}n{me}", upstream_id(&connect.client_id)),
            connect.keep_alive,
        ),
        out.clone(),
        v5,
        ctx.max_packet,
        ctx.metrics.mqtt_local_relays.clone(),
    );

    let mut relay_ping = tokio::time::interval(Duration::from_secs(
        u64::from(mqtt::relay_keep_alive(connect.keep_alive) / 2).max(1),
    ));
    relay_ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // MQTT: no packet for 1.5 × keep-alive and the server closes the connection.
    let idle_limit = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let mut idle_deadline = idle_limit.map(|l| tokio::time::Instant::now() + l);
    let mut may_subscribe = true;
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
        let relay_gone = relay.gone();
        let frame = tokio::select! {
            f = read_frame(&mut client_rx, &mut inbound, ctx.max_packet) => f,
            _ = receipts.changed() => {
                if !flush(&mut owed, &receipts, &out, v5, &session).await {
                    break Err(ConnectionError::Protocol("a publish was refused: the buffer's disk is full"));
                }
                continue;
            }
            // The relay gone ends the subscriptions of a client that subscribed, not its
            // durable publishing: the connection goes on, refusing SUBSCRIBEs from then on
            // (those rumqttd had not answered are refused now). Copies, an UNSUBSCRIBE or the
            // will open another relay when due.
            _ = relay_gone.cancelled() => {
                for refusal in relay.reset() {
                    if out.send(refusal).await.is_err() {
                        break;
                    }
                }
                if subscribed {
                    may_subscribe = false;
                    subscribed = false;
                    ctx.local_subscribers
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(client_id = %connect.client_id, "the embedded broker closed this connection's relay: its local subscriptions ended (new ones are refused)");
                }
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
            // A subscriber's relay is kept alive at rumqttd whatever the client sends (its
            // publishes may not go there, and a client with no keep-alive never pings).
            _ = relay_ping.tick(), if subscribed => {
                if let Some(to_broker) = relay.if_open() {
                    let _ = to_broker.try_send(Bytes::from_static(&[0xC0, 0]));
                }
                continue;
            }
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
                    let sent = if !relay.available() {
                        false
                    } else if retained {
                        tokio::time::timeout(RETAINED_WAIT, relay.opened().send(copy))
                            .await
                            .is_ok_and(|sent| sent.is_ok())
                    } else {
                        relay.opened().try_send(copy).is_ok()
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
                        1 if p.dup && s.kept.get(p.pkid) == Some(digest) => Some(true),
                        1 => {
                            s.kept.insert(p.pkid, digest);
                            Some(false)
                        }
                        2 if !s.unreleased.contains(&p.pkid)
                            && s.unreleased.len() >= super::MAX_UNRELEASED =>
                        {
                            None
                        }
                        2 => Some(!s.unreleased.insert(p.pkid)),
                        _ => Some(false),
                    }
                };
                let Some(already) = already else {
                    // Nothing of this publish was taken: the client keeps it.
                    break Err(ConnectionError::Protocol(
                        "more than 1024 QoS 2 publishes awaiting their PUBREL",
                    ));
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
            kind::SUBSCRIBE if !may_subscribe || !relay.available() => {
                // No relay to the local broker (any more, or for now): nothing to subscribe with.
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
                    Some(mqtt::keep_filters(&frame, &sub, &keep))
                };
                if let Some(f) = forwarded {
                    if !subscribed {
                        subscribed = true;
                        ctx.local_subscribers
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    relay.awaits_suback(sub.pkid, keep);
                    // A relay that cannot take it is gone: see `relay_gone` above.
                    let _ = relay.opened().send(f).await;
                }
            }
            kind::CONNECT => break Err(ConnectionError::Protocol("a second CONNECT")),
            kind::PINGREQ => {
                // Answered here, whatever rumqttd does; passed on so an open relay stays
                // alive there too (its PINGRESP is not relayed).
                if let Some(to_broker) = relay.if_open() {
                    let _ = to_broker.try_send(frame.raw);
                }
                if out.send(Bytes::from_static(&[0xD0, 0])).await.is_err() {
                    break Ok(());
                }
            }
            _ => {
                let disconnect = frame.kind() == kind::DISCONNECT;
                if disconnect {
                    will_due = v5 && frame.body().first() == Some(&0x04);
                }
                // A DISCONNECT goes to rumqttd only if the relay is open; anything else
                // (UNSUBSCRIBE, acknowledgements of what rumqttd sent, AUTH) opens it. An
                // UNSUBSCRIBE with no subscription to end (the client has none at rumqttd, or
                // no relay is to be had) is answered here: rumqttd does not answer one for a
                // filter it does not have. The rest is dropped when no relay is to be had.
                if disconnect {
                    if let Some(to_broker) = relay.if_open() {
                        let _ = to_broker.send(frame.raw).await;
                    }
                    break Ok(());
                }
                let unsubscribe = frame.kind() == kind::UNSUBSCRIBE;
                let relayed = (subscribed || !unsubscribe)
                    && relay.available()
                    && relay.opened().send(frame.raw.clone()).await.is_ok();
                if !relayed
                    && unsubscribe
                    && out.send(or_end!(mqtt::unsuback(&frame, v5))).await.is_err()
                {
                    break Ok(());
                }
            }
        }
    };
    // Local subscribers get a kept will too (rumqttd never sees a client's will).
    if will_due
        && let Some(will) = &connect.will
        && keep_will(ctx, &who, &connect.client_id, will).await
        && relay.available()
        && ctx
            .local_subscribers
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    {
        let _ = relay
            .opened()
            .try_send(mqtt::publish_qos0(&will.topic, &will.payload, v5));
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
    relay.close().await;
    let _ = writer.await;
    result
}

/// A vanished client's will message goes into the buffer like a publish (the ACL applies;
/// nobody waits for its commit). MQTT 5's will delay is not waited out: the will is kept at
/// once, and the broker's copy reaches local subscribers as rumqttd handles it.
pub(super) async fn keep_will(
    ctx: &Ctx,
    who: &Client<'_>,
    client_id: &str,
    will: &mqtt::Will,
) -> bool {
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

/// Waits until `deadline`, or forever without one.
pub(super) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
