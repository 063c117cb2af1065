//! The config's parsing and checks, key by key.

use super::*;
use crate::transform::OnError;

pub(crate) const GOOD: &str = "
version: 1
device_id: dev-1
ingest:
  url: http://127.0.0.1:8080
  token_env: EDGE_AGENT_TOKEN
mqtt:
  listen: 127.0.0.1:1883
  auth: { allow_anonymous: true }
buffer:
  path: /tmp/buffer.db
  quota_bytes: 64MiB
streams:
  - name: alarms
    topics: [\"plant/+/alarm/#\"]
    priority: critical
    batch: { max_records: 10, linger: 0ms }
  - name: telemetry
    topics: [\"plant/+/telemetry/#\", \"legacy/#\"]
    priority: normal
";

#[test]
fn a_client_certificate_may_replace_the_token_over_https_only() {
    let cert_only = GOOD.replace(
        "  token_env: EDGE_AGENT_TOKEN\n",
        "  client_cert_file: /c.pem\n  client_key_file: /c.key\n",
    );
    let err = AgentConfig::parse(Path::new("a.yaml"), &cert_only)
        .unwrap_err()
        .to_string();
    assert!(err.contains("https://"), "{err}");
    let https = cert_only.replace("http://127.0.0.1:8080", "https://ingest.example.com");
    let c = AgentConfig::parse(Path::new("a.yaml"), &https).expect("valid");
    assert_eq!(c.ingest.token, TokenSource::CertificateOnly);
    assert_eq!(
        resolve_token(Path::new("a.yaml"), &c.ingest.token).expect("no token"),
        ""
    );
    let neither = GOOD.replace("  token_env: EDGE_AGENT_TOKEN\n", "");
    assert!(AgentConfig::parse(Path::new("a.yaml"), &neither).is_err());
}

/// `GOOD` with `transforms` (indented list items) on the telemetry stream.
fn with_transforms(list: &str) -> String {
    format!("{GOOD}    transforms:\n{list}")
}

#[test]
fn transforms_parse_in_order() {
    let text = with_transforms(
        "      - enrich:
          fields: { device_location: factory-floor-1, line: 3 }
          facts: [device_id]
          topic: \"plant/{site}/#\"
      - filter:
          action: drop
          where:
            - { field: status, op: in, value: [maintenance, off] }
            - { field: sensor.t, op: \">\", value: 150 }
      - deadband: { field: sensor.t, absolute: 0.5, heartbeat: 5m, on_error: drop }
      - window: { every: 1m, fields: [sensor.t], keep_raw: false }
",
    );
    let c = AgentConfig::parse(Path::new("a.yaml"), &text).expect("valid");
    let kinds: Vec<&str> = c.streams[1]
        .transforms
        .iter()
        .map(|t| t.spec.name())
        .collect();
    assert_eq!(kinds, ["enrich", "filter", "deadband", "window"]);
    assert_eq!(c.streams[1].transforms[2].on_error, OnError::Drop);
    assert!(c.streams[0].transforms.is_empty());
}

#[test]
fn transform_errors_name_the_key_path() {
    for (list, key, reason) in [
        (
            "      - colour: red\n",
            "streams[1].transforms[0]",
            "unknown field `colour`",
        ),
        (
            "      - { window: { every: 1m }, deadband: { field: t, absolute: 1 } }\n",
            "streams[1].transforms[0]",
            "one key per list item",
        ),
        (
            "      - enrich: { facts: [mood] }\n",
            "streams[1].transforms[0].enrich.facts[0]",
            "unknown fact",
        ),
        (
            "      - enrich: { topic: \"plant/#/x\" }\n",
            "streams[1].transforms[0].enrich.topic",
            "last segment",
        ),
        (
            "      - enrich: { fields: { \"device location\": a } }\n",
            "streams[1].transforms[0].enrich.fields.device location",
            "[A-Za-z0-9_.-]",
        ),
        (
            "      - enrich: { fields: { seq: 1 } }\n",
            "streams[1].transforms[0].enrich.fields.seq",
            "metadata",
        ),
        (
            "      - enrich: { topic: \"plant/{stream}/#\" }\n",
            "streams[1].transforms[0].enrich.topic",
            "metadata",
        ),
        (
            "      - enrich: { fields: { a1: 1, a2: 1, a3: 1, a4: 1, a5: 1, a6: 1, a7: 1, a8: 1, a9: 1 } }\n      - enrich: { fields: { b1: 1, b2: 1, b3: 1, b4: 1, b5: 1, b6: 1, b7: 1, b8: 1 } }\n",
            "streams[1].transforms",
            "add 17 names; at most 16",
        ),
        (
            "      - enrich: { fields: { Site: a } }\n      - enrich: { fields: { site: b } }\n",
            "streams[1].transforms",
            "differ in more than case",
        ),
        (
            "      - filter: { where: [{ field: t, op: \"~\", value: 1 }] }\n",
            "streams[1].transforms[0].filter.where[0].op",
            "unknown operator",
        ),
        (
            "      - filter: { where: [{ field: t, op: \">\" }] }\n",
            "streams[1].transforms[0].filter.where[0].value",
            "needs a value",
        ),
        (
            "      - filter: { where: [{ field: t, op: in, value: 3 }] }\n",
            "streams[1].transforms[0].filter.where[0].value",
            "non-empty list",
        ),
        (
            "      - filter: { action: keep }\n",
            "streams[1].transforms[0].filter",
            "selects nothing",
        ),
        (
            "      - deadband: { field: t }\n",
            "streams[1].transforms[0].deadband",
            "needs a threshold",
        ),
        (
            "      - deadband: { field: t, absolute: -1 }\n",
            "streams[1].transforms[0].deadband.absolute",
            "above 0",
        ),
        (
            "      - deadband: { field: \"a..b\", absolute: 1 }\n",
            "streams[1].transforms[0].deadband.field",
            "not a field path",
        ),
        (
            "      - window: { every: 10ms }\n",
            "streams[1].transforms[0].window.every",
            "at least 1s",
        ),
        (
            "      - window: { every: 1m, fields: [count] }\n",
            "streams[1].transforms[0].window.fields[0]",
            "uses itself",
        ),
        (
            "      - deadband: { field: t, absolute: 1, heartbeat: 0s }\n",
            "streams[1].transforms[0].deadband.heartbeat",
            "above 0",
        ),
        (
            "      - filter: { where: [{ field: t, op: in, value: [] }] }\n",
            "streams[1].transforms[0].filter.where[0].value",
            "non-empty list",
        ),
        (
            "      - window: { every: 1m, keep: true }\n",
            "streams[1].transforms[0]",
            "unknown field `keep`",
        ),
    ] {
        let err = AgentConfig::parse(Path::new("a.yaml"), &with_transforms(list))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a.yaml") && err.contains(key) && err.contains(reason),
            "{list}: {err}"
        );
    }
    let long = format!(
        "      - enrich: {{ fields: {{ note: {} }} }}\n",
        "x".repeat(65_536)
    );
    let err = AgentConfig::parse(Path::new("a.yaml"), &with_transforms(&long))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("streams[1].transforms[0].enrich.fields.note")
            && err.contains("65536 bytes; at most 65535"),
        "{err}"
    );
}

#[test]
fn file_sources_parse_and_errors_name_the_key_path() {
    let with = |source: &str| format!("{GOOD}sources:\n  - file: {source}\n");
    let c = AgentConfig::parse(
            Path::new("a.yaml"),
            &with("{ path: /edge/sensors/*.log, stream: telemetry, topic: \"sensors/temperature/{file}\" }"),
        )
        .expect("valid");
    assert_eq!(c.sources.len(), 1);
    assert_eq!(c.sources[0].dir, Path::new("/edge/sensors"));
    assert!(c.sources[0].pattern.matches("temperature.log"));
    assert!(!c.sources[0].pattern.matches("temperature.log.1"));
    assert_eq!(c.sources[0].max_line_bytes, 64 << 10);
    for (source, key, reason) in [
        (
            "{ path: sensors/*.log, stream: telemetry }",
            "sources[0].file.path",
            "absolute",
        ),
        (
            "{ path: /edge/*/t.log, stream: telemetry }",
            "sources[0].file.path",
            "not in its directory",
        ),
        (
            "{ path: /edge/t.log, stream: nowhere }",
            "sources[0].file.stream",
            "not a configured stream",
        ),
        (
            "{ path: /edge/t.log, stream: _losses }",
            "sources[0].file.stream",
            "not a configured stream",
        ),
        (
            "{ path: /edge/t.log, stream: telemetry, topic: \"a/#\" }",
            "sources[0].file.topic",
            "no + or #",
        ),
        (
            "{ path: /edge/t.log, stream: telemetry, start_at: middle }",
            "sources[0].file.start_at",
            "beginning or end",
        ),
        (
            "{ path: /edge/t.log, stream: telemetry, poll: 1ms }",
            "sources[0].file.poll",
            "between",
        ),
        (
            "{ path: /edge/t.log, stream: telemetry, max_line_bytes: 0B }",
            "sources[0].file.max_line_bytes",
            "above 0",
        ),
        (
            "{ path: /edge/t.log, stream: telemetry, colour: red }",
            "sources[0].file",
            "unknown field `colour`",
        ),
    ] {
        let err = AgentConfig::parse(Path::new("a.yaml"), &with(source))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains(reason), "{source}: {err}");
    }
}

