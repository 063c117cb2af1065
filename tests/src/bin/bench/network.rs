//! The network layer's figures (issue 4's benchmarks), measured on the pipeline as it is:
//! wire bytes per raw byte by batch size with and without a zstd dictionary, bytes written to
//! the gateway's disk per record; and (`BENCH_ONLY=drain`) the drain of a 1,000,000-record
//! backlog under 10,000 records/s of live load against the time the buffer alone needs to read
//! and delete those records (`agent/examples/buffer_drain.rs`, same run), with critical latency
//! online and during that drain, beside the baseline's agent (`BENCH_BASELINE_DIR`) and its
//! ingest, when the baseline has them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::load::{self, LoadSpec, PayloadKind, Steady};
use e2e::{AgentHarness, CRITICAL_AND_BULK, CloudHarness, DEVICE, TENANT, free_port};
use rumqttc::QoS;

/// The agent's default zstd level.
const LEVEL: i32 = 1;
/// Dictionary size the issue measured with.
const DICT_BYTES: usize = 4096;

fn record(client: usize, i: u64) -> ingest_wire::Record {
    ingest_wire::Record {
        seq: i + 1,
        topic: format!("plant/{client}/telemetry/t{}", i % 4),
        payload: load::payload(PayloadKind::Json, client, i, 200).into(),
        received_at_ms: 1_795_000_000_000 + i as i64 * 10,
        // As the agent sends them: the host's boot id and time since boot on every record.
        boot_id: "5f2c1a9e-3b7d-4e8a-9c21-0d4b6e8f1a2c".into(),
        monotonic_ms: 60_000 + i * 10,
        qos: None,
        attributes: Vec::new(),
    }
}

fn batch(client: usize, first: u64, n: u64) -> (Vec<u8>, usize) {
    let records: Vec<_> = (first..first + n).map(|i| record(client, i)).collect();
    let raw = records
        .iter()
        .map(|r| r.topic.len() + r.payload.len())
        .sum();
    let b = ingest_wire::Batch {
        device_id: DEVICE.into(),
        stream: "telemetry".into(),
        sent_at_ms: 1_795_000_000_000,
        records,
        epoch: 1,
    };
    (ingest_wire::encode_batch(&b), raw)
}

/// (records per batch, wire/raw without dictionary, wire/raw with a 4 KiB dictionary).
pub fn wire_ratios() -> Vec<(u64, f64, f64)> {
    // The dictionary is trained on other sensors' single-record batches, as an agent would
    // train it on its own history.
    let samples: Vec<Vec<u8>> = (0..2000u64)
        .map(|i| batch(100 + (i % 10) as usize, i, 1).0)
        .collect();
    let dict = zstd::dict::from_samples(&samples, DICT_BYTES).expect("train dictionary");
    let mut with_dict =
        zstd::bulk::Compressor::with_dictionary(LEVEL, &dict).expect("dictionary compressor");
    [10u64, 100, 1000]
        .into_iter()
        .map(|n| {
            // 20 batches per size, from sensors the dictionary never saw.
            let (mut raw, mut plain, mut dicted) = (0usize, 0usize, 0usize);
            for b in 0..20u64 {
                let (bytes, r) = batch((b % 5) as usize, b * n, n);
                raw += r;
                plain += zstd::bulk::compress(&bytes, LEVEL).expect("zstd").len();
                dicted += with_dict.compress(&bytes).expect("zstd dict").len();
            }
            (n, plain as f64 / raw as f64, dicted as f64 / raw as f64)
        })
        .collect()
}

/// 1000-record batches by zstd level: (level, wire/raw, compression MB/s of the encoded batch).
pub fn level_sweep() -> Vec<(i32, f64, f64)> {
    let batches: Vec<(Vec<u8>, usize)> = (0..5u64)
        .map(|b| batch(b as usize, b * 1000, 1000))
        .collect();
    let raw: usize = batches.iter().map(|(_, r)| r).sum();
    let encoded: usize = batches.iter().map(|(b, _)| b.len()).sum();
    [1, 3, 9, 15, 19]
        .into_iter()
        .map(|level| {
            let started = Instant::now();
            let wire: usize = batches
                .iter()
                .map(|(b, _)| zstd::bulk::compress(b, level).expect("zstd").len())
                .sum();
            let speed = encoded as f64 / started.elapsed().as_secs_f64() / 1e6;
            (level, wire as f64 / raw as f64, speed)
        })
        .collect()
}

