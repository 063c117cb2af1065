//! The central stream log on real brokers: sensors (real MQTT clients) → edge-agent →
//! cloud-ingest → tansu (Kafka protocol) or nats-server (JetStream), read back with clients we
//! did not write: Python's confluent-kafka and async-nats.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::brokers::{KafkaRecord, NatsServer, Tansu, jetstream_read, kafka_read};
use e2e::load::{self, LoadSpec, PayloadKind, Steady};
use e2e::{AgentHarness, CloudHarness, DEVICE, TENANT, TOKEN, eventually};
use rumqttc::QoS;

const STREAMS: [&str; 3] = ["alarms", "telemetry", "logs"];
const PAYLOAD: usize = 120;

fn topic_of(client: usize, i: u64) -> String {
    match i % 3 {
        0 => format!("plant/{client}/alarm/a{}", i % 7),
        1 => format!("plant/{client}/telemetry/t{}", i % 5),
        _ => format!("plant/{client}/logs/l"),
    }
}

fn publish(mqtt: std::net::SocketAddr, clients: usize, per_client: u64) {
    let report = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(load::publish(LoadSpec {
            mqtt,
            clients,
            messages_per_client: per_client,
            rate_per_client: None,
            payload_bytes: PAYLOAD,
            kind: PayloadKind::Binary,
            qos: QoS::AtLeastOnce,
            topic: Arc::new(topic_of),
            client_prefix: "sensor-".into(),
        }));
    assert_eq!(report.acked, clients as u64 * per_client, "every PUBACK");
}

/// (client, index) of a load payload.
fn origin(payload: &[u8]) -> (usize, u64) {
    let client = u32::from_be_bytes(payload[0..4].try_into().expect("4 bytes")) as usize;
    let index = u64::from_be_bytes(payload[4..12].try_into().expect("8 bytes"));
    (client, index)
}

/// Records sharing an idempotency key, beyond the first.
fn duplicates(records: &[KafkaRecord]) -> Vec<&KafkaRecord> {
    let mut seen = HashSet::new();
    records
        .iter()
        .filter(|r| !seen.insert(r.idempotency_key()))
        .collect()
}

fn kafka_topics(tenant: &str) -> Vec<String> {
    STREAMS
        .iter()
        .map(|s| format!("iot.{tenant}.{s}"))
        .collect()
}

/// A test directory with two subdirectories (two agents, or two ingest replicas).
fn dirs_for_two() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).expect("dir");
    std::fs::create_dir_all(&b).expect("dir");
    (dir, a, b)
}

