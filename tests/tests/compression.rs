//! zstd dictionaries for streams sent a few records at a time: trained by the agent on its own
//! records, registered at the ingest, registered again at a replica that lacks it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, CloudHarness, TENANT, eventually, free_port};
use rumqttc::QoS;

fn alarms(mqtt: std::net::SocketAddr, clients: usize, n: u64, prefix: &str) -> LoadSpec {
    LoadSpec {
        mqtt,
        clients,
        messages_per_client: n,
        // A few records per batch: what a dictionary is for.
        rate_per_client: Some(300.0),
        payload_bytes: 120,
        kind: PayloadKind::Json,
        qos: QoS::AtLeastOnce,
        topic: Arc::new(|c, i| format!("plant/{c}/alarm/a{}", i % 3)),
        client_prefix: prefix.into(),
    }
}

#[test]
fn a_small_batch_stream_trains_a_dictionary_and_a_replica_without_it_gets_it_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cloud = CloudHarness::new(dir.path()).port(port).run();
    let streams = "
  - name: alarms
    topics: [\"plant/+/alarm/#\"]
    priority: critical
    zstd_dictionary: true
    batch: { max_records: 10, linger: 0ms }
";
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .streams(streams)
        .run();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(load::publish(alarms(agent.mqtt, 3, 1000, "first-")));
    eventually(Duration::from_secs(30), "first 3000 delivered", || {
        (cloud.total_records() == 3000).then_some(())
    });
    let id = agent.metric("agent_stream_dictionary_id{stream=\"alarms\"}");
    assert!(
        id > 0.0,
        "a dictionary was trained on the stream's first records"
    );
    assert_eq!(agent.metric("agent_dictionary_registrations_total"), 1.0);

    // A restarted ingest has forgotten it: it answers 428, the agent registers it again and
    // resends; nothing is lost or duplicated.
    let mut cloud = cloud;
    cloud.process.kill();
    let cloud = CloudHarness::new(dir.path()).port(port).run();
    runtime.block_on(load::publish(alarms(agent.mqtt, 3, 500, "second-")));
    eventually(Duration::from_secs(30), "all 4500 delivered", || {
        (agent.backlog() == 0.0 && cloud.total_records() == 4500).then_some(())
    });
    assert_eq!(
        agent.metric("agent_dictionary_registrations_total"),
        2.0,
        "registered again at the restarted ingest"
    );
    assert_eq!(
        agent.metric("agent_stream_dictionary_id{stream=\"alarms\"}"),
        id,
        "the same dictionary, still in use"
    );
    let records = cloud.read_topic(&format!("iot.{TENANT}.alarms"));
    let seqs: HashSet<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(records.len(), 4500, "no duplicates");
    assert_eq!(seqs.len(), 4500, "every record once");
}
