//! How streams share the uplink: critical first, but nothing starves behind it.

use std::sync::Arc;
use std::time::Duration;

use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, CloudHarness, TENANT, eventually};
use rumqttc::QoS;

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
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .streams(streams)
        .extra("scheduling:\n  starvation_bound: 1s\n")
        .run();
    let spec = |clients: usize, n: u64, topic: &'static str| LoadSpec {
        mqtt: agent.mqtt,
        clients,
        messages_per_client: n,
        rate_per_client: None,
        payload_bytes: 100,
        kind: PayloadKind::Binary,
        qos: QoS::AtLeastOnce,
        topic: Arc::new(move |c, _| format!("plant/{c}/{topic}/x")),
        client_prefix: format!("{topic}-"),
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // Far more critical data than the uplink moves in a second, in batches of 100; then bulk.
    runtime.block_on(load::publish(spec(4, 50_000, "alarm")));
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
        200_000
    );
}
