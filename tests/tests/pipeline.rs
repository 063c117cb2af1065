//! The core pipeline, end to end: real MQTT clients → real `edge-agent` → real `cloud-ingest`
//! → embedded log, read back over the ingest's HTTP API.

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, Cloud, CloudHarness, DEVICE, LogRecord, TENANT, eventually, free_port};
use rumqttc::QoS;

const STREAMS: [&str; 3] = ["alarms", "telemetry", "logs"];

fn topic_of(client: usize, i: u64) -> String {
    match i % 3 {
        0 => format!("plant/{client}/alarm/a{}", i % 7),
        1 => format!("plant/{client}/telemetry/t{}", i % 5),
        _ => format!("plant/{client}/logs/l"),
    }
}

fn spec(mqtt: std::net::SocketAddr, clients: usize, per_client: u64) -> LoadSpec {
    LoadSpec {
        mqtt,
        clients,
        messages_per_client: per_client,
        rate_per_client: None,
        payload_bytes: 120,
        kind: PayloadKind::Binary,
        qos: QoS::AtLeastOnce,
        topic: Arc::new(topic_of),
        client_prefix: "sensor-".into(),
    }
}

/// Records the agent's buffer holds, over [`STREAMS`].
fn buffered(agent: &e2e::Agent) -> f64 {
    STREAMS
        .iter()
        .map(|s| agent.metric(&format!("agent_backlog_records{{stream=\"{s}\"}}")))
        .sum()
}

fn publish(spec: LoadSpec) -> load::LoadReport {
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(load::publish(spec))
}

/// Reads every stream's topic and checks: each published message is there exactly once with
/// identical bytes, the right key, stream and MQTT topic; per stream, seqs strictly increase
/// with the offset; per sensor, messages keep their publish order.
fn assert_exactly_once_in_order(cloud: &Cloud, clients: usize, per_client: u64) {
    let mut seen: HashMap<(usize, u64), usize> = HashMap::new();
    for stream in STREAMS {
        let records: Vec<LogRecord> = cloud.read_topic(&format!("iot.{TENANT}.{stream}"));
        let mut last_index: HashMap<usize, u64> = HashMap::new();
        for (pos, r) in records.iter().enumerate() {
            assert_eq!(r.offset, pos as u64, "dense offsets");
            assert_eq!(r.key, DEVICE);
            assert_eq!(r.stream, stream);
            if pos > 0 {
                assert!(
                    r.seq > records[pos - 1].seq,
                    "{stream}: seq {} after {}",
                    r.seq,
                    records[pos - 1].seq
                );
            }
            let client = u32::from_be_bytes(r.payload[0..4].try_into().expect("4 bytes")) as usize;
            let index = u64::from_be_bytes(r.payload[4..12].try_into().expect("8 bytes"));
            assert_eq!(
                r.payload,
                load::payload(PayloadKind::Binary, client, index, 120),
                "payload bytes of {client}/{index}"
            );
            assert_eq!(r.mqtt_topic, topic_of(client, index));
            assert_eq!(
                STREAMS[(index % 3) as usize],
                stream,
                "routed to its stream"
            );
            if let Some(prev) = last_index.insert(client, index) {
                assert!(
                    index > prev,
                    "{stream}: sensor {client} message {index} after {prev}"
                );
            }
            *seen.entry((client, index)).or_default() += 1;
        }
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "duplicates in the log: {:?}",
        &duplicates[..duplicates.len().min(5)]
    );
    let missing: Vec<_> = (0..clients)
        .flat_map(|c| (0..per_client).map(move |i| (c, i)))
        .filter(|k| !seen.contains_key(k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} records missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

#[test]
fn ten_thousand_qos1_messages_arrive_exactly_once_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    let report = publish(spec(agent.mqtt, 5, 2000));
    assert_eq!(report.acked, 10_000, "every publish was acknowledged");
    eventually(Duration::from_secs(60), "10,000 records in the log", || {
        (cloud.total_records() >= 10_000).then_some(())
    });
    assert_exactly_once_in_order(&cloud, 5, 2000);
    // Counted once deleted: the last acknowledgements may wait up to a second for a commit.
    let telemetry = (0..2000u64).filter(|i| i % 3 == 1).count() as f64 * 5.0;
    eventually(
        Duration::from_secs(10),
        "telemetry counted delivered",
        || {
            let delivered = agent.metric("agent_records_delivered_total{stream=\"telemetry\"}");
            assert!(delivered <= telemetry, "{delivered} delivered");
            (delivered == telemetry).then_some(())
        },
    );
    let wire = agent.metric("agent_wire_bytes_total");
    let raw = agent.metric("agent_raw_bytes_total");
    assert!(
        wire > 0.0 && raw > wire,
        "compressed on the wire: {wire} of {raw}"
    );
}

#[test]
fn mosquitto_clients_publish_over_mqtt_3_and_5() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    for (addr, version, message) in [
        (agent.mqtt, "mqttv311", "from mosquitto v3.1.1"),
        (agent.mqtt5, "mqttv5", "from mosquitto v5"),
    ] {
        let status = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &addr.port().to_string(), "-V", version, "-q", "1", "-t", "plant/9/telemetry/temp", "-m", message])
            .status()
            .expect("mosquitto_pub must be installed (Debian's mosquitto-clients; the test command installs it)");
        assert!(status.success());
    }
    let records = eventually(Duration::from_secs(20), "both mosquitto records", || {
        let r = cloud.read_topic(&format!("iot.{TENANT}.telemetry"));
        (r.len() >= 2).then_some(r)
    });
    let payloads: HashSet<&[u8]> = records.iter().map(|r| r.payload.as_slice()).collect();
    assert_eq!(
        payloads,
        HashSet::from([
            b"from mosquitto v3.1.1".as_slice(),
            b"from mosquitto v5".as_slice()
        ])
    );
    assert!(
        records
            .iter()
            .all(|r| r.mqtt_topic == "plant/9/telemetry/temp")
    );
}

