//! Side by side with Mosquitto, in one run: what a user choosing between us and the broker they
//! run today needs is ratios on the same machine at the same moment, not absolute figures from
//! another day. The same load generator (10 publishers, 200 B JSON, QoS 1) publishes to:
//! - Debian's Mosquitto alone, no subscriber (broker intake only: every PUBACK received);
//! - Mosquitto with one QoS 1 `mosquitto_sub` (non-durable pub/sub: until the subscriber has
//!   every message);
//! - this agent and ingest, durable end to end (until every record is in the embedded log), and
//!   the baseline's (`BENCH_BASELINE_DIR`) when there is one.
//!
//! Three rounds, the systems alternating within each; the table shows the medians, with each
//! one's peak RSS.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::brokers::Mosquitto;
use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, CloudHarness, peak_rss_mib};
use rumqttc::QoS;

use crate::median;

const PUBLISHERS: usize = 10;
const ROUNDS: usize = 3;

/// One run: records/s and the peak RSS (MiB) of each process that held the data.
#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    rate: f64,
    rss: f64,
    rss_ingest: f64,
}

fn load(mqtt: std::net::SocketAddr, total: u64) -> load::LoadReport {
    let spec = LoadSpec {
        mqtt,
        clients: PUBLISHERS,
        messages_per_client: total / PUBLISHERS as u64,
        rate_per_client: None,
        payload_bytes: 200,
        kind: PayloadKind::Json,
        qos: QoS::AtLeastOnce,
        topic: Arc::new(|client, i| format!("plant/{client}/telemetry/t{}", i % 4)),
        client_prefix: "peer-".into(),
    };
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(load::publish(spec))
}

fn mosquitto_intake(total: u64) -> Measured {
    let dir = tempfile::tempdir().expect("tempdir");
    let mosquitto = Mosquitto::start_in_memory(dir.path());
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], mosquitto.port));
    let report = load(addr, total);
    assert_eq!(report.acked, total, "Mosquitto acknowledged every message");
    Measured {
        rate: report.acked as f64 / report.elapsed.as_secs_f64(),
        rss: peak_rss_mib(mosquitto.process.pid()),
        rss_ingest: 0.0,
    }
}

fn mosquitto_pub_sub(total: u64) -> Measured {
    let dir = tempfile::tempdir().expect("tempdir");
    let mosquitto = Mosquitto::start_in_memory(dir.path());
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], mosquitto.port));
    // Exits once it has `total` messages.
    let mut subscriber = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &mosquitto.port.to_string()])
        .args(["-q", "1", "-t", "plant/#", "-C", &total.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("mosquitto_sub");
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let report = load(addr, total);
    assert_eq!(report.acked, total);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if subscriber.try_wait().expect("mosquitto_sub").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the subscriber never got them all"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Measured {
        rate: total as f64 / started.elapsed().as_secs_f64(),
        rss: peak_rss_mib(mosquitto.process.pid()),
        rss_ingest: 0.0,
    }
}

/// This tree's agent and ingest, or the baseline's (`BENCH_BASELINE_DIR`: its agent, and its
/// ingest when it has one).
fn durable(total: u64, baseline: bool) -> Measured {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cloud = CloudHarness::new(dir.path());
    if let Some(ingest) = crate::baseline_ingest().filter(|_| baseline) {
        cloud = cloud.binary(&ingest);
    }
    let cloud = cloud.run();
    let mut agent = AgentHarness::new(dir.path(), &cloud.url());
    if baseline {
        agent = agent.launcher(&[crate::baseline_agent().expect("a baseline agent")]);
    }
    let agent = agent.run();
    let started = Instant::now();
    let report = load(agent.mqtt, total);
    assert_eq!(report.acked, total);
    cloud.wait_for_records(total, Duration::from_secs(300));
    Measured {
        rate: total as f64 / started.elapsed().as_secs_f64(),
        rss: peak_rss_mib(agent.process.pid()),
        rss_ingest: peak_rss_mib(cloud.process.pid()),
    }
}

fn medians(runs: &[Measured]) -> Measured {
    Measured {
        rate: median(runs.iter().map(|m| m.rate).collect()),
        rss: median(runs.iter().map(|m| m.rss).collect()),
        rss_ingest: median(runs.iter().map(|m| m.rss_ingest).collect()),
    }
}

/// Prints the table.
pub fn table(scale: u64) {
    let total = 200_000 * scale;
    let with_baseline = crate::baseline_agent().is_some();
    let (mut intake, mut pub_sub, mut durable, mut baseline) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        intake.push(mosquitto_intake(total));
        pub_sub.push(mosquitto_pub_sub(total));
        durable.push(self::durable(total, false));
        if with_baseline {
            baseline.push(self::durable(total, true));
        }
    }
    let (intake, pub_sub, durable) = (medians(&intake), medians(&pub_sub), medians(&durable));
    println!();
    println!(
        "| {PUBLISHERS} publishers, 200 B JSON, QoS 1, {total} messages, medians of {ROUNDS} alternating rounds | records/s | peak RSS MiB |"
    );
    println!("|---|---:|---:|");
    println!(
        "| Mosquitto, no subscriber (broker intake only), persistence off | {:.0} | {:.1} |",
        intake.rate, intake.rss
    );
    println!(
        "| Mosquitto, one QoS 1 `mosquitto_sub` (non-durable pub/sub) | {:.0} | {:.1} |",
        pub_sub.rate, pub_sub.rss
    );
    println!(
        "| edge-agent + cloud-ingest, durable end to end (published → in the embedded log) | {:.0} | agent {:.1}, ingest {:.1} |",
        durable.rate, durable.rss, durable.rss_ingest
    );
    println!(
        "| ratio: durable end to end / Mosquitto pub/sub | {:.2} | |",
        durable.rate / pub_sub.rate
    );
    println!(
        "| ratio: durable end to end / Mosquitto intake only | {:.2} | |",
        durable.rate / intake.rate
    );
    if with_baseline {
        let baseline = medians(&baseline);
        println!(
            "| baseline (BENCH_BASELINE) agent + ingest, durable end to end | {:.0} | agent {:.1}, ingest {:.1} |",
            baseline.rate, baseline.rss, baseline.rss_ingest
        );
        println!(
            "| ratio: this durable end to end / the baseline's | {:.2} | |",
            durable.rate / baseline.rate
        );
    }
}
