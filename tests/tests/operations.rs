//! Operating the agent under systemd: readiness only once MQTT is open, and a watchdog that
//! stops pinging when a stage is stuck (checked with a fake `NOTIFY_SOCKET` read here).

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::{AgentHarness, CloudHarness, bin};

/// What a fake systemd heard: each datagram with when it came (after the first), and whether
/// MQTT accepted a connection the moment `READY=1` came.
struct Heard {
    messages: Vec<(Duration, String)>,
    mqtt_open_at_ready: Option<bool>,
}

/// Listens on `socket` for `window` after the first datagram, connecting to `mqtt_port` as
/// soon as `READY=1` arrives.
fn listen(socket: UnixDatagram, mqtt_port: u16, window: Duration) -> Heard {
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let mut heard = Heard {
        messages: Vec::new(),
        mqtt_open_at_ready: None,
    };
    let mut buf = [0u8; 4096];
    loop {
        if first.map_or(started.elapsed() > Duration::from_secs(30), |f| {
            f.elapsed() > window
        }) {
            return heard;
        }
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text == "READY=1" && heard.mqtt_open_at_ready.is_none() {
            heard.mqtt_open_at_ready =
                Some(std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).is_ok());
        }
        let at = *first.get_or_insert_with(Instant::now);
        heard.messages.push((at.elapsed(), text));
    }
}

#[test]
fn systemd_hears_ready_once_mqtt_is_open_and_no_watchdog_ping_while_a_stage_is_stuck() {
    for stage in ["forwarder", "buffer writer"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket_path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).expect("bind the fake NOTIFY_SOCKET");
        let port = e2e::free_port();
        let listener = std::thread::spawn(move || listen(socket, port, Duration::from_secs(7)));
        let cloud = CloudHarness::new(dir.path()).run();
        let agent = AgentHarness::new(dir.path(), &cloud.url())
            .mqtt_port(port)
            .launcher(&[
                PathBuf::from("/usr/bin/env"),
                format!("NOTIFY_SOCKET={}", socket_path.display()).into(),
                "WATCHDOG_USEC=1000000".into(),
                format!("EDGE_AGENT_TEST_STALL={stage}").into(),
                bin("edge-agent"),
            ])
            .run();
        let heard = listener.join().expect("listener");
        // The start may first extend systemd's start timeout (while the buffer opens).
        let states: Vec<&(Duration, String)> = heard
            .messages
            .iter()
            .filter(|(_, m)| !m.starts_with("EXTEND_TIMEOUT_USEC="))
            .collect();
        let (ready_at, first) = states.first().expect("systemd heard something");
        assert_eq!(
            first, "READY=1",
            "{stage}: READY first: {:?}",
            heard.messages
        );
        assert_eq!(
            first, "READY=1",
            "{stage}: READY first: {:?}",
            heard.messages
        );
        assert_eq!(
            heard.mqtt_open_at_ready,
            Some(true),
            "{stage}: MQTT accepts connections when READY comes"
        );
        let pings: Vec<Duration> = states
            .iter()
            .filter(|(_, m)| m == "WATCHDOG=1")
            .map(|(at, _)| at.saturating_sub(*ready_at))
            .collect();
        println!("{stage}: watchdog pings at {pings:?} after READY");
        assert!(
            pings.iter().any(|at| *at < Duration::from_millis(1_500)),
            "{stage}: pings while every stage makes progress: {pings:?}"
        );
        // The heartbeat stops 2 s after the start; a second later (the watchdog period) it is
        // stuck, and the pings stop.
        assert!(
            pings.iter().all(|at| *at < Duration::from_millis(4_500)),
            "{stage}: no ping once the stage is stuck: {pings:?}"
        );
        let log = agent.process.stderr();
        assert!(
            log.contains("makes no progress") && log.contains(stage),
            "{stage}: the log says which stage: {log}"
        );
    }
}

