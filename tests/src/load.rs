//! The load generator: simulated sensors publishing over real MQTT (rumqttc), one connection
//! each, at a paced rate or flat out, with deterministic payloads that tests can regenerate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// What the payloads look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// Arbitrary bytes (zeros, 0xff, invalid UTF-8): proves binary safety.
    Binary,
    /// JSON telemetry padded to the asked size with random readings: every value random, up to
    /// five digits, so a pessimistic case for compression.
    Json,
    /// JSON telemetry as real sensors send it, about 120 bytes whatever the asked size: one
    /// reading a second per sensor, each value drifting slowly around its sensor's own level
    /// (a slow wave plus a last-digit jitter), a battery that drains, a status that rarely
    /// changes.
    Drifting,
}

/// Topic of message `index` of sensor `client`.
pub type TopicFn = Arc<dyn Fn(usize, u64) -> String + Send + Sync>;

/// A load to publish.
#[derive(Clone)]
pub struct LoadSpec {
    /// The agent's MQTT address.
    pub mqtt: SocketAddr,
    /// Simulated sensors (one MQTT connection each).
    pub clients: usize,
    /// Messages each sensor publishes.
    pub messages_per_client: u64,
    /// Messages per second per sensor; `None` publishes as fast as the broker takes them.
    pub rate_per_client: Option<f64>,
    /// Payload size in bytes.
    pub payload_bytes: usize,
    /// Payload format.
    pub kind: PayloadKind,
    /// QoS 0 or 1.
    pub qos: QoS,
    /// Topic of each message.
    pub topic: TopicFn,
    /// Client id prefix.
    pub client_prefix: String,
}

/// What a load run did.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Messages published.
    pub published: u64,
    /// PUBACKs received (QoS 1).
    pub acked: u64,
    /// Wall time from the first publish to the last PUBACK.
    pub elapsed: Duration,
    /// Time from writing each QoS 1 publish to its PUBACK, microseconds (a sample: at most
    /// [`MAX_LATENCY_SAMPLES`] per sensor).
    pub ack_latencies_us: Vec<u64>,
}

/// PUBACK latencies kept per sensor.
pub const MAX_LATENCY_SAMPLES: usize = 20_000;

impl LoadReport {
    /// The `q`-quantile (0..=1) of the PUBACK latencies, in milliseconds; 0 without samples.
    pub fn ack_latency_ms(&self, q: f64) -> f64 {
        let mut v = self.ack_latencies_us.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        let at = ((v.len() - 1) as f64 * q).round() as usize;
        v[at] as f64 / 1000.0
    }
}

