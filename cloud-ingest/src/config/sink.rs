//! The `sink` section: which stream log records go to (embedded, Kafka or NATS JetStream),
//! and its options.

use std::time::Duration;

use super::raw::RawSink;
use super::{Invalid, KAFKA_FIXED_PROPERTIES, KafkaConfig, NatsConfig, Retention, SinkConfig};

/// The `sink` section, checked against the topic template (NATS subjects derive from it).
pub(super) fn validate(raw: RawSink, topic_template: &str) -> Result<SinkConfig, Invalid> {
    Ok(match raw {
        RawSink::Embedded(e) => {
            let max_age = match e.max_age.trim() {
                "forever" => None,
                text => Some(
                    config_types::parse_duration(text)
                        .and_then(|d| {
                            if d.is_zero() {
                                Err("must be above 0".into())
                            } else {
                                Ok(d)
                            }
                        })
                        .map_err(|reason| {
                            (
                                "sink.options.max_age".to_owned(),
                                format!("{reason} (or \"forever\")"),
                            )
                        })?,
                ),
            };
            let max_bytes_per_topic = e.max_bytes_per_topic.map(config_types::Size::get);
            let most = crate::publish::embedded::MAX_TOPICS;
            if !(1..=most).contains(&e.max_topics_per_tenant) {
                return Err((
                    "sink.options.max_topics_per_tenant".into(),
                    format!(
                        "{} is not between 1 and {most} (the topics one embedded log holds)",
                        e.max_topics_per_tenant
                    ),
                ));
            }
            SinkConfig::Embedded {
                path: e.path,
                retention: Retention {
                    max_age,
                    max_bytes_per_topic,
                },
                max_topics_per_tenant: e.max_topics_per_tenant,
            }
        }
        RawSink::Kafka(k) => {
            if k.brokers.trim().is_empty() {
                return Err((
                    "sink.options.brokers".into(),
                    "must list at least one host:port".into(),
                ));
            }
            if !["zstd", "lz4", "snappy", "gzip", "none"].contains(&k.compression.as_str()) {
                return Err((
                    "sink.options.compression".into(),
                    format!(
                        "{:?} is not one of zstd, lz4, snappy, gzip, none",
                        k.compression
                    ),
                ));
            }
            if let Some(fixed) = k.properties.keys().find(|p| {
                KAFKA_FIXED_PROPERTIES.contains(&p.as_str())
                    || p.as_str() == "compression.type"
                    || p.as_str() == "linger.ms"
            }) {
                return Err((
                    format!("sink.options.properties.{fixed}"),
                    "is set by the ingest (brokers, compression, linger and delivery_timeout are options of their own; idempotence, acks=all and ordering are not negotiable)".into(),
                ));
            }
            let delivery_timeout = k.delivery_timeout.0;
            if delivery_timeout < Duration::from_secs(1) {
                return Err((
                    "sink.options.delivery_timeout".into(),
                    "must be at least 1s".into(),
                ));
            }
            SinkConfig::Kafka(KafkaConfig {
                brokers: k.brokers,
                compression: k.compression,
                linger: k.linger.0,
                delivery_timeout,
                properties: k.properties,
            })
        }
        RawSink::Nats(n) => {
            if !n.url.starts_with("nats://") && !n.url.starts_with("tls://") {
                return Err((
                    "sink.options.url".into(),
                    format!("{:?} is not a nats:// or tls:// URL", n.url),
                ));
            }
            if n.stream.is_empty()
                || n.stream
                    .contains(|c: char| c == '.' || c == '*' || c == '>' || c.is_whitespace())
            {
                return Err((
                    "sink.options.stream".into(),
                    format!(
                        "{:?} is not a JetStream stream name (no '.', '*', '>' or spaces)",
                        n.stream
                    ),
                ));
            }
            let subjects = match n.subjects {
                Some(s) if !s.is_empty() => s,
                Some(_) => {
                    return Err((
                        "sink.options.subjects".into(),
                        "must list at least one subject".into(),
                    ));
                }
                None => {
                    let prefix = topic_template.split('{').next().unwrap_or_default();
                    if prefix.is_empty() || !prefix.ends_with('.') {
                        return Err((
                            "sink.options.subjects".into(),
                            format!(
                                "cannot be derived from topic_template {topic_template:?} (it must start with a fixed prefix ending in '.', like \"iot.\"); list the stream's subjects"
                            ),
                        ));
                    }
                    vec![format!("{prefix}>")]
                }
            };
            SinkConfig::Nats(NatsConfig {
                url: n.url,
                stream: n.stream,
                subjects,
                create_stream: n.create_stream,
                duplicate_window: n.duplicate_window.0,
                replicas: n.replicas.get(),
                ack_timeout: n.ack_timeout.0,
            })
        }
    })
}