#[test]
fn the_embedded_broker_can_be_turned_off_when_a_source_feeds_the_agent() {
    let off = GOOD.replace(
        "mqtt:\n  listen: 127.0.0.1:1883\n  auth: { allow_anonymous: true }\n",
        "mqtt:\n  enabled: false\n",
    );
    assert_ne!(off, GOOD);
    let err = AgentConfig::parse(Path::new("a.yaml"), &off)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mqtt.enabled") && err.contains("nothing would feed the agent"),
        "{err}"
    );
    let c = AgentConfig::parse(
        Path::new("a.yaml"),
        &format!(
            "{off}sources:\n  - mqtt: {{ url: \"mqtt://127.0.0.1:1884\", topics: [\"#\"] }}\n"
        ),
    )
    .expect("valid");
    assert!(!c.mqtt.enabled);
    // Files only a listener would read are not read.
    let with_files = off.replace(
            "  enabled: false\n",
            "  enabled: false\n  auth: { users_file: /nonexistent/users }\n  tls: { listen: 127.0.0.1:8883, cert_file: /nonexistent/c, key_file: /nonexistent/k }\n",
        );
    assert_ne!(with_files, off);
    let c = AgentConfig::parse(
            Path::new("a.yaml"),
            &format!("{with_files}sources:\n  - mqtt: {{ url: \"mqtt://127.0.0.1:1884\", topics: [\"#\"] }}\n"),
        )
        .expect("valid");
    assert!(c.mqtt.tls.is_none() && c.mqtt.auth.users_file.is_none());
    assert!(
        AgentConfig::parse(Path::new("a.yaml"), GOOD)
            .expect("valid")
            .mqtt
            .enabled
    );
    let no_listen = GOOD.replace("  listen: 127.0.0.1:1883\n", "");
    let err = AgentConfig::parse(Path::new("a.yaml"), &no_listen)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mqtt.listen") && err.contains("enabled: false"),
        "{err}"
    );
}

