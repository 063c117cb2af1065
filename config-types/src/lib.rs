//! What the agent's and the ingest's YAML configs share.
//!
//! - [`parse`] turns YAML into a binary's raw config struct, or a [`ConfigError`] that names
//!   the file, the key path and the reason (`config/agent.yaml: streams[2].priority: unknown
//!   variant "urgent" …`). serde_path_to_error supplies the key path.
//! - [`Duration`] ("250ms", "5m") and the sizes [`Size`] and [`MemorySize`] ("64MiB", or a
//!   plain number of bytes) are parsed while the YAML is read, so a raw config struct holds
//!   typed values and its errors point at the key that holds the bad text. Counts that cannot
//!   be zero are `NonZeroUsize` or `NonZeroU32` in the raw structs, for the same reason.
//!
//! YAML is read with `serde_norway`, the maintained fork of the archived `serde_yaml` (same
//! API, same messages).

use std::fmt;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

/// A config that cannot be used: the binary exits with this message before it starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// Key path, e.g. `streams[1].priority`; `(file)` when the file cannot be read, `(top
    /// level)` for the document as a whole.
    pub key: String,
    /// What is wrong and what to do.
    pub reason: String,
}

impl ConfigError {
    /// An error at `key` of `file`.
    pub fn new(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_owned(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Reads `file` whole.
pub fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file)
        .map_err(|e| ConfigError::new(file, "(file)", format!("cannot read: {e}")))
}

/// Parses `text` as YAML into `T`; `file` names it in messages only.
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(text)).map_err(|e| {
        let path = e.path().to_string();
        // serde names Rust types ("expected a nonzero usize"): say it the operator's way.
        let reason = yaml_reason(&path, e.into_inner().to_string())
            .replace("a nonzero usize", "a whole number above 0")
            .replace(
                "a nonzero u32",
                "a whole number above 0 (at most 4294967295)",
            )
            .replace("expected usize", "expected a whole number")
            .replace(
                "expected u32",
                "expected a whole number (at most 4294967295)",
            );
        let key = if path == "." {
            "(top level)".to_owned()
        } else {
            path
        };
        ConfigError::new(file, key, reason)
    })
}

/// The YAML parser puts its own path before its message ("buffer: unknown field …"); the key
/// path comes from serde_path_to_error instead, so drop the repeat.
fn yaml_reason(path: &str, message: String) -> String {
    match message.split_once(": ") {
        Some((prefix, rest)) if path.starts_with(prefix) => rest.to_owned(),
        _ => message,
    }
}

/// `n`, which must be above 0: a count's default.
pub const fn count(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => panic!("a count is above 0"),
    }
}

/// The rule names (device ids, stream names, tenants) follow, for messages.
pub const NAME_RULE: &str = "must be 1-256 characters of [A-Za-z0-9_.-]";

/// A duration written like "250ms", "30s", "5m" or "7d" (humantime's syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Duration {
        Duration(std::time::Duration::from_millis(ms))
    }

    /// `s` seconds.
    pub const fn from_secs(s: u64) -> Duration {
        Duration(std::time::Duration::from_secs(s))
    }
}

/// Parses a duration as [`Duration`] does; the error says what was expected.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like \"10ms\" or \"30s\": {e}"))
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(Duration)
            .map_err(de::Error::custom)
    }
}

/// A size in bytes, above 0: "64MiB", "1.5GB", "512KiB", or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub NonZeroU64);

impl Size {
    /// `n` bytes; `n` must be above 0 (a constant default).
    pub const fn bytes(n: u64) -> Size {
        match NonZeroU64::new(n) {
            Some(n) => Size(n),
            None => panic!("a Size is above 0"),
        }
    }

    /// The bytes.
    pub const fn get(self) -> u64 {
        self.0.get()
    }
}

/// Parses a size as [`Size`] does; the error says what was expected.
pub fn parse_size(text: &str) -> Result<NonZeroU64, String> {
    let bytes = text
        .trim()
        .parse::<bytesize::ByteSize>()
        .map_err(|e| format!("{text:?} is not a size like \"64MiB\": {e}"))?;
    NonZeroU64::new(bytes.as_u64()).ok_or_else(|| "must be above 0".to_owned())
}