/// `edge-agent status ARGS --json`, parsed.
fn status(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(bin("edge-agent"))
        .arg("status")
        .args(args)
        .arg("--json")
        .output()
        .expect("edge-agent status");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// The `telemetry` stream's entry of a status.
fn telemetry(s: &serde_json::Value) -> serde_json::Value {
    s["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .find(|x| x["name"] == "telemetry")
        .cloned()
        .expect("telemetry stream")
}

#[test]
fn status_shows_the_backlog_grow_during_an_outage_and_drain_after_and_reads_a_stopped_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ingest_port = e2e::free_port();
    let metrics_port = e2e::free_port();
    let config = dir.path().join("agent.yaml");
    let harness = AgentHarness::new(dir.path(), &format!("http://127.0.0.1:{ingest_port}"));
    std::fs::write(dir.path().join("token"), format!("{}\n", e2e::TOKEN)).expect("token");
    std::fs::write(
        &config,
        harness.config_text().replace(
            "metrics_listen: 127.0.0.1:0",
            &format!("metrics_listen: 127.0.0.1:{metrics_port}"),
        ),
    )
    .expect("config");
    let config_arg = config.display().to_string();
    let mut agent = e2e::start_agent(dir.path(), &config);

    // The ingest is down: the backlog and its age grow.
    assert!(e2e::mosquitto_pub_lines(
        agent.mqtt,
        1,
        "plant/1/telemetry/t",
        (0..50).map(|i| format!("r{i}"))
    ));
    // The oldest record's age is refreshed by the buffer writer every second.
    let first = e2e::eventually(Duration::from_secs(10), "an age", || {
        let s = status(&["--config", &config_arg]);
        telemetry(&s)["oldest_age_seconds"].as_f64().map(|_| s)
    });
    assert_eq!(first["source"], "running agent");
    let t = telemetry(&first);
    assert_eq!(t["records_waiting"], 50, "{first}");
    let age = t["oldest_age_seconds"].as_f64().expect("an age");
    std::thread::sleep(Duration::from_millis(2_500));
    let later = status(&["--config", &config_arg]);
    let later_age = telemetry(&later)["oldest_age_seconds"]
        .as_f64()
        .expect("an age");
    assert!(
        later_age >= age + 2.0,
        "the age grows: {age} then {later_age}"
    );
    assert_eq!(later["link_up"], false, "{later}");
    assert!(
        later["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{later}"
    );
    assert!(later["buffer_file_bytes"].as_u64() > Some(0));
    // 50 records of 19 B of topic and 2-3 B of payload, written with the schema, the WAL
    // and the reserve file: far more bytes written than buffered.
    assert!(
        later["write_amplification"]
            .as_f64()
            .is_some_and(|a| a > 1.0),
        "{later}"
    );
    let table = std::process::Command::new(bin("edge-agent"))
        .args(["status", "--config", &config_arg])
        .output()
        .expect("status");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("telemetry")
            && table.contains("link: down")
            && table.contains("write amplification"),
        "{table}"
    );

    // Stopped: the buffer file tells the same backlog.
    let stopped = agent.process.terminate();
    assert!(stopped.success(), "{stopped}: {}", agent.process.stderr());
    let offline = status(&[
        "--buffer",
        &dir.path().join("buffer.db").display().to_string(),
    ]);
    assert_eq!(offline["source"], "buffer file (agent not running)");
    assert_eq!(telemetry(&offline)["records_waiting"], 50, "{offline}");
    let fallback = status(&["--config", &config_arg]);
    assert_eq!(
        fallback["source"], "buffer file (agent not running)",
        "no agent: the file"
    );

    // Back, and the ingest too: the backlog drains to zero.
    let agent = e2e::start_agent(dir.path(), &config);
    let cloud = CloudHarness::new(dir.path()).port(ingest_port).run();
    e2e::eventually(Duration::from_secs(60), "the backlog drained", || {
        let s = status(&["--config", &config_arg]);
        let t = telemetry(&s);
        (t["records_waiting"] == 0 && t["oldest_age_seconds"].is_null() && s["link_up"] == true)
            .then_some(())
    });
    assert!(cloud.total_records() >= 50);
    drop(agent);
}

/// Degraded: records wait, the ingest answers (here: it refuses the token), and nothing has
/// been delivered for `ingest.degraded_after`: `agent_degraded` is 1 and `status` says so.
#[test]
fn a_reachable_ingest_that_takes_nothing_makes_the_agent_degraded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .device(e2e::DEVICE, "a-token-the-ingest-does-not-know")
        .ingest_extra("  degraded_after: 2s\n")
        .run();
    assert_eq!(agent.metric("agent_degraded"), 0.0, "nothing waits yet");
    assert!(e2e::mosquitto_pub_qos1(
        agent.mqtt,
        "plant/1/telemetry/t",
        "waits"
    ));
    e2e::eventually(Duration::from_secs(20), "degraded", || {
        (agent.metric("agent_degraded") == 1.0).then_some(())
    });
    assert_eq!(agent.metric("agent_link_up"), 1.0, "the ingest answers");
    assert_eq!(agent.metric("agent_auth_alarm"), 1.0);
    assert!(
        agent.metric("agent_oldest_undelivered_age_seconds{stream=\"telemetry\"}") >= 2.0,
        "the waiting record's age"
    );
    assert!(
        agent.metric("agent_disk_written_bytes_total") > 0.0,
        "the agent's disk writes are counted"
    );
    assert_eq!(
        agent.metric("agent_buffered_bytes_total"),
        ("plant/1/telemetry/t".len() + "waits".len()) as f64,
        "the topic and payload bytes buffered: write amplification's denominator"
    );
}

