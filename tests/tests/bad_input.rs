//! Bad input gets a clear error and loses nothing else: broken configs, and bad requests at
//! the real ingest (wrong token, garbage, zstd bombs, replays, half-valid batches).

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use e2e::{CloudHarness, DEVICE, TENANT, TOKEN, bin, eventually};
use ingest_wire::{Batch, CONTENT_TYPE_BATCH, CONTENT_TYPE_JSON, Record};

const GOOD_AGENT: &str = "version: 1
device_id: dev-1
ingest:
  url: http://127.0.0.1:9
  token_file: TOKEN_FILE
mqtt:
  listen: 127.0.0.1:0
  auth: { allow_anonymous: true }
buffer:
  path: BUFFER
  quota_bytes: 64MiB
streams:
  - name: telemetry
    topics: [\"plant/#\"]
    priority: normal
";

/// Runs `edge-agent ARGS`; returns (success, stderr).
fn agent(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("edge-agent"))
        .args(args)
        .output()
        .expect("run edge-agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_agent_configs_name_file_key_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "t0k3n").expect("token");
    let good = GOOD_AGENT
        .replace("TOKEN_FILE", &token.display().to_string())
        .replace("BUFFER", &dir.path().join("b.db").display().to_string());
    let file = dir.path().join("agent.yaml");
    std::fs::write(&file, &good).expect("write");
    assert!(
        agent(&["check-config", file.to_str().expect("utf8")]).0,
        "the good config is valid"
    );

    let cases = [
        (
            good.replace("quota_bytes: 64MiB", "quota_bytes: 64MiB\n  colour: blue"),
            "buffer.colour: unknown field `colour`",
        ),
        (
            good.replace("priority: normal", "priority: urgent"),
            "streams[0].priority: unknown variant `urgent`",
        ),
        (
            good.replace(&token.display().to_string(), "/nonexistent/token"),
            "ingest.token_file: cannot read token file /nonexistent/token",
        ),
        (
            good.replace("  auth: { allow_anonymous: true }\n", ""),
            "mqtt.auth: no client could connect",
        ),
        (
            good.replace(
                "  auth: { allow_anonymous: true }",
                "  auth: { allow_anonymous: true }\n  acl: [{ users: [\"*\"], publish: [\"a/#/b\"] }]",
            ),
            "mqtt.acl[0].publish[0]: \"a/#/b\" is not a valid MQTT topic filter",
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(&file, &text).expect("write");
        let path = file.to_str().expect("utf8");
        for args in [vec!["check-config", path], vec!["run", "--config", path]] {
            let (ok, stderr) = agent(&args);
            assert!(!ok, "{args:?} must fail for {expected}");
            assert!(
                stderr.contains(&format!("{path}: {expected}")),
                "{args:?}: stderr {stderr:?} should contain {expected:?}"
            );
        }
    }
    let users = dir.path().join("users");
    std::fs::write(&users, "alice:plaintext-password\n").expect("users");
    std::fs::write(
        &file,
        good.replace(
            "  auth: { allow_anonymous: true }",
            &format!("  auth: {{ users_file: {} }}", users.display()),
        ),
    )
    .expect("write");
    let (ok, stderr) = agent(&["check-config", file.to_str().expect("utf8")]);
    assert!(!ok);
    assert!(
        stderr.contains(&format!(
            "{}:1: user \"alice\": not a password hash",
            users.display()
        )),
        "the users file's error names file and line: {stderr}"
    );
    assert!(
        !dir.path().join("b.db").exists(),
        "a bad config starts nothing"
    );
}

#[test]
fn bad_ingest_config_names_file_key_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ingest.yaml");
    std::fs::write(&file, "version: 1\nlisten: 127.0.0.1:0\ndevices:\n  - id: d\n    tenant: t\n    token_sha256: nothex\nsink:\n  type: embedded\n  options:\n    path: /tmp/x.db\n").expect("write");
    let out = Command::new(bin("cloud-ingest"))
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: devices[0].token_sha256: must be 64 hex characters",
            file.display()
        )),
        "{stderr}"
    );
}