#[test]
fn kafka_two_tenants_three_streams_exactly_once_with_keys_headers_and_order() {
    let (dir, a_dir, b_dir) = dirs_for_two();
    let tansu = Tansu::start(dir.path());
    let cloud = CloudHarness::new(dir.path())
        .kafka(&tansu.brokers)
        .device("dev-b", "globex", "token-b-0123456789")
        .run();
    // Device A enriches its telemetry: its binary payloads carry attributes, which become
    // Kafka headers.
    let enriched = e2e::THREE_STREAMS.replace(
        "    batch: { max_records: 1000, linger: 50ms }\n",
        "    batch: { max_records: 1000, linger: 50ms }
    transforms:
      - enrich:
          fields: { device_location: factory floor 1 }
          facts: [device_id]
          topic: \"plant/{site}/#\"\n",
    );
    assert_ne!(enriched, e2e::THREE_STREAMS);
    let agent_a = AgentHarness::new(&a_dir, &cloud.url())
        .streams(&enriched)
        .run();
    let agent_b = AgentHarness::new(&b_dir, &cloud.url())
        .device("dev-b", "token-b-0123456789")
        .run();
    let (clients, per_client) = (5, 1000);
    std::thread::scope(|s| {
        s.spawn(|| publish(agent_a.mqtt, clients, per_client));
        s.spawn(|| publish(agent_b.mqtt, clients, per_client));
    });
    let total = 2 * clients * per_client as usize;
    let mut topics = kafka_topics(TENANT);
    topics.extend(kafka_topics("globex"));
    let records = kafka_read(
        &tansu.brokers,
        &topics,
        total,
        Duration::from_secs(2),
        Duration::from_secs(120),
    );
    assert!(duplicates(&records).is_empty(), "no duplicates");
    assert_eq!(records.len(), total, "exactly the published records");

    let tenant_of = HashMap::from([(DEVICE, TENANT), ("dev-b", "globex")]);
    let mut origins = HashSet::new();
    let mut last_seq: HashMap<(String, i32, String), u64> = HashMap::new();
    let mut last_index: HashMap<(String, usize, String), u64> = HashMap::new();
    for r in &records {
        let device = r.header("device");
        assert_eq!(r.key, device, "key = device id");
        let tenant = tenant_of[device];
        assert_eq!(r.header("tenant"), tenant);
        let stream = r.header("stream");
        assert_eq!(
            r.topic,
            format!("iot.{tenant}.{stream}"),
            "a device writes only into its tenant's topics"
        );
        let (client, index) = origin(&r.value());
        assert_eq!(
            r.value(),
            load::payload(PayloadKind::Binary, client, index, PAYLOAD)
        );
        assert_eq!(r.header("mqtt_topic"), topic_of(client, index));
        assert_eq!(
            STREAMS[(index % 3) as usize],
            stream,
            "routed to its stream"
        );
        assert!(origins.insert((device.to_owned(), client, index)));
        for h in ["received_at_ms", "sent_at_ms", "ingested_at_ms", "epoch"] {
            assert!(r.header(h).parse::<i64>().is_ok(), "{h} is a number");
        }
        assert_eq!(
            r.timestamp_ms,
            r.header("received_at_ms").parse::<i64>().expect("ms"),
            "the Kafka timestamp is the receive time (clock fine: not corrected)"
        );
        assert!(!r.headers.contains_key("clock_corrected"));
        if device == DEVICE && stream == "telemetry" {
            assert_eq!(r.header("device_location"), "factory floor 1");
            assert_eq!(r.header("device_id"), DEVICE);
            assert_eq!(r.header("site"), client.to_string());
        } else {
            assert!(!r.headers.contains_key("site"), "{:?}", r.headers);
        }
        let batch_id = r.header("batch_id");
        assert!(
            batch_id.starts_with(&format!("{device}/{stream}/{}/", r.header("epoch"))),
            "{batch_id}"
        );
        // Order per key within a partition: sequence numbers grow with the offset.
        let seq: u64 = r.header("seq").parse().expect("seq");
        if let Some(prev) = last_seq.insert((r.topic.clone(), r.partition, r.key.clone()), seq) {
            assert!(seq > prev, "{}: seq {seq} after {prev}", r.topic);
        }
        // Per sensor, FIFO streams keep publish order.
        let sensor = (device.to_owned(), client, stream.to_owned());
        if let Some(prev) = last_index.insert(sensor, index) {
            assert!(
                index > prev,
                "{device} sensor {client}: {index} after {prev}"
            );
        }
    }
    assert_eq!(origins.len(), total);
    drop((agent_a, agent_b));
}

