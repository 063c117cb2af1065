//! What edge transforms cost: end-to-end records/s (first publish → last record in the log)
//! with a three-step chain (enrich, filter, deadband) on the stream, against none, in the same
//! run. QoS 1, 200 B JSON, 10 publishers of the load generator; every record passes the chain
//! (the filter keeps `status == ok`, the deadband sends every change of `seq`), so both sides
//! deliver the same records. Alternating rounds, three each; the table shows the medians.

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, CloudHarness, peak_rss_mib};
use rumqttc::QoS;

use crate::median;

const PLAIN: &str = "
  - name: telemetry
    topics: [\"plant/+/telemetry/#\"]
    priority: normal
    batch: { max_records: 1000, linger: 50ms }
";

const CHAIN: &str = "
  - name: telemetry
    topics: [\"plant/+/telemetry/#\"]
    priority: normal
    batch: { max_records: 1000, linger: 50ms }
    transforms:
      - enrich:
          fields: { device_location: factory-floor-1 }
          facts: [device_id]
          topic: \"plant/{site}/#\"
      - filter: { where: [{ field: status, op: \"==\", value: ok }] }
      - deadband: { field: seq, absolute: 1 }
";

/// One run with `streams`: (records/s, agent peak RSS MiB).
fn measure(streams: &str, total: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .streams(streams)
        .run();
    let publishers = 10;
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
        client_prefix: "chain-".into(),
    };
    let total = per_client * publishers as u64;
    let started = Instant::now();
    let report = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(load::publish(spec));
    assert_eq!(report.acked, total, "every publish acknowledged");
    cloud.wait_for_records(total, Duration::from_secs(300));
    (
        total as f64 / started.elapsed().as_secs_f64(),
        peak_rss_mib(agent.process.pid()),
    )
}

/// Prints the table.
pub fn table(scale: u64) {
    let total = 60_000 * scale;
    let (mut plain, mut chain) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        plain.push(measure(PLAIN, total));
        chain.push(measure(CHAIN, total));
    }
    let rate = |v: &[(f64, f64)]| median(v.iter().map(|m| m.0).collect());
    let rss = |v: &[(f64, f64)]| median(v.iter().map(|m| m.1).collect());
    println!();
    println!(
        "| QoS 1, 200 B JSON, 10 publishers, {total} records | end-to-end records/s | agent peak RSS MiB |"
    );
    println!("|---|---:|---:|");
    println!(
        "| no transforms | {:.0} | {:.1} |",
        rate(&plain),
        rss(&plain)
    );
    println!(
        "| enrich + filter + deadband | {:.0} | {:.1} |",
        rate(&chain),
        rss(&chain)
    );
    println!(
        "| ratio (chain / none) | {:.2} | |",
        rate(&chain) / rate(&plain)
    );
}
