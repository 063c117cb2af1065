//! The MQTT front door, end to end: acknowledgements that mean "on disk", QoS 2 and resends
//! exactly once, both protocol versions on one port with local subscribers still served,
//! `$` topics kept, and clients that try to wedge or crash the door.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, Cloud, CloudHarness, TENANT, eventually};
use rumqttc::QoS;

/// A raw MQTT 3.1.1 CONNECT for `client_id`.
fn connect_packet(client_id: &str, clean: bool) -> Vec<u8> {
    let mut v = vec![
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        if clean { 0x02 } else { 0x00 },
        0,
        60,
    ];
    v.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    v.extend_from_slice(client_id.as_bytes());
    packet(0x10, &v)
}

/// A raw PUBLISH at `qos` (1 or 2) with packet id `pkid`.
fn publish_packet(topic: &str, payload: &[u8], qos: u8, pkid: u16, dup: bool) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    v.extend_from_slice(topic.as_bytes());
    v.extend_from_slice(&pkid.to_be_bytes());
    v.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | if dup { 0x08 } else { 0 }, &v)
}

fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// Connects as `client_id` and reads the CONNACK; returns the stream and the CONNACK code.
fn raw_client(addr: SocketAddr, client_id: &str, clean: bool) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(&connect_packet(client_id, clean))
        .expect("CONNECT");
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack[0], 0x20, "a CONNACK");
    (s, connack[3])
}

fn read_packet(s: &mut TcpStream) -> Vec<u8> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).expect("packet head");
    let mut body = vec![0u8; head[1] as usize];
    s.read_exact(&mut body).expect("packet body");
    [head.to_vec(), body].concat()
}

fn records_of(cloud: &Cloud, stream: &str) -> Vec<e2e::LogRecord> {
    cloud.read_topic(&format!("iot.{TENANT}.{stream}"))
}

fn publish(spec: LoadSpec) -> load::LoadReport {
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(load::publish(spec))
}

fn steady_sensor(mqtt: SocketAddr, n: u64) -> std::thread::JoinHandle<load::LoadReport> {
    std::thread::spawn(move || {
        publish(LoadSpec {
            mqtt,
            clients: 1,
            messages_per_client: n,
            rate_per_client: Some(200.0),
            payload_bytes: 64,
            kind: PayloadKind::Binary,
            qos: QoS::AtLeastOnce,
            topic: Arc::new(|_, _| "plant/1/telemetry/steady".to_owned()),
            client_prefix: "steady-".into(),
        })
    })
}

#[test]
fn qos2_from_mosquitto_and_a_qos1_resend_after_a_lost_puback_are_stored_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    for version in ["mqttv311", "mqttv5"] {
        let status = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &agent.mqtt.port().to_string(),
                "-V",
                version,
            ])
            .args([
                "-q",
                "2",
                "-t",
                "plant/2/telemetry/q2",
                "-m",
                &format!("qos2 {version}"),
            ])
            .status()
            .expect("mosquitto_pub");
        assert!(status.success());
    }
    // A QoS 2 resend (DUP) before the PUBREL: acknowledged again, stored once.
    let (mut s, code) = raw_client(agent.mqtt, "raw/qos2", true);
    assert_eq!(code, 0);
    s.write_all(&publish_packet(
        "plant/2/telemetry/q2",
        b"raw qos2",
        2,
        9,
        false,
    ))
    .expect("publish");
    assert_eq!(
        read_packet(&mut s),
        vec![0x50, 2, 0, 9],
        "PUBREC after the commit"
    );
    s.write_all(&publish_packet(
        "plant/2/telemetry/q2",
        b"raw qos2",
        2,
        9,
        true,
    ))
    .expect("resend");
    assert_eq!(read_packet(&mut s), vec![0x50, 2, 0, 9]);
    s.write_all(&[0x62, 2, 0, 9]).expect("PUBREL");
    assert_eq!(read_packet(&mut s), vec![0x70, 2, 0, 9], "PUBCOMP");
    drop(s);

    // QoS 1: the PUBACK is lost (the connection drops before the client reads it); the client
    // reconnects to its persistent session and resends with DUP: one record.
    let (mut s, _) = raw_client(agent.mqtt, "plant/7/sensor", false);
    s.write_all(&publish_packet(
        "plant/2/telemetry/q1",
        b"resent once",
        1,
        5,
        false,
    ))
    .expect("publish");
    eventually(Duration::from_secs(10), "the first one committed", || {
        (agent.metric("agent_records_buffered_total{stream=\"telemetry\"}") >= 4.0).then_some(())
    });
    drop(s);
    let (mut s, _) = raw_client(agent.mqtt, "plant/7/sensor", false);
    s.write_all(&publish_packet(
        "plant/2/telemetry/q1",
        b"resent once",
        1,
        5,
        true,
    ))
    .expect("resend");
    assert_eq!(
        read_packet(&mut s),
        vec![0x40, 2, 0, 5],
        "PUBACK for the resend"
    );
    drop(s);

    let records = eventually(Duration::from_secs(20), "all in the log", || {
        let r = records_of(&cloud, "telemetry");
        (r.len() >= 4).then_some(r)
    });
    let mut payloads: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    payloads.sort();
    assert_eq!(
        payloads,
        ["qos2 mqttv311", "qos2 mqttv5", "raw qos2", "resent once"],
        "each exactly once"
    );
    assert_eq!(agent.metric("agent_mqtt_resends_total"), 2.0);
}

