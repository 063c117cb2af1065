//! The ingest's YAML config: parse (raw serde structs), then a pure `validate` into domain types.
//! Every error names the file, the key path and the reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A config file that cannot be used. Start-up stops with this message; nothing else happens.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The config file.
        file: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not parse or does not fit the schema.
    #[error("{file}: {key}: {reason}")]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// Key path, e.g. `devices[1].token_sha256`.
        key: String,
        /// What is wrong and what is expected.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    version: u32,
    listen: SocketAddr,
    #[serde(default = "default_topic_template")]
    topic_template: String,
    devices: Vec<RawDevice>,
    sink: RawSink,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    read_api: RawReadApi,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReadApi {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default)]
    token_sha256: Option<String>,
}

impl Default for RawReadApi {
    fn default() -> Self {
        RawReadApi {
            enabled: true,
            token_sha256: None,
        }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    id: String,
    tenant: String,
    token_sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum RawSink {
    Embedded { path: PathBuf },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_max_body")]
    max_body_bytes: String,
    #[serde(default = "default_max_decompressed")]
    max_decompressed_bytes: String,
    #[serde(default = "default_max_records")]
    max_records_per_batch: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_body_bytes: default_max_body(),
            max_decompressed_bytes: default_max_decompressed(),
            max_records_per_batch: default_max_records(),
        }
    }
}

fn default_topic_template() -> String {
    "iot.{tenant}.{stream}".into()
}
fn default_max_body() -> String {
    "8MiB".into()
}
fn default_max_decompressed() -> String {
    "64MiB".into()
}
fn default_max_records() -> usize {
    10_000
}

/// A validated ingest config.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    /// Log topic name template with `{tenant}` and `{stream}`.
    pub topic_template: String,
    /// Registered devices by id.
    pub devices: HashMap<String, Device>,
    /// Where records go.
    pub sink: SinkConfig,
    /// Per-request limits.
    pub limits: RequestLimits,
    /// Who may read the embedded log over HTTP.
    pub read_api: ReadApi,
}

/// Access to `GET /v1/log…` (the embedded log's read endpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadApi {
    /// Not served (404).
    Disabled,
    /// Served to anyone who can reach the listener (only allowed on a loopback address).
    Open,
    /// Served to requests bearing the token with this SHA-256.
    Token([u8; 32]),
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Tenant the device belongs to; its records go to that tenant's topics only.
    pub tenant: String,
    /// SHA-256 of the device's bearer token.
    pub token_sha256: [u8; 32],
}

/// The stream log records are appended to.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// The embedded log: one SQLite file.
    Embedded {
        /// Path of the log file.
        path: PathBuf,
    },
}

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest request body as sent.
    pub max_body_bytes: usize,
    /// Largest body once decompressed.
    pub max_decompressed_bytes: usize,
    /// Most records in one batch.
    pub max_records_per_batch: usize,
}

impl IngestConfig {
    /// Reads and validates `file`.
    pub fn load(file: &Path) -> Result<IngestConfig, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Self::parse(file, &text)
    }

    /// Parses and validates `text` as the content of `file` (used in messages only).
    pub fn parse(file: &Path, text: &str) -> Result<IngestConfig, ConfigError> {
        let raw: RawConfig = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(
            text,
        ))
        .map_err(|e| ConfigError::Invalid {
            file: file.to_owned(),
            key: key_or_root(e.path().to_string()),
            reason: yaml_reason(&e.path().to_string(), e.into_inner().to_string()),
        })?;
        validate(raw).map_err(|(key, reason)| ConfigError::Invalid {
            file: file.to_owned(),
            key,
            reason,
        })
    }
}

/// serde_yaml puts its own path before its message ("buffer: unknown field …"); the key path
/// comes from serde_path_to_error instead, so drop the repeat.
fn yaml_reason(path: &str, message: String) -> String {
    match message.split_once(": ") {
        Some((prefix, rest)) if path.starts_with(prefix) => rest.to_owned(),
        _ => message,
    }
}

fn key_or_root(path: String) -> String {
    if path == "." {
        "(top level)".into()
    } else {
        path
    }
}

