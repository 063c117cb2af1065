//! How streams share the uplink: critical first, but nothing starves behind it; and a
//! bandwidth cap holds on a metered link.

use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, CRITICAL_AND_BULK, CloudHarness, TENANT, eventually, free_port};
use rumqttc::QoS;

/// `clients` sensors each publishing `n` QoS 1 messages as fast as they can on
/// `plant/<client>/<topic>/x`.
fn burst(
    mqtt: std::net::SocketAddr,
    clients: usize,
    n: u64,
    topic: &'static str,
    kind: PayloadKind,
    payload_bytes: usize,
) -> LoadSpec {
    LoadSpec {
        mqtt,
        clients,
        messages_per_client: n,
        rate_per_client: None,
        payload_bytes,
        kind,
        qos: QoS::AtLeastOnce,
        topic: Arc::new(move |c, _| format!("plant/{c}/{topic}/x")),
        client_prefix: format!("{topic}-"),
    }
}

#[test]
fn a_flood_of_critical_does_not_stop_bulk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let streams = "
  - name: alarms
    topics: [\"plant/+/alarm/#\"]
    priority: critical
    batch: { max_records: 100, linger: 0ms }
  - name: logs
    topics: [\"plant/+/logs/#\"]
    priority: bulk
    batch: { max_records: 500, linger: 0ms }
";
    // A slow uplink (200 KiB/s, critical capped too), so critical data piles up far faster
    // than it leaves: the flood is still queued when bulk arrives.
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .streams(streams)
        .ingest_extra("  max_upload_rate: 200KiB\n  critical_may_exceed_rate: false\n")
        .extra("scheduling:\n  starvation_bound: 1s\n")
        .run();
    let spec = |clients, n, topic| burst(agent.mqtt, clients, n, topic, PayloadKind::Binary, 100);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // Far more critical data than the uplink moves in a second, in batches of 100; then bulk.
    runtime.block_on(load::publish(spec(4, 10_000, "alarm")));
    runtime.block_on(load::publish(spec(1, 500, "logs")));
    let critical_left_when_bulk_done = eventually(
        Duration::from_secs(60),
        "all 500 bulk records delivered",
        || {
            let bulk = cloud.read_topic(&format!("iot.{TENANT}.logs")).len();
            (bulk == 500).then(|| agent.metric("agent_backlog_records{stream=\"alarms\"}"))
        },
    );
    assert!(
        critical_left_when_bulk_done > 10_000.0,
        "bulk got through while critical still had {critical_left_when_bulk_done} records queued"
    );
    eventually(Duration::from_secs(120), "everything delivered", || {
        (agent.backlog() == 0.0).then_some(())
    });
    assert_eq!(
        cloud.read_topic(&format!("iot.{TENANT}.alarms")).len(),
        40_000
    );
}

#[test]
fn after_an_outage_critical_goes_first_and_the_bandwidth_cap_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cap: f64 = 320.0 * 1024.0;
    // The ingest does not exist yet: an outage from the start.
    let agent = AgentHarness::new(dir.path(), &format!("http://127.0.0.1:{port}"))
        .streams(CRITICAL_AND_BULK)
        .ingest_extra("  max_upload_rate: 320KiB\n")
        .run();
    let spec = |clients, n, topic| burst(agent.mqtt, clients, n, topic, PayloadKind::Json, 200);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(load::publish(spec(2, 50_000, "logs")));
    runtime.block_on(load::publish(spec(1, 100, "alarm")));
    eventually(Duration::from_secs(30), "everything buffered", || {
        (agent.backlog() == 100_100.0).then_some(())
    });

    let cloud = CloudHarness::new(dir.path()).port(port).run();
    let (alarms, logs) = (format!("iot.{TENANT}.alarms"), format!("iot.{TENANT}.logs"));
    let count = |counts: &std::collections::HashMap<String, u64>, t: &str| {
        counts.get(t).copied().unwrap_or(0)
    };
    let mut bulk_when_critical_done = None;
    let (mut at_10, mut at_90) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(120);
    while at_90.is_none() {
        assert!(
            Instant::now() < deadline,
            "the backlog did not drain in 120 s"
        );
        let counts = cloud.topic_counts();
        let sample = (Instant::now(), agent.metric("agent_wire_bytes_total"));
        let bulk = count(&counts, &logs);
        if bulk_when_critical_done.is_none() && count(&counts, &alarms) == 100 {
            bulk_when_critical_done = Some(bulk);
        }
        if at_10.is_none() && bulk >= 10_000 {
            at_10 = Some(sample);
        }
        if bulk >= 90_000 {
            at_90 = Some(sample);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let bulk_before = bulk_when_critical_done.expect("critical delivered before 90% of bulk");
    assert!(
        bulk_before < 10_000,
        "all critical records arrive before 10% of the bulk backlog; bulk had {bulk_before}"
    );
    let ((t10, b10), (t90, b90)) = (
        at_10.expect("sampled at 10%"),
        at_90.expect("sampled at 90%"),
    );
    let rate = (b90 - b10) / (t90 - t10).as_secs_f64();
    println!(
        "critical done with {bulk_before} bulk records in the log; uplink {:.0} B/s for a cap of {cap:.0} B/s ({:+.1}%), waited {:.1} s for the cap",
        rate,
        (rate / cap - 1.0) * 100.0,
        agent.metric("agent_rate_limited_seconds_total")
    );
    assert!(
        (rate - cap).abs() <= cap * 0.10,
        "the uplink ran at {rate:.0} B/s for a cap of {cap:.0} B/s"
    );
    eventually(Duration::from_secs(60), "bulk complete", || {
        (count(&cloud.topic_counts(), &logs) == 100_000).then_some(())
    });
}

#[test]
fn after_an_outage_a_newest_first_stream_sends_its_newest_records_first_and_fifo_keeps_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let streams = "
  - name: latest
    topics: [\"plant/+/latest/#\"]
    priority: normal
    order: newest_first
    batch: { max_records: 50, linger: 0ms }
  - name: logs
    topics: [\"plant/+/logs/#\"]
    priority: bulk
    batch: { max_records: 50, linger: 0ms }
";
    // The ingest does not exist yet: an outage from the start.
    let agent = AgentHarness::new(dir.path(), &format!("http://127.0.0.1:{port}"))
        .streams(streams)
        .run();
    let spec = |n, topic| burst(agent.mqtt, 1, n, topic, PayloadKind::Json, 100);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(load::publish(spec(2000, "latest")));
    runtime.block_on(load::publish(spec(2000, "logs")));
    eventually(Duration::from_secs(30), "everything buffered", || {
        (agent.backlog() == 4000.0).then_some(())
    });

    let cloud = CloudHarness::new(dir.path()).port(port).run();
    eventually(Duration::from_secs(60), "everything delivered", || {
        (agent.backlog() == 0.0 && cloud.total_records() == 4000).then_some(())
    });
    let latest = cloud.read_topic(&format!("iot.{TENANT}.latest"));
    let seqs: Vec<u64> = latest.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs.iter().collect::<std::collections::BTreeSet<_>>().len(),
        2000,
        "every record once"
    );
    assert_eq!(
        &seqs[..50],
        &(1951..=2000).collect::<Vec<_>>()[..],
        "the newest batch is the first in the log"
    );
    assert!(seqs[50..].iter().all(|&s| s <= 1950), "then the backlog");
    let index = |r: &e2e::LogRecord| -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("json payload");
        v["seq"].as_u64().expect("index")
    };
    assert_eq!(
        index(&latest[49]),
        1999,
        "seq 2000 is the sensor's last reading"
    );

    let logs = cloud.read_topic(&format!("iot.{TENANT}.logs"));
    assert_eq!(
        logs.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=2000).collect::<Vec<_>>(),
        "a FIFO stream keeps exact order"
    );
    assert_eq!(
        logs.iter().map(index).collect::<Vec<_>>(),
        (0..2000).collect::<Vec<_>>(),
        "in publish order"
    );
}