/// A bare SIGHUP to `agent`, which must refuse its config (and count the refusal).
fn refused_on_hangup(agent: &e2e::Agent) {
    let series = "agent_config_reloads_total{outcome=\"refused\"}";
    let before = agent.metric(series);
    agent.process.hangup();
    e2e::eventually(Duration::from_secs(10), "the refusal counted", || {
        (agent.metric(series) > before).then_some(())
    });
    assert!(agent.process.stderr().contains("config refused"));
}

/// `edge-agent reload --config CONFIG` (with `--pid` if given).
fn reload(config: &std::path::Path, pid: Option<u32>) -> std::process::Output {
    let mut cmd = std::process::Command::new(bin("edge-agent"));
    cmd.args(["reload", "--config"]).arg(config);
    if let Some(pid) = pid {
        cmd.arg("--pid").arg(pid.to_string());
    }
    cmd.output().expect("edge-agent reload")
}

/// What one rumqttc session saw.
#[derive(Debug)]
struct Session {
    acked: u64,
    connacks: u64,
    ended: bool,
}

/// A sensor logged in as `user` publishing `messages` at QoS 1, one every `pause`, on one
/// connection; it stops once they are acknowledged (with none to send: only when the
/// connection ends), at the first connection error (no reconnect), or after `limit`.
fn sensor(
    mqtt: std::net::SocketAddr,
    user: &str,
    password: &str,
    messages: u64,
    pause: Duration,
    limit: Duration,
) -> std::thread::JoinHandle<Session> {
    let mut options = rumqttc::MqttOptions::new(format!("reload-{user}"), "127.0.0.1", mqtt.port());
    options.set_credentials(user, password);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = rumqttc::Client::new(options, 64);
    std::thread::spawn(move || {
        // Held here until the session ends: without a handle left, rumqttc would end it.
        let _keep = client.clone();
        let publisher = std::thread::spawn(move || {
            for i in 0..messages {
                if client
                    .publish(
                        "plant/7/telemetry/t",
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        format!("m{i}"),
                    )
                    .is_err()
                {
                    return;
                }
                std::thread::sleep(pause);
            }
        });
        let started = Instant::now();
        let mut session = Session {
            acked: 0,
            connacks: 0,
            ended: false,
        };
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => session.connacks += 1,
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => session.acked += 1,
                Ok(_) => {}
                Err(_) => {
                    session.ended = true;
                    break;
                }
            }
            if (messages > 0 && session.acked == messages) || started.elapsed() > limit {
                break;
            }
        }
        drop(connection);
        let _ = publisher.join();
        session
    })
}

/// `mosquitto_pub` as `user`; whether the broker took it.
fn pub_as(mqtt: std::net::SocketAddr, user: &str, password: &str) -> bool {
    pub_to(mqtt, user, password, "plant/8/telemetry/t")
}

/// `mosquitto_pub` of `hello` to `topic` at QoS 1 as `user`; whether the broker took it.
fn pub_to(mqtt: std::net::SocketAddr, user: &str, password: &str, topic: &str) -> bool {
    std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt.port().to_string(), "-q", "1"])
        .args(["-u", user, "-P", password, "-t", topic, "-m", "hello"])
        .status()
        .expect("mosquitto_pub")
        .success()
}