fn batch(device: &str, seqs: &[u64]) -> Batch {
    Batch {
        device_id: device.into(),
        stream: "telemetry".into(),
        sent_at_ms: 1,
        epoch: 0,
        records: seqs
            .iter()
            .map(|&seq| Record {
                seq,
                topic: "plant/1/telemetry".into(),
                payload: Bytes::from(vec![0, 0xff, seq as u8]),
                qos: None,
                received_at_ms: 1,
                ..Default::default()
            })
            .collect(),
    }
}

fn zstd(batch: &Batch) -> Vec<u8> {
    zstd::bulk::compress(&ingest_wire::encode_batch(batch), 1).expect("compress")
}

#[test]
fn the_ingest_refuses_bad_requests_and_writes_nothing_partial() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path())
        .limits("  max_decompressed_bytes: 1MiB\n  max_records_per_batch: 1000")
        .run();
    let topic = format!("iot.{TENANT}.telemetry");

    let (status, body) = cloud.post(
        DEVICE,
        "wrong-token",
        CONTENT_TYPE_BATCH,
        Some("zstd"),
        zstd(&batch(DEVICE, &[1, 2])),
    );
    assert_eq!(status, 401, "{body}");
    let (status, _) = cloud.post(
        "no-such-device",
        TOKEN,
        CONTENT_TYPE_BATCH,
        Some("zstd"),
        zstd(&batch("no-such-device", &[1])),
    );
    assert_eq!(status, 401, "unknown device");
    let (status, body) = cloud.post(
        DEVICE,
        TOKEN,
        CONTENT_TYPE_BATCH,
        Some("zstd"),
        b"\x28\xb5\x2f\xfd garbage".to_vec(),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("zstd"), "the reason is given: {body}");
    let bomb = zstd::bulk::compress(&vec![0u8; 256 << 20], 19).expect("bomb");
    assert!(bomb.len() < 100_000, "a small body that expands 256 MiB");
    let (status, body) = cloud.post(DEVICE, TOKEN, CONTENT_TYPE_BATCH, Some("zstd"), bomb);
    assert_eq!(status, 413, "{body}");
    // Half valid: a good record followed by a bad one (sequence goes backwards).
    let (status, body) = cloud.post(
        DEVICE,
        TOKEN,
        CONTENT_TYPE_BATCH,
        Some("zstd"),
        zstd(&batch(DEVICE, &[10, 11, 5])),
    );
    assert_eq!(status, 400, "{body}");
    let (status, _) = cloud.post(
        DEVICE,
        TOKEN,
        CONTENT_TYPE_BATCH,
        Some("zstd"),
        zstd(&batch("another-device", &[1])),
    );
    assert_eq!(status, 403, "a device cannot write as another");
    assert!(
        cloud.read_topic(&topic).is_empty(),
        "nothing of the refused batches is in the log"
    );

    let good = zstd(&batch(DEVICE, &[1, 2, 3]));
    let (status, body) = cloud.post(
        DEVICE,
        TOKEN,
        CONTENT_TYPE_BATCH,
        Some("zstd"),
        good.clone(),
    );
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"accepted":3,"duplicates":0}"#)
    );
    let (status, body) = cloud.post(DEVICE, TOKEN, CONTENT_TYPE_BATCH, Some("zstd"), good);
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"accepted":0,"duplicates":3}"#),
        "a replay is acknowledged, not appended"
    );
    let json = format!(
        r#"{{"device_id":"{DEVICE}","stream":"telemetry","records":[{{"seq":3,"topic":"plant/1/telemetry","payload":"dup"}},{{"seq":4,"topic":"plant/1/telemetry","payload":"21.5"}}]}}"#
    );
    let (status, body) = cloud.post(DEVICE, TOKEN, CONTENT_TYPE_JSON, None, json.into_bytes());
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"accepted":1,"duplicates":1}"#),
        "plain JSON batches work too"
    );

    let records = eventually(Duration::from_secs(5), "4 records", || {
        let r = cloud.read_topic(&topic);
        (r.len() == 4).then_some(r)
    });
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        records[0].payload,
        vec![0, 0xff, 1],
        "binary payload kept exactly"
    );
    assert_eq!(records[3].payload, b"21.5");
}