#[test]
fn one_port_serves_mqtt_3_and_5_and_local_subscribers_still_get_live_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    let port = agent.mqtt.port().to_string();
    let mut subscribers: Vec<_> = ["mqttv311", "mqttv5"]
        .iter()
        .map(|v| {
            Command::new("mosquitto_sub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    v,
                    "-t",
                    "plant/+/telemetry/#",
                    "-C",
                    "2",
                    "-W",
                    "20",
                ])
                .stdout(Stdio::piped())
                .spawn()
                .expect("mosquitto_sub")
        })
        .collect();
    // Give both subscribers time to subscribe. (Waiting for their SUBACKs instead, read from
    // `mosquitto_sub -d`, made both miss the publishes even 300 ms later: not yet explained.)
    std::thread::sleep(Duration::from_millis(500));
    for version in ["mqttv311", "mqttv5"] {
        let status = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", "1"])
            .args([
                "-t",
                "plant/3/telemetry/live",
                "-m",
                &format!("live {version}"),
            ])
            .status()
            .expect("mosquitto_pub");
        assert!(status.success());
    }
    for sub in subscribers.drain(..) {
        let out = sub.wait_with_output().expect("mosquitto_sub output");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("live mqttv311") && text.contains("live mqttv5"),
            "a local subscriber got both: {text:?}"
        );
    }
    eventually(Duration::from_secs(20), "both also in the log", || {
        (records_of(&cloud, "telemetry").len() == 2).then_some(())
    });
}

#[test]
fn dollar_topics_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    assert!(e2e::mosquitto_pub_qos1(
        agent.mqtt,
        "$plant/1/alarm/x",
        "dollar"
    ));
    let r = eventually(Duration::from_secs(20), "the $ record in the log", || {
        let r = records_of(&cloud, "default");
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(r[0].mqtt_topic, "$plant/1/alarm/x");
    assert_eq!(r[0].payload, b"dollar");
}

#[test]
fn a_vanished_clients_will_is_kept_and_a_clean_goodbye_keeps_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    let port = agent.mqtt.port().to_string();
    // A local subscriber on the gateway gets the wills too (the door sends them to rumqttd).
    let watcher = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "plant/9/alarm/#",
            "-C",
            "2",
            "-W",
            "30",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    eventually(Duration::from_secs(10), "watcher connected", || {
        (agent.metric("agent_mqtt_connections") == 1.0).then_some(())
    });
    // mosquitto_sub with a will, killed (no DISCONNECT), in MQTT 3.1.1 and 5.
    for v in ["mqttv311", "mqttv5"] {
        let mut sub = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                v,
                "-i",
                &format!("willing-{v}"),
            ])
            .args(["-t", "plant/9/telemetry/nothing"])
            .args(["--will-topic", &format!("plant/9/alarm/{v}/gone")])
            .args(["--will-payload", "offline", "--will-qos", "1"])
            .stdout(Stdio::null())
            .spawn()
            .expect("mosquitto_sub");
        eventually(Duration::from_secs(10), "connected", || {
            (agent.metric("agent_mqtt_connections") == 2.0).then_some(())
        });
        sub.kill().expect("kill -9");
        let _ = sub.wait();
        // (The watcher leaves by itself after the second will.)
        eventually(Duration::from_secs(10), "gone", || {
            (agent.metric("agent_mqtt_connections") <= 1.0).then_some(())
        });
    }
    // mosquitto_pub with a will ends with DISCONNECT: its will is not kept.
    let clean = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1"])
        .args(["-t", "plant/9/telemetry/x", "-m", "bye"])
        .args([
            "--will-topic",
            "plant/9/alarm/clean/gone",
            "--will-payload",
            "never",
        ])
        .status()
        .expect("mosquitto_pub");
    assert!(clean.success());
    // Its connection's end (and any will) is counted before the gauge goes down.
    let seen = watcher.wait_with_output().expect("watcher");
    assert_eq!(
        String::from_utf8_lossy(&seen.stdout),
        "offline\noffline\n",
        "the local subscriber got both wills"
    );
    eventually(Duration::from_secs(10), "closed", || {
        (agent.metric("agent_mqtt_connections") == 0.0).then_some(())
    });
    assert_eq!(agent.metric("agent_mqtt_wills_total"), 2.0);
    eventually(Duration::from_secs(20), "the publish and the wills", || {
        (!records_of(&cloud, "telemetry").is_empty() && records_of(&cloud, "alarms").len() >= 2)
            .then_some(())
    });
    let mut wills: Vec<(String, Vec<u8>)> = records_of(&cloud, "alarms")
        .into_iter()
        .map(|r| (r.mqtt_topic, r.payload))
        .collect();
    wills.sort();
    assert_eq!(
        wills,
        [
            (
                "plant/9/alarm/mqttv311/gone".to_owned(),
                b"offline".to_vec()
            ),
            ("plant/9/alarm/mqttv5/gone".to_owned(), b"offline".to_vec()),
        ]
    );
}

