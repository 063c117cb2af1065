//! Crashes and stops of the agent under steady QoS 1 load: `kill -9` at random moments, and
//! SIGTERM. Publishers reconnect with fresh sessions and never resend, so every duplicate in
//! the log would be the gateway's.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use e2e::load::Steady;
use e2e::{Agent, AgentHarness, Cloud, CloudHarness, TENANT, eventually, free_port, start_agent};

/// How often each (client, index) is in the telemetry topic.
/// The crash tests run one at a time: the kill -9 test measures how much a crash can lose,
/// which is bounded by the buffer's commit latency; the other test's fsyncs on the same disk
/// would stretch it.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How long after a kill a publisher may still read a PUBACK the killed agent sent.
const ACK_READ_SLACK: Duration = Duration::from_millis(50);

fn in_log(cloud: &Cloud) -> HashMap<(u32, u64), u32> {
    let mut seen = HashMap::new();
    for r in cloud.read_topic(&format!("iot.{TENANT}.telemetry")) {
        let c = u32::from_be_bytes(r.payload[0..4].try_into().expect("4"));
        let i = u64::from_be_bytes(r.payload[4..12].try_into().expect("8"));
        *seen.entry((c, i)).or_default() += 1;
    }
    seen
}

/// Every (publisher, message index, PUBACK time) the publishers got.
fn acknowledged(logs: &[e2e::load::SteadyLog]) -> Vec<(u32, u64, Instant)> {
    logs.iter()
        .enumerate()
        .flat_map(|(c, l)| l.acked.iter().map(move |&(i, t)| (c as u32, i, t)))
        .collect()
}

fn drain(agent: &Agent, cloud: &Cloud, at_least: usize) {
    eventually(
        Duration::from_secs(60),
        "the buffer drained into the log",
        || (agent.backlog() == 0.0 && cloud.total_records() as usize >= at_least).then_some(()),
    );
}

fn integrity(buffer: &std::path::Path) -> String {
    let conn = rusqlite::Connection::open(buffer).expect("open buffer");
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check")
}

#[test]
fn sigterm_under_load_loses_nothing() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let port = free_port();
    let mut agent = AgentHarness::new(dir.path(), &cloud.url())
        .mqtt_port(port)
        .run();
    let mqtt = agent.mqtt;
    let publishers: Vec<_> = (0..3)
        .map(|c| Steady::start(mqtt, c, 400.0, &format!("plant/{c}/telemetry/t"), 120))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let status = agent.process.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    let stopped_at = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let agent = start_agent(dir.path(), &agent.config);
    std::thread::sleep(Duration::from_secs(1));
    let logs: Vec<_> = publishers.into_iter().map(Steady::stop).collect();
    let acked = acknowledged(&logs);
    assert!(
        acked.iter().any(|a| a.2 < stopped_at) && acked.iter().any(|a| a.2 > stopped_at),
        "load ran across the stop"
    );
    drain(&agent, &cloud, acked.len());
    let seen = in_log(&cloud);
    let missing: Vec<_> = acked
        .iter()
        .filter(|(c, i, _)| !seen.contains_key(&(*c, *i)))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost across SIGTERM, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(3)]
    );
    assert!(seen.values().all(|&n| n == 1), "duplicates in the log");
}

#[test]
fn twenty_kill_9_cycles_lose_nothing_beyond_the_commit_window() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let port = free_port();
    let mut agent = AgentHarness::new(dir.path(), &cloud.url())
        .mqtt_port(port)
        .run();
    let config = agent.config.clone();
    let mqtt = agent.mqtt;
    let publishers: Vec<_> = (0..2)
        .map(|c| Steady::start(mqtt, c, 500.0, &format!("plant/{c}/telemetry/t"), 120))
        .collect();
    let mut kills = Vec::new();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(300 + x % 700));
        agent.process.kill();
        kills.push(Instant::now());
        agent = start_agent(dir.path(), &config);
    }
    std::thread::sleep(Duration::from_secs(1));
    let logs: Vec<_> = publishers.into_iter().map(Steady::stop).collect();
    let acked = acknowledged(&logs);
    drain(&agent, &cloud, 1);
    eventually(Duration::from_secs(30), "log stable", || {
        let before = cloud.total_records();
        std::thread::sleep(Duration::from_millis(500));
        (cloud.total_records() == before && agent.backlog() == 0.0).then_some(())
    });
    let seen = in_log(&cloud);
    assert!(seen.values().all(|&n| n == 1), "duplicates in the log");

    // rumqttd acks on receipt, so a message acknowledged while its group was still open (the
    // 10 ms commit window) or being committed (the fsync: a few ms, but on this VM up to
    // ~200 ms when the ingest's fsyncs compete for the disk; 1 run in ~10 lost messages
    // acknowledged 160-199 ms before a kill) may be lost to a kill. Anything acknowledged
    // before that must be in the log.
    let window = Duration::from_millis(10 + 290);
    let mut per_cycle = vec![(0u64, 0u64); kills.len() + 1];
    // For a loss beyond the window: how long before its kill, and after the previous one.
    let mut beyond_at: Vec<(usize, u128, u128)> = Vec::new();
    for &(c, i, t) in &acked {
        let cycle = kills.iter().position(|&k| k > t).unwrap_or(kills.len());
        if !seen.contains_key(&(c, i)) {
            // A PUBACK the killed agent sent just before it died can be read by the publisher
            // just after the kill was recorded (seen: 4 ms after); no new agent answers that
            // fast (a start takes well over 50 ms), so such a message belongs to that kill.
            let just_after_previous = cycle
                .checked_sub(1)
                .and_then(|p| kills.get(p))
                .is_some_and(|&k| t - k <= ACK_READ_SLACK);
            let in_window =
                just_after_previous || kills.get(cycle).is_some_and(|&k| k - t <= window);
            if in_window {
                per_cycle[cycle].0 += 1
            } else {
                per_cycle[cycle].1 += 1;
                let before_kill = kills.get(cycle).map_or(0, |&k| (k - t).as_millis());
                let after_start = cycle
                    .checked_sub(1)
                    .and_then(|p| kills.get(p))
                    .map_or(0, |&k| (t - k).as_millis());
                beyond_at.push((cycle, before_kill, after_start));
            }
        }
    }
    println!("cycle | acked-but-lost within the commit window | beyond it");
    for (n, (within, beyond)) in per_cycle.iter().enumerate() {
        println!("{n:>5} | {within:>39} | {beyond:>9}");
    }
    let beyond: u64 = per_cycle.iter().map(|p| p.1).sum();
    if let (Some(first), Some(last)) = (beyond_at.first(), beyond_at.last()) {
        let reports = cloud.loss_reports();
        println!(
            "beyond the window: cycle {} from {} ms to {} ms before its kill ({} to {} ms after the previous kill); loss reports: {:?}",
            first.0,
            first.1,
            last.1,
            first.2,
            last.2,
            reports
                .iter()
                .map(|r| (r.reason, r.count))
                .collect::<Vec<_>>()
        );
    }
    println!(
        "acknowledged: {}, in the log: {}, connections: {:?}",
        acked.len(),
        seen.len(),
        logs.iter().map(|l| l.connections).collect::<Vec<_>>()
    );
    assert_eq!(
        beyond, 0,
        "acknowledged messages lost beyond the commit window"
    );
    assert!(
        acked.len() > 5000,
        "the load kept flowing across the crashes: {} acked",
        acked.len()
    );

    let status = agent.process.terminate();
    assert!(status.success());
    assert_eq!(integrity(&dir.path().join("buffer.db")), "ok");
}