/// A process's resident memory (`VmRSS`) or its peak so far (`VmHWM`), from /proc.
fn memory(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        << 10
}

/// The issue's amplification: a few hundred bytes of zstd holding 4,000,000 empty records
/// (and 1,000,000 in JSON, 22 MB once decompressed) are answered 413, and each time the
/// ingest's peak memory stays within 64 MiB of its idle (built, the records took about 450 MB).
#[test]
fn a_tiny_body_of_millions_of_records_is_refused_without_the_memory() {
    let mut raw = ingest_wire::encode_batch(&batch(DEVICE, &[1]));
    raw.extend([0x22u8, 0x00].repeat(4_000_000));
    let proto = zstd::bulk::compress(&raw, 19).expect("zstd");
    let mut json = format!(r#"{{"device_id":"{DEVICE}","stream":"telemetry","records":["#);
    json.push_str(&vec![r#"{"seq":1,"topic":"t"}"#; 1_000_000].join(","));
    json.push_str("]}");
    let json = zstd::bulk::compress(json.as_bytes(), 19).expect("zstd");
    eprintln!("bodies: {} B protobuf, {} B JSON", proto.len(), json.len());
    for (kind, body) in [(CONTENT_TYPE_BATCH, &proto), (CONTENT_TYPE_JSON, &json)] {
        // A fresh ingest for each, so each peak is its own.
        let dir = tempfile::tempdir().expect("tempdir");
        let cloud = CloudHarness::new(dir.path()).run();
        let pid = cloud.process.pid();
        let idle = memory(pid, "VmRSS:");
        for _ in 0..3 {
            let (status, answer) = cloud.post(DEVICE, TOKEN, kind, Some("zstd"), body.clone());
            assert_eq!(status, 413, "{kind}: {answer}");
            assert!(answer.contains("records"), "{answer}");
        }
        let peak = memory(pid, "VmHWM:");
        eprintln!(
            "{kind}: ingest RSS {} MiB idle, {} MiB at most",
            idle >> 20,
            peak >> 20
        );
        assert!(
            peak < idle + (64 << 20),
            "{kind}: RSS went from {} to {} MiB",
            idle >> 20,
            peak >> 20
        );
    }
}

/// Slowloris and a flood of slow bodies get bounded answers (the connection closed, 408, 503
/// with Retry-After), and an agent publishing meanwhile loses nothing.
#[test]
fn slow_headers_and_a_thousand_slow_bodies_get_bounded_answers_and_others_get_through() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path())
        .limits("  max_concurrent_requests: 50\n  header_timeout: 2s\n  body_timeout: 3s")
        .run();
    let agent = e2e::AgentHarness::new(dir.path(), &cloud.url()).run();
    // Slowloris: a header byte every 300 ms; the ingest ends the connection at its header
    // timeout (2 s here), long before the headers could be whole.
    let started = Instant::now();
    let slow = TcpStream::connect(cloud.addr).expect("connect");
    let mut trickle = slow.try_clone().expect("clone");
    std::thread::spawn(move || {
        for b in b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nX-Device-Id: dev-1\r\n".iter() {
            if trickle.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let mut slow = slow;
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "slowloris kept its connection for {took:?}"
    );
    // 1,000 slow bodies at once: headers whole, then 1 byte of a 100-byte body.
    let head = format!(
        "POST /v1/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nX-Device-Id: {DEVICE}\r\nContent-Type: {CONTENT_TYPE_BATCH}\r\nContent-Length: 100\r\n\r\nx"
    );
    let flood: Vec<_> = (0..1000)
        .map(|_| {
            let (addr, head) = (cloud.addr, head.clone());
            std::thread::spawn(move || -> Option<u16> {
                let mut s = TcpStream::connect(addr).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
                s.write_all(head.as_bytes()).ok()?;
                let mut answer = [0u8; 12];
                s.read_exact(&mut answer).ok()?;
                std::str::from_utf8(&answer[9..12]).ok()?.parse().ok()
            })
        })
        .collect();
    // Meanwhile an agent's records go through (its retries absorb the 503s).
    assert!(e2e::mosquitto_pub_qos1(
        agent.mqtt,
        "plant/1/telemetry/t",
        "during the flood"
    ));
    let answers: Vec<Option<u16>> = flood
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    let count = |code| answers.iter().filter(|a| **a == Some(code)).count();
    let (timeouts, busy) = (count(408), count(503));
    eprintln!(
        "1,000 slow bodies: {timeouts} × 408, {busy} × 503, {} other",
        1000 - timeouts - busy
    );
    assert_eq!(
        timeouts + busy,
        1000,
        "every slow body answered 408 or 503: {answers:?}"
    );
    assert!(
        timeouts <= 50,
        "at most max_concurrent_requests were served at once"
    );
    eventually(
        Duration::from_secs(30),
        "the agent's record in the log",
        || {
            cloud
                .read_topic(&format!("iot.{TENANT}.telemetry"))
                .iter()
                .any(|r| r.payload == b"during the flood")
                .then_some(())
        },
    );
}

/// The issue's collision: tenant `acme` sending stream `eu.telemetry` would have written into
/// tenant `acme.eu`'s topic `iot.acme.eu.telemetry`. A tenant `acme.eu` is refused when the
/// config loads, and the stream `eu.telemetry` with 400; nothing reaches the log.
#[test]
fn tenants_and_streams_that_would_share_a_topic_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ingest.yaml");
    let token = "ab".repeat(32);
    std::fs::write(
        &file,
        format!("version: 1\nlisten: 127.0.0.1:0\ndevices:\n  - id: d1\n    tenant: acme\n    token_sha256: {token}\n  - id: d2\n    tenant: acme.eu\n    token_sha256: {token}\nsink:\n  type: embedded\n  options:\n    path: /tmp/x.db\n"),
    )
    .expect("write");
    let out = Command::new(bin("cloud-ingest"))
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("devices[1].tenant") && stderr.contains("acme.eu"),
        "{stderr}"
    );

    let cloud = CloudHarness::new(dir.path()).run();
    let mut b = batch(DEVICE, &[1, 2]);
    b.stream = "eu.telemetry".into();
    let (status, body) = cloud.post(DEVICE, TOKEN, CONTENT_TYPE_BATCH, Some("zstd"), zstd(&b));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("eu.telemetry") && body.contains("'.'"),
        "{body}"
    );
    assert!(
        cloud
            .read_topic(&format!("iot.{TENANT}.eu.telemetry"))
            .is_empty(),
        "nothing stored"
    );
}