#[test]
fn jetstream_exactly_once_and_a_retry_to_another_replica_is_dropped_by_msg_id() {
    let (dir, a_dir, b_dir) = dirs_for_two();
    let nats = NatsServer::start(dir.path());
    let cloud = CloudHarness::new(&a_dir).nats(&nats.url, "IOT").run();
    eventually(Duration::from_secs(20), "ingest ready", || {
        (cloud.readyz() == 200).then_some(())
    });
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    let (clients, per_client) = (3, 1000);
    publish(agent.mqtt, clients, per_client);
    let total = clients * per_client as usize;
    eventually(Duration::from_secs(60), "all records acknowledged", || {
        (cloud.metric("ingest_records_accepted_total") as usize >= total).then_some(())
    });

    let messages = jetstream_read(&nats.url, "IOT");
    assert_eq!(messages.len(), total, "exactly the published records");
    let mut origins = HashSet::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    for m in &messages {
        let stream = &m.headers["stream"];
        assert_eq!(m.subject, format!("iot.{TENANT}.{stream}"));
        let seq: u64 = m.headers["seq"].parse().expect("seq");
        assert_eq!(
            m.headers["Nats-Msg-Id"],
            format!("{DEVICE}/{stream}/{}/{seq}", m.headers["epoch"]),
            "Nats-Msg-Id is the idempotency key"
        );
        let (client, index) = origin(&m.payload);
        assert_eq!(
            m.payload,
            load::payload(PayloadKind::Binary, client, index, PAYLOAD)
        );
        assert_eq!(m.headers["mqtt_topic"], topic_of(client, index));
        assert!(origins.insert((client, index)), "no duplicate");
        if let Some(prev) = last_seq.insert(m.subject.clone(), seq) {
            assert!(seq > prev, "{}: seq {seq} after {prev}", m.subject);
        }
    }

    // A retry that reaches another replica (which never saw the batch) is dropped by the
    // server's Msg-Id dedup. The batch also comes from an agent whose clock is 1 h slow.
    let replica_b = CloudHarness::new(&b_dir).nats(&nats.url, "IOT").run();
    eventually(Duration::from_secs(20), "replica B ready", || {
        (replica_b.readyz() == 200).then_some(())
    });
    let hour = 3_600_000;
    let agent_now = e2e::now_ms() - hour;
    let batch = ingest_wire::Batch {
        device_id: DEVICE.into(),
        stream: "retry".into(),
        sent_at_ms: agent_now,
        epoch: 42,
        records: (1..=50)
            .map(|seq| ingest_wire::Record {
                seq,
                // A topic and an attribute holding `Nats-Msg-Id`: neither may hide the real
                // header from the server, or the retry below would be stored twice.
                topic: "plant/9/Nats-Msg-Id/retry".into(),
                payload: bytes::Bytes::from(format!("r{seq}")),
                qos: None,
                received_at_ms: agent_now - 1000,
                attributes: vec![ingest_wire::Attribute {
                    key: "line".into(),
                    value: format!(" {seq} Nats-Msg-Id: x\n"),
                }],
                ..Default::default()
            })
            .collect(),
    };
    let body = ingest_wire::compress(&ingest_wire::encode_batch(&batch), 3).expect("zstd");
    let post = |c: &e2e::Cloud| {
        let (status, ack) = c.post(
            DEVICE,
            TOKEN,
            ingest_wire::CONTENT_TYPE_BATCH,
            Some("zstd"),
            body.clone(),
        );
        assert_eq!(status, 200, "{ack}");
        serde_json::from_str::<serde_json::Value>(&ack).expect("ack JSON")
    };
    let first = post(&cloud);
    assert_eq!(
        (first["accepted"].as_u64(), first["duplicates"].as_u64()),
        (Some(50), Some(0))
    );
    let retry = post(&replica_b);
    assert_eq!(
        (retry["accepted"].as_u64(), retry["duplicates"].as_u64()),
        (Some(0), Some(50)),
        "the other replica's retry appended nothing"
    );
    let messages = jetstream_read(&nats.url, "IOT");
    let retried: Vec<_> = messages
        .iter()
        .filter(|m| m.headers["stream"] == "retry")
        .collect();
    assert_eq!(retried.len(), 50, "once each");
    assert_eq!(messages.len(), total + 50);
    for m in retried {
        let original: i64 = m.headers["received_at_ms"].parse().expect("ms");
        let corrected: i64 = m.headers["corrected_at_ms"].parse().expect("ms");
        assert_eq!(original, agent_now - 1000, "the original is kept");
        assert!(
            (corrected - original - hour).abs() < 5_000,
            "corrected by the agent's clock error: {}",
            corrected - original
        );
        assert_eq!(m.headers["clock_corrected"], "true");
        assert_eq!(m.headers["mqtt_topic"], "plant/9/%4Eats-Msg-Id/retry");
        let seq = &m.headers["seq"];
        assert_eq!(
            m.headers["line"],
            format!("%20{seq} %4Eats-Msg-Id: x%0A"),
            "an attribute is a header, encoded"
        );
    }
    drop(agent);
}