/// Pure: raw config to domain types, or (key path, reason).
fn validate(raw: RawConfig) -> Result<IngestConfig, (String, String)> {
    if raw.version != 1 {
        return Err((
            "version".into(),
            format!("unsupported version {} (expected 1)", raw.version),
        ));
    }
    for placeholder in ["{tenant}", "{stream}"] {
        if !raw.topic_template.contains(placeholder) {
            return Err((
                "topic_template".into(),
                format!("must contain {placeholder} so tenants and streams get their own topics"),
            ));
        }
    }
    let mut devices = HashMap::new();
    for (i, d) in raw.devices.into_iter().enumerate() {
        let key = |field: &str| format!("devices[{i}].{field}");
        if !ingest_wire::valid_name(&d.id) {
            return Err((
                key("id"),
                "must be 1-256 characters of [A-Za-z0-9_.-]".into(),
            ));
        }
        if !ingest_wire::valid_name(&d.tenant) {
            return Err((
                key("tenant"),
                "must be 1-256 characters of [A-Za-z0-9_.-]".into(),
            ));
        }
        let mut token_sha256 = [0u8; 32];
        hex::decode_to_slice(d.token_sha256.trim(), &mut token_sha256).map_err(|_| {
            (
                key("token_sha256"),
                "must be 64 hex characters: the SHA-256 of the token (`cloud-ingest hash-token`)"
                    .into(),
            )
        })?;
        let device = Device {
            tenant: d.tenant,
            token_sha256,
        };
        if devices.insert(d.id.clone(), device).is_some() {
            return Err((key("id"), format!("device {:?} is listed twice", d.id)));
        }
    }
    let size = |key: &str, text: &str| -> Result<usize, (String, String)> {
        let bytes = text
            .parse::<bytesize::ByteSize>()
            .map_err(|e| {
                (
                    format!("limits.{key}"),
                    format!("{text:?} is not a size like \"8MiB\": {e}"),
                )
            })?
            .as_u64();
        usize::try_from(bytes)
            .ok()
            .filter(|&b| b > 0)
            .ok_or_else(|| (format!("limits.{key}"), "must be above 0".into()))
    };
    let limits = RequestLimits {
        max_body_bytes: size("max_body_bytes", &raw.limits.max_body_bytes)?,
        max_decompressed_bytes: size("max_decompressed_bytes", &raw.limits.max_decompressed_bytes)?,
        max_records_per_batch: match raw.limits.max_records_per_batch {
            0 => {
                return Err((
                    "limits.max_records_per_batch".into(),
                    "must be above 0".into(),
                ));
            }
            n => n,
        },
    };
    let read_api = match (raw.read_api.enabled, raw.read_api.token_sha256) {
        (false, _) => ReadApi::Disabled,
        (true, Some(hash)) => {
            let mut token = [0u8; 32];
            hex::decode_to_slice(hash.trim(), &mut token).map_err(|_| {
                ("read_api.token_sha256".to_owned(), "must be 64 hex characters: the SHA-256 of the token (`cloud-ingest hash-token`)".to_owned())
            })?;
            ReadApi::Token(token)
        }
        (true, None) if raw.listen.ip().is_loopback() => ReadApi::Open,
        (true, None) => {
            return Err((
                "read_api".into(),
                format!(
                    "listen ({}) is not a loopback address, so the log's read API needs read_api.token_sha256, or read_api.enabled: false",
                    raw.listen
                ),
            ));
        }
    };
    let sink = match raw.sink {
        RawSink::Embedded { path } => SinkConfig::Embedded { path },
    };
    Ok(IngestConfig {
        listen: raw.listen,
        topic_template: raw.topic_template,
        devices,
        sink,
        limits,
        read_api,
    })
}

#[cfg(test)]
mod tests {
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
    fn the_annotated_example_is_valid() {
        let c = IngestConfig::parse(
            Path::new("config/cloud-ingest.yaml"),
            include_str!("../../config/cloud-ingest.yaml"),
        )
        .expect("config/cloud-ingest.yaml is valid");
        assert_eq!(
            c.devices["demo-device"].token_sha256,
            crate::auth::hash_token("demo-token-change-me")
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
                GOOD.replace("  path: /tmp/log.db", "  path: /tmp/log.db\n  extra: 1"),
                "sink",
                "unknown field `extra`",
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
}