/// The ingest's certificate is renewed without a restart: on SIGHUP, and when its files
/// change; a broken file keeps the previous certificate; SIGHUP never stops the ingest.
#[test]
fn tls_certificates_reload_on_sighup_and_on_change_and_a_bad_one_is_not_taken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (one, two) = (d.join("one"), d.join("two"));
    std::fs::create_dir_all(&one).expect("dir");
    std::fs::create_dir_all(&two).expect("dir");
    let ca_one = e2e::certificates(&one, "one", &[("server", "/CN=localhost")]);
    let ca_two = e2e::certificates(&two, "two", &[("server", "/CN=localhost")]);
    let (live_cert, live_key) = (d.join("live.pem"), d.join("live.key"));
    let install = |from: &std::path::Path| {
        std::fs::copy(from.join("server.key"), &live_key).expect("key");
        std::fs::copy(from.join("server.pem"), &live_cert).expect("cert");
    };
    install(&one);
    let cloud = CloudHarness::new(d)
        .tls(&format!(
            "  cert_file: {}\n  key_file: {}",
            live_cert.display(),
            live_key.display()
        ))
        .run();
    let trusting = |ca: &str| {
        reqwest::blocking::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(&std::fs::read(ca).expect("ca")).expect("ca"),
            )
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client")
    };
    let serves = |ca: &str| {
        trusting(ca)
            .get(format!("{}/healthz", cloud.url()))
            .send()
            .is_ok_and(|r| r.status().is_success())
    };
    assert!(
        serves(&ca_one) && !serves(&ca_two),
        "certificate one at start"
    );

    install(&two);
    cloud.process.hangup();
    eventually(
        Duration::from_secs(10),
        "certificate two after SIGHUP",
        || (serves(&ca_two) && !serves(&ca_one)).then_some(()),
    );

    install(&one);
    eventually(
        Duration::from_secs(20),
        "certificate one, files changed, no signal",
        || (serves(&ca_one) && !serves(&ca_two)).then_some(()),
    );

    std::fs::write(&live_cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").expect("garbage");
    cloud.process.hangup();
    eventually(Duration::from_secs(10), "the failed reload logged", || {
        cloud
            .process
            .stderr()
            .contains("TLS reload failed")
            .then_some(())
    });
    assert!(
        serves(&ca_one),
        "a broken file keeps the previous certificate"
    );

    let mut plain = CloudHarness::new(&two).run();
    plain.process.hangup();
    eventually(Duration::from_secs(10), "the reload logged", || {
        plain
            .process
            .stderr()
            .contains("SIGHUP: config reloaded")
            .then_some(())
    });
    assert!(
        plain.process.try_status().is_none(),
        "SIGHUP does not stop the ingest"
    );
    assert_eq!(plain.readyz(), 200);
}

