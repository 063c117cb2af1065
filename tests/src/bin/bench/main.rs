//! `bench`: the pipeline's throughput and memory, measured with the real release binaries on
//! this machine, printed as a Markdown table. Run with `bash tests/bench.sh`.
//!
//! Each scenario starts a fresh ingest (embedded log) and agent, publishes with N simulated
//! sensors as fast as the broker takes them, and waits until every record is in the log.
//!
//! The second table is the ingest's overhead on Kafka: the same records POSTed as batches to
//! the ingest (which answers once Kafka acknowledged each record) against a plain rdkafka
//! producer with the same settings, both on one tansu broker on this machine.

mod at_rest;
mod boot;
mod device;
mod embedded_log;
mod flash;
mod front_door;
mod memory;
mod network;
mod peers;
mod transforms;
mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::brokers::Tansu;
use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, CloudHarness, DEVICE, TOKEN, peak_rss_mib};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rumqttc::QoS;

struct Scenario {
    name: &'static str,
    clients: usize,
    per_client: u64,
    payload_bytes: usize,
    qos: QoS,
    /// Extra `mqtt:` keys of the agent (the 512 MB board profile).
    mqtt_extra: &'static str,
    /// Extra `ingest:` keys of the agent (the 512 MB board profile).
    ingest_extra: &'static str,
}

/// The memory keys of `cross/agent.yaml`, the packaged profile for a 512 MB board.
const BOARD_512MB: &str = "  router_segment_bytes: 1MiB\n  router_segments: 4\n";
/// Its uplink key that bounds memory: batches built at once.
const BOARD_512MB_INGEST: &str = "  max_in_flight: 2\n";

struct Row {
    name: &'static str,
    records: u64,
    publish_rate: f64,
    e2e_rate: f64,
    agent_peak_rss_mb: f64,
    ingest_peak_rss_mb: f64,
    wire_over_raw: f64,
    lost: u64,
    lost_counted: u64,
}