/// One SIGHUP with a new stream (ahead of the loaded one, so every stream index after it
/// moves), a changed priority and new MQTT users: under QoS 1 load nothing is lost and the
/// loaded sensor keeps its connection, a new user can connect, its publish goes to the new
/// stream, the changed priority is in force, a removed user's connection is closed; a broken
/// config is refused and the running one stays.
#[test]
fn sighup_reloads_streams_priorities_and_users_keeps_connections_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    let (old, gone) = (
        format!("old:{}\n", e2e::hash_password("pw-old")),
        format!("gone:{}\n", e2e::hash_password("pw-gone")),
    );
    std::fs::write(&users, format!("{old}{gone}")).expect("users");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .mqtt_auth(&format!(
            "  auth: {{ allow_anonymous: false, users_file: {} }}\n",
            users.display()
        ))
        .run();
    assert!(!pub_as(agent.mqtt, "new", "pw-new"), "not a user yet");
    let messages = 600;
    let loaded = sensor(
        agent.mqtt,
        "old",
        "pw-old",
        messages,
        Duration::from_millis(10),
        Duration::from_secs(60),
    );
    let leaving = sensor(
        agent.mqtt,
        "gone",
        "pw-gone",
        0,
        Duration::ZERO,
        Duration::from_secs(30),
    );
    // Both connected and the loaded sensor's records arriving before the reload.
    e2e::eventually(Duration::from_secs(10), "both sensors connected", || {
        (agent.metric("agent_mqtt_connections") >= 2.0).then_some(())
    });
    e2e::eventually(Duration::from_secs(10), "the load flowing", || {
        (cloud.total_records() > 0).then_some(())
    });
    std::fs::write(
        &users,
        format!("{old}new:{}\n", e2e::hash_password("pw-new")),
    )
    .expect("users");
    let config = std::fs::read_to_string(&agent.config).expect("config");
    let streams = "
  - name: alarms
    topics: [\"plant/+/alarm/#\"]
    priority: critical
    batch: { max_records: 100, linger: 0ms }
  - name: vibration
    topics: [\"plant/+/vibration/#\"]
    priority: high
    batch: { max_records: 100, linger: 0ms }
  - name: telemetry
    topics: [\"plant/+/telemetry/#\"]
    priority: high
    batch: { max_records: 1000, linger: 50ms }
";
    assert!(config.contains(e2e::THREE_STREAMS));
    let reloaded_config = config.replace(e2e::THREE_STREAMS, streams);
    std::fs::write(&agent.config, &reloaded_config).expect("new streams");
    let priority = |name: &str| -> serde_json::Value {
        let status: serde_json::Value =
            reqwest::blocking::get(format!("http://{}/status", agent.metrics))
                .and_then(|r| r.json())
                .expect("/status");
        status["streams"]
            .as_array()
            .expect("streams")
            .iter()
            .find(|x| x["name"] == name)
            .map_or(serde_json::Value::Null, |x| x["priority"].clone())
    };
    assert_eq!(priority("telemetry"), "normal", "before the reload");
    // `edge-agent reload` checks the config and signals the agent running it.
    let reloaded = reload(&agent.config, None);
    assert!(
        reloaded.status.success(),
        "{}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    assert!(
        String::from_utf8_lossy(&reloaded.stdout)
            .contains(&format!("agent {} reloads it", agent.process.pid()))
    );
    e2e::eventually(Duration::from_secs(10), "the new user is in", || {
        pub_as(agent.mqtt, "new", "pw-new").then_some(())
    });
    e2e::eventually(Duration::from_secs(10), "the new streams in force", || {
        (priority("telemetry") == "high" && priority("vibration") == "high").then_some(())
    });
    let buffered = agent.metric("agent_records_buffered_total{stream=\"telemetry\"}");
    assert!(
        buffered > 0.0 && buffered < messages as f64,
        "the reload came while the load was flowing: {buffered} of {messages} buffered"
    );
    assert!(pub_to(agent.mqtt, "new", "pw-new", "plant/8/vibration/x"));
    e2e::eventually(Duration::from_secs(20), "the new stream delivered", || {
        (!cloud
            .read_topic(&format!("iot.{}.vibration", e2e::TENANT))
            .is_empty())
        .then_some(())
    });
    assert!(
        priority("logs").is_null(),
        "an empty stream dropped from the config is gone"
    );
    let leaving = leaving.join().expect("gone's session");
    assert!(
        leaving.ended,
        "a removed user's connection is closed: {leaving:?}"
    );

    // A config that does not validate: refused, the running one stays.
    std::fs::write(
        &agent.config,
        reloaded_config.replace("streams:", "streams: 5\nx:"),
    )
    .expect("broken");
    assert!(
        !reload(&agent.config, None).status.success(),
        "a broken config: nothing signalled"
    );
    // Signalled anyway (a bare SIGHUP): the agent refuses it itself.
    refused_on_hangup(&agent);
    assert!(
        pub_as(agent.mqtt, "new", "pw-new"),
        "the running config stays"
    );

    let loaded = loaded.join().expect("old's session");
    assert_eq!(
        (loaded.acked, loaded.connacks, loaded.ended),
        (messages, 1, false),
        "every publish acknowledged on the one connection"
    );
    e2e::eventually(Duration::from_secs(30), "every record delivered", || {
        let n = cloud
            .read_topic(&format!("iot.{}.telemetry", e2e::TENANT))
            .iter()
            .filter(|r| r.payload.starts_with(b"m"))
            .count();
        (n as u64 == messages).then_some(())
    });
}

/// Reloads in a row under full-speed QoS 1 load, each one renumbering the streams (a stream
/// added ahead of the loaded one, then removed): every publish is acknowledged, and each lands
/// in the log exactly once.
#[test]
fn reloads_under_full_speed_load_lose_and_duplicate_nothing() {
    use e2e::load::{LoadSpec, PayloadKind, publish};
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url()).run();
    let config = std::fs::read_to_string(&agent.config).expect("config");
    assert!(config.contains(e2e::THREE_STREAMS));
    let renumbered = config.replace(
        e2e::THREE_STREAMS,
        &format!(
            "
  - name: vibration
    topics: [\"plant/+/vibration/#\"]
    priority: high{}",
            e2e::THREE_STREAMS
        ),
    );
    let (clients, per_client) = (4, 5_000);
    let mqtt = agent.mqtt;
    let load = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(publish(LoadSpec {
                mqtt,
                clients,
                messages_per_client: per_client,
                rate_per_client: None,
                payload_bytes: 100,
                kind: PayloadKind::Json,
                qos: rumqttc::QoS::AtLeastOnce,
                topic: std::sync::Arc::new(|c, _| format!("plant/{c}/telemetry/t")),
                client_prefix: "reload-load-".into(),
            }))
    });
    let mut reloads = 0;
    while !load.is_finished() && reloads < 20 {
        std::thread::sleep(Duration::from_millis(150));
        let next = if reloads % 2 == 0 {
            &renumbered
        } else {
            &config
        };
        std::fs::write(&agent.config, next).expect("config");
        agent.process.hangup();
        reloads += 1;
    }
    let report = load.join().expect("load");
    let total = clients as u64 * per_client;
    assert_eq!(report.acked, total, "every publish acknowledged");
    let topic = format!("iot.{}.telemetry", e2e::TENANT);
    e2e::eventually(Duration::from_secs(60), "every record delivered", || {
        (cloud.read_topic(&topic).len() as u64 >= total).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let records = cloud.read_topic(&topic);
    let mut payloads: Vec<_> = records.iter().map(|r| r.payload.clone()).collect();
    payloads.sort();
    payloads.dedup();
    assert_eq!(
        (records.len() as u64, payloads.len() as u64),
        (total, total),
        "each record once"
    );
    let done = agent.metric("agent_config_reloads_total{outcome=\"applied\"}");
    println!(
        "{done} reloads applied of {reloads} signals, under a load of {total} QoS 1 publishes"
    );
    assert!(
        reloads >= 4 && done >= 2.0,
        "reloads under the load: {done} of {reloads} signals"
    );
}

/// A gateway pointed at an ingest that is gone (a decommissioned address) is moved to the
/// right one by a reload: what waited is delivered, nothing twice, and the agent's MQTT
/// connections stay.
#[test]
fn a_reload_moves_the_uplink_to_a_new_ingest_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let gone = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let gone_url = format!("http://{}", gone.local_addr().expect("addr"));
    drop(gone);
    let agent = AgentHarness::new(dir.path(), &gone_url).run();
    for i in 0..20 {
        assert!(e2e::mosquitto_pub_qos1(
            agent.mqtt,
            "plant/1/telemetry/t",
            &format!("m{i}")
        ));
    }
    e2e::eventually(Duration::from_secs(10), "the uplink failing", || {
        (agent.metric("agent_link_up") == 0.0
            && agent.metric("agent_backlog_records{stream=\"telemetry\"}") == 20.0)
            .then_some(())
    });
    assert_eq!(
        cloud.total_records(),
        0,
        "nothing reached the right ingest yet"
    );
    let config = std::fs::read_to_string(&agent.config).expect("config");
    // A new URL with a CA file that cannot be read: refused whole (by `edge-agent reload` and
    // by the agent on a bare SIGHUP), and the running uplink stays.
    let unreadable = config.replace(&gone_url, &cloud.url()).replace(
        "  retry_initial:",
        "  ca_file: /nonexistent/ca.pem\n  retry_initial:",
    );
    std::fs::write(&agent.config, unreadable).expect("bad CA");
    let refused = reload(&agent.config, Some(agent.process.pid()));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("ingest.ca_file"));
    refused_on_hangup(&agent);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(cloud.total_records(), 0, "still the old URL");
    assert_eq!(agent.readyz(), 200, "the agent runs on");
    std::fs::write(&agent.config, config.replace(&gone_url, &cloud.url())).expect("new url");
    assert!(
        reload(&agent.config, Some(agent.process.pid()))
            .status
            .success()
    );
    e2e::eventually(Duration::from_secs(30), "delivered to the new URL", || {
        (cloud.total_records() >= 20).then_some(())
    });
    assert!(e2e::mosquitto_pub_qos1(
        agent.mqtt,
        "plant/1/telemetry/t",
        "after"
    ));
    e2e::eventually(Duration::from_secs(30), "the next one too", || {
        (cloud.total_records() >= 21).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cloud.total_records(), 21, "nothing twice");
    assert!(
        agent.process.stderr().contains("streams_and_uplink=true"),
        "the uplink was restarted by the reload: {}",
        agent.process.stderr()
    );
}

/// `--log-format json`: every log line is one JSON object; and the same message repeated
/// (20 refused logins of one client) is written once per quiet period.
#[test]
fn json_logs_parse_and_repeated_messages_are_written_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    std::fs::write(&users, format!("u:{}\n", e2e::hash_password("right"))).expect("users");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .launcher(&[bin("edge-agent"), "--log-format".into(), "json".into()])
        .mqtt_auth(&format!(
            "  auth: {{ allow_anonymous: false, users_file: {} }}\n",
            users.display()
        ))
        .run();
    for _ in 0..20 {
        assert!(!pub_as(agent.mqtt, "u", "wrong"), "refused");
    }
    assert!(pub_as(agent.mqtt, "u", "right"));
    let log = agent.process.stderr();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "edge-agent running"),
        "{log}"
    );
    let refusals = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "MQTT connection refused")
        .count();
    assert_eq!(refusals, 1, "20 identical refusals, written once: {log}");
}

