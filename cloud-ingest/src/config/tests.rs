//! The config's parsing and checks, key by key.

use super::*;

const GOOD: &str = "
version: 1
listen: 127.0.0.1:0
devices:
  - id: dev-1
    tenant: acme
    token_sha256: 2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b
sink:
  type: embedded
  options:
    path: /tmp/log.db
";

#[test]
fn good_config() {
    let c = IngestConfig::parse(Path::new("i.yaml"), GOOD).expect("valid");
    assert_eq!(c.devices["dev-1"].tenant, "acme");
    assert_eq!(c.limits.max_records_per_batch, 10_000);
    assert_eq!(c.limits.max_body_bytes, 8 << 20);
}

#[test]
fn the_read_api_is_off_by_default_and_never_open_for_a_loopback_address_alone() {
    let c = IngestConfig::parse(Path::new("i.yaml"), GOOD).expect("valid");
    assert_eq!(c.read_api, ReadApi::Disabled);
    let on = format!("{GOOD}read_api: {{ enabled: true }}\n");
    let err = IngestConfig::parse(Path::new("i.yaml"), &on)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("read_api") && err.contains("allow_without_token"),
        "{err}"
    );
    let tenant = format!(
        "{GOOD}read_api: {{ enabled: true, tenant_tokens: [{{ tenant: acme, token_sha256: {} }}] }}\n",
        "ab".repeat(32)
    );
    assert_eq!(
        IngestConfig::parse(Path::new("i.yaml"), &tenant)
            .expect("valid")
            .read_api,
        ReadApi::Tokens(vec![ReadToken {
            sha256: [0xab; 32],
            tenant: Some("acme".into())
        }])
    );
    let typo = tenant.replace("[{ tenant: acme", "[{ tenant: acne");
    let err = IngestConfig::parse(Path::new("i.yaml"), &typo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("read_api.tenant_tokens[0].tenant"), "{err}");
    let open = format!("{GOOD}read_api: {{ enabled: true, allow_without_token: true }}\n");
    assert_eq!(
        IngestConfig::parse(Path::new("i.yaml"), &open)
            .expect("valid")
            .read_api,
        ReadApi::Open
    );
    let both = format!(
        "{GOOD}read_api: {{ enabled: true, allow_without_token: true, token_sha256: {} }}\n",
        "ab".repeat(32)
    );
    assert!(IngestConfig::parse(Path::new("i.yaml"), &both).is_err());
}