#[test]
fn a_publisher_over_its_rate_is_slowed_at_qos1_and_shed_and_counted_at_qos0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .mqtt_extra("  rate_limit: { messages_per_second: 100 }\n")
        .run();
    // A well-behaved sensor publishes throughout (at 200/s it is slowed to 100/s too).
    let steady = steady_sensor(agent.mqtt, 300);
    // A QoS 0 flood at full speed: mosquitto_pub -l, one publish per line.
    assert!(e2e::mosquitto_pub_lines(
        agent.mqtt,
        0,
        "plant/2/logs/flood",
        (0..5000).map(|i| format!("line {i}"))
    ));
    // A QoS 1 publisher over the rate: slowed, every publish acknowledged and kept.
    let started = Instant::now();
    let fast = publish(LoadSpec {
        mqtt: agent.mqtt,
        clients: 1,
        messages_per_client: 400,
        rate_per_client: None,
        payload_bytes: 64,
        kind: PayloadKind::Binary,
        qos: QoS::AtLeastOnce,
        topic: Arc::new(|_, _| "plant/3/telemetry/fast".to_owned()),
        client_prefix: "fast-".into(),
    });
    let took = started.elapsed();
    assert_eq!((fast.published, fast.acked), (400, 400));
    // 100 at once, then 100 a second: at least 3 s (a lower bound; a slow machine only adds).
    assert!(took >= Duration::from_millis(2900), "slowed: {took:?}");
    let steady = steady.join().expect("steady");
    assert_eq!(steady.acked, 300, "the steady sensor lost nothing");
    let shed = agent.metric("agent_mqtt_shed_total");
    assert!(shed > 0.0, "the flood was shed");
    let logs = eventually(Duration::from_secs(30), "everything kept delivered", || {
        let logs = records_of(&cloud, "logs").len() as f64;
        (records_of(&cloud, "telemetry").len() == 700 && logs + shed >= 5000.0).then_some(logs)
    });
    assert_eq!(
        logs + shed,
        5000.0,
        "every QoS 0 publish kept or shed and counted"
    );
    assert!(
        agent
            .process
            .stderr()
            .contains("QoS 0 publishes over mqtt.rate_limit shed"),
        "and logged for its client"
    );
}

#[test]
fn a_thousand_retained_200_kb_publishes_stay_within_the_retained_bounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    // No ingest: the durable path only buffers (within its quota) meanwhile.
    let agent = AgentHarness::new(
        dir.path(),
        &format!("http://127.0.0.1:{}", e2e::free_port()),
    )
    .mqtt_extra("  retained: { max_messages: 10000, max_bytes: 16MiB }\n")
    .run();
    let rss = || -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", agent.process.pid()))
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            << 10
    };
    let before = rss();
    let (mut s, code) = raw_client(agent.mqtt, "retainer", true);
    assert_eq!(code, 0);
    let payload = vec![0x5Au8; 200_000];
    let mut peak = 0;
    for i in 0..1000 {
        let topic = format!("retained/{i}");
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&payload);
        s.write_all(&packet(0x31, &body)).expect("retained publish");
        if i % 100 == 99 {
            peak = peak.max(rss());
        }
    }
    drop(s);
    eventually(Duration::from_secs(60), "all taken", || {
        (agent.metric("agent_records_received_total{stream=\"default\"}") >= 1000.0
            && agent.metric("agent_buffer_queue_records") == 0.0)
            .then_some(())
    });
    peak = peak.max(rss());
    let retained = agent.metric("agent_mqtt_retained_bytes");
    let refused = agent.metric("agent_mqtt_retained_refused_total");
    assert!(retained <= 16.0 * 1048576.0, "{retained}");
    assert!(refused >= 900.0, "{refused}");
    // What is retained is what a new local subscriber gets.
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &agent.mqtt.port().to_string()])
        .args(["-t", "retained/#", "-W", "3", "-F", "%t"])
        .output()
        .expect("mosquitto_sub");
    let got = String::from_utf8_lossy(&out.stdout).lines().count() as f64;
    let dropped = agent.metric("agent_mqtt_local_copies_dropped_total");
    assert!(
        got <= 1000.0 - refused && got + dropped >= 1000.0 - refused && got > 0.0,
        "a new subscriber gets what is retained: {got} ({refused} refused, {dropped} dropped)"
    );
    eprintln!(
        "RSS {} MiB before, {} MiB at most; {retained} B retained, {refused} refused",
        before >> 20,
        peak >> 20
    );
    // The README's cap for this load with the default bounds (16 MiB retained, 32 MiB queued).
    assert!(
        peak < 160 << 20,
        "RSS grew from {} to {} MiB",
        before >> 20,
        peak >> 20
    );
}