/// The payload of message `index` of sensor `client`: deterministic, so a test can regenerate
/// and compare it byte for byte.
pub fn payload(kind: PayloadKind, client: usize, index: u64, size: usize) -> Vec<u8> {
    match kind {
        PayloadKind::Binary => {
            let mut out = Vec::with_capacity(size.max(12));
            out.extend_from_slice(&(client as u32).to_be_bytes());
            out.extend_from_slice(&index.to_be_bytes());
            let mut x = (client as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index;
            while out.len() < size {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                out.push(match x % 4 {
                    0 => 0x00,
                    1 => 0xff,
                    _ => (x >> 8) as u8,
                });
            }
            out
        }
        PayloadKind::Drifting => drifting(client, index),
        PayloadKind::Json => {
            // Values that vary like real readings; padding with device-ish fields, not filler.
            let mut x = (client as u64 + 7).wrapping_mul(0x2545_F491_4F6C_DD1D)
                ^ index.wrapping_mul(0x9E37_79B9);
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut s = format!(
                "{{\"sensor\":\"s-{client}\",\"seq\":{index},\"ts\":{},\"temperature\":{:.2},\"humidity\":{:.1},\"pressure\":{:.1},\"status\":\"ok\"",
                1_790_000_000_000u64 + index * 100,
                15.0 + (next() % 2000) as f64 / 100.0,
                30.0 + (next() % 400) as f64 / 10.0,
                990.0 + (next() % 500) as f64 / 10.0
            );
            let mut k = 0;
            while s.len() + 24 < size {
                s.push_str(&format!(
                    ",\"v{k}\":{:.3}",
                    (next() % 100_000) as f64 / 1000.0
                ));
                k += 1;
            }
            while s.len() + 1 < size {
                s.push(' ');
            }
            s.push('}');
            s.into_bytes()
        }
    }
}

/// Reading `index` of sensor `client` for [`PayloadKind::Drifting`]: a function of both only,
/// so any reading can be made again to check what arrived.
fn drifting(client: usize, index: u64) -> Vec<u8> {
    let c = client as f64;
    let t = index as f64;
    // A jitter of -1, 0 or +1 in the last digit, from a hash of (client, index).
    let jitter = |salt: u64| {
        let mut x = (client as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ index.wrapping_mul(0xBF58_476D_1CE4_E5B9)
            ^ salt;
        x ^= x >> 31;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
        (x >> 33) % 3
    } as f64
        - 1.0;
    let wave = |period: f64, phase: f64| (std::f64::consts::TAU * t / period + phase).sin();
    let temperature = 18.0 + (c % 7.0) + 2.5 * wave(3_600.0, c) + 0.01 * jitter(1);
    let humidity = 40.0 + (c % 11.0) + 6.0 * wave(7_200.0, c / 2.0) + 0.1 * jitter(2);
    let pressure = 1_009.0 + (c % 5.0) + 1.5 * wave(43_200.0, c / 3.0) + 0.1 * jitter(3);
    let battery = 3.9 - 0.000_002 * t - 0.01 * (c % 3.0);
    let status = if index % 5_000 < 5 { "check" } else { "ok" };
    format!(
        "{{\"sensor\":\"s-{client}\",\"ts\":{},\"temperature\":{temperature:.2},\"humidity\":{humidity:.1},\"pressure\":{pressure:.1},\"battery\":{battery:.3},\"status\":\"{status}\"}}",
        1_790_000_000_000u64 + client as u64 * 37 + index * 1_000,
    )
    .into_bytes()
}

/// Publishes the whole load and waits for every PUBACK (QoS 1) or for the last publish to be
/// written (QoS 0). Panics if a sensor cannot connect or stalls for 60 s.
pub async fn publish(spec: LoadSpec) -> LoadReport {
    let started = Instant::now();
    let tasks: Vec<_> = (0..spec.clients)
        .map(|c| tokio::spawn(sensor(spec.clone(), c)))
        .collect();
    let mut report = LoadReport {
        published: 0,
        acked: 0,
        elapsed: Duration::ZERO,
        ack_latencies_us: Vec::new(),
    };
    for t in tasks {
        let (published, acked, latencies) = t.await.expect("sensor task");
        report.published += published;
        report.acked += acked;
        report.ack_latencies_us.extend(latencies);
    }
    report.elapsed = started.elapsed();
    report
}

async fn sensor(spec: LoadSpec, client: usize) -> (u64, u64, Vec<u64>) {
    let mut options = MqttOptions::new(
        format!("{}{client}", spec.client_prefix),
        spec.mqtt.ip().to_string(),
        spec.mqtt.port(),
    );
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(2 << 20, 2 << 20);
    options.set_clean_session(true);
    let (mqtt, mut eventloop) = AsyncClient::new(options, 1000);
    let total = spec.messages_per_client;
    let qos = spec.qos;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    // Polls until the DISCONNECT is written: stopping earlier would drop unflushed publishes.
    let poller = tokio::spawn(async move {
        let mut done_tx = Some(done_tx);
        let mut acked = 0u64;
        let mut written = 0u64;
        let mut sent_at = std::collections::HashMap::new();
        let mut latencies = Vec::new();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(60), eventloop.poll()).await;
            match event {
                Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                    acked += 1;
                    if let Some(t) = sent_at.remove(&ack.pkid)
                        && latencies.len() < MAX_LATENCY_SAMPLES
                    {
                        latencies.push(Instant::now().duration_since(t).as_micros() as u64);
                    }
                }
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid)))) => {
                    written += 1;
                    if pkid != 0 {
                        sent_at.insert(pkid, Instant::now());
                    }
                }
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) => {
                    return (acked, latencies);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("sensor {client}: MQTT connection failed: {e}"),
                Err(_) => panic!("sensor {client}: no MQTT progress for 60 s ({acked} acked)"),
            }
            let done = match qos {
                QoS::AtMostOnce => written >= total,
                _ => acked >= total,
            };
            if done && let Some(tx) = done_tx.take() {
                let _ = tx.send(());
            }
        }
    });
    let interval = spec
        .rate_per_client
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let start = Instant::now();
    for i in 0..total {
        if let Some(every) = interval {
            let due = start + every.mul_f64(i as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        let topic = (spec.topic)(client, i);
        mqtt.publish(
            topic,
            qos,
            false,
            payload(spec.kind, client, i, spec.payload_bytes),
        )
        .await
        .expect("queue publish");
    }
    done_rx.await.expect("poller signals completion");
    mqtt.disconnect().await.expect("queue disconnect");
    let (acked, latencies) = poller.await.expect("poller");
    (total, acked, latencies)
}

/// A publisher that runs until stopped: QoS 1 at a steady rate to a fixed address, reconnecting
/// with a fresh session whenever the connection drops, and never republishing a message whose
/// PUBACK it did not get (so the log can hold each message at most once). It records when each
/// message was acknowledged.
pub struct Steady {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<SteadyLog>,
}

/// What a [`Steady`] publisher did.
#[derive(Debug, Default)]
pub struct SteadyLog {
    /// Messages handed to the client (acknowledged or not).
    pub published: u64,
    /// (message index, when its PUBACK arrived), in ack order.
    pub acked: Vec<(u64, Instant)>,
    /// Connections made.
    pub connections: u64,
}

impl Steady {
    /// Starts publishing `rate` messages/s of `payload_bytes` binary payloads (client id
    /// `client`) on `topic` to `mqtt`.
    pub fn start(
        mqtt: SocketAddr,
        client: usize,
        rate: f64,
        topic: &str,
        payload_bytes: usize,
    ) -> Steady {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let topic = topic.to_owned();
        let handle = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(steady(mqtt, client, rate, topic, payload_bytes, flag))
        });
        Steady { stop, handle }
    }

    /// Stops publishing (after the PUBACKs in flight, up to 2 s) and returns the log.
    pub fn stop(self) -> SteadyLog {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().expect("steady publisher")
    }
}

