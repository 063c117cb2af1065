//! The `sources` section: files tailed into streams ([`crate::source::file`]) and upstream
//! brokers subscribed to ([`crate::source::mqtt`]).

use std::time::Duration;

use super::raw::{RawFileSource, RawMqttSource, RawSource};
use super::{Invalid, StreamConfig, topic_filters};
use crate::source::file::FileSourceConfig;
use crate::source::mqtt::MqttSourceConfig;

/// The `sources` list, checked against the configured `streams`: the files tailed and the
/// upstream brokers subscribed to.
pub(super) fn validate(
    raw: Vec<RawSource>,
    streams: &[StreamConfig],
    device_id: &str,
    max_payload_bytes: usize,
) -> Result<(Vec<FileSourceConfig>, Vec<MqttSourceConfig>), Invalid> {
    let mut files = Vec::new();
    let mut mqtt_sources = Vec::new();
    for (i, s) in raw.into_iter().enumerate() {
        let key = format!("sources[{i}]");
        match s {
            RawSource {
                file: Some(f),
                mqtt: None,
            } => files.push(validate_file(&key, f, streams)?),
            RawSource {
                file: None,
                mqtt: Some(m),
            } => mqtt_sources.push(validate_mqtt(&key, m, device_id, max_payload_bytes)?),
            _ => {
                return Err((
                    key,
                    "a source is one of file or mqtt (one key per list item)".into(),
                ));
            }
        }
    }
    for (i, m) in mqtt_sources.iter().enumerate() {
        if mqtt_sources[..i]
            .iter()
            .any(|o| (&o.host, o.port, &o.client_id) == (&m.host, m.port, &m.client_id))
        {
            return Err((
                "sources".into(),
                format!(
                    "two mqtt sources use client_id {:?} at {}:{}: their sessions would take each other over",
                    m.client_id, m.host, m.port
                ),
            ));
        }
    }
    for (i, s) in files.iter().enumerate() {
        if files[..i].iter().any(|o| o.key() == s.key()) {
            return Err((
                format!("sources[{i}].file.path"),
                "the same files as an earlier source".into(),
            ));
        }
    }
    Ok((files, mqtt_sources))
}

/// One `sources: - mqtt:` entry, checked.
fn validate_mqtt(
    key: &str,
    m: RawMqttSource,
    device_id: &str,
    max_payload_bytes: usize,
) -> Result<MqttSourceConfig, Invalid> {
    let key = format!("{key}.mqtt");
    let url = reqwest::Url::parse(&m.url)
        .map_err(|e| (format!("{key}.url"), format!("{:?}: {e}", m.url)))?;
    if !matches!(url.scheme(), "mqtt" | "tcp") {
        return Err((
            format!("{key}.url"),
            format!(
                "{:?}: mqtt://host:port (plain MQTT on the gateway; TLS is not supported here)",
                m.url
            ),
        ));
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| (format!("{key}.url"), format!("{:?} names no host", m.url)))?
        .to_owned();
    if m.topics.is_empty() {
        return Err((
            format!("{key}.topics"),
            "needs at least one MQTT topic filter".into(),
        ));
    }
    let topics = topic_filters(&format!("{key}.topics"), &m.topics)?;
    let client_id = m
        .client_id
        .unwrap_or_else(|| format!("edge-agent-{device_id}"));
    if client_id.is_empty() || client_id.len() > 128 {
        return Err((
            format!("{key}.client_id"),
            "must be 1-128 bytes (it keys our persistent session at that broker)".into(),
        ));
    }
    let credentials = match (m.username, m.password_file) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => {
            return Err((
                format!("{key}.username"),
                "username and password_file go together".into(),
            ));
        }
    };
    Ok(MqttSourceConfig {
        host,
        port: url.port().unwrap_or(1883),
        topics,
        client_id,
        credentials,
        max_payload_bytes,
    })
}

/// One `sources: - file:` entry, checked against the configured `streams`.
fn validate_file(
    key: &str,
    f: RawFileSource,
    streams: &[StreamConfig],
) -> Result<FileSourceConfig, Invalid> {
    let key = format!("{key}.file");
    let path = std::path::Path::new(&f.path);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err((format!("{key}.path"), format!("{:?} names no file", f.path)));
    };
    if !path.is_absolute() {
        return Err((
            format!("{key}.path"),
            format!("{:?} must be absolute", f.path),
        ));
    }
    if dir.to_string_lossy().contains(['*', '?', '[']) {
        return Err((
            format!("{key}.path"),
            "patterns (*, ?, [..]) only in the file name, not in its directory".into(),
        ));
    }
    let pattern = glob::Pattern::new(&name.to_string_lossy())
        .map_err(|e| (format!("{key}.path"), format!("{:?}: {e}", f.path)))?;
    if !streams
        .iter()
        .any(|s| s.name == f.stream && s.name != ingest_wire::LOSS_STREAM)
    {
        return Err((
            format!("{key}.stream"),
            format!("{:?} is not a configured stream", f.stream),
        ));
    }
    let topic = f.topic.unwrap_or_else(|| "files/{file}".into());
    if topic.is_empty() || topic.contains(['+', '#']) {
        return Err((
            format!("{key}.topic"),
            format!(
                "{topic:?} must be an MQTT topic name (no + or #; {{file}} is the file's name)"
            ),
        ));
    }
    let max_line_bytes = f.max_line_bytes.get();
    if !(1..=crate::source::file::MAX_LINE_BYTES).contains(&max_line_bytes) {
        return Err((
            format!("{key}.max_line_bytes"),
            "must be between 1 B and 512KiB".into(),
        ));
    }
    let start_at_end = match f.start_at.as_str() {
        "beginning" => false,
        "end" => true,
        other => {
            return Err((
                format!("{key}.start_at"),
                format!("{other:?} (expected beginning or end)"),
            ));
        }
    };
    let poll = f.poll.0;
    if poll < Duration::from_millis(10) || poll > Duration::from_secs(60) {
        return Err((format!("{key}.poll"), "must be between 10ms and 60s".into()));
    }
    Ok(FileSourceConfig {
        dir: dir.to_owned(),
        pattern,
        stream: f.stream,
        topic,
        max_line_bytes,
        start_at_end,
        poll,
    })
}