/// Indices acknowledged by the MQTT broker (PUBACK), i.e. owed to the log.
fn acked_indices(log: &load::SteadyLog) -> BTreeMap<u64, ()> {
    log.acked.iter().map(|&(i, _)| (i, ())).collect()
}

const ONE_STREAM: &str = "
  - name: telemetry
    topics: [\"plant/#\"]
    priority: normal
    batch: { max_records: 200, linger: 20ms }
";

#[test]
fn kafka_outage_is_answered_503_and_everything_unacknowledged_arrives_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tansu = Tansu::start(dir.path());
    let cloud = CloudHarness::new(dir.path()).kafka(&tansu.brokers).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .streams(ONE_STREAM)
        .run();
    let accepted = || cloud.metric("ingest_records_accepted_total") as u64;
    let publisher = Steady::start(agent.mqtt, 1, 500.0, "plant/1/telemetry", PAYLOAD);
    eventually(Duration::from_secs(30), "first records in Kafka", || {
        (accepted() >= 500).then_some(())
    });

    tansu.kill();
    // The batch in flight fails: 503 from the ingest, or, when Kafka's delivery timeout and
    // the producer's replacement outlast the agent's request timeout, no answer. Either way
    // the agent then probes /readyz instead of sending more.
    eventually(Duration::from_secs(30), "a batch fails", || {
        (agent.metric("agent_batches_total{outcome=\"retried\",stream=\"telemetry\"}") >= 1.0)
            .then_some(())
    });
    eventually(Duration::from_secs(10), "/readyz says not ready", || {
        (cloud.readyz() == 503).then_some(())
    });
    let before = accepted();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        accepted(),
        before,
        "nothing is acknowledged while Kafka is down"
    );
    assert!(agent.backlog() > 0.0, "the agent buffers");

    tansu.restart();
    let restart_point = accepted();
    eventually(Duration::from_secs(30), "/readyz recovers", || {
        (cloud.readyz() == 200).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let log = publisher.stop();
    let owed = acked_indices(&log);
    let total = log.acked.len() as u64;
    eventually(Duration::from_secs(60), "the backlog drains", || {
        (agent.backlog() == 0.0 && accepted() == total).then_some(())
    });

    // The new (empty) broker holds exactly the records not acknowledged before the restart:
    // sequence numbers restart_point+1 ..= total, each once, in order.
    let records = kafka_read(
        &tansu.brokers,
        &[format!("iot.{TENANT}.telemetry")],
        (total - restart_point) as usize,
        Duration::from_secs(2),
        Duration::from_secs(60),
    );
    assert!(duplicates(&records).is_empty(), "no duplicates");
    let seqs: Vec<u64> = records
        .iter()
        .map(|r| r.header("seq").parse().expect("seq"))
        .collect();
    assert_eq!(
        seqs,
        (restart_point + 1..=total).collect::<Vec<_>>(),
        "everything after the restart point, in order"
    );
    for r in &records {
        let (_, index) = origin(&r.value());
        assert!(owed.contains_key(&index), "{index} was published");
    }
    println!(
        "kafka outage: {total} records published, {restart_point} acknowledged before the restart, {} delivered to the new broker",
        records.len()
    );
}

#[test]
fn the_agent_fails_over_to_a_second_ingest_replica_and_loses_nothing() {
    let (dir, a_dir, b_dir) = dirs_for_two();
    let tansu = Tansu::start(dir.path());
    let mut replica_a = CloudHarness::new(&a_dir).kafka(&tansu.brokers).run();
    let replica_b = CloudHarness::new(&b_dir).kafka(&tansu.brokers).run();
    let agent = AgentHarness::new(dir.path(), &replica_a.url())
        .ingest_urls(&[replica_a.url(), replica_b.url()])
        .streams(ONE_STREAM)
        .run();
    let publisher = Steady::start(agent.mqtt, 1, 500.0, "plant/1/telemetry", PAYLOAD);
    eventually(Duration::from_secs(30), "replica A takes batches", || {
        (replica_a.metric("ingest_records_accepted_total") >= 500.0).then_some(())
    });
    replica_a.process.kill();
    let killed_at = Instant::now();
    eventually(Duration::from_secs(30), "replica B takes over", || {
        (replica_b.metric("ingest_records_accepted_total") > 0.0).then_some(())
    });
    let failover = killed_at.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let log = publisher.stop();
    let total = log.acked.len();
    eventually(Duration::from_secs(60), "the backlog drains", || {
        (agent.backlog() == 0.0).then_some(())
    });
    assert!(agent.metric("agent_ingest_failovers_total") >= 1.0);
    assert_eq!(agent.metric("agent_ingest_current"), 1.0, "on replica B");

    let records = kafka_read(
        &tansu.brokers,
        &[format!("iot.{TENANT}.telemetry")],
        total,
        Duration::from_secs(2),
        Duration::from_secs(60),
    );
    let got: HashSet<u64> = records.iter().map(|r| origin(&r.value()).1).collect();
    let missing: Vec<u64> = acked_indices(&log)
        .keys()
        .filter(|i| !got.contains(i))
        .copied()
        .collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    // A batch replica A appended but never answered (killed) is sent again to B, which cannot
    // know: at most that one batch (200 records) appears twice, identified by its headers.
    let dups = duplicates(&records);
    assert!(dups.len() <= 200, "{} duplicates", dups.len());
    println!(
        "failover: {total} records, none lost, {} duplicated across replicas, B took over {failover:?} after A died",
        dups.len()
    );
}

/// What the poison tests publish, in order, on one QoS 1 connection: (MQTT topic, payload).
/// The second record is bigger than the log takes (64 KiB in these tests); the fourth's topic
/// has a line feed, which no header may carry as it is.
fn poison_sequence() -> Vec<(String, Vec<u8>)> {
    vec![
        ("plant/1/alarm/a".into(), b"first".to_vec()),
        ("plant/1/alarm/a".into(), vec![b'x'; 100_000]),
        ("plant/1/alarm/a".into(), b"third".to_vec()),
        ("plant/1/alarm/x\ny".into(), b"fourth".to_vec()),
        ("plant/1/alarm/a".into(), b"fifth".to_vec()),
    ]
}

/// Publishes `messages` in order with rumqttc at QoS 1 and waits for every PUBACK
/// (mosquitto_pub refuses a topic with a control character; rumqttc sends it).
fn publish_in_order(mqtt: std::net::SocketAddr, messages: &[(String, Vec<u8>)]) {
    let mut options = rumqttc::MqttOptions::new("poison-sensor", "127.0.0.1", mqtt.port());
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = rumqttc::Client::new(options, 16);
    for (topic, payload) in messages {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload.clone())
            .expect("queue publish");
    }
    let mut acked = 0;
    for event in connection.iter() {
        match event.expect("MQTT connection") {
            rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => acked += 1,
            _ => continue,
        }
        if acked == messages.len() {
            break;
        }
    }
    client.disconnect().ok();
}

