//! What the config needs from the machine, once at start: the ingest token from its file or
//! environment variable, and the buffer volume's room.

use std::path::Path;

use super::{AgentConfig, ConfigError, TokenSource};

/// Reads the ingest token from its file or environment variable (start-up I/O); empty when
/// the agent logs in with its certificate only.
pub fn resolve_token(file: &Path, source: &TokenSource) -> Result<String, ConfigError> {
    let err = |key: &str, reason: String| ConfigError::new(file, key, reason);
    let token = match source {
        TokenSource::CertificateOnly => return Ok(String::new()),
        TokenSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
            err(
                "ingest.token_file",
                format!("cannot read token file {}: {e}", path.display()),
            )
        })?,
        TokenSource::Env(var) => std::env::var(var).map_err(|_| {
            err(
                "ingest.token_env",
                format!("environment variable {var} is not set"),
            )
        })?,
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        let key = match source {
            TokenSource::File(_) => "ingest.token_file",
            _ => "ingest.token_env",
        };
        return Err(err(key, "the token is empty".into()));
    }
    if token.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        let key = match source {
            TokenSource::File(_) => "ingest.token_file",
            _ => "ingest.token_env",
        };
        return Err(err(
            key,
            "the token holds a space or a character an HTTP header cannot carry".into(),
        ));
    }
    Ok(token)
}

/// Checks that the buffer's volume can hold the reserve, the WAL's room and the quota
/// ([`crate::buffer::space::check`]), and picks the reserve when the config leaves it open
/// (start-up I/O: the volume is asked). Returns the reserve in bytes.
pub fn check_buffer_volume(file: &Path, config: &AgentConfig) -> Result<u64, ConfigError> {
    use crate::buffer::space;
    let err = |key: &str, reason: String| ConfigError::new(file, key, reason);
    let path = &config.buffer.path;
    let volume = space::Volume::of(path).map_err(|e| {
        err(
            "buffer.path",
            format!("cannot read the free space of {}: {e}", path.display()),
        )
    })?;
    let max_record = config.mqtt.max_payload_bytes as u64;
    let reserve = config
        .buffer
        .reserve_bytes
        .unwrap_or_else(|| space::auto_reserve(volume.total, max_record));
    space::check(
        volume,
        space::Usage::of(path),
        reserve,
        config.buffer.quota_bytes,
        max_record,
    )
    .map_err(|(key, reason)| err(key, format!("{}: {reason}", path.display())))?;
    Ok(reserve)
}