#[test]
fn client_ids_with_slashes_and_takeovers_do_not_wedge_the_door() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    let steady = steady_sensor(agent.mqtt, 1000);
    // Twice the same id with a slash (this crashed rumqttd), then 100 takeovers.
    let (_first, code) = raw_client(agent.mqtt, "plant/7/sensor", true);
    assert_eq!(code, 0);
    for i in 0..101 {
        let (mut s, code) = raw_client(agent.mqtt, "plant/7/sensor", i % 2 == 0);
        assert_eq!(code, 0, "takeover {i} accepted");
        s.write_all(&publish_packet(
            "plant/7/telemetry/x",
            &[i as u8],
            1,
            1,
            false,
        ))
        .expect("publish");
        assert_eq!(
            read_packet(&mut s),
            vec![0x40, 2, 0, 1],
            "takeover {i} publishes"
        );
    }
    for id in ["", "a+b#c", "$weird", &"é".repeat(1000)] {
        let (mut s, code) = raw_client(agent.mqtt, id, true);
        assert_eq!(code, 0, "id {id:?}");
        s.write_all(&publish_packet("plant/7/telemetry/x", b"id", 1, 2, false))
            .expect("publish");
        assert_eq!(read_packet(&mut s), vec![0x40, 2, 0, 2]);
    }
    let report = steady.join().expect("steady sensor");
    assert_eq!(report.acked, 1000);
    eventually(
        Duration::from_secs(30),
        "nothing of the steady sensor lost",
        || {
            let n = records_of(&cloud, "telemetry")
                .iter()
                .filter(|r| r.mqtt_topic == "plant/1/telemetry/steady")
                .count();
            (n == 1000).then_some(())
        },
    );
    assert_eq!(agent.readyz(), 200);
}

#[test]
fn idle_sockets_garbage_and_a_connect_storm_do_not_starve_the_door() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .mqtt_extra("  max_connections: 7000\n")
        .run();
    let pid = agent.process.pid();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let before = fds();
    let steady = steady_sensor(agent.mqtt, 1000);
    // 5,000 idle sockets that never send a CONNECT (as many as this process may open, with
    // room for the storm, if its hard limit is lower: the count is printed).
    let limit = {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut limit = getrlimit(Resource::Nofile);
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
        getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
    };
    let want = 5000.min(limit.saturating_sub(1500) as usize);
    eprintln!("{want} idle sockets (open files limit {limit})");
    let idle: Vec<TcpStream> = (0..want)
        .map(|i| TcpStream::connect(agent.mqtt).unwrap_or_else(|e| panic!("idle socket {i}: {e}")))
        .collect();
    assert!(idle.len() >= 2000, "{} idle sockets", idle.len());
    // Garbage, and a header announcing 256 MiB.
    for bytes in [
        vec![0xFFu8; 64],
        vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F, 1, 2, 3],
    ] {
        let mut s = TcpStream::connect(agent.mqtt).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(&bytes).expect("write");
        let mut buf = [0u8; 16];
        assert!(
            matches!(s.read(&mut buf), Ok(0) | Err(_)),
            "garbage gets the connection closed"
        );
    }
    // 1,000 sensors connecting at once, as after a switch reboot.
    let started = Instant::now();
    let storm: Vec<_> = (0..1000)
        .map(|i| {
            let addr = agent.mqtt;
            std::thread::spawn(move || raw_client(addr, &format!("storm-{i}"), true).1)
        })
        .collect();
    let codes: Vec<u8> = storm
        .into_iter()
        .map(|t| t.join().expect("storm"))
        .collect();
    assert!(codes.iter().all(|c| *c == 0), "every storm client accepted");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "1,000 connected in {:?}",
        started.elapsed()
    );
    let report = steady.join().expect("steady");
    assert_eq!(report.acked, 1000, "the steady sensor lost nothing");
    // The idle sockets' descriptors go once their CONNECT timed out (10 s), while this side
    // still holds them open.
    eventually(Duration::from_secs(30), "descriptors released", || {
        (fds() <= before + 50).then_some(())
    });
    drop(idle);
    eventually(Duration::from_secs(30), "steady sensor in the log", || {
        let n = records_of(&cloud, "telemetry").len();
        (n == 1000).then_some(())
    });
}

/// mosquitto_pub with these credentials; whether it succeeded.
fn mosquitto_pub(
    addr: SocketAddr,
    version: &str,
    creds: Option<(&str, &str)>,
    topic: &str,
    message: &str,
) -> bool {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &addr.port().to_string(),
        "-V",
        version,
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        message,
    ]);
    if let Some((u, p)) = creds {
        cmd.args(["-u", u, "-P", p]);
    }
    cmd.stderr(Stdio::null())
        .status()
        .expect("mosquitto_pub")
        .success()
}

/// A raw MQTT 3.1.1 CONNECT with credentials, then the CONNACK code.
fn raw_login(addr: SocketAddr, client_id: &str, user: &str, password: &str) -> (TcpStream, u8) {
    let mut v = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60];
    for field in [client_id.as_bytes(), user.as_bytes(), password.as_bytes()] {
        v.extend_from_slice(&(field.len() as u16).to_be_bytes());
        v.extend_from_slice(field);
    }
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(&packet(0x10, &v)).expect("CONNECT");
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).expect("CONNACK");
    (s, connack[3])
}