/// Text or a number of bytes.
struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = NonZeroU64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a size like \"64MiB\" or a number of bytes")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<NonZeroU64, E> {
        parse_size(text).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<NonZeroU64, E> {
        NonZeroU64::new(n).ok_or_else(|| E::custom("must be above 0"))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<NonZeroU64, E> {
        u64::try_from(n)
            .map_err(|_| E::custom("must be above 0"))
            .and_then(|n| self.visit_u64(n))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        d.deserialize_any(SizeVisitor).map(Size)
    }
}

/// A [`Size`] of something held in memory, so at most what this machine can address (a
/// 32-bit gateway's 4 GiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemorySize(pub NonZeroUsize);

impl MemorySize {
    /// `n` bytes; `n` must be above 0 (a constant default).
    pub const fn bytes(n: usize) -> MemorySize {
        match NonZeroUsize::new(n) {
            Some(n) => MemorySize(n),
            None => panic!("a MemorySize is above 0"),
        }
    }

    /// The bytes.
    pub const fn get(self) -> usize {
        self.0.get()
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MemorySize, D::Error> {
        let Size(n) = Size::deserialize(d)?;
        usize::try_from(n.get())
            .ok()
            .and_then(NonZeroUsize::new)
            .map(MemorySize)
            .ok_or_else(|| de::Error::custom("too large for this machine's memory"))
    }
}

/// Bytes per second, written as a [`Size`] ("1MiB"): 1 B to 4294967295 B (4 GiB), what the rate
/// limiters count in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRate(pub NonZeroU32);

impl<'de> Deserialize<'de> for ByteRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteRate, D::Error> {
        let Size(n) = Size::deserialize(d)?;
        NonZeroU32::try_from(n)
            .map(ByteRate)
            .map_err(|_| de::Error::custom("must be 1 B to 4294967295 B (4 GiB) per second"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        wait: Duration,
        quota: Size,
        #[serde(default)]
        queue: Option<MemorySize>,
        #[serde(default)]
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        count: NonZeroUsize,
    }

    fn err(text: &str) -> String {
        parse::<Sample>(Path::new("a.yaml"), text)
            .expect_err(text)
            .to_string()
    }

    #[test]
    fn typed_values_parse_while_the_yaml_is_read() {
        let s: Sample = parse(
            Path::new("a.yaml"),
            "wait: 250ms\nquota: 64MiB\nqueue: 4096\ninner: { count: 3 }\n",
        )
        .expect("valid");
        assert_eq!(s.wait, Duration::from_millis(250));
        assert_eq!(s.quota, Size::bytes(64 << 20));
        assert_eq!(s.queue, Some(MemorySize::bytes(4096)));
        assert_eq!(s.inner.map(|i| i.count.get()), Some(3));
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_reason() {
        for (text, message) in [
            (
                "wait: soon\nquota: 1MiB\n",
                "a.yaml: wait: \"soon\" is not a duration like \"10ms\"",
            ),
            (
                "wait: 1s\nquota: lots\n",
                "a.yaml: quota: \"lots\" is not a size like \"64MiB\"",
            ),
            ("wait: 1s\nquota: 0B\n", "a.yaml: quota: must be above 0"),
            ("wait: 1s\nquota: 0\n", "a.yaml: quota: must be above 0"),
            ("wait: 1s\nquota: -5\n", "a.yaml: quota: must be above 0"),
            (
                "wait: 1s\nquota: 1MiB\ninner: { count: 0 }\n",
                "a.yaml: inner.count: invalid value: integer `0`, expected a whole number above 0",
            ),
            (
                "wait: 1s\nquota: 1MiB\ncolour: red\n",
                "a.yaml: colour: unknown field `colour`",
            ),
            ("wait: [1]\nquota: 1MiB\n", "a.yaml: wait: invalid type"),
        ] {
            let e = err(text);
            assert!(e.starts_with(message), "{text:?}: {e}");
        }
        assert_eq!(
            read(Path::new("/nonexistent/a.yaml"))
                .expect_err("missing")
                .key,
            "(file)"
        );
    }

    #[cfg(target_pointer_width = "32")]
    #[test]
    fn a_memory_size_past_the_address_space_is_refused() {
        assert!(err("wait: 1s\nquota: 1MiB\nqueue: 5GiB\n").contains("too large"));
    }
}
