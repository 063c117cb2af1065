//! Flash wear: the bytes the agent writes to its disk per record at steady rates of 100, 1,000
//! and 10,000 records/s (10 publishers of the load generator, QoS 1, 200 B JSON, delivered as
//! they come), and the write amplification: the bytes the buffer's device received (the
//! agent's directory is an ext4 of its own on a loop device, [`LoopDisk`]: the WAL, the
//! checkpoints, the database, the file system's journal, and the agent's log file, which is
//! there too) over the topic and payload bytes of the records; beside it `/proc/<pid>/io`
//! write_bytes (what the agent's own metric counts: whole page-cache folios, not the file
//! system's journal), the largest the WAL file grew (a WAL that never starts again grows
//! without end) and the PUBACK latency. This tree's agent and, with `BENCH_BASELINE`, the
//! previous one, and with `BENCH_FLASH_COMMIT_WINDOWS=5ms,20ms` each of them with each of
//! those `buffer.commit_window`s too (the operator's lever: fewer, fuller commits for a later
//! PUBACK); an entry `5ms/300us` is a window with a `buffer.commit_gap`, run with this tree's
//! agent only (an older one may not know the key). Alternating; medians of 3 rounds.
//! `BENCH_FLASH_CAPTURE=<dir>` keeps the first run's buffer for a look at its pages
//! ([`capture`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, CloudHarness};
use rumqttc::QoS;

use crate::device::LoopDisk;
use crate::median;
use crate::network::disk_writes;

const PUBLISHERS: u64 = 10;

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Bytes the buffer's device received per record ([`LoopDisk`]; NaN where it could not be
    /// set up).
    device_per_record: f64,
    /// Those over the records' topic + payload bytes: the write amplification.
    amplification: f64,
    /// Bytes written per record as `/proc/<pid>/io` write_bytes counts them (whole folios).
    per_record: f64,
    /// The largest the WAL file was during the run, MiB (sampled every 20 ms: [`e2e::PeakSize`]).
    wal_mib: f64,
    /// PUBACK latency p50 and p99, ms.
    puback_ms: (f64, f64),
}

/// One run of `agent` (`None`: this tree's) at `rate` records/s for `seconds`, with
/// `commit_window` if given.
fn measure(agent: Option<&Path>, rate: u64, seconds: u64, commit_window: Option<&str>) -> Measured {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    // Dropped after the agent (declared before it): unmounted once the agent stopped.
    let disk = LoopDisk::mount(dir.path(), 4);
    let agent_dir = disk
        .as_ref()
        .map_or_else(|| dir.path().to_owned(), |d| d.mount.clone());
    let mut harness = AgentHarness::new(&agent_dir, &cloud.url());
    if let Some(window) = commit_window {
        harness = harness.buffer_extra(&crate::commit_config(window));
    }
    if let Some(bin) = agent {
        harness = harness.launcher(&[bin.to_path_buf()]);
    }
    let agent = harness.run();
    let pid = agent.process.pid();
    // What the start wrote (the schema, the reserve file) is not the records'.
    std::thread::sleep(Duration::from_secs(1));
    let before = disk_writes(pid);
    let device_before = disk.as_ref().and_then(LoopDisk::written);
    let wal = e2e::PeakSize::watch(&agent_dir.join("buffer.db-wal"));
    let per_client = rate * seconds / PUBLISHERS;
    let total = per_client * PUBLISHERS;
    let spec = LoadSpec {
        mqtt: agent.mqtt,
        clients: PUBLISHERS as usize,
        messages_per_client: per_client,
        rate_per_client: Some(rate as f64 / PUBLISHERS as f64),
        payload_bytes: 200,
        kind: PayloadKind::Json,
        qos: QoS::AtLeastOnce,
        topic: Arc::new(|client, i| format!("plant/{client}/telemetry/t{}", i % 4)),
        client_prefix: "flash-".into(),
    };
    let report = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(load::publish(spec));
    assert_eq!(report.acked, total, "every publish acknowledged");
    if let Some(keep) = std::env::var_os("BENCH_FLASH_CAPTURE") {
        capture(agent, disk, &agent_dir, Path::new(&keep));
    }
    cloud.wait_for_records(total, Duration::from_secs(120));
    // The acknowledgements' deletes and the checkpoint after them (every 500 ms).
    std::thread::sleep(Duration::from_secs(2));
    let written = disk_writes(pid).saturating_sub(before) as f64;
    let device = match (disk.as_ref().and_then(LoopDisk::written), device_before) {
        (Some(after), Some(before)) => after.saturating_sub(before) as f64,
        _ => f64::NAN,
    };
    let raw = agent.metric("agent_raw_bytes_total");
    let wal = wal.stop();
    Measured {
        device_per_record: device / total as f64,
        amplification: device / raw.max(1.0),
        per_record: written / total as f64,
        wal_mib: wal as f64 / (1u64 << 20) as f64,
        puback_ms: (report.ack_latency_ms(0.5), report.ack_latency_ms(0.99)),
    }
}