#[test]
fn only_known_users_get_in_and_the_acl_keeps_them_to_their_topics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let users = dir.path().join("users");
    std::fs::write(
        &users,
        format!(
            "sensor-1:{}\ngrafana:{}:dashboards\n",
            e2e::hash_password("s3cret-1"),
            e2e::hash_password("dash-pw")
        ),
    )
    .expect("users");
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .mqtt_auth(&format!(
            "  auth: {{ allow_anonymous: false, users_file: {} }}
  acl:
    - users: [\"*\"]
      publish: [\"plant/+/telemetry/%u/#\"]
    - groups: [dashboards]
      subscribe: [\"plant/#\"]
",
            users.display()
        ))
        .run();
    let good = Some(("sensor-1", "s3cret-1"));
    for version in ["mqttv311", "mqttv5"] {
        assert!(
            mosquitto_pub(
                agent.mqtt,
                version,
                good,
                "plant/1/telemetry/sensor-1/t",
                version
            ),
            "{version}: the right password works"
        );
        assert!(!mosquitto_pub(
            agent.mqtt,
            version,
            Some(("sensor-1", "wrong")),
            "plant/1/telemetry/sensor-1/t",
            "x"
        ));
        assert!(!mosquitto_pub(
            agent.mqtt,
            version,
            Some(("mallory", "s3cret-1")),
            "plant/1/telemetry/sensor-1/t",
            "x"
        ));
        assert!(
            !mosquitto_pub(
                agent.mqtt,
                version,
                None,
                "plant/1/telemetry/sensor-1/t",
                "x"
            ),
            "anonymous refused"
        );
    }
    assert_eq!(agent.metric("agent_mqtt_auth_failures_total"), 6.0);
    let (_, code) = raw_login(agent.mqtt, "c", "sensor-1", "wrong");
    assert_eq!(code, 4, "3.1.1: bad user name or password");
    let (_, code) = raw_client(agent.mqtt, "anon", true);
    assert_eq!(code, 5, "3.1.1: not authorized");

    // Outside its prefix: acknowledged (3.1.1) but never stored; counted.
    assert!(mosquitto_pub(
        agent.mqtt,
        "mqttv311",
        good,
        "plant/1/telemetry/sensor-2/t",
        "not mine"
    ));
    assert!(mosquitto_pub(
        agent.mqtt,
        "mqttv311",
        good,
        "plant/1/alarm/sensor-1/t",
        "not mine"
    ));
    assert_eq!(
        agent.metric("agent_mqtt_denied_total{action=\"publish\"}"),
        2.0
    );

    // A sensor may not subscribe to everything; a dashboard may read the plant.
    let (mut s, code) = raw_login(agent.mqtt, "spy", "sensor-1", "s3cret-1");
    assert_eq!(code, 0);
    let mut sub = vec![0, 7];
    sub.extend_from_slice(&[0, 1, b'#', 0]);
    s.write_all(&packet(0x82, &sub)).expect("SUBSCRIBE");
    assert_eq!(
        read_packet(&mut s),
        vec![0x90, 3, 0, 7, 0x80],
        "SUBACK failure"
    );
    let (mut s, code) = raw_login(agent.mqtt, "dash", "grafana", "dash-pw");
    assert_eq!(code, 0);
    let mut sub = vec![0, 8];
    for f in ["plant/#", "#"] {
        sub.extend_from_slice(&(f.len() as u16).to_be_bytes());
        sub.extend_from_slice(f.as_bytes());
        sub.push(0);
    }
    s.write_all(&packet(0x82, &sub)).expect("SUBSCRIBE");
    assert_eq!(
        read_packet(&mut s),
        vec![0x90, 4, 0, 8, 0, 0x80],
        "granted in place, refused in place"
    );
    assert_eq!(
        agent.metric("agent_mqtt_denied_total{action=\"subscribe\"}"),
        2.0
    );

    // Every publish above was acknowledged, so anything kept of it was counted already.
    assert_eq!(
        agent.metric("agent_records_received_total{stream=\"telemetry\"}"),
        2.0,
        "denied publishes are not stored"
    );
    let records = eventually(Duration::from_secs(20), "the two allowed records", || {
        let r = records_of(&cloud, "telemetry");
        (r.len() >= 2).then_some(r)
    });
    assert_eq!(records.len(), 2);
}

#[test]
fn a_buffer_that_refuses_every_commit_stops_the_agent_which_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let mut agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    let (mut s, _) = raw_client(agent.mqtt, "before", true);
    s.write_all(&publish_packet("plant/1/telemetry/t", b"kept", 1, 1, false))
        .expect("publish");
    assert_eq!(read_packet(&mut s), vec![0x40, 2, 0, 1]);
    // The buffer's files refuse every write from now on, through the descriptors the agent
    // already holds (a failing SD card does that): `chattr +i` on ext4.
    let files: Vec<_> = ["buffer.db", "buffer.db-wal"]
        .iter()
        .map(|f| dir.path().join(f))
        .collect();
    let chattr = |flag: &str| {
        for f in &files {
            let status = Command::new("chattr")
                .arg(flag)
                .arg(f)
                .status()
                .expect("chattr");
            assert!(status.success(), "chattr {flag} (needs root and ext4)");
        }
    };
    chattr("+i");
    s.write_all(&publish_packet(
        "plant/1/telemetry/t",
        b"not kept",
        1,
        2,
        false,
    ))
    .expect("publish");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut buf = [0u8; 4];
    let acked = s.read_exact(&mut buf).is_ok();
    let ready = e2e::try_eventually(Duration::from_secs(10), || {
        (agent.readyz() == 503).then_some(())
    });
    let exited = e2e::try_eventually(Duration::from_secs(40), || agent.process.try_status());
    chattr("-i");
    assert!(!acked, "no PUBACK: the record is not on disk");
    assert!(ready.is_some(), "not ready while commits fail");
    let exited = exited.expect("the agent stops by itself");
    assert!(!exited.success(), "and exits non-zero: {exited:?}");
    assert!(agent.process.stderr().contains("stopped unexpectedly"));
}

#[test]
fn tls_with_a_ca_file_works_plain_tcp_to_the_tls_port_does_not_and_a_full_door_says_unavailable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(made.success());
    let cloud = CloudHarness::new(dir.path()).run();
    let mut agent = AgentHarness::new(dir.path(), &cloud.url())
        .mqtt_extra(&format!(
            "  tls: {{ listen: 127.0.0.1:0, cert_file: {}, key_file: {} }}\n  max_connections: 2\n",
            cert.display(),
            key.display()
        ))
        .run();
    let tls: SocketAddr = agent
        .printed("mqtts listening on")
        .parse()
        .expect("address");
    let publish = |extra: &[&str], message: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &tls.port().to_string(), "-q", "1"])
            .args(["-t", "plant/4/telemetry/tls", "-m", message])
            .args(extra)
            .stderr(Stdio::null())
            .status()
            .expect("mosquitto_pub")
            .success()
    };
    let ca = cert.display().to_string();
    assert!(publish(&["--cafile", &ca, "-V", "mqttv311"], "over tls v3"));
    assert!(publish(&["--cafile", &ca, "-V", "mqttv5"], "over tls v5"));
    assert!(
        !publish(&[], "plain tcp"),
        "plain MQTT to the TLS port fails"
    );
    // A raw MQTT CONNECT gets a TLS alert or nothing, never a CONNACK.
    let mut s = TcpStream::connect(tls).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(&connect_packet("plain", true)).expect("write");
    let mut first = [0u8; 1];
    let answered = s.read(&mut first).unwrap_or(0);
    assert!(
        answered == 0 || first[0] != 0x20,
        "no CONNACK over plain TCP"
    );
    drop(s);

    // A full door (mqtt.max_connections, shared by both listeners) answers "server
    // unavailable", over TLS as over plain TCP; once a connection ends there is room again.
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(agent.mqtt).expect("idle"))
        .collect();
    let refused = |port: u16, extra: &[&str]| {
        let out = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
            .args([
                "-t",
                "plant/4/telemetry/full",
                "-m",
                "refused",
                "-V",
                "mqttv311",
            ])
            .args(extra)
            .output()
            .expect("mosquitto_pub");
        (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).to_lowercase())
    };
    let answer = eventually(Duration::from_secs(10), "refused over TLS", || {
        refused(tls.port(), &["--cafile", &ca])
    });
    assert!(answer.contains("unavailable"), "{answer}");
    let answer = refused(agent.mqtt.port(), &[]).expect("refused over TCP");
    assert!(answer.contains("unavailable"), "{answer}");
    drop(idle);
    eventually(Duration::from_secs(10), "room again", || {
        publish(&["--cafile", &ca, "-V", "mqttv311"], "after the flood").then_some(())
    });
    let r = eventually(Duration::from_secs(20), "the TLS records", || {
        let r = records_of(&cloud, "telemetry");
        (r.len() >= 3).then_some(r)
    });
    assert_eq!(r.len(), 3, "nothing of the refused publishes is kept");
}