/// A read of large records is streamed and paged: 40 records of 1 MiB come back 16 MiB per
/// response, and a response costs the ingest a few chunks of memory, not its size.
#[test]
fn a_large_read_is_streamed_in_pages_of_bounded_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    for first in (1..=40).step_by(8) {
        let mut b = batch(DEVICE, &(first..first + 8).collect::<Vec<_>>());
        for r in &mut b.records {
            r.payload = Bytes::from(vec![b'x'; 1 << 20]);
        }
        let (status, body) = cloud.post(DEVICE, TOKEN, CONTENT_TYPE_BATCH, Some("zstd"), zstd(&b));
        assert_eq!(status, 200, "{body}");
    }
    let pid = cloud.process.pid();
    // Reset the peak (VmHWM) to what the ingest holds now, then read.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("clear_refs (root)");
    let before = memory(pid, "VmRSS:");
    let (status, body) = cloud.get(&format!("/v1/log/iot.{TENANT}.telemetry?limit=10000"), None);
    let peak = memory(pid, "VmHWM:");
    assert_eq!(status, 200);
    let page: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let records = page["records"].as_array().expect("records");
    assert_eq!(records.len(), 16, "16 MiB of payload per response");
    assert_eq!(page["next_offset"], 16);
    assert_eq!(records[0]["payload"].as_str().map(str::len), Some(1 << 20));
    let grew = peak.saturating_sub(before) >> 20;
    println!("a 16 MiB read response raised the ingest's peak RSS by {grew} MiB");
    assert!(grew < 12, "the response is streamed, not built: {grew} MiB");
    let all = cloud.read_topic(&format!("iot.{TENANT}.telemetry"));
    assert_eq!(all.len(), 40, "paging with next_offset reads everything");
}

/// SIGHUP reloads the device registry: a device added to the file can send without a restart;
/// a file that fails validation is refused whole and the running config stays.
#[test]
fn sighup_adds_a_device_without_a_restart_and_refuses_a_broken_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cloud = CloudHarness::new(dir.path()).run();
    let post = |device: &str, token: &str, seq: u64| {
        cloud.post(
            device,
            token,
            CONTENT_TYPE_BATCH,
            Some("zstd"),
            zstd(&batch(device, &[seq])),
        )
    };
    let (status, _) = post("dev-new", "token-new-0123456789", 1);
    assert_eq!(status, 401, "not registered yet");

    let text = std::fs::read_to_string(&cloud.config).expect("config");
    let added = text.replacen(
        "devices:\n",
        &format!(
            "devices:\n  - id: dev-new\n    tenant: {TENANT}\n    token_sha256: {}\n",
            e2e::token_hash("token-new-0123456789")
        ),
        1,
    );
    std::fs::write(&cloud.config, &added).expect("config");
    cloud.process.hangup();
    eventually(Duration::from_secs(10), "the new device accepted", || {
        (post("dev-new", "token-new-0123456789", 2).0 == 200).then_some(())
    });

    std::fs::write(
        &cloud.config,
        added.replace("tenant: acme", "tenant: acme.eu"),
    )
    .expect("config");
    cloud.process.hangup();
    eventually(Duration::from_secs(10), "the refusal logged", || {
        cloud
            .process
            .stderr()
            .contains("config refused")
            .then_some(())
    });
    assert!(
        cloud.process.stderr().contains("devices[0].tenant"),
        "the error names the key"
    );
    assert_eq!(
        post("dev-new", "token-new-0123456789", 3).0,
        200,
        "the running config stays"
    );
    assert_eq!(post(DEVICE, TOKEN, 4).0, 200);
    assert!(
        cloud.process.try_status().is_none(),
        "still the same process"
    );
}