/// A wrong ingest token is fixed without a restart: the token file is rewritten, `edge-agent
/// reload`, and what waited is delivered.
#[test]
fn a_reload_takes_a_new_ingest_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .device(e2e::DEVICE, "the-wrong-token-0123")
        .run();
    assert!(e2e::mosquitto_pub_qos1(
        agent.mqtt,
        "plant/1/telemetry/t",
        "kept"
    ));
    e2e::eventually(Duration::from_secs(20), "the token refused", || {
        (agent.metric("agent_auth_alarm") == 1.0).then_some(())
    });
    std::fs::write(dir.path().join("token"), format!("{}\n", e2e::TOKEN)).expect("token");
    assert!(
        reload(&agent.config, Some(agent.process.pid()))
            .status
            .success()
    );
    e2e::eventually(
        Duration::from_secs(30),
        "delivered with the new token",
        || (cloud.total_records() >= 1).then_some(()),
    );
    assert_eq!(agent.metric("agent_auth_alarm"), 0.0);
}

/// The MQTT listener's certificate is renewed by a reload: new TLS connections get the new
/// one (checked against its CA with mosquitto_pub), no restart.
#[test]
fn a_reload_takes_a_renewed_mqtt_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    std::fs::create_dir_all(&one).expect("dir");
    std::fs::create_dir_all(&two).expect("dir");
    let ca_one = e2e::certificates(&one, "one", &[("server", "/CN=localhost")]);
    let ca_two = e2e::certificates(&two, "two", &[("server", "/CN=localhost")]);
    let (cert, key) = (dir.path().join("mqtt.pem"), dir.path().join("mqtt.key"));
    let install = |from: &std::path::Path| {
        std::fs::copy(from.join("server.key"), &key).expect("key");
        std::fs::copy(from.join("server.pem"), &cert).expect("cert");
    };
    install(&one);
    let cloud = CloudHarness::new(dir.path()).run();
    let mut agent = AgentHarness::new(dir.path(), &cloud.url())
        .mqtt_extra(&format!(
            "  tls: {{ listen: 127.0.0.1:0, cert_file: {}, key_file: {} }}\n",
            cert.display(),
            key.display()
        ))
        .run();
    let tls: std::net::SocketAddr = agent
        .printed("mqtts listening on")
        .parse()
        .expect("address");
    let publish = |ca: &str| {
        std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &tls.port().to_string(), "-q", "1"])
            .args(["-t", "plant/5/telemetry/tls", "-m", "m", "--cafile", ca])
            .stderr(std::process::Stdio::null())
            .status()
            .expect("mosquitto_pub")
            .success()
    };
    assert!(
        publish(&ca_one) && !publish(&ca_two),
        "certificate one at start"
    );
    install(&two);
    assert!(
        reload(&agent.config, Some(agent.process.pid()))
            .status
            .success()
    );
    e2e::eventually(
        Duration::from_secs(10),
        "certificate two after the reload",
        || (publish(&ca_two) && !publish(&ca_one)).then_some(()),
    );
}