#[test]
fn a_client_certificate_logs_in_as_its_common_name_and_the_acl_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let server_ca = e2e::certificates(d, "server", &[("server", "/CN=localhost")]);
    let client_ca = e2e::certificates(
        d,
        "client",
        &[("sensor-7", "/CN=sensor-7"), ("nameless", "/O=plant")],
    );
    // Signed by a CA the agent does not know.
    e2e::certificates(d, "rogue", &[("rogue", "/CN=sensor-7")]);
    let users = d.join("users");
    std::fs::write(
        &users,
        format!("sensor-1:{}\n", e2e::hash_password("s3cret-1")),
    )
    .expect("users");
    let cloud = CloudHarness::new(d).run();
    let mut agent = AgentHarness::new(d, &cloud.url())
        .mqtt_auth(&format!(
            "  auth: {{ allow_anonymous: false, users_file: {} }}
  acl:
    - users: [\"*\"]
      publish: [\"plant/+/telemetry/%u/#\"]
",
            users.display()
        ))
        .mqtt_extra(&format!(
            "  tls: {{ listen: 127.0.0.1:0, cert_file: {}, key_file: {}, client_ca_file: {client_ca} }}\n",
            d.join("server.pem").display(),
            d.join("server.key").display(),
        ))
        .run();
    let tls: SocketAddr = agent
        .printed("mqtts listening on")
        .parse()
        .expect("address");
    let publish = |who: Option<&str>, login: &[&str], topic: &str| {
        let mut c = Command::new("mosquitto_pub");
        c.args(["-h", "127.0.0.1", "-p", &tls.port().to_string(), "-q", "1"])
            .args(["--cafile", &server_ca, "-t", topic, "-m", topic])
            .args(login)
            .stderr(Stdio::null());
        if let Some(who) = who {
            let (cert, key) = (d.join(format!("{who}.pem")), d.join(format!("{who}.key")));
            c.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        c.status().expect("mosquitto_pub").success()
    };
    for v in ["mqttv311", "mqttv5"] {
        let topic = format!("plant/1/telemetry/sensor-7/{v}");
        assert!(
            publish(Some("sensor-7"), &["-V", v], &topic),
            "{v}: the certificate is the login"
        );
    }
    // The certificate's user is the one the ACL sees: another's prefix is denied (stored
    // nothing), and naming another user in the CONNECT is refused.
    publish(
        Some("sensor-7"),
        &["-V", "mqttv5"],
        "plant/1/telemetry/sensor-1/denied",
    );
    assert!(!publish(
        Some("sensor-7"),
        &["-V", "mqttv311", "-u", "sensor-1", "-P", "s3cret-1"],
        "plant/1/telemetry/sensor-1/other-user",
    ));
    // A certificate without a Common Name, or signed by another CA, gets nowhere; without a
    // certificate, the password still works and anonymous is still refused.
    assert!(!publish(
        Some("nameless"),
        &["-V", "mqttv311"],
        "plant/1/telemetry/x/nameless"
    ));
    assert!(!publish(
        Some("rogue"),
        &["-V", "mqttv311"],
        "plant/1/telemetry/sensor-7/rogue"
    ));
    assert!(publish(
        None,
        &["-V", "mqttv311", "-u", "sensor-1", "-P", "s3cret-1"],
        "plant/1/telemetry/sensor-1/password"
    ));
    assert!(!publish(
        None,
        &["-V", "mqttv311"],
        "plant/1/telemetry/sensor-7/anonymous"
    ));
    let topics = |r: Vec<e2e::LogRecord>| -> Vec<String> {
        let mut t: Vec<String> = r.into_iter().map(|r| r.mqtt_topic).collect();
        t.sort();
        t
    };
    // The last publish that may be kept came after all the others, each acknowledged (so
    // committed, in order) before the next began: once it is in the log, so is anything
    // wrongly kept before it.
    let r = eventually(Duration::from_secs(20), "the last allowed record", || {
        let r = records_of(&cloud, "telemetry");
        r.iter()
            .any(|r| r.mqtt_topic == "plant/1/telemetry/sensor-1/password")
            .then_some(r)
    });
    assert_eq!(
        topics(r),
        [
            "plant/1/telemetry/sensor-1/password",
            "plant/1/telemetry/sensor-7/mqttv311",
            "plant/1/telemetry/sensor-7/mqttv5"
        ]
    );
}

#[test]
fn a_client_silent_past_its_keep_alive_is_closed_and_pings_are_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    // CONNECT with a keep-alive of 1 s.
    let mut v = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 1, 0, 5];
    v.extend_from_slice(b"quiet");
    let mut s = TcpStream::connect(agent.mqtt).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(&packet(0x10, &v)).expect("CONNECT");
    assert_eq!(read_packet(&mut s)[..2], [0x20, 2], "CONNACK");
    s.write_all(&[0xC0, 0]).expect("PINGREQ");
    assert_eq!(read_packet(&mut s), vec![0xD0, 0], "PINGRESP");
    let quiet = Instant::now();
    let mut buf = [0u8; 8];
    let closed = matches!(s.read(&mut buf), Ok(0) | Err(_));
    assert!(closed, "closed after its keep-alive");
    assert!(
        quiet.elapsed() < Duration::from_secs(5),
        "within 1.5 × 1 s (and some slack): {:?}",
        quiet.elapsed()
    );
}