#[test]
fn embedded_retention() {
    let parse = |options: &str| {
        IngestConfig::parse(
            Path::new("i.yaml"),
            &GOOD.replace(
                "    path: /tmp/log.db",
                &format!("    path: /tmp/log.db\n{options}"),
            ),
        )
    };
    let retention = |c: IngestConfig| match c.sink {
        SinkConfig::Embedded { retention, .. } => retention,
        other => panic!("{other:?}"),
    };
    assert_eq!(retention(parse("").expect("valid")).max_age, None);
    assert_eq!(
        retention(parse("    max_age: 7d").expect("valid")).max_age,
        Some(Duration::from_secs(7 * 86_400))
    );
    let r = retention(parse("    max_age: forever\n    max_bytes_per_topic: 1GiB").expect("valid"));
    assert_eq!((r.max_age, r.max_bytes_per_topic), (None, Some(1 << 30)));
    let topics = |c: IngestConfig| match c.sink {
        SinkConfig::Embedded {
            max_topics_per_tenant,
            ..
        } => max_topics_per_tenant,
        other => panic!("{other:?}"),
    };
    assert_eq!(topics(parse("").expect("valid")), 1_000);
    assert_eq!(
        topics(parse("    max_topics_per_tenant: 50").expect("valid")),
        50
    );
    for (bad, key) in [
        ("    max_age: soon", "sink.options.max_age"),
        (
            "    max_bytes_per_topic: lots",
            "sink.options.max_bytes_per_topic",
        ),
        (
            "    max_topics_per_tenant: 0",
            "sink.options.max_topics_per_tenant",
        ),
        (
            "    max_topics_per_tenant: 1048576",
            "sink.options.max_topics_per_tenant",
        ),
    ] {
        let err = parse(bad).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
}

#[test]
fn stateless_sinks() {
    let kafka = GOOD.replace(
            "type: embedded\n  options:\n    path: /tmp/log.db",
            "type: kafka\n  options:\n    brokers: k1:9092,k2:9092\n    properties:\n      security.protocol: plaintext",
        );
    match IngestConfig::parse(Path::new("i.yaml"), &kafka)
        .expect("valid")
        .sink
    {
        SinkConfig::Kafka(k) => {
            assert_eq!(k.compression, "zstd");
            assert_eq!(k.linger, Duration::from_millis(5));
            assert_eq!(k.properties["security.protocol"], "plaintext");
        }
        other => panic!("{other:?}"),
    }
    let nats = GOOD.replace(
        "type: embedded\n  options:\n    path: /tmp/log.db",
        "type: nats\n  options:\n    url: nats://127.0.0.1:4222",
    );
    match IngestConfig::parse(Path::new("i.yaml"), &nats)
        .expect("valid")
        .sink
    {
        SinkConfig::Nats(n) => {
            assert_eq!(n.subjects, vec!["iot.>".to_owned()]);
            assert_eq!(n.stream, "IOT");
            assert_eq!(n.duplicate_window, Duration::from_secs(120));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_annotated_example_is_valid() {
    let c = IngestConfig::parse(
        Path::new("config/cloud-ingest.yaml"),
        include_str!("../../../config/cloud-ingest.yaml"),
    )
    .expect("config/cloud-ingest.yaml is valid");
    assert_eq!(
        c.devices["demo-device"].token_sha256,
        Some(crate::auth::hash_token("demo-token-change-me"))
    );
}

#[test]
fn errors_name_file_key_and_reason() {
    let cases = [
        (
            GOOD.replace("tenant: acme", "tenant: acme\n    colour: red"),
            "devices[0]",
            "unknown field `colour`",
        ),
        (
            GOOD.replace("token_sha256: 2bb8", "token_sha256: zz"),
            "devices[0].token_sha256",
            "64 hex",
        ),
        (
            GOOD.replace("type: embedded", "type: kafkaa"),
            "sink",
            "unknown variant `kafkaa`",
        ),
        (
            GOOD.replace("version: 1", "version: 2"),
            "version",
            "unsupported version 2",
        ),
        (
            GOOD.replace(
                "    path: /tmp/log.db",
                "    path: /tmp/log.db\n    extra: 1",
            ),
            "sink.options",
            "unknown field `extra`",
        ),
        (
            GOOD.replace("  options:\n    path: /tmp/log.db", "  path: /tmp/log.db"),
            "sink.path",
            "expected \"type\" or \"options\"",
        ),
        (
            GOOD.replace(
                "type: embedded\n  options:\n    path: /tmp/log.db",
                "type: kafka\n  options:\n    brokers: k:9092\n    properties:\n      acks: \"1\"",
            ),
            "sink.options.properties.acks",
            "not negotiable",
        ),
        (
            GOOD.replace(
                "type: embedded\n  options:\n    path: /tmp/log.db",
                "type: kafka\n  options:\n    brokers: k:9092\n    compression: brotli",
            ),
            "sink.options.compression",
            "\"brotli\" is not one of",
        ),
        (
            GOOD.replace(
                "type: embedded\n  options:\n    path: /tmp/log.db",
                "type: nats\n  options:\n    url: http://n:4222",
            ),
            "sink.options.url",
            "not a nats://",
        ),
        (
            format!("{GOOD}topic_template: \"{{tenant}}.{{stream}}\"\n").replace(
                "type: embedded\n  options:\n    path: /tmp/log.db",
                "type: nats\n  options:\n    url: nats://n:4222",
            ),
            "sink.options.subjects",
            "cannot be derived",
        ),
        (
            format!("{GOOD}clock_skew_threshold: soon\n"),
            "clock_skew_threshold",
            "not a duration",
        ),
        (
            format!("{GOOD}limits:\n  max_records_per_batch: 0\n"),
            "limits.max_records_per_batch",
            "expected a whole number above 0",
        ),
        (
            format!("{GOOD}limits:\n  header_timeout: 0s\n"),
            "limits.header_timeout",
            "must be above 0",
        ),
        (
            format!("{GOOD}limits:\n  device_bytes_per_second: 0B\n"),
            "limits.device_bytes_per_second",
            "must be above 0",
        ),
        (
            format!("{GOOD}limits:\n  device_bytes_per_second: 5GiB\n"),
            "limits.device_bytes_per_second",
            "4294967295",
        ),
        (
            GOOD.replace(
                "type: embedded\n  options:\n    path: /tmp/log.db",
                "type: nats\n  options:\n    url: nats://n:4222\n    replicas: 0",
            ),
            "sink.options.replicas",
            "expected a whole number above 0",
        ),
        (
            GOOD.replace(
                "    path: /tmp/log.db",
                "    path: /tmp/log.db\n    max_age: 0s",
            ),
            "sink.options.max_age",
            "above 0 (or \"forever\")",
        ),
        (
            format!("{GOOD}limits:\n  max_body_bytes: lots\n"),
            "limits.max_body_bytes",
            "not a size",
        ),
        (
            format!("{GOOD}topic_template: iot.{{stream}}\n"),
            "topic_template",
            "{tenant}",
        ),
    ];
    for (text, key, reason) in cases {
        let err = IngestConfig::parse(Path::new("conf/i.yaml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("conf/i.yaml: "), "{err}");
        assert!(err.contains(key), "{err} should name {key}");
        assert!(err.contains(reason), "{err} should say {reason}");
    }
}