/// A reload that changes the ACL closes the connections holding subscriptions made under the
/// old one (rumqttd keeps a subscription once made); their clients come back under the new
/// rules. Publishers without subscriptions stay.
#[test]
fn a_reload_that_changes_the_acl_closes_subscribers_made_under_the_old_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    std::fs::write(&users, format!("dash:{}\n", e2e::hash_password("pw-dash"))).expect("users");
    let cloud = CloudHarness::new(dir.path()).run();
    let auth = |subscribe: &str| {
        format!(
            "  auth: {{ allow_anonymous: false, users_file: {} }}\n  acl:\n    - users: [\"*\"]\n      publish: [\"plant/#\"]\n      subscribe: [\"{subscribe}\"]\n",
            users.display()
        )
    };
    let agent = AgentHarness::new(dir.path(), &cloud.url())
        .mqtt_auth(&auth("plant/#"))
        .run();
    let mut options = rumqttc::MqttOptions::new("dashboard", "127.0.0.1", agent.mqtt.port());
    options.set_credentials("dash", "pw-dash");
    let (client, mut connection) = rumqttc::Client::new(options, 16);
    client
        .subscribe("plant/#", rumqttc::QoS::AtMostOnce)
        .expect("subscribe");
    let (subacked_tx, subacked) = std::sync::mpsc::channel();
    let watcher = std::thread::spawn(move || {
        let _keep = client;
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    let _ = subacked_tx.send(());
                }
                Ok(_) => {}
                Err(_) => return true,
            }
        }
        false
    });
    let publisher = sensor(
        agent.mqtt,
        "dash",
        "pw-dash",
        0,
        Duration::ZERO,
        Duration::from_secs(8),
    );
    subacked
        .recv_timeout(Duration::from_secs(10))
        .expect("the subscription acknowledged");
    e2e::eventually(Duration::from_secs(10), "both connected", || {
        (agent.metric("agent_mqtt_connections") >= 2.0).then_some(())
    });
    let config = std::fs::read_to_string(&agent.config).expect("config");
    std::fs::write(
        &agent.config,
        config.replace("subscribe: [\"plant/#\"]", "subscribe: [\"plant/1/#\"]"),
    )
    .expect("config");
    assert!(reload(&agent.config, None).status.success());
    assert!(
        watcher.join().expect("watcher"),
        "the subscriber was closed"
    );
    let publisher = publisher.join().expect("publisher");
    assert!(
        !publisher.ended,
        "a connection without subscriptions stays: {publisher:?}"
    );
}