/// A client that never releases its QoS 2 publishes (no PUBREL) holds at most 1,024 of them in
/// its session: the 1,025th closes its connection, unacknowledged and not stored; what it sent
/// before is kept, once.
#[test]
fn a_client_that_never_releases_its_qos2_publishes_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    let (mut s, code) = raw_client(agent.mqtt, "hoarder", true);
    assert_eq!(code, 0);
    let mut packets = Vec::new();
    for pkid in 1..=1025u16 {
        packets.extend(publish_packet(
            "plant/1/telemetry/q2",
            &pkid.to_be_bytes(),
            2,
            pkid,
            false,
        ));
    }
    s.write_all(&packets).expect("publishes");
    let mut pubrecs = 0;
    let closed = loop {
        let mut head = [0u8; 2];
        match s.read_exact(&mut head) {
            Ok(()) => {
                let mut body = vec![0u8; head[1] as usize];
                s.read_exact(&mut body).expect("packet body");
                assert_eq!(head[0], 0x50, "only PUBRECs come back");
                pubrecs += 1;
            }
            Err(e) => break e,
        }
    };
    assert!(
        closed.kind() != std::io::ErrorKind::WouldBlock
            && closed.kind() != std::io::ErrorKind::TimedOut,
        "the door closed the connection ({closed})"
    );
    assert_eq!(pubrecs, 1024, "the first 1,024 acknowledged");
    eventually(Duration::from_secs(20), "1,024 records in the log", || {
        (records_of(&cloud, "telemetry").len() == 1024).then_some(())
    });
}

