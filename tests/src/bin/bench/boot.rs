//! Boot time to MQTT-open with a large buffer: the agent reads the whole file with
//! `PRAGMA quick_check` at a start after a crash, and skips that read after a clean stop that
//! left the file unchanged (`buffer/recovery.rs`). A buffer of 1,000,000 records of 200 B
//! (ingest unreachable, so they all stay) is booted, page cache dropped before each start:
//! this agent after a clean stop, the previous main after a clean stop (`BENCH_BASELINE_DIR`,
//! if built: it always checks), and this agent after `kill -9`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::AgentHarness;
use e2e::load::{self, LoadSpec, PayloadKind};
use rumqttc::QoS;

/// Drops the page cache (root only), so a start reads the buffer from disk as after a reboot.
fn drop_caches() -> bool {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Seconds from spawning `agent` (this tree's if `None`) on `dir`'s buffer to its MQTT
/// listener accepting; the agent is returned running.
fn boot(dir: &Path, ingest: &str, agent: Option<&Path>) -> (f64, e2e::Agent) {
    let mut harness = AgentHarness::new(dir, ingest).quota("4GiB");
    if let Some(bin) = agent {
        harness = harness.launcher(&[bin.to_path_buf()]);
    }
    let started = Instant::now();
    let running = harness.run();
    (started.elapsed().as_secs_f64(), running)
}

/// Prints the table.
pub fn table(scale: u64) {
    let records = 1_000_000 * scale;
    let dir = tempfile::tempdir().expect("tempdir");
    // An ingest that is never there: every record stays in the buffer.
    let ingest = format!("http://127.0.0.1:{}", e2e::free_port());
    let (_, mut agent) = boot(dir.path(), &ingest, None);
    let clients = 10;
    let report = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(load::publish(LoadSpec {
            mqtt: agent.mqtt,
            clients,
            messages_per_client: records / clients as u64,
            rate_per_client: None,
            payload_bytes: 200,
            kind: PayloadKind::Json,
            qos: QoS::AtLeastOnce,
            topic: Arc::new(|client, i| format!("plant/{client}/telemetry/t{}", i % 4)),
            client_prefix: "boot-".into(),
        }));
    assert_eq!(report.acked, records, "every record acknowledged");
    assert!(agent.process.terminate().success(), "a clean stop");
    let size = std::fs::metadata(dir.path().join("buffer.db")).map_or(0, |m| m.len());
    let cold = drop_caches();

    let mut rows = Vec::new();
    let (secs, mut agent) = boot(dir.path(), &ingest, None);
    rows.push(("this agent, after a clean stop", secs));
    assert!(agent.process.terminate().success(), "a clean stop");
    if let Some(base) = std::env::var_os("BENCH_BASELINE_DIR") {
        drop_caches();
        let bin = Path::new(&base).join("edge-agent");
        let (secs, mut agent) = boot(dir.path(), &ingest, Some(&bin));
        rows.push(("previous main (BENCH_BASELINE), after a clean stop", secs));
        assert!(agent.process.terminate().success(), "a clean stop");
    }
    // A crash: no clean-stop marker, so the whole file is read.
    let (_, mut agent) = boot(dir.path(), &ingest, None);
    std::thread::sleep(Duration::from_millis(500));
    agent.process.kill();
    drop_caches();
    let (secs, mut agent) = boot(dir.path(), &ingest, None);
    rows.push(("this agent, after kill -9", secs));
    agent.process.kill();

    println!();
    println!(
        "| boot to MQTT open, {records} records buffered ({} MiB file), page cache {} | seconds |",
        size >> 20,
        if cold { "dropped" } else { "warm (not root)" }
    );
    println!("|---|---:|");
    for (what, secs) in rows {
        println!("| {what} | {secs:.2} |");
    }
}