#[test]
fn mqtt_sources_parse_and_errors_name_the_key_path() {
    let with = |source: &str| format!("{GOOD}sources:\n  - mqtt: {source}\n");
    let c = AgentConfig::parse(
        Path::new("a.yaml"),
        &with("{ url: \"mqtt://127.0.0.1:1884\", topics: [\"plant/#\"] }"),
    )
    .expect("valid");
    let m = &c.mqtt_sources[0];
    assert_eq!((m.host.as_str(), m.port), ("127.0.0.1", 1884));
    assert_eq!(m.client_id, "edge-agent-dev-1");
    for (source, key, reason) in [
        (
            "{ url: \"https://x\", topics: [a] }",
            "sources[0].mqtt.url",
            "mqtt://host:port",
        ),
        (
            "{ url: \"mqtt://x\", topics: [] }",
            "sources[0].mqtt.topics",
            "at least one",
        ),
        (
            "{ url: \"mqtt://x\", topics: [\"a/#/b\"] }",
            "sources[0].mqtt.topics[0]",
            "not a valid",
        ),
        (
            "{ url: \"mqtt://x\", topics: [a], username: u }",
            "sources[0].mqtt.username",
            "go together",
        ),
    ] {
        let err = AgentConfig::parse(Path::new("a.yaml"), &with(source))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains(reason), "{source}: {err}");
    }
    let both = format!(
        "{GOOD}sources:\n  - {{ mqtt: {{ url: \"mqtt://x\", topics: [a] }}, file: {{ path: /a, stream: telemetry }} }}\n"
    );
    let err = AgentConfig::parse(Path::new("a.yaml"), &both)
        .unwrap_err()
        .to_string();
    assert!(err.contains("one of file or mqtt"), "{err}");
}