fn bulk_spec(mqtt: std::net::SocketAddr, clients: usize, per_client: u64) -> LoadSpec {
    LoadSpec {
        mqtt,
        clients,
        messages_per_client: per_client,
        rate_per_client: None,
        payload_bytes: 200,
        kind: PayloadKind::Json,
        qos: QoS::AtLeastOnce,
        topic: Arc::new(|c, i| format!("plant/{c}/logs/l{}", i % 4)),
        client_prefix: "drain-".into(),
    }
}

/// Bytes the process wrote to storage so far (`/proc/<pid>/io` write_bytes).
pub fn disk_writes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Percentile `p` (0..=100) of `v`, in ms.
fn percentile(mut v: Vec<i64>, p: f64) -> i64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize]
}

/// What the drain scenario measured.
pub struct Drain {
    /// Bytes the agent wrote to disk per buffered record, while buffering.
    pub disk_bytes_per_record: f64,
    /// Seconds from the link's return until the backlog was gone.
    pub drain_seconds: f64,
    /// Live records/s published meanwhile.
    pub live_rate: f64,
    /// Critical latency, link up, live load.
    pub critical_online: Latency,
    /// The same during the drain.
    pub critical_draining: Latency,
}

/// Live load: `clients` steady publishers of `rate` records/s each on the bulk stream, plus
/// one critical publisher at 20/s.
fn live(mqtt: std::net::SocketAddr, clients: usize, rate: f64) -> Vec<Steady> {
    let mut v: Vec<Steady> = (0..clients)
        .map(|c| Steady::start(mqtt, 1000 + c, rate, &format!("plant/{c}/logs/live"), 200))
        .collect();
    v.push(Steady::start(mqtt, 2000, 20.0, "plant/0/alarm/a", 64));
    v
}

/// Critical latency for records the agent received in [from, to] (Unix ms).
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Agent receipt → ingest receipt, p50 and p99 ms.
    pub total: (i64, i64),
    /// Of which in the agent (receipt → the batch's send time), p99 ms.
    pub agent_p99: i64,
}

fn critical_latency(cloud: &e2e::Cloud, from: i64, to: i64) -> Latency {
    let page: serde_json::Value = reqwest::blocking::get(format!(
        "{}/v1/log/iot.{TENANT}.alarms?limit=10000",
        cloud.url()
    ))
    .and_then(|r| r.json())
    .expect("read alarms");
    let stamps: Vec<(i64, i64, i64)> = page["records"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| {
                    Some((
                        r["received_at_ms"].as_i64()?,
                        r["sent_at_ms"].as_i64()?,
                        r["ingested_at_ms"].as_i64()?,
                    ))
                })
                .filter(|&(rx, _, _)| rx >= from && rx <= to)
                .collect()
        })
        .unwrap_or_default();
    let total: Vec<i64> = stamps.iter().map(|(rx, _, ing)| ing - rx).collect();
    Latency {
        total: (percentile(total.clone(), 50.0), percentile(total, 99.0)),
        agent_p99: percentile(stamps.iter().map(|(rx, sent, _)| sent - rx).collect(), 99.0),
    }
}