/// Checks what a poison test read back: the stream's records in order with the line feed
/// encoded in its header, and one dead letter for the oversized record.
fn check_poison_outcome(
    stream: &[(BTreeMap<String, String>, Vec<u8>)],
    dead: &[(BTreeMap<String, String>, Vec<u8>)],
) {
    let payloads: Vec<&[u8]> = stream.iter().map(|(_, p)| p.as_slice()).collect();
    assert_eq!(
        payloads,
        [&b"first"[..], b"third", b"fourth", b"fifth"],
        "the stream went on past the poison, in order, nothing else lost"
    );
    assert_eq!(
        stream[2].0["mqtt_topic"], "plant/1/alarm/x%0Ay",
        "a line feed in a topic is percent-encoded in its header"
    );
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    let (headers, sample) = &dead[0];
    assert_eq!(headers["dead_letter_topic"], format!("iot.{TENANT}.alarms"));
    assert_eq!(headers["dead_letter_payload_bytes"], "100000");
    assert_eq!(headers["mqtt_topic"], "plant/1/alarm/a");
    assert!(!headers["dead_letter_reason"].is_empty());
    assert_eq!(sample, &vec![b'x'; 4096], "the first 4 KiB of the payload");
    let seqs: Vec<u64> = stream
        .iter()
        .chain(dead)
        .map(|(h, _)| h["seq"].parse().expect("seq"))
        .collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 5, "five distinct sequence numbers: {seqs:?}");
}

