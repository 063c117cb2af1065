//! `bench`: the pipeline's throughput and memory, measured with the real release binaries on
//! this machine, printed as a Markdown table. Run with `bash tests/bench.sh`.
//!
//! Each scenario starts a fresh ingest (embedded log) and agent, publishes with N simulated
//! sensors as fast as the broker takes them, and waits until every record is in the log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, CloudHarness};
use rumqttc::QoS;

struct Scenario {
    name: &'static str,
    clients: usize,
    per_client: u64,
    payload_bytes: usize,
    qos: QoS,
}

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

/// Peak resident set size of `pid` in MiB (VmHWM).
fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn run(s: &Scenario) -> Row {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
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
        agent_peak_rss_mb: peak_rss_mb(agent.process.pid()),
        ingest_peak_rss_mb: peak_rss_mb(cloud.process.pid()),
        wire_over_raw: if raw > 0.0 { wire / raw } else { 0.0 },
    }
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
        },
        Scenario {
            name: "QoS0, 200 B JSON, 10 sensors",
            clients: 10,
            per_client: 30_000 * scale,
            payload_bytes: 200,
            qos: QoS::AtMostOnce,
        },
        Scenario {
            name: "QoS1, 1 KiB JSON, 5 sensors",
            clients: 5,
            per_client: 20_000 * scale,
            payload_bytes: 1024,
            qos: QoS::AtLeastOnce,
        },
    ];
    println!(
        "| scenario | records | publish msg/s | end-to-end records/s | agent peak RSS MiB | ingest peak RSS MiB | wire / raw bytes | lost (counted by the agent) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for s in &scenarios {
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
}