fn run(s: &Scenario) -> Row {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .mqtt_extra(s.mqtt_extra)
        .ingest_extra(s.ingest_extra)
        .run();
    let spec = LoadSpec {
        mqtt: agent.mqtt,
        clients: s.clients,
        messages_per_client: s.per_client,
        rate_per_client: None,
        payload_bytes: s.payload_bytes,
        kind: PayloadKind::Json,
        qos: s.qos,
        topic: Arc::new(|client, i| format!("plant/{client}/telemetry/t{}", i % 4)),
        client_prefix: "bench-".into(),
    };
    let total = s.clients as u64 * s.per_client;
    let started = Instant::now();
    let report = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(load::publish(spec));
    // Done when every record is in the log or counted as lost by the agent (never silent).
    let deadline = Instant::now() + Duration::from_secs(300);
    let dropped = || {
        agent.metric("agent_records_dropped_total{reason=\"broker_overflow\",stream=\"(unknown)\"}")
            as u64
    };
    while cloud.total_records() + dropped() < total {
        assert!(
            Instant::now() < deadline,
            "{}: records neither in the log nor counted as lost after 300 s",
            s.name
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let e2e = started.elapsed();
    let in_log = cloud.total_records();
    let wire = agent.metric("agent_wire_bytes_total");
    let raw = agent.metric("agent_raw_bytes_total");
    Row {
        name: s.name,
        records: total,
        publish_rate: report.published as f64 / report.elapsed.as_secs_f64(),
        e2e_rate: in_log as f64 / e2e.as_secs_f64(),
        lost: total - in_log,
        lost_counted: dropped(),
        agent_peak_rss_mb: peak_rss_mib(agent.process.pid()),
        ingest_peak_rss_mb: peak_rss_mib(cloud.process.pid()),
        wire_over_raw: if raw > 0.0 { wire / raw } else { 0.0 },
    }
}

/// Records per batch and concurrent senders in the Kafka comparison.
const KAFKA_BATCH: u64 = 1000;
const KAFKA_SENDERS: usize = 4;

/// The batches sender `sender` posts: `batches` × `per_batch` records of 200 B JSON, as the
/// test device on stream `bench<sender>`, sequences from 1.
pub(crate) fn json_batches(sender: usize, batches: u64, per_batch: u64) -> Vec<ingest_wire::Batch> {
    json_batches_of(
        DEVICE,
        &format!("bench{sender}"),
        sender,
        batches,
        per_batch,
    )
}

/// [`json_batches`] as `device` on `stream`.
pub(crate) fn json_batches_of(
    device: &str,
    stream: &str,
    sender: usize,
    batches: u64,
    per_batch: u64,
) -> Vec<ingest_wire::Batch> {
    (0..batches)
        .map(|b| {
            let records = (0..per_batch)
                .map(|i| {
                    let seq = b * per_batch + i + 1;
                    ingest_wire::Record {
                        seq,
                        topic: format!("plant/{sender}/telemetry/t{}", seq % 4),
                        payload: load::payload(PayloadKind::Json, sender, seq, 200).into(),
                        qos: None,
                        received_at_ms: e2e::now_ms(),
                        ..Default::default()
                    }
                })
                .collect();
            ingest_wire::Batch {
                device_id: device.into(),
                stream: stream.into(),
                // Unknown (0): the bodies are posted again in later rounds, and a send time
                // more than a minute old would read as a skewed clock to correct.
                sent_at_ms: 0,
                epoch: 1,
                records,
            }
        })
        .collect()
}

/// Rounds of the Kafka comparison; the table shows the medians (this VM's noise is ±25%).
const KAFKA_ROUNDS: usize = 3;

/// Median records/s through the ingest into Kafka, and through a plain rdkafka producer, each
/// run on a fresh broker (tansu's memory storage slows as it fills), alternating.
fn kafka_overhead(records: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let per_sender = records / KAFKA_BATCH / KAFKA_SENDERS as u64;
    let total = per_sender * KAFKA_SENDERS as u64 * KAFKA_BATCH;
    let bodies: Vec<Vec<Vec<u8>>> = (0..KAFKA_SENDERS)
        .map(|s| {
            json_batches(s, per_sender, KAFKA_BATCH)
                .iter()
                .map(|b| ingest_wire::compress(&ingest_wire::encode_batch(b), 3).expect("zstd"))
                .collect()
        })
        .collect();
    let (mut via_ingest, mut direct) = (Vec::new(), Vec::new());
    for _ in 0..KAFKA_ROUNDS {
        via_ingest.push(through_ingest(dir.path(), &bodies, total));
        let tansu = Tansu::start(dir.path());
        direct.push(
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(produce_directly(&tansu.brokers, total)),
        );
    }
    (median(via_ingest), median(direct))
}

/// The median of `v` (the upper one of an even count).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The baseline's agent that `tests/bench.sh` built from `BENCH_BASELINE`
/// (`BENCH_BASELINE_DIR`), if any.
pub(crate) fn baseline_agent() -> Option<std::path::PathBuf> {
    baseline_bin("edge-agent")
}

/// The baseline's ingest (`BENCH_BASELINE_DIR`), if any.
pub(crate) fn baseline_ingest() -> Option<std::path::PathBuf> {
    baseline_bin("cloud-ingest")
}

/// The commit settings listed in the environment variable `var`, comma-separated: `5ms` is a
/// `buffer.commit_window`, `5ms/300us` a window and a `buffer.commit_gap`.
pub(crate) fn commit_settings(var: &str) -> Vec<String> {
    std::env::var(var)
        .map(|v| {
            v.split(',')
                .map(|w| w.trim().to_owned())
                .filter(|w| !w.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// The `buffer:` lines of a commit setting ([`commit_settings`]).
pub(crate) fn commit_config(setting: &str) -> String {
    match setting.split_once('/') {
        Some((window, gap)) => format!("  commit_window: {window}\n  commit_gap: {gap}\n"),
        None => format!("  commit_window: {setting}\n"),
    }
}

fn baseline_bin(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("BENCH_BASELINE_DIR")
        .map(|d| std::path::PathBuf::from(d).join(name))
        .filter(|p| p.exists())
}

/// records/s of `bodies` (one list per concurrent sender) POSTed to a fresh ingest on a fresh
/// broker, until the last 2xx.
fn through_ingest(dir: &std::path::Path, bodies: &[Vec<Vec<u8>>], total: u64) -> f64 {
    let tansu = Tansu::start(dir);
    let cloud = CloudHarness::new(dir)
        .sink(&format!(
            "  type: kafka\n  options:\n    brokers: {}\n    delivery_timeout: 30s\n",
            tansu.brokers
        ))
        .run();
    // Warm-up: the topics exist before the clock starts, for both sides.
    let url = format!("{}{}", cloud.url(), ingest_wire::BATCHES_PATH);
    let http = reqwest::blocking::Client::new();
    for sender in bodies {
        post_until_ok(
            &http,
            &url,
            ingest_wire::CONTENT_TYPE_BATCH,
            DEVICE,
            TOKEN,
            &sender[0],
        );
    }
    let started = Instant::now();
    std::thread::scope(|scope| {
        for sender in bodies {
            let url = &url;
            scope.spawn(move || {
                let http = reqwest::blocking::Client::new();
                // The first batch went in the warm-up; its retry is a duplicate, not counted.
                for body in &sender[1..] {
                    post_until_ok(
                        &http,
                        url,
                        ingest_wire::CONTENT_TYPE_BATCH,
                        DEVICE,
                        TOKEN,
                        body,
                    );
                }
            });
        }
    });
    let sent = total - bodies.len() as u64 * KAFKA_BATCH;
    sent as f64 / started.elapsed().as_secs_f64()
}

/// POSTs `body` (zstd, of `content_type`) as `device` with `token` until a 2xx.
pub(crate) fn post_until_ok(
    http: &reqwest::blocking::Client,
    url: &str,
    content_type: &str,
    device: &str,
    token: &str,
    body: &[u8],
) {
    for _ in 0..100 {
        let answer = http
            .post(url)
            .header("content-type", content_type)
            .header("content-encoding", ingest_wire::ENCODING_ZSTD)
            .header(ingest_wire::HEADER_DEVICE_ID, device)
            .header("authorization", format!("Bearer {token}"))
            .body(body.to_vec())
            .send();
        match answer {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => eprintln!("ingest answered {}; retrying", r.status()),
            Err(e) => eprintln!("request failed: {e}; retrying"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("the ingest never took a batch");
}

/// (topic index, payload, headers) of one record of the direct run.
type PreparedRecord = (usize, Vec<u8>, Vec<(&'static str, String)>);

/// The same records straight from an rdkafka producer configured as the ingest's (idempotent,
/// acks=all, zstd, linger 5 ms, the same key, headers and number of topics); records/s until
/// all acknowledged.
async fn produce_directly(brokers: &str, records: u64) -> f64 {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "zstd")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    // As many topics as the ingest's senders have streams, records spread over them.
    let topics: Vec<String> = (0..KAFKA_SENDERS)
        .map(|t| format!("iot.direct.bench{t}"))
        .collect();
    // Built before the clock starts, as the ingest's request bodies are.
    let prepared: Vec<PreparedRecord> = (0..records + KAFKA_SENDERS as u64)
        .map(|seq| {
            let headers = vec![
                ("device", DEVICE.to_owned()),
                ("tenant", "direct".to_owned()),
                ("stream", "bench".to_owned()),
                ("epoch", "1".to_owned()),
                ("seq", seq.to_string()),
                ("mqtt_topic", format!("plant/0/telemetry/t{}", seq % 4)),
                ("received_at_ms", e2e::now_ms().to_string()),
                ("sent_at_ms", e2e::now_ms().to_string()),
                ("ingested_at_ms", e2e::now_ms().to_string()),
                ("batch_id", format!("{DEVICE}/bench/1/{seq}-{seq}")),
            ];
            let payload = load::payload(PayloadKind::Json, 0, seq, 200);
            (seq as usize % KAFKA_SENDERS, payload, headers)
        })
        .collect();
    let send = |seq: u64| {
        let (topic, payload, fields) = &prepared[seq as usize];
        let topic = &topics[*topic];
        let headers = fields.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_str()),
            })
        });
        let mut record = FutureRecord::to(topic)
            .key(DEVICE)
            .payload(payload)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => return delivery,
                Err((_, back)) => {
                    // Queue full: let librdkafka drain a little.
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    };
    let delivered = |r: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, _>| {
        assert!(matches!(r, Ok(Ok(_))), "record not delivered: {r:?}");
    };
    for t in 0..KAFKA_SENDERS as u64 {
        delivered(send(t).await);
    }
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for seq in KAFKA_SENDERS as u64..records + KAFKA_SENDERS as u64 {
        pending.push_back(send(seq));
        if pending.len() >= 4_000
            && let Some(oldest) = pending.pop_front()
        {
            delivered(oldest.await);
        }
    }
    for p in pending {
        delivered(p.await);
    }
    records as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let scale: u64 = std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let scenarios = [
        Scenario {
            name: "QoS1, 200 B JSON, 10 sensors",
            clients: 10,
            per_client: 30_000 * scale,
            payload_bytes: 200,
            qos: QoS::AtLeastOnce,
            mqtt_extra: "",
            ingest_extra: "",
        },
        Scenario {
            name: "QoS0, 200 B JSON, 10 sensors",
            clients: 10,
            per_client: 30_000 * scale,
            payload_bytes: 200,
            qos: QoS::AtMostOnce,
            mqtt_extra: "",
            ingest_extra: "",
        },
        Scenario {
            name: "QoS1, 1 KiB JSON, 5 sensors",
            clients: 5,
            per_client: 20_000 * scale,
            payload_bytes: 1024,
            qos: QoS::AtLeastOnce,
            mqtt_extra: "",
            ingest_extra: "",
        },
        Scenario {
            name: "QoS1, 200 B JSON, 10 sensors, 512 MB board profile",
            clients: 10,
            per_client: 30_000 * scale,
            payload_bytes: 200,
            qos: QoS::AtLeastOnce,
            mqtt_extra: BOARD_512MB,
            ingest_extra: BOARD_512MB_INGEST,
        },
    ];
    // BENCH_ONLY=pipeline|kafka|network|wire|memory|drain|frontdoor|boot|transforms|peers|flash|log runs one group of tables.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let runs = |table: &str| only.is_empty() || only == table;
    let scenarios = if runs("pipeline") {
        &scenarios[..]
    } else {
        &scenarios[..0]
    };
    if runs("pipeline") {
        println!(
            "| scenario | records | publish msg/s | end-to-end records/s | agent peak RSS MiB | ingest peak RSS MiB | wire / raw bytes | lost (counted by the agent) |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    }
    for s in scenarios {
        let r = run(s);
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.3} | {} ({}) |",
            r.name,
            r.records,
            r.publish_rate,
            r.e2e_rate,
            r.agent_peak_rss_mb,
            r.ingest_peak_rss_mb,
            r.wire_over_raw,
            r.lost,
            r.lost_counted
        );
    }
    if runs("kafka") {
        let records = 200_000 * scale;
        let (via_ingest, direct) = kafka_overhead(records);
        println!();
        println!(
            "| into Kafka (tansu, memory storage), {records} records of 200 B JSON | records/s |"
        );
        println!("|---|---:|");
        println!(
            "| cloud-ingest: {KAFKA_SENDERS} senders × batches of {KAFKA_BATCH}, 2xx after Kafka acked each record | {via_ingest:.0} |"
        );
        println!("| plain rdkafka producer, same settings, key and headers | {direct:.0} |");
        println!("| ratio (ingest / direct) | {:.2} |", via_ingest / direct);
    }
    if runs("network") {
        network_tables();
    }
    if runs("memory") {
        memory::table(scale);
    }
    if runs("wire") {
        wire::table();
    }
    if runs("drain") {
        network::drain_table(scale);
    }
    if runs("frontdoor") {
        front_door::table(scale);
    }
    if runs("boot") {
        boot::table(scale);
    }
    if runs("transforms") {
        transforms::table(scale);
    }
    if runs("peers") {
        peers::table(scale);
    }
    if runs("flash") {
        flash::table(scale);
    }
    if runs("log") {
        embedded_log::table(scale);
    }
}

/// Issue 4's figures for the network layer as it is (see `network.rs`).
fn network_tables() {
    println!();
    println!("| records per batch | wire / raw, zstd level 1 | with a 4 KiB dictionary |");
    println!("|---:|---:|---:|");
    for (n, plain, dict) in network::wire_ratios() {
        println!("| {n} | {plain:.3} | {dict:.3} |");
    }
    println!();
    println!("| zstd level, 1000-record batches | wire / raw | compression MB/s (one core) |");
    println!("|---:|---:|---:|");
    for (level, ratio, speed) in network::level_sweep() {
        println!("| {level} | {ratio:.3} | {speed:.0} |");
    }
    println!();
    println!(
        "| compression at rest? design, records per commit | disk bytes written per record | wire / raw | building 1000-record requests, µs per record |"
    );
    println!("|---|---:|---:|---:|");
    for r in at_rest::measure() {
        println!(
            "| {}, {} | {:.0} | {:.3} | {:.2} |",
            r.design, r.group, r.disk_per_record, r.wire_ratio, r.drain_us_per_record
        );
    }
}