#[test]
fn a_poison_record_into_kafka_is_dead_lettered_and_its_stream_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tansu = Tansu::start(dir.path());
    let cloud = CloudHarness::new(dir.path())
        .sink(&format!(
            "  type: kafka\n  options:\n    brokers: {}\n    delivery_timeout: 2s\n    properties:\n      message.max.bytes: \"65536\"\n",
            tansu.brokers
        ))
        .run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    publish_in_order(agent.mqtt, &poison_sequence());
    let topics = [
        format!("iot.{TENANT}.alarms"),
        format!("iot.{TENANT}._dead_letters"),
    ];
    let records = kafka_read(
        &tansu.brokers,
        &topics,
        5,
        Duration::from_secs(2),
        Duration::from_secs(120),
    );
    let split = |topic: &str| -> Vec<_> {
        records
            .iter()
            .filter(|r| r.topic == topic)
            .map(|r| (r.headers.clone(), r.value()))
            .collect()
    };
    check_poison_outcome(&split(&topics[0]), &split(&topics[1]));
    assert_eq!(cloud.metric("ingest_records_dead_lettered_total"), 1.0);
    assert_eq!(cloud.readyz(), 200, "a poison record is not an outage");
    eventually(
        Duration::from_secs(30),
        "the agent's backlog drained",
        || (agent.backlog() == 0.0).then_some(()),
    );
}

#[test]
fn a_poison_record_into_jetstream_is_dead_lettered_and_its_stream_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsServer::start_with(dir.path(), "max_payload: 65536\n");
    let cloud = CloudHarness::new(dir.path()).nats(&nats.url, "IOT").run();
    eventually(Duration::from_secs(20), "ingest ready", || {
        (cloud.readyz() == 200).then_some(())
    });
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    publish_in_order(agent.mqtt, &poison_sequence());
    eventually(
        Duration::from_secs(60),
        "four records and a dead letter",
        || {
            (cloud.metric("ingest_records_accepted_total") >= 4.0
                && cloud.metric("ingest_records_dead_lettered_total") >= 1.0)
                .then_some(())
        },
    );
    let messages = jetstream_read(&nats.url, "IOT");
    let split = |subject: String| -> Vec<_> {
        messages
            .iter()
            .filter(|m| m.subject == subject)
            .map(|m| (m.headers.clone(), m.payload.clone()))
            .collect()
    };
    check_poison_outcome(
        &split(format!("iot.{TENANT}.alarms")),
        &split(format!("iot.{TENANT}._dead_letters")),
    );
    assert_eq!(cloud.readyz(), 200, "a poison record is not an outage");
    eventually(
        Duration::from_secs(30),
        "the agent's backlog drained",
        || (agent.backlog() == 0.0).then_some(()),
    );
}
