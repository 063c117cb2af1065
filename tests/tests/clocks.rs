//! Gateways often boot without a real-time clock. An agent whose wall clock is an hour slow
//! (run under libfaketime) gets corrected timestamps in the log, beside its originals, flagged;
//! and every record carries the host's boot id and time since boot, which the wrong wall clock
//! does not touch.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, CloudHarness, TENANT, bin, eventually};
use rumqttc::QoS;

const HOUR_MS: i64 = 3_600_000;

/// The log's records of `topic` as the read API returns them (JSON).
fn log_json(cloud: &e2e::Cloud, topic: &str) -> Vec<serde_json::Value> {
    let page: serde_json::Value =
        reqwest::blocking::get(format!("{}/v1/log/{topic}?limit=10000", cloud.url()))
            .and_then(|r| r.json())
            .expect("read log");
    page["records"].as_array().cloned().unwrap_or_default()
}

fn publish(mqtt: std::net::SocketAddr, n: u64) {
    let report = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(load::publish(LoadSpec {
            mqtt,
            clients: 1,
            messages_per_client: n,
            rate_per_client: Some(500.0),
            payload_bytes: 64,
            kind: PayloadKind::Json,
            qos: QoS::AtLeastOnce,
            topic: Arc::new(|c, _| format!("plant/{c}/telemetry/t")),
            client_prefix: "clock-".into(),
        }));
    assert_eq!(report.acked, n);
}

#[test]
fn an_agent_an_hour_slow_gets_corrected_timestamps_beside_its_originals_and_boot_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let launcher: Vec<PathBuf> = [
        "env",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
        "faketime",
        "-f",
        "-1h",
    ]
    .iter()
    .map(PathBuf::from)
    .chain([bin("edge-agent")])
    .collect();
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .launcher(&launcher)
        .run();
    publish(agent.mqtt, 200);
    let topic = format!("iot.{TENANT}.telemetry");
    let records = eventually(Duration::from_secs(30), "200 records in the log", || {
        let r = log_json(&cloud, &topic);
        (r.len() == 200).then_some(r)
    });
    for r in &records {
        let field = |name: &str| r[name].as_i64().unwrap_or_else(|| panic!("{name} in {r}"));
        let (original, corrected, ingested) = (
            field("received_at_ms"),
            field("corrected_at_ms"),
            field("ingested_at_ms"),
        );
        assert_eq!(r["clock_corrected"], true, "{r}");
        assert!(
            (ingested - original - HOUR_MS).abs() < 10_000,
            "the original, as the agent's clock said, is kept: {r}"
        );
        assert!(
            (0..10_000).contains(&(ingested - corrected)),
            "corrected onto the ingest's clock: {r}"
        );
    }
    assert!(cloud.metric("ingest_clock_corrected_batches_total") > 0.0);

    // Boot id and time since boot: right even when the wall clock is not.
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    let uptime_ms = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as i64)
        .expect("uptime");
    let mut last = 0;
    for r in &records {
        assert_eq!(r["boot_id"].as_str(), Some(boot_id.trim()), "{r}");
        let monotonic = r["monotonic_ms"].as_i64().expect("monotonic_ms");
        assert!(monotonic >= last, "monotonic time never goes back: {r}");
        assert!(
            (0..60_000).contains(&(uptime_ms - monotonic)),
            "milliseconds since this host booted: {monotonic} vs uptime {uptime_ms}"
        );
        last = monotonic;
    }

    // With a correct clock nothing is corrected: see the Kafka test in sinks.rs.
    drop(agent);
}