/// Online phase, outage with a `backlog`-record build-up, then the drain under live load, with
/// this tree's agent and ingest or with `baseline`'s (the agent's binary, and the ingest's
/// when the baseline has one).
pub fn drain(
    backlog: u64,
    baseline: Option<(&std::path::Path, Option<&std::path::Path>)>,
) -> Drain {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let ingest = |dir: &std::path::Path| {
        let harness = CloudHarness::new(dir).port(port);
        match baseline.and_then(|(_, ingest)| ingest) {
            Some(bin) => harness.binary(bin),
            None => harness,
        }
    };
    let mut cloud = ingest(dir.path()).run();
    let mut harness = AgentHarness::new(dir.path(), &cloud.url())
        .streams(CRITICAL_AND_BULK)
        .quota("4GiB");
    if let Some((bin, _)) = baseline {
        harness = harness.launcher(&[bin.to_path_buf()]);
    }
    let agent = harness.run();
    let (live_clients, live_each) = (4, 2500.0);

    // Online: 10 s of live load with the link up.
    let online_from = e2e::now_ms();
    let publishers = live(agent.mqtt, live_clients, live_each);
    std::thread::sleep(Duration::from_secs(10));
    let online_to = e2e::now_ms();
    for p in publishers {
        p.stop();
    }
    wait_until("online load delivered", Duration::from_secs(60), || {
        agent.backlog() == 0.0
    });
    let critical_online = critical_latency(&cloud, online_from, online_to);

    // Outage: the backlog builds up in the buffer.
    cloud.process.kill();
    let writes_before = disk_writes(agent.process.pid());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(load::publish(bulk_spec(agent.mqtt, 10, backlog / 10)));
    wait_until("backlog buffered", Duration::from_secs(300), || {
        agent.backlog() >= backlog as f64
    });
    let disk_bytes_per_record =
        (disk_writes(agent.process.pid()) - writes_before) as f64 / backlog as f64;

    // The link returns; live load goes on through the drain.
    let publishers = live(agent.mqtt, live_clients, live_each);
    let cloud = ingest(dir.path()).run();
    // Timed from the ingest listening again (its own start is not the drain), so the agent's
    // wait for its next readiness probe (at most `retry_max`, 500 ms here) is in it.
    let started = Instant::now();
    // Latency "during the drain" counts from when the drain is under way (the first bulk batch
    // is in), not from the outage's end, when the agent may still be in its retry backoff.
    wait_until("drain started", Duration::from_secs(60), || {
        agent.metric("agent_backlog_records{stream=\"logs\"}") < backlog as f64
    });
    let drain_from = e2e::now_ms();
    wait_until("backlog drained", Duration::from_secs(600), || {
        agent.metric("agent_backlog_records{stream=\"logs\"}") < live_each * live_clients as f64
    });
    let drain_seconds = started.elapsed().as_secs_f64();
    let drain_to = e2e::now_ms();
    let published: u64 = publishers.into_iter().map(|p| p.stop().published).sum();
    let critical_draining = critical_latency(&cloud, drain_from, drain_to);
    Drain {
        disk_bytes_per_record,
        drain_seconds,
        live_rate: published as f64 / drain_seconds,
        critical_online,
        critical_draining,
    }
}

/// Seconds the buffer alone needs to read and delete `records` (the `buffer_drain` example,
/// which `tests/bench.sh` builds beside the binaries).
pub fn buffer_alone(records: u64) -> f64 {
    let example = e2e::bin_dir().join("examples").join("buffer_drain");
    let out = std::process::Command::new(&example)
        .arg(records.to_string())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (built by tests/bench.sh)", example.display()));
    assert!(out.status.success(), "buffer_drain: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("buffer_drain prints `seconds <s> records <n>`")
}

/// Rounds of the drain table.
const ROUNDS: usize = 3;

/// The drain table: [`ROUNDS`] alternating rounds of the buffer alone, this agent's drain and
/// the baseline's (when `BENCH_BASELINE` is set), medians.
pub fn drain_table(scale: u64) {
    let backlog = 1_000_000 * scale;
    let baseline = crate::baseline_agent();
    let baseline_ingest = crate::baseline_ingest();
    let (mut alone, mut ours, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        alone.push(buffer_alone(backlog));
        ours.push(drain(backlog, None));
        if let Some(bin) = &baseline {
            theirs.push(drain(backlog, Some((bin, baseline_ingest.as_deref()))));
        }
    }
    let limit = crate::median(alone);
    println!();
    println!(
        "| drain of {backlog} records (200 B JSON) under live load, medians of {ROUNDS} rounds | drain s | ÷ buffer alone (target ≤ 1.5) | live records/s | critical p50 / p99 ms, link up (in the agent) | critical p50 / p99 ms, during the drain (in the agent) | disk bytes per buffered record |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| the buffer alone: read and delete, batches of 5000 (`buffer_drain`) | {limit:.2} | 1.00 | | | | |"
    );
    for (who, results) in [("this agent", ours), ("baseline (BENCH_BASELINE)", theirs)] {
        if results.is_empty() {
            continue;
        }
        let m = |f: &dyn Fn(&Drain) -> f64| crate::median(results.iter().map(f).collect());
        let seconds = m(&|d| d.drain_seconds);
        println!(
            "| {who} | {seconds:.2} | {:.2} | {:.0} | {:.0} / {:.0} ({:.0}) | {:.0} / {:.0} ({:.0}) | {:.0} |",
            seconds / limit,
            m(&|d| d.live_rate),
            m(&|d| d.critical_online.total.0 as f64),
            m(&|d| d.critical_online.total.1 as f64),
            m(&|d| d.critical_online.agent_p99 as f64),
            m(&|d| d.critical_draining.total.0 as f64),
            m(&|d| d.critical_draining.total.1 as f64),
            m(&|d| d.critical_draining.agent_p99 as f64),
            m(&|d| d.disk_bytes_per_record),
        );
    }
}