/// A connection opens its relay to rumqttd (local pub/sub) only once it needs it: publishers
/// while nobody on the gateway subscribes hold none (each would cost rumqttd about 60 KiB); a
/// subscriber holds one (also one with no keep-alive speaking MQTT 3.1, which rumqttd itself
/// refuses), and so does a publisher once its publishes have a local subscriber to reach, which
/// then gets them; each relay closes with its connection.
#[test]
fn only_connections_that_need_local_pub_sub_open_a_relay_to_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    let relays = || agent.metric("agent_mqtt_local_relays");
    let mut publishers: Vec<TcpStream> = (0..20)
        .map(|i| {
            let (mut s, code) = raw_client(agent.mqtt, &format!("pub-{i}"), true);
            assert_eq!(code, 0, "accepted");
            s.write_all(&publish_packet(
                "plant/1/telemetry/t",
                b"alone",
                1,
                1,
                false,
            ))
            .expect("PUBLISH");
            assert_eq!(read_packet(&mut s), vec![0x40, 2, 0, 1], "PUBACK");
            s
        })
        .collect();
    // A real MQTT 5 client reads the door's own CONNACK too.
    assert!(
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &agent.mqtt.port().to_string()])
            .args([
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-t",
                "plant/2/telemetry/t",
                "-m",
                "v5"
            ])
            .status()
            .expect("mosquitto_pub")
            .success()
    );
    eventually(Duration::from_secs(10), "mosquitto_pub gone", || {
        (agent.metric("agent_mqtt_connections") == 20.0).then_some(())
    });
    assert_eq!(
        relays(),
        0.0,
        "no relay for publishers without local subscribers"
    );

    // MQTT 3.1, no keep-alive, clean session, client id "sub".
    let mut connect = vec![0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 0];
    connect.extend_from_slice(&[0, 3, b's', b'u', b'b']);
    let mut sub = TcpStream::connect(agent.mqtt).expect("connect");
    sub.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    sub.write_all(&packet(0x10, &connect)).expect("CONNECT");
    assert_eq!(read_packet(&mut sub), vec![0x20, 2, 0, 0], "CONNACK");
    let filter = b"plant/+/telemetry/#";
    let mut subscribe = vec![0, 7, 0, filter.len() as u8];
    subscribe.extend_from_slice(filter);
    subscribe.push(0);
    sub.write_all(&packet(0x82, &subscribe)).expect("SUBSCRIBE");
    assert_eq!(
        read_packet(&mut sub),
        vec![0x90, 3, 0, 7, 0],
        "rumqttd's SUBACK"
    );
    assert_eq!(relays(), 1.0, "the subscriber's relay");

    let s = &mut publishers[0];
    s.write_all(&publish_packet("plant/1/telemetry/t", b"seen", 1, 2, false))
        .expect("PUBLISH");
    assert_eq!(read_packet(s), vec![0x40, 2, 0, 2], "PUBACK");
    let copy = read_packet(&mut sub);
    assert_eq!(copy[0], 0x30, "a QoS 0 PUBLISH: {copy:?}");
    assert!(copy.ends_with(b"plant/1/telemetry/tseen"), "{copy:?}");
    assert_eq!(relays(), 2.0, "and the publisher's, to reach it");
    drop(sub);
    eventually(
        Duration::from_secs(10),
        "the publisher's relay only",
        || (relays() == 1.0).then_some(()),
    );
    // An UNSUBSCRIBE from a client that has no subscription is answered by the door (rumqttd
    // would not answer it), with no relay.
    let (mut s, _) = raw_client(agent.mqtt, "unsub", true);
    s.write_all(&packet(0xA2, &[0, 8, 0, 1, b'x']))
        .expect("UNSUBSCRIBE");
    assert_eq!(read_packet(&mut s), vec![0xB0, 2, 0, 8], "UNSUBACK");
    assert_eq!(relays(), 1.0, "still the publisher's only");
    drop(s);
    drop(publishers);
    eventually(Duration::from_secs(10), "every relay closed", || {
        (relays() == 0.0).then_some(())
    });
    eventually(Duration::from_secs(20), "every publish in the log", || {
        (records_of(&cloud, "telemetry").len() == 22).then_some(())
    });
}