/// `/metrics` can leave the public port for a listener of its own.
#[test]
fn metrics_can_sit_on_their_own_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cloud = CloudHarness::new(dir.path())
        .extra("metrics_listen: 127.0.0.1:0\n")
        .run();
    let metrics = cloud.process.wait_line("metrics on");
    let (status, _) = cloud.get("/metrics", None);
    assert_eq!(status, 404, "no metrics on the public port");
    assert_eq!(cloud.readyz(), 200, "readiness stays on the public port");
    let text = reqwest::blocking::get(format!("http://{metrics}/metrics"))
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.text())
        .expect("metrics on their own listener");
    assert!(text.contains("ingest_records_accepted_total"), "{text}");
}

/// Many costly requests at once share one memory budget (`limits.max_decoding_bytes`): 16
/// bodies of a few KB, each expanding to 60 MiB (zstd frames that do not declare their size,
/// so each is charged the most a request may cost), sent together. Those over the budget get
/// 503 with Retry-After at once; the ingest's peak stays near the budget, not 16 × 60 MiB.
#[test]
fn concurrent_costly_requests_share_one_memory_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path())
        .limits("  max_decoding_bytes: 210MiB")
        .run();
    let bomb = zstd::stream::encode_all(&vec![0u8; 60 << 20][..], 3).expect("zstd");
    assert!(bomb.len() < 64 << 10, "{} B", bomb.len());
    let pid = cloud.process.pid();
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("clear_refs (root)");
    let before = memory(pid, "VmRSS:");
    let url = format!("{}/v1/batches", cloud.url());
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let senders: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    let r = reqwest::blocking::Client::new()
                        .post(&url)
                        .header("X-Device-Id", DEVICE)
                        .bearer_auth(TOKEN)
                        .header("Content-Type", CONTENT_TYPE_BATCH)
                        .header("Content-Encoding", "zstd")
                        .body(bomb.clone())
                        .send()
                        .expect("post");
                    (r.status().as_u16(), r.text().unwrap_or_default())
                })
            })
            .collect();
        senders
            .into_iter()
            .map(|t| t.join().expect("sender"))
            .collect()
    });
    let peak = memory(pid, "VmHWM:");
    let busy = answers.iter().filter(|(status, _)| *status == 503).count();
    println!(
        "16 requests of 60 MiB each: {busy} answered 503; peak RSS {} MiB above {} MiB",
        (peak - before) >> 20,
        before >> 20
    );
    for (status, body) in &answers {
        assert!(matches!(status, 400 | 503), "{status}: {body}");
    }
    assert!(busy > 0, "some are over the budget: {answers:?}");
    assert!(
        peak < before + (260 << 20),
        "the budget bounds them together: {} MiB above before",
        (peak - before) >> 20
    );
    let (status, body) = cloud.post(
        DEVICE,
        TOKEN,
        CONTENT_TYPE_BATCH,
        Some("zstd"),
        zstd(&batch(DEVICE, &[1, 2])),
    );
    assert_eq!(status, 200, "the budget is given back: {body}");
}