#[test]
fn unrouted_topics_land_in_the_default_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    assert_eq!(agent.readyz(), 200, "ready once MQTT listens");
    let mut s = spec(agent.mqtt, 1, 10);
    s.topic = Arc::new(|_, i| format!("somewhere/else/{i}"));
    publish(s);
    let records = eventually(
        Duration::from_secs(20),
        "10 records in the default stream",
        || {
            let r = cloud.read_topic(&format!("iot.{TENANT}.default"));
            (r.len() >= 10).then_some(r)
        },
    );
    assert_eq!(records.len(), 10);
    assert_eq!(records[3].mqtt_topic, "somewhere/else/3");
}

#[test]
fn data_published_before_the_ingest_exists_arrives_once_it_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let agent = AgentHarness::new(dir.path(), &format!("http://127.0.0.1:{port}")).run();
    let report = publish(spec(agent.mqtt, 3, 1000));
    assert_eq!(report.acked, 3000);
    eventually(Duration::from_secs(20), "3000 records buffered", || {
        (buffered(&agent) >= 3000.0).then_some(())
    });
    assert_eq!(
        agent.metric("agent_link_up"),
        0.0,
        "the link is reported down"
    );
    let cloud = CloudHarness::new(dir.path()).port(port).run();
    eventually(Duration::from_secs(60), "3000 records in the log", || {
        (cloud.total_records() >= 3000).then_some(())
    });
    assert_exactly_once_in_order(&cloud, 3, 1000);
    eventually(Duration::from_secs(10), "empty buffer", || {
        (buffered(&agent) == 0.0).then_some(())
    });
}

/// A backlog drained in many batches: each stream's next batch is read (and compressed) while
/// the one before is in flight, and the log still gets every record exactly once, in order.
#[test]
fn a_backlog_drains_with_each_next_batch_read_ahead_exactly_once_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let streams = e2e::THREE_STREAMS.replace("linger:", "drain_max_records: 300, linger:");
    let agent = AgentHarness::new(dir.path(), &format!("http://127.0.0.1:{port}"))
        .streams(&streams)
        .run();
    let report = publish(spec(agent.mqtt, 3, 3000));
    assert_eq!(report.acked, 9000);
    eventually(Duration::from_secs(30), "9000 records buffered", || {
        (buffered(&agent) >= 9000.0).then_some(())
    });
    let cloud = CloudHarness::new(dir.path()).port(port).run();
    eventually(Duration::from_secs(60), "9000 records in the log", || {
        (cloud.total_records() >= 9000).then_some(())
    });
    assert_exactly_once_in_order(&cloud, 3, 3000);
    let read_ahead: f64 = STREAMS
        .iter()
        .map(|s| {
            agent.metric(&format!(
                "agent_batches_read_ahead_total{{fate=\"sent\",stream=\"{s}\"}}"
            ))
        })
        .sum();
    assert!(
        read_ahead > 0.0,
        "3,000 records a stream in batches of 300: batches were read ahead and sent"
    );
    eventually(Duration::from_secs(10), "empty buffer", || {
        (buffered(&agent) == 0.0).then_some(())
    });
}