/// `BENCH_FLASH_CAPTURE=<dir>`: kills the agent (SIGKILL, so nothing is checkpointed) right
/// after its first run's publishes, keeps its buffer and WAL in `keep` and ends the bench; the
/// WAL then holds the commits since the last checkpoint, which `tests/wal_pages.py <dir>`
/// counts by page and b-tree.
fn capture(mut agent: e2e::Agent, disk: Option<LoopDisk>, agent_dir: &Path, keep: &Path) -> ! {
    agent.process.kill();
    std::fs::create_dir_all(keep).expect("capture directory");
    for f in ["buffer.db", "buffer.db-wal"] {
        std::fs::copy(agent_dir.join(f), keep.join(f)).expect("copy the buffer");
    }
    drop(disk);
    println!("the buffer and its WAL are in {}", keep.display());
    std::process::exit(0);
}

fn medians(runs: &[Measured]) -> Measured {
    // A round without the device's figure (no loop device) leaves none for the row.
    let device = |v: Vec<f64>| {
        if v.iter().any(|x| x.is_nan()) {
            f64::NAN
        } else {
            median(v)
        }
    };
    Measured {
        device_per_record: device(runs.iter().map(|m| m.device_per_record).collect()),
        per_record: median(runs.iter().map(|m| m.per_record).collect()),
        amplification: device(runs.iter().map(|m| m.amplification).collect()),
        wal_mib: median(runs.iter().map(|m| m.wal_mib).collect()),
        puback_ms: (
            median(runs.iter().map(|m| m.puback_ms.0).collect()),
            median(runs.iter().map(|m| m.puback_ms.1).collect()),
        ),
    }
}

/// Prints the table.
pub fn table(scale: u64) {
    let baseline = crate::baseline_agent();
    // BENCH_FLASH_COMMIT_WINDOWS=5ms,20ms (comma-separated): this tree's agent with each too.
    let windows = crate::commit_settings("BENCH_FLASH_COMMIT_WINDOWS");
    println!();
    println!(
        "| steady rate, 10 publishers, QoS 1, 200 B JSON | bytes the device received per record | write amplification (device bytes / topic + payload) | write_bytes per record (page cache, whole folios) | largest WAL file, MiB | PUBACK p50 / p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    // BENCH_FLASH_RATES=10000 (comma-separated) measures only those of the three rates.
    let only: Option<Vec<u64>> = std::env::var("BENCH_FLASH_RATES")
        .ok()
        .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect());
    for (rate, seconds) in [(100u64, 30u64), (1_000, 15), (10_000, 10)] {
        if only.as_ref().is_some_and(|o| !o.contains(&rate)) {
            continue;
        }
        let seconds = seconds * scale;
        // Per row: its label, its agent, its commit window; the rows alternate within a round.
        let mut rows: Vec<(String, Option<&Path>, Option<&str>)> =
            vec![("this version".into(), None, None)];
        if let Some(bin) = &baseline {
            rows.push(("baseline".into(), Some(bin.as_path()), None));
        }
        for w in &windows {
            rows.push((format!("this version, commit {w}"), None, Some(w.as_str())));
            if let Some(bin) = baseline.as_ref().filter(|_| !w.contains('/')) {
                rows.push((
                    format!("baseline, commit {w}"),
                    Some(bin.as_path()),
                    Some(w.as_str()),
                ));
            }
        }
        let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); rows.len()];
        for _ in 0..3 {
            for (row, (_, agent, window)) in rows.iter().enumerate() {
                runs[row].push(measure(*agent, rate, seconds, *window));
            }
        }
        for ((label, _, _), runs) in rows.iter().zip(&runs) {
            let m = medians(runs);
            println!(
                "| {rate} records/s, {label} | {:.0} | {:.2} | {:.0} | {:.1} | {:.1} / {:.1} |",
                m.device_per_record,
                m.amplification,
                m.per_record,
                m.wal_mib,
                m.puback_ms.0,
                m.puback_ms.1
            );
        }
    }
}
