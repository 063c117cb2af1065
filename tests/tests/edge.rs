//! Edge processing, end to end: the real agent and ingest, readings published with
//! `mosquitto_pub`, what arrives read back from the ingest's log, counts from `/metrics`.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e::{AgentHarness, CloudHarness, TENANT};

/// Two streams: the seed's example done our way on `telemetry` (enrich with a location, the
/// device and the site from the topic; keep temperatures above -40; send on a change of 0.5
/// or after 2 s; 4 s windows, raw readings kept), and a deadband alone on `vibration` that
/// passes what it cannot read.
const STREAMS: &str = "
  - name: telemetry
    topics: [\"plant/+/telemetry/#\"]
    priority: normal
    batch: { max_records: 100, linger: 0ms }
    transforms:
      - enrich:
          fields: { device_location: factory-floor-1 }
          facts: [device_id]
          topic: \"plant/{site}/#\"
      - filter:
          where: [{ field: t, op: \">\", value: -40 }]
          on_error: drop
      - deadband: { field: t, absolute: 0.5, heartbeat: 2s }
      - window: { every: 4s, fields: [t], keep_raw: true }
  - name: vibration
    topics: [\"plant/+/vibration/#\"]
    priority: normal
    batch: { max_records: 100, linger: 0ms }
    transforms:
      - deadband: { field: v, absolute: 1, on_error: pass }
  - name: raw
    topics: [\"plant/+/raw/#\"]
    priority: normal
    batch: { max_records: 100, linger: 0ms }
    transforms:
      - enrich:
          fields: { device_location: factory-floor-1, floor: 3 }
          facts: [device_id]
          topic: \"plant/{site}/#\"
";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn json(payload: &[u8]) -> serde_json::Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(payload).into()))
}

/// A scripted sequence through enrich + filter + deadband (with heartbeat) + window gives
/// exactly the expected records in the log, in order, and `/metrics` counts what was not
/// sent, by reason; malformed JSON into a deadband stream is counted, passed through untouched
/// as configured, and the stream keeps flowing.
#[test]
fn a_scripted_sequence_through_the_transforms_gives_exactly_the_expected_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .streams(STREAMS)
        .run();
    // Start just after a window boundary, so the first burst falls in one window.
    while now_ms() % 4_000 > 300 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let burst = [
        r#"{"t": 20.0}"#, // sent
        r#"{"t": 20.2}"#, // deadband
        r#"{"t": 20.6}"#, // sent
        r#"{"t": -50}"#,  // filter
        "garbage",        // enrich gives it attributes, filter cannot read it: dropped
        r#"{"t": 20.7}"#, // deadband
    ];
    let started = now_ms();
    assert!(e2e::mosquitto_pub_lines(
        agent.mqtt,
        1,
        "plant/berlin/telemetry/t1",
        burst.iter().map(|s| s.to_string())
    ));
    assert!(
        now_ms() - started < 2_000,
        "the burst took too long for the scripted windows"
    );
    assert!(e2e::mosquitto_pub_lines(
        agent.mqtt,
        1,
        "plant/berlin/vibration/v1",
        [r#"{"v": 1}"#, "garbage", r#"{"v": 1.2}"#, r#"{"v": 3}"#].map(String::from)
    ));
    assert!(e2e::mosquitto_pub_lines(
        agent.mqtt,
        1,
        "plant/berlin/raw/r1",
        ["21.5 C", r#"{"t": 1}"#].map(String::from)
    ));
    // After the first window (4 s) and the heartbeat (2 s after 20.6 was sent): sent again.
    while now_ms() < started - started % 4_000 + 4_500 {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(e2e::mosquitto_pub_lines(
        agent.mqtt,
        1,
        "plant/berlin/telemetry/t1",
        [r#"{"t": 20.7}"#.to_string()]
    ));

    let topic = format!("iot.{TENANT}.telemetry");
    let records = e2e::eventually(Duration::from_secs(20), "both windows ended", || {
        let r = cloud.read_topic(&topic);
        (r.len() >= 5).then_some(r)
    });
    let got: Vec<serde_json::Value> = records.iter().map(|r| json(&r.payload)).collect();
    assert_eq!(got.len(), 5, "{got:#?}");
    for (i, t) in [(0, 20.0), (1, 20.6), (3, 20.7)] {
        assert_eq!(got[i]["t"], t, "raw reading {i}: {}", got[i]);
        assert_eq!(got[i]["device_location"], "factory-floor-1");
        assert_eq!(got[i]["device_id"], e2e::DEVICE);
        assert_eq!(got[i]["site"], "berlin");
    }
    let window = |w: &serde_json::Value, count: u64, min: f64, max: f64, last: f64| {
        assert_eq!(w["count"], count, "{w}");
        assert_eq!(
            (&w["t"]["min"], &w["t"]["max"], &w["t"]["last"]),
            (
                &serde_json::Value::from(min),
                &serde_json::Value::from(max),
                &serde_json::Value::from(last)
            ),
            "{w}"
        );
        assert_eq!(
            w["window_end_ms"].as_i64().expect("end")
                - w["window_start_ms"].as_i64().expect("start"),
            4_000
        );
    };
    window(&got[2], 2, 20.0, 20.6, 20.6);
    assert!((got[2]["t"]["mean"].as_f64().expect("mean") - 20.3).abs() < 1e-9);
    window(&got[4], 1, 20.7, 20.7, 20.7);
    assert_eq!(
        records[2].mqtt_topic, "plant/berlin/telemetry/t1",
        "a window's record keeps its topic"
    );

    let vibration = cloud.read_topic(&format!("iot.{TENANT}.vibration"));
    let got: Vec<Vec<u8>> = vibration.iter().map(|r| r.payload.to_vec()).collect();
    assert_eq!(
        got,
        vec![
            br#"{"v": 1}"#.to_vec(),
            b"garbage".to_vec(),
            br#"{"v": 3}"#.to_vec()
        ],
        "passed through untouched, and the stream flows on"
    );

    // Not a JSON object: the payload untouched, the enrichment as attributes (headers in
    // Kafka and NATS). A JSON object: fields, no attributes.
    let raw = cloud.read_topic(&format!("iot.{TENANT}.raw"));
    assert_eq!(raw.len(), 2);
    assert_eq!(raw[0].payload, b"21.5 C");
    let want: std::collections::BTreeMap<String, String> = [
        ("device_id", e2e::DEVICE),
        ("device_location", "factory-floor-1"),
        ("floor", "3"),
        ("site", "berlin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(raw[0].attributes, want);
    let enriched = json(&raw[1].payload);
    assert_eq!(
        (&enriched["floor"], &enriched["site"]),
        (&3.into(), &"berlin".into())
    );
    assert!(raw[1].attributes.is_empty());

    let metric = |stream: &str, reason: &str| {
        agent.metric(&format!(
            "agent_records_filtered_total{{reason=\"{reason}\",stream=\"{stream}\"}}"
        ))
    };
    assert_eq!(metric("telemetry", "deadband"), 2.0);
    assert_eq!(metric("telemetry", "filter"), 1.0);
    assert_eq!(metric("telemetry", "unparsable"), 1.0);
    assert_eq!(metric("vibration", "deadband"), 1.0);
    let unparsable = |stream: &str, step: &str, action: &str| {
        agent.metric(&format!(
            "agent_transform_unparsable_total{{action=\"{action}\",stream=\"{stream}\",transform=\"{step}\"}}"
        ))
    };
    assert_eq!(
        unparsable("telemetry", "enrich", "passed"),
        0.0,
        "enrich gives a payload it cannot read attributes instead"
    );
    assert_eq!(unparsable("telemetry", "filter", "dropped"), 1.0);
    assert_eq!(unparsable("vibration", "deadband", "passed"), 1.0);
    assert_eq!(
        agent.metric("agent_records_dropped_total"),
        0.0,
        "filtered records are not losses"
    );
}

/// A stream for lines tailed from files.
const FILE_STREAMS: &str = "
  - name: files
    topics: [\"files/#\"]
    priority: normal
    batch: { max_records: 500, linger: 20ms }
";

/// Appends lines `L<from>`..`L<to>` (exclusive) to `path`.
fn append(path: &std::path::Path, from: u64, to: u64) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open for append");
    let text: String = (from..to).map(|i| format!("L{i}\n")).collect();
    f.write_all(text.as_bytes()).expect("append");
}

/// The lines in the log so far, as numbers, in log order.
fn lines_in_log(cloud: &e2e::Cloud) -> Vec<u64> {
    cloud
        .read_topic(&format!("iot.{TENANT}.files"))
        .iter()
        .map(|r| {
            let text = String::from_utf8_lossy(&r.payload);
            text.strip_prefix('L')
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a line of ours: {text:?}"))
        })
        .collect()
}

/// Waits until the log holds `n` lines; they must be 0..n, each once, in order.
fn all_lines(cloud: &e2e::Cloud, n: u64, what: &str) {
    let got = e2e::eventually(Duration::from_secs(30), what, || {
        let got = lines_in_log(cloud);
        (got.len() as u64 >= n).then_some(got)
    });
    std::thread::sleep(Duration::from_millis(500));
    let got = if got.len() as u64 == n {
        lines_in_log(cloud)
    } else {
        got
    };
    assert_eq!(
        got,
        (0..n).collect::<Vec<_>>(),
        "{what}: every line once, in order"
    );
}

/// The file source: appended lines, a rotation by rename (with lines the application still
/// writes to the renamed file), a copytruncate, a truncate, and a `kill -9` of the agent in
/// the middle of a burst of appends: every line arrives exactly once, in order.
#[test]
fn a_tailed_file_gives_every_line_once_in_order_through_rotation_truncation_and_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("sensors");
    std::fs::create_dir_all(&logs).expect("logs dir");
    let file = logs.join("temperature.log");
    let cloud = CloudHarness::new(dir.path()).run();
    let harness = AgentHarness::new(dir.path(), &cloud.url())
        .streams(FILE_STREAMS)
        .extra(&format!(
            "sources:\n  - file: {{ path: \"{}/*.log\", stream: files, poll: 50ms }}\n",
            logs.display()
        ));
    let config = dir.path().join("agent.yaml");
    std::fs::write(dir.path().join("token"), format!("{}\n", e2e::TOKEN)).expect("token");
    std::fs::write(&config, harness.config_text()).expect("config");
    let mut agent = e2e::start_agent(dir.path(), &config);

    // More lines at once than one batch holds: each batch is committed with its position.
    append(&file, 0, 3_000);
    all_lines(&cloud, 3_000, "appended lines");
    let topic = cloud.read_topic(&format!("iot.{TENANT}.files"))[0]
        .mqtt_topic
        .clone();
    assert_eq!(topic, "files/temperature.log");

    // Rotation by rename: the application still writes to the renamed file, then a new one.
    let rotated = logs.join("temperature.log.1");
    std::fs::rename(&file, &rotated).expect("rename");
    append(&rotated, 3_000, 3_020);
    append(&file, 3_020, 3_070);
    all_lines(&cloud, 3_070, "after a rotation by rename");

    // copytruncate, then a plain truncate.
    std::fs::copy(&file, logs.join("temperature.log.2")).expect("copy");
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&file)
        .expect("truncate");
    append(&file, 3_070, 3_100);
    all_lines(&cloud, 3_100, "after a copytruncate");
    std::fs::write(&file, "").expect("truncate");
    append(&file, 3_100, 3_110);
    all_lines(&cloud, 3_110, "after a truncate");
    let event = |agent: &e2e::Agent, event: &str| {
        agent.metric(&format!(
            "agent_file_source_events_total{{event=\"{event}\",source=\"file:{}/*.log\"}}",
            logs.display()
        ))
    };
    assert!(event(&agent, "rotated") >= 1.0, "the rename was seen");
    assert!(
        event(&agent, "truncated") >= 2.0,
        "both truncations were seen"
    );

    // A rotation while the agent is stopped: the renamed file's tail is still read, first.
    assert!(agent.process.terminate().success());
    append(&file, 3_110, 3_130);
    std::fs::rename(&file, logs.join("temperature.log.3")).expect("rename");
    append(&file, 3_130, 3_150);
    let mut agent = e2e::start_agent(dir.path(), &config);
    all_lines(&cloud, 3_150, "after a rotation while stopped");

    // kill -9 in the middle of a burst of appends, then a restart.
    let burst = {
        let file = file.clone();
        std::thread::spawn(move || {
            for i in 0..40 {
                append(&file, 3_150 + i * 50, 3_200 + i * 50);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    agent.process.kill();
    burst.join().expect("burst");
    let _agent = e2e::start_agent(dir.path(), &config);
    all_lines(&cloud, 5_150, "after a kill -9 in the middle of a burst");
}

/// `count` QoS 1 messages `U<from>`.. published to Mosquitto with `mosquitto_pub` (which
/// waits for each PUBACK); whether it took them all.
fn publish_upstream(port: u16, from: u64, count: u64) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    e2e::mosquitto_pub_lines(
        addr,
        1,
        "plant/9/telemetry/upstream",
        (from..from + count).map(|i| format!("U{i}")),
    )
}

/// The upstream messages in the log, as numbers (sorted), and how many records there were.
fn upstream_in_log(cloud: &e2e::Cloud) -> (Vec<u64>, usize) {
    let records = cloud.read_topic(&format!("iot.{TENANT}.telemetry"));
    let mut got: Vec<u64> = records
        .iter()
        .filter_map(|r| {
            String::from_utf8_lossy(&r.payload)
                .strip_prefix('U')
                .and_then(|n| n.parse().ok())
        })
        .collect();
    let n = got.len();
    got.sort_unstable();
    got.dedup();
    (got, n)
}

/// Waits until the agent's subscription at the Mosquitto at `port` is in place: probes
/// published there reach the log.
fn subscribed(cloud: &e2e::Cloud, port: u16) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    e2e::eventually(Duration::from_secs(20), "subscribed upstream", || {
        assert!(e2e::mosquitto_pub_qos1(addr, "plant/9/probe", "probe"));
        (!cloud
            .read_topic(&format!("iot.{TENANT}.default"))
            .is_empty())
        .then_some(())
    });
}

/// An agent subscribed to the Mosquitto at `port` (persistent session, QoS 1).
fn upstream_agent(dir: &std::path::Path, cloud: &e2e::Cloud, port: u16) -> std::path::PathBuf {
    let harness = AgentHarness::new(dir, &cloud.url()).extra(&format!(
        "sources:\n  - mqtt: {{ url: \"mqtt://127.0.0.1:{port}\", topics: [\"plant/#\"], client_id: edge-bridge-test }}\n"
    ));
    let config = dir.join("agent.yaml");
    std::fs::write(dir.join("token"), format!("{}\n", e2e::TOKEN)).expect("token");
    std::fs::write(&config, harness.config_text()).expect("config");
    config
}

/// The upstream broker source against a real Mosquitto: what is published there lands in the
/// log; while the agent is killed (-9) Mosquitto queues for its persistent session, and after
/// the restart nothing is lost, nothing doubled.
#[test]
fn an_upstream_mosquittos_messages_land_in_the_log_and_a_kill_9_loses_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mosquitto = e2e::brokers::Mosquitto::start(dir.path());
    let cloud = CloudHarness::new(dir.path()).run();
    let config = upstream_agent(dir.path(), &cloud, mosquitto.port);
    let mut agent = e2e::start_agent(dir.path(), &config);
    // Subscribed once the session exists: a first message makes it through.
    subscribed(&cloud, mosquitto.port);
    // A message over the agent's mqtt.max_payload_bytes (256 KiB) is acknowledged and dropped,
    // counted: it does not stall the ones behind it.
    let big = dir.path().join("big");
    std::fs::write(&big, "x".repeat(300 << 10)).expect("big message");
    assert!(
        std::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &mosquitto.port.to_string(),
                "-q",
                "1"
            ])
            .args(["-t", "plant/9/telemetry/big", "-f"])
            .arg(&big)
            .status()
            .expect("mosquitto_pub")
            .success()
    );
    assert!(publish_upstream(mosquitto.port, 0, 200));
    e2e::eventually(Duration::from_secs(30), "200 in the log", || {
        (upstream_in_log(&cloud).0.len() == 200).then_some(())
    });
    assert_eq!(
        agent.metric(
            "agent_records_dropped_total{reason=\"too_large\",stream=\"(upstream broker)\"}"
        ),
        1.0
    );

    agent.process.kill();
    assert!(
        publish_upstream(mosquitto.port, 200, 300),
        "queued for the session"
    );
    let _agent = e2e::start_agent(dir.path(), &config);
    e2e::eventually(Duration::from_secs(30), "500 in the log", || {
        (upstream_in_log(&cloud).0.len() == 500).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let (got, records) = upstream_in_log(&cloud);
    assert!(
        got == (0..500).collect::<Vec<_>>(),
        "nothing lost: {} of 500",
        got.len()
    );
    assert_eq!(records, 500, "nothing twice");
}

/// `mqtt.enabled: false`: no embedded broker and no MQTT listener; an upstream Mosquitto
/// alone feeds the agent, and what is published there lands in the log.
#[test]
fn without_the_embedded_broker_an_upstream_mosquitto_feeds_the_agent_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mosquitto = e2e::brokers::Mosquitto::start(dir.path());
    let cloud = CloudHarness::new(dir.path()).run();
    let port = e2e::free_port();
    let harness = AgentHarness::new(dir.path(), &cloud.url())
        .mqtt_port(port)
        .mqtt_extra("  enabled: false\n")
        .extra(&format!(
            "sources:\n  - mqtt: {{ url: \"mqtt://127.0.0.1:{}\", topics: [\"plant/#\"] }}\n",
            mosquitto.port
        ));
    let config = dir.path().join("agent.yaml");
    std::fs::write(dir.path().join("token"), format!("{}\n", e2e::TOKEN)).expect("token");
    std::fs::write(&config, harness.config_text()).expect("config");
    let agent = e2e::start_agent_without_mqtt(dir.path(), &config);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on mqtt.listen"
    );
    subscribed(&cloud, mosquitto.port);
    assert!(publish_upstream(mosquitto.port, 0, 300));
    e2e::eventually(Duration::from_secs(30), "300 in the log", || {
        (upstream_in_log(&cloud).0.len() == 300).then_some(())
    });
    assert_eq!(agent.readyz(), 200, "ready without MQTT");
}

/// Mosquitto restarted twice (its persistent state saved and read back) under a steady QoS 1
/// load of 2,000 messages/s: the agent reconnects on its own, its session survives, and every
/// message Mosquitto acknowledged to the publisher is in the log, once. A second persistent
/// subscriber, Mosquitto's own `mosquitto_sub`, is the witness that Mosquitto kept them all.
#[test]
fn a_restart_of_the_upstream_mosquitto_under_load_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut mosquitto = e2e::brokers::Mosquitto::start(dir.path());
    let cloud = CloudHarness::new(dir.path()).run();
    let config = upstream_agent(dir.path(), &cloud, mosquitto.port);
    let _agent = e2e::start_agent(dir.path(), &config);
    subscribed(&cloud, mosquitto.port);
    let witness_out = std::fs::File::create(dir.path().join("witness")).expect("witness");
    let mut witness = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &mosquitto.port.to_string()])
        .args([
            "-q",
            "1",
            "-c",
            "-i",
            "witness",
            "-t",
            "plant/9/steady/#",
            "-F",
            "%x",
        ])
        .stdout(witness_out)
        .spawn()
        .expect("mosquitto_sub");
    // The witness is subscribed once a probe reaches it.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], mosquitto.port));
    e2e::eventually(Duration::from_secs(20), "the witness subscribed", || {
        assert!(e2e::mosquitto_pub_qos1(
            addr,
            "plant/9/steady/probe",
            "probe"
        ));
        std::fs::read_to_string(dir.path().join("witness"))
            .is_ok_and(|w| !w.is_empty())
            .then_some(())
    });
    let steady = e2e::load::Steady::start(addr, 1, 2_000.0, "plant/9/steady/x", 16);
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1_500));
        mosquitto.restart();
    }
    std::thread::sleep(Duration::from_millis(1_500));
    let log = steady.stop();
    let acked: BTreeSet<u64> = log.acked.iter().map(|&(i, _)| i).collect();
    assert!(
        acked.len() > 5_000 && log.connections >= 3,
        "the load ran across both restarts: {log:?}"
    );
    let index = |p: &[u8]| u64::from_be_bytes(p[4..12].try_into().expect("8 bytes"));
    let in_log = || -> Vec<u64> {
        cloud
            .read_topic(&format!("iot.{TENANT}.default"))
            .iter()
            .filter(|r| r.mqtt_topic == "plant/9/steady/x")
            .map(|r| index(&r.payload))
            .collect()
    };
    let _ = e2e::try_eventually(Duration::from_secs(30), || {
        acked
            .is_subset(&in_log().into_iter().collect())
            .then_some(())
    });
    let _ = e2e::try_eventually(Duration::from_secs(10), || {
        let seen = std::fs::read_to_string(dir.path().join("witness")).unwrap_or_default();
        (seen.lines().count() >= acked.len()).then_some(())
    });
    let _ = witness.kill();
    let _ = witness.wait();
    // Late copies, if any, have arrived.
    std::thread::sleep(Duration::from_secs(1));
    let records = in_log();
    let got: BTreeSet<u64> = records.iter().copied().collect();
    let seen: BTreeSet<u64> = std::fs::read_to_string(dir.path().join("witness"))
        .expect("witness")
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            (0..l.len() / 2)
                .map(|i| u8::from_str_radix(&l[2 * i..2 * i + 2], 16).ok())
                .collect::<Option<Vec<u8>>>()
        })
        .filter(|p| p.len() >= 12)
        .map(|p| index(&p))
        .collect();
    // How many acknowledged messages `from` lacks, and the first few.
    let missing = |from: &BTreeSet<u64>| -> (usize, Vec<u64>) {
        let lacking: Vec<u64> = acked.difference(from).copied().collect();
        (lacking.len(), lacking.into_iter().take(20).collect())
    };
    assert_eq!(
        missing(&seen),
        (0, Vec::new()),
        "Mosquitto kept every message (the witness has them all): else the test's broker is broken"
    );
    assert_eq!(missing(&got), (0, Vec::new()), "the agent lost none");
    assert_eq!(records.len(), got.len(), "the agent stored none twice");
}