async fn steady(
    mqtt: SocketAddr,
    client: usize,
    rate: f64,
    topic: String,
    size: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> SteadyLog {
    use std::collections::VecDeque;
    use std::sync::atomic::Ordering;
    let mut log = SteadyLog::default();
    let every = Duration::from_secs_f64(1.0 / rate);
    let mut next_index = 0u64;
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        log.connections += 1;
        let mut options = MqttOptions::new(
            format!("steady-{client}-{}", log.connections),
            mqtt.ip().to_string(),
            mqtt.port(),
        );
        options.set_keep_alive(Duration::from_secs(5));
        options.set_clean_session(true);
        let (mqtt_client, mut eventloop) = AsyncClient::new(options, 100);
        // Indices handed to this client, in order; the n-th outgoing PUBLISH is the n-th of them.
        let mut queued: VecDeque<u64> = VecDeque::new();
        let mut in_flight: std::collections::HashMap<u16, u64> = std::collections::HashMap::new();
        let mut connected = false;
        let mut draining_since: Option<Instant> = None;
        loop {
            if stop.load(Ordering::Relaxed) && draining_since.is_none() {
                draining_since = Some(Instant::now());
            }
            if draining_since.is_some_and(|d| {
                in_flight.is_empty() && queued.is_empty() || d.elapsed() > Duration::from_secs(2)
            }) {
                return log;
            }
            let due = start + every.mul_f64(next_index as f64);
            let publish_now =
                connected && draining_since.is_none() && Instant::now() >= due && queued.len() < 50;
            if publish_now {
                if mqtt_client
                    .try_publish(
                        topic.clone(),
                        QoS::AtLeastOnce,
                        false,
                        payload(PayloadKind::Binary, client, next_index, size),
                    )
                    .is_ok()
                {
                    queued.push_back(next_index);
                    next_index += 1;
                    log.published += 1;
                }
                continue;
            }
            let wait = if connected {
                due.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(20))
            } else {
                Duration::from_millis(20)
            };
            let event = tokio::select! {
                e = eventloop.poll() => Some(e),
                _ = tokio::time::sleep(wait) => None,
            };
            match event {
                None => {}
                Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => connected = true,
                Some(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid)))) => {
                    if let Some(index) = queued.pop_front() {
                        in_flight.insert(pkid, index);
                    }
                }
                Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                    if let Some(index) = in_flight.remove(&ack.pkid) {
                        log.acked.push((index, Instant::now()));
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    // Connection gone: what was not acknowledged is abandoned, never resent.
                    if !connected {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    break;
                }
            }
        }
    }
    log
}