/// The read API is never open for want of a token, not even on a loopback listener, and a
/// tenant's read token reads its own topics only.
#[test]
fn a_tenants_read_token_reads_its_own_topics_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (globex_device, globex_token) = ("dev-g", "token-g-0123456789");
    let cloud = CloudHarness::new(dir.path())
        .device(globex_device, "globex", globex_token)
        .read_api(&format!(
            "{{ enabled: true, tenant_tokens: [{{ tenant: {TENANT}, token_sha256: {} }}, {{ tenant: globex, token_sha256: {} }}] }}",
            e2e::token_hash("reader-a"),
            e2e::token_hash("reader-g"),
        ))
        .run();
    for (device, token) in [(DEVICE, TOKEN), (globex_device, globex_token)] {
        let (status, body) = cloud.post(
            device,
            token,
            CONTENT_TYPE_BATCH,
            Some("zstd"),
            zstd(&batch(device, &[1, 2])),
        );
        assert_eq!(status, 200, "{body}");
    }
    let (acme_topic, globex_topic) = ("iot.acme.telemetry", "iot.globex.telemetry");
    assert_eq!(TENANT, "acme");

    for path in ["/v1/log".to_owned(), format!("/v1/log/{acme_topic}")] {
        let (status, body) = cloud.get(&path, None);
        assert_eq!(
            status, 401,
            "no token on a loopback listener: {path} {body}"
        );
        let (status, _) = cloud.get(&path, Some("wrong"));
        assert_eq!(status, 401, "a wrong token: {path}");
    }
    let (status, body) = cloud.get("/v1/log", Some("reader-a"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(acme_topic) && !body.contains("globex"),
        "acme's token lists acme's topics only: {body}"
    );
    let (status, body) = cloud.get(&format!("/v1/log/{globex_topic}"), Some("reader-a"));
    assert_eq!(status, 403, "acme's token cannot read globex: {body}");
    assert!(!body.contains("payload"), "{body}");
    let (status, body) = cloud.get(&format!("/v1/log/{acme_topic}"), Some("reader-a"));
    assert_eq!(status, 200, "{body}");
    let (status, body) = cloud.get(&format!("/v1/log/{globex_topic}"), Some("reader-g"));
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(page["records"].as_array().map(Vec::len), Some(2), "{body}");
}

/// A device over its rate gets 429 with Retry-After; the agent waits and resends, so all its
/// records arrive, and another device's own bucket is untouched.
#[test]
fn a_device_over_its_rate_gets_429_and_its_agent_delivers_everything_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path())
        .limits("  device_records_per_second: 50\n  max_records_per_batch: 100")
        .device("dev-b", TENANT, "token-b-0123456789")
        .run();
    let agent = e2e::AgentHarness::new(dir.path(), &cloud.url()).run();
    assert!(e2e::mosquitto_pub_lines(
        agent.mqtt,
        1,
        "plant/1/telemetry/fast",
        (0..400).map(|i| format!("r{i}"))
    ));
    eventually(Duration::from_secs(10), "a 429", || {
        (cloud.metric("ingest_requests_total{status=\"429\"}") > 0.0).then_some(())
    });
    // Another device is not slowed by the first one's rate.
    let mut b = batch("dev-b", &[1, 2, 3]);
    b.stream = "other".into();
    let (status, body) = cloud.post(
        "dev-b",
        "token-b-0123456789",
        CONTENT_TYPE_BATCH,
        Some("zstd"),
        zstd(&b),
    );
    assert_eq!(status, 200, "{body}");
    let n = eventually(Duration::from_secs(60), "all 400 delivered", || {
        let n = cloud.read_topic(&format!("iot.{TENANT}.telemetry")).len();
        (n >= 400).then_some(n)
    });
    assert_eq!(n, 400);
}

