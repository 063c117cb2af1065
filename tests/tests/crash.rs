//! Crashes and stops of the agent under steady QoS 1 load: `kill -9` at random moments, and
//! SIGTERM. Publishers reconnect with fresh sessions and never resend, so every duplicate in
//! the log would be the gateway's.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use e2e::load::Steady;
use e2e::{Agent, AgentHarness, Cloud, CloudHarness, TENANT, eventually, free_port, start_agent};

/// How often each (client, index) is in the telemetry topic.
/// The crash tests run one at a time, each with the disk to itself.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
fn twenty_kill_9_cycles_lose_nothing_acknowledged() {
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

    // A PUBACK is sent only after its record's commit: nothing acknowledged may be missing,
    // whenever the kill came.
    let mut per_cycle = vec![0u64; kills.len() + 1];
    for &(c, i, t) in &acked {
        if !seen.contains_key(&(c, i)) {
            per_cycle[kills.iter().position(|&k| k > t).unwrap_or(kills.len())] += 1;
        }
    }
    println!("cycle | acknowledged but not in the log");
    for (n, lost) in per_cycle.iter().enumerate() {
        println!("{n:>5} | {lost:>31}");
    }
    println!(
        "acknowledged: {}, in the log: {}, connections: {:?}",
        acked.len(),
        seen.len(),
        logs.iter().map(|l| l.connections).collect::<Vec<_>>()
    );
    assert_eq!(
        per_cycle.iter().sum::<u64>(),
        0,
        "acknowledged messages lost across kill -9"
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
