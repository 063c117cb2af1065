//! The front door's throughput and latency against a baseline: QoS 1, 200 B JSON, 1, 10 and
//! 100 publishers of the load generator; end to end (first publish → last record in the log),
//! PUBACK latency and the agent's peak RSS. The baseline's agent (`BENCH_BASELINE_DIR`, which
//! `tests/bench.sh` builds from the git ref in `BENCH_BASELINE`) and this one alternate, three
//! rounds each; the table shows the medians. With `BENCH_FRONTDOOR_COMMIT_WINDOWS=1ms,5ms/300us`
//! this tree's agent runs with each of those commit settings too ([`crate::commit_settings`]).
//! (It first measured the PUBACK after fsync against a main that acknowledged on receipt:
//! BENCHMARKS.md.)

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, CloudHarness, peak_rss_mib};
use rumqttc::QoS;

use crate::median;

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Measured {
    rate: f64,
    p50: f64,
    p99: f64,
    rss: f64,
}

/// One run of `agent` (`None`: this tree's) with `publishers` sensors, and the commit setting
/// `commit` if given.
fn measure(agent: Option<&Path>, publishers: usize, total: u64, commit: Option<&str>) -> Measured {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let mut harness = AgentHarness::new(dir.path(), &cloud.url());
    if let Some(commit) = commit {
        harness = harness.buffer_extra(&crate::commit_config(commit));
    }
    if let Some(bin) = agent {
        harness = harness.launcher(&[bin.to_path_buf()]);
    }
    let agent = harness.run();
    let per_client = total / publishers as u64;
    let spec = LoadSpec {
        mqtt: agent.mqtt,
        clients: publishers,
        messages_per_client: per_client,
        rate_per_client: None,
        payload_bytes: 200,
        kind: PayloadKind::Json,
        qos: QoS::AtLeastOnce,
        topic: Arc::new(|client, i| format!("plant/{client}/telemetry/t{}", i % 4)),
        client_prefix: "door-".into(),
    };
    let total = per_client * publishers as u64;
    let started = Instant::now();
    let report = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(load::publish(spec));
    cloud.wait_for_records(total, Duration::from_secs(300));
    Measured {
        rate: total as f64 / started.elapsed().as_secs_f64(),
        p50: report.ack_latency_ms(0.5),
        p99: report.ack_latency_ms(0.99),
        rss: peak_rss_mib(agent.process.pid()),
    }
}

fn medians(runs: &[Measured]) -> Measured {
    Measured {
        rate: median(runs.iter().map(|m| m.rate).collect()),
        p50: median(runs.iter().map(|m| m.p50).collect()),
        p99: median(runs.iter().map(|m| m.p99).collect()),
        rss: median(runs.iter().map(|m| m.rss).collect()),
    }
}

/// Prints the table.
pub fn table(scale: u64) {
    let baseline = crate::baseline_agent();
    let settings = crate::commit_settings("BENCH_FRONTDOOR_COMMIT_WINDOWS");
    println!();
    println!(
        "| QoS 1, 200 B JSON | end-to-end records/s | PUBACK p50 / p99 ms | agent peak RSS MiB |"
    );
    println!("|---|---:|---:|---:|");
    for publishers in [1usize, 10, 100] {
        let total = 60_000 * scale;
        let (mut new, mut old) = (Vec::new(), Vec::new());
        let mut with: Vec<Vec<Measured>> = vec![Vec::new(); settings.len()];
        for _ in 0..3 {
            new.push(measure(None, publishers, total, None));
            if let Some(bin) = &baseline {
                old.push(measure(Some(bin), publishers, total, None));
            }
            for (runs, commit) in with.iter_mut().zip(&settings) {
                runs.push(measure(None, publishers, total, Some(commit)));
            }
        }
        let row = |label: &str, m: Measured| {
            println!(
                "| {publishers} publishers, {label} | {:.0} | {:.1} / {:.1} | {:.1} |",
                m.rate, m.p50, m.p99, m.rss
            );
        };
        let n = medians(&new);
        row("this version", n);
        for (runs, commit) in with.iter().zip(&settings) {
            let m = medians(runs);
            row(&format!("this version, commit {commit}"), m);
            println!(
                "| {publishers} publishers, ratio commit {commit} / this version | {:.2} | | |",
                m.rate / n.rate
            );
        }
        if !old.is_empty() {
            let o = medians(&old);
            row("baseline (BENCH_BASELINE)", o);
            println!(
                "| {publishers} publishers, ratio this / previous | {:.2} | | |",
                n.rate / o.rate
            );
        }
    }
}