/// HTTPS end to end: the agent reaches the ingest with a private CA (`ingest.ca_file`); a
/// device with a client certificate and no token is accepted (mTLS), a certificate for one
/// device cannot post as another, and the agent refuses plain HTTP to another host.
#[test]
fn the_agent_reaches_the_ingest_over_https_and_certificates_identify_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = e2e::certificates(
        d,
        "test",
        &[
            ("server", "/CN=localhost"),
            ("dev-1", &format!("/CN={DEVICE}")),
            ("dev-b", "/CN=dev-b"),
            ("dev-c", "/CN=dev-c"),
        ],
    );
    let at = |f: &str| d.join(f).display().to_string();
    let cloud = CloudHarness::new(d)
        .device("dev-b", TENANT, "token-b-0123456789")
        .certificate_device("dev-c", TENANT)
        .tls(&format!(
            "  cert_file: {}\n  key_file: {}\n  client_ca_file: {ca}",
            at("server.pem"),
            at("server.key")
        ))
        .run();
    assert!(cloud.url().starts_with("https://"));
    let agent = e2e::AgentHarness::new(d, &cloud.url())
        .ingest_extra(&format!("  ca_file: {ca}\n"))
        .run();
    assert!(e2e::mosquitto_pub_qos1(
        agent.mqtt,
        "plant/1/telemetry/t",
        "over https"
    ));
    eventually(Duration::from_secs(30), "the record over HTTPS", || {
        cloud
            .read_topic(&format!("iot.{TENANT}.telemetry"))
            .iter()
            .any(|r| r.payload == b"over https")
            .then_some(())
    });

    // mTLS: a client certificate, no token.
    let with_cert = |who: &str| {
        let mut pem = std::fs::read(d.join(format!("{who}.pem"))).expect("cert");
        pem.extend(std::fs::read(d.join(format!("{who}.key"))).expect("key"));
        reqwest::blocking::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(&std::fs::read(&ca).expect("ca")).expect("ca"),
            )
            .identity(reqwest::Identity::from_pem(&pem).expect("identity"))
            .build()
            .expect("client")
    };
    let post = |client: &reqwest::blocking::Client, device: &str| {
        let mut b = batch(device, &[1]);
        b.stream = "certified".into();
        let r = client
            .post(format!("{}/v1/batches", cloud.url()))
            .header("X-Device-Id", device)
            .header("Content-Type", CONTENT_TYPE_BATCH)
            .header("Content-Encoding", "zstd")
            .body(zstd(&b))
            .send()
            .expect("post");
        (r.status().as_u16(), r.text().unwrap_or_default())
    };
    let (status, body) = post(&with_cert("dev-1"), DEVICE);
    assert_eq!(status, 200, "a certificate is the login: {body}");
    let (status, body) = post(&with_cert("dev-b"), DEVICE);
    assert_eq!(
        status, 403,
        "dev-b's certificate cannot post as {DEVICE}: {body}"
    );

    // A device registered without a token, and its agent configured without one: the
    // certificate is the only login, end to end.
    let c_dir = d.join("dev-c");
    std::fs::create_dir_all(&c_dir).expect("dir");
    let c_config = c_dir.join("agent.yaml");
    let text = e2e::AgentHarness::new(&c_dir, &cloud.url())
        .device("dev-c", "unused")
        .ingest_extra(&format!(
            "  ca_file: {ca}\n  client_cert_file: {}\n  client_key_file: {}\n",
            at("dev-c.pem"),
            at("dev-c.key")
        ))
        .config_text();
    let without_token: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("token_file:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(text.len(), without_token.len(), "the token line is gone");
    std::fs::write(&c_config, without_token).expect("config");
    let agent_c = e2e::start_agent(&c_dir, &c_config);
    assert!(e2e::mosquitto_pub_qos1(
        agent_c.mqtt,
        "plant/3/telemetry/t",
        "certificate only"
    ));
    eventually(
        Duration::from_secs(30),
        "the certificate-only record",
        || {
            cloud
                .read_topic(&format!("iot.{TENANT}.telemetry"))
                .iter()
                .any(|r| r.payload == b"certificate only" && r.key == "dev-c")
                .then_some(())
        },
    );
    let (status, body) = cloud.post(
        "dev-c",
        "",
        CONTENT_TYPE_BATCH,
        Some("zstd"),
        zstd(&batch("dev-c", &[9])),
    );
    assert_eq!(
        status, 401,
        "without its certificate, dev-c cannot log in: {body}"
    );

    // Plain HTTP to another host is refused by the agent's config check.
    let config = d.join("insecure.yaml");
    std::fs::write(
        &config,
        e2e::AgentHarness::new(d, "http://10.1.2.3:8080").config_text(),
    )
    .expect("config");
    std::fs::write(d.join("token"), "t\n").expect("token");
    let (ok, stderr) = self::agent(&["check-config", &config.display().to_string()]);
    assert!(!ok);
    assert!(
        stderr.contains("ingest.url") && stderr.contains("allow_insecure_http"),
        "{stderr}"
    );
}
