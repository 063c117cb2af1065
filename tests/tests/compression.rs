//! zstd dictionaries for streams sent a few records at a time: trained by the agent on its own
//! records, registered at the ingest, registered again at a replica that lacks it; and the
//! batch body versions: version 2 (columnar) once the ingest lists it, version 1 again for a
//! replica that refuses it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use e2e::fault::{FaultProxy, Mode};
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

/// 3 sensors × `n` JSON readings on `plant/{c}/telemetry/t{i % 3}`.
fn telemetry(mqtt: std::net::SocketAddr, n: u64, prefix: &str) -> LoadSpec {
    LoadSpec {
        mqtt,
        clients: 3,
        messages_per_client: n,
        rate_per_client: Some(2000.0),
        payload_bytes: 150,
        kind: PayloadKind::Json,
        qos: QoS::AtLeastOnce,
        topic: Arc::new(|c, i| format!("plant/{c}/telemetry/t{}", i % 3)),
        client_prefix: prefix.into(),
    }
}

/// Every record of the telemetry topic is one of the published readings, each exactly once,
/// on its own topic with its own payload bytes.
fn exactly_the_readings(cloud: &e2e::Cloud, n: u64) {
    let records = cloud.read_topic(&format!("iot.{TENANT}.telemetry"));
    let got: HashSet<(String, Vec<u8>)> = records
        .iter()
        .map(|r| (r.mqtt_topic.clone(), r.payload.clone()))
        .collect();
    let want: HashSet<(String, Vec<u8>)> = (0..3usize)
        .flat_map(|c| {
            (0..n).map(move |i| {
                (
                    format!("plant/{c}/telemetry/t{}", i % 3),
                    load::payload(PayloadKind::Json, c, i, 150),
                )
            })
        })
        .collect();
    assert_eq!(records.len() as u64, 3 * n, "no record twice");
    assert!(got == want, "the records are the readings, byte for byte");
}

#[test]
fn batches_go_as_version_2_once_the_ingest_lists_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(load::publish(telemetry(agent.mqtt, 2000, "v2-")));
    eventually(Duration::from_secs(30), "6000 delivered", || {
        (agent.backlog() == 0.0 && cloud.total_records() == 6000).then_some(())
    });
    exactly_the_readings(&cloud, 2000);
    let (v1, v2) = (
        cloud.metric("ingest_batches_total{body=\"v1\"}"),
        cloud.metric("ingest_batches_total{body=\"v2\"}"),
    );
    assert!(
        v1 >= 1.0 && v2 > v1,
        "version 1 until the first answer lists version 2, then version 2: {v1} v1, {v2} v2"
    );
    assert_eq!(agent.metric("agent_ingest_body_version"), 2.0);
}

/// Behind one URL a load balancer may reach a replica from before version 2 (a rolling
/// upgrade): it answers a version 2 body 400. The agent sends the same records again as
/// version 1 at once: nothing is dead-lettered, lost or appended twice.
#[test]
fn a_replica_that_refuses_version_2_gets_the_same_records_as_version_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    // The proxy stands for the older replica: it refuses every version 2 body with 400, and
    // passes on the newer replica's answers (which list version 2) to the rest.
    let proxy = FaultProxy::start(
        0,
        cloud.addr,
        Mode::Reject(Arc::new(e2e::fault::is_version_2)),
    );
    let agent = AgentHarness::new(dir.path(), &proxy.url()).run();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(load::publish(telemetry(agent.mqtt, 1000, "old-")));
    eventually(Duration::from_secs(30), "3000 delivered", || {
        (agent.backlog() == 0.0 && cloud.total_records() == 3000).then_some(())
    });
    exactly_the_readings(&cloud, 1000);
    assert!(
        proxy.faults.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "the agent tried version 2 once it was listed"
    );
    assert_eq!(cloud.metric("ingest_batches_total{body=\"v2\"}"), 0.0);
    assert_eq!(
        agent.metric("agent_records_dead_lettered_total{stream=\"telemetry\"}"),
        0.0,
        "a format refusal dead-letters nothing"
    );
    assert_eq!(agent.metric("agent_ingest_body_version"), 1.0);
}