#[test]
fn good_config_gets_an_implicit_default_stream() {
    let c = AgentConfig::parse(Path::new("a.yaml"), GOOD).expect("valid");
    assert_eq!(c.streams.len(), 4);
    assert_eq!(c.streams[3].name, "_losses");
    assert_eq!(c.streams[c.default_stream].name, "default");
    assert_eq!(c.streams[c.default_stream].priority, Priority::Bulk);
    assert_eq!(c.streams[0].batch.linger, Duration::ZERO);
    assert_eq!(c.buffer.commit_window, Duration::from_millis(5));
    assert_eq!(c.buffer.commit_gap, Duration::from_micros(150));
    assert_eq!(c.ingest.token, TokenSource::Env("EDGE_AGENT_TOKEN".into()));
}

#[test]
fn durations_sizes_and_counts_are_typed_as_they_are_read() {
    let text = GOOD
        .replace(
            "quota_bytes: 64MiB",
            "quota_bytes: 1000000\n  queue_bytes: 2.5MiB",
        )
        .replace(
            "  auth: { allow_anonymous: true }",
            "  auth: { allow_anonymous: true }\n  max_payload_bytes: 512KiB",
        );
    let c = AgentConfig::parse(Path::new("a.yaml"), &text).expect("valid");
    assert_eq!(c.buffer.quota_bytes, 1_000_000);
    assert_eq!(c.buffer.queue_bytes, 2_621_440);
    assert_eq!(c.mqtt.max_payload_bytes, 512 << 10);
    // The defaults, from raw.rs.
    assert_eq!(c.streams[1].batch.linger, Duration::from_millis(200));
    assert_eq!(c.streams[1].batch.max_records, 1000);
    assert_eq!(c.ingest.request_timeout, Duration::from_secs(30));
    assert_eq!(c.ingest.max_in_flight, 4);
    assert_eq!(c.mqtt.max_connections, 1000);
    assert_eq!(c.schedule.weights, [4, 2, 1]);
    assert_eq!(c.buffer.queue_records, 20_000);
}

