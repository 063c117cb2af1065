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
        let (_, first) = heard.messages.first().expect("systemd heard something");
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
        let pings: Vec<Duration> = heard
            .messages
            .iter()
            .filter(|(_, m)| m == "WATCHDOG=1")
            .map(|(at, _)| *at)
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