#[test]
fn errors_name_file_key_and_reason() {
    let cases = [
            (
                GOOD.replace("priority: critical", "priority: urgent"),
                "streams[0].priority",
                "unknown variant `urgent`",
            ),
            (
                GOOD.replace("quota_bytes: 64MiB", "quota_bytes: 64MiB\n  colour: red"),
                "buffer.colour",
                "unknown field `colour`",
            ),
            (
                GOOD.replace("token_env: EDGE_AGENT_TOKEN", "token: abc"),
                "ingest.token",
                "never written inline",
            ),
            (
                GOOD.replace(
                    "token_env: EDGE_AGENT_TOKEN",
                    "token_env: A\n  token_file: /x",
                ),
                "ingest",
                "exactly one",
            ),
            (
                GOOD.replace("\"legacy/#\"", "\"legacy/#/x\""),
                "streams[1].topics[1]",
                "not a valid MQTT topic filter",
            ),
            (
                GOOD.replace("linger: 0ms", "linger: soon"),
                "streams[0].batch.linger",
                "not a duration",
            ),
            (
                GOOD.replace("quota_bytes: 64MiB", "quota_bytes: lots"),
                "buffer.quota_bytes",
                "not a size",
            ),
            (
                GOOD.replace("quota_bytes: 64MiB", "quota_bytes: 0B"),
                "buffer.quota_bytes",
                "must be above 0",
            ),
            (
                GOOD.replace("max_records: 10,", "max_records: 0,"),
                "streams[0].batch.max_records",
                "expected a whole number above 0",
            ),
            (
                GOOD.replace(
                    "  auth: { allow_anonymous: true }",
                    "  auth: { allow_anonymous: true }\n  max_connections: -3",
                ),
                "mqtt.max_connections",
                "expected a whole number above 0",
            ),
            (
                format!("{GOOD}scheduling: {{ weights: {{ bulk: 0 }} }}\n"),
                "scheduling.weights.bulk",
                "expected a whole number above 0",
            ),
            (
                format!("{GOOD}scheduling: {{ starvation_bound: 5 }}\n"),
                "scheduling.starvation_bound",
                "time unit needed",
            ),
            (
                GOOD.replace("name: telemetry", "name: alarms"),
                "streams[1].name",
                "defined twice",
            ),
            (
                GOOD.replace("url: http://127.0.0.1:8080", "url: ftp://x"),
                "ingest.url",
                "not an http(s) URL",
            ),
            (
                GOOD.replace(
                    "url: http://127.0.0.1:8080",
                    "urls: [\"https://a:1\", \"b:2\"]",
                ),
                "ingest.urls[1]",
                "\"b:2\" is not an http(s) URL",
            ),
            (
                GOOD.replace(
                    "url: http://127.0.0.1:8080",
                    "url: http://a:1\n  urls: [\"http://b:2\"]",
                ),
                "ingest",
                "exactly one of url",
            ),
            (
                GOOD.replace("url: http://127.0.0.1:8080", "url: http://10.0.0.1:8080"),
                "ingest.url",
                "allow_insecure_http",
            ),
            (
                GOOD.replace("url: http://127.0.0.1:8080", "urls: []"),
                "ingest",
                "exactly one of url",
            ),
            (
                GOOD.replace(
                    "url: http://127.0.0.1:8080",
                    "url: http://127.0.0.1:8080\n  max_upload_rate: fast",
                ),
                "ingest.max_upload_rate",
                "not a size",
            ),
            (
                GOOD.replace("version: 1", "version: 3"),
                "version",
                "unsupported version",
            ),
            (
                GOOD.replace(
                    "  auth: { allow_anonymous: true }",
                    "  auth: { allow_anonymous: true }\n  tls: { listen: 127.0.0.1:8883, cert_file: c, key_file: k, require_client_cert: true }",
                ),
                "mqtt.tls.require_client_cert",
                "needs client_ca_file",
            ),
        ];
    for (text, key, reason) in cases {
        let err = AgentConfig::parse(Path::new("config/agent.yaml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("config/agent.yaml: "), "{err}");
        assert!(
            err.contains(&format!(": {key}: ")),
            "{err} should name {key}"
        );
        assert!(err.contains(reason), "{err} should say {reason}");
    }
}

#[test]
fn the_annotated_example_is_valid() {
    let c = AgentConfig::parse(
        Path::new("config/agent.yaml"),
        include_str!("../../../config/agent.yaml"),
    )
    .expect("config/agent.yaml is valid");
    let temperature = c
        .streams
        .iter()
        .find(|s| s.name == "temperature")
        .expect("the edge processing example");
    assert_eq!(temperature.transforms.len(), 4);
    assert_eq!(
        c.streams
            .iter()
            .find(|s| s.name == "logs")
            .and_then(|s| s.ttl),
        Some(Duration::from_secs(7 * 86_400))
    );
    assert_eq!(
        c.streams.last().map(|s| s.name.as_str()),
        Some(ingest_wire::LOSS_STREAM)
    );
}

#[test]
fn missing_token_file_is_named() {
    let err = resolve_token(
        Path::new("a.yaml"),
        &TokenSource::File("/nonexistent/token".into()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("a.yaml: ingest.token_file: cannot read token file /nonexistent/token"),
        "{err}"
    );
}

#[test]
fn the_commit_window_is_bounded_and_its_gap_fits_inside_it() {
    let with = |lines: &str| {
        GOOD.replace(
            "quota_bytes: 64MiB",
            &format!("quota_bytes: 64MiB\n{lines}"),
        )
    };
    let c = AgentConfig::parse(
        Path::new("a.yaml"),
        &with("  commit_window: 5ms\n  commit_gap: 300us"),
    )
    .expect("valid");
    assert_eq!(c.buffer.commit_window, Duration::from_millis(5));
    assert_eq!(c.buffer.commit_gap, Duration::from_micros(300));
    let c = AgentConfig::parse(Path::new("a.yaml"), &with("  commit_window: 5ms")).expect("valid");
    assert_eq!(
        c.buffer.commit_gap, c.buffer.commit_window,
        "a window set alone is waited whole"
    );
    let c = AgentConfig::parse(Path::new("a.yaml"), &with("  commit_gap: 0ms")).expect("valid");
    assert_eq!(
        (c.buffer.commit_window, c.buffer.commit_gap),
        (Duration::from_millis(5), Duration::ZERO)
    );
    for (lines, key, why) in [
        ("  commit_window: 2s", "buffer.commit_window", "at most 1s"),
        (
            "  commit_window: 1ms\n  commit_gap: 2ms",
            "buffer.commit_gap",
            "2ms is longer than buffer.commit_window (1ms)",
        ),
        (
            "  commit_gap: 10ms",
            "buffer.commit_gap",
            "(5ms, the default; set buffer.commit_window too)",
        ),
    ] {
        let err = AgentConfig::parse(Path::new("a.yaml"), &with(lines))
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains(why), "{lines}: {err}");
    }
}
