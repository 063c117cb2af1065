//! The agent's logs: text for people, or one JSON object per line for fleet log collectors
//! (`--log-format json`), on stderr (journald takes it from there).
//!
//! Levels: ERROR is kept for "data lost" and "an operator must act"; WARN for what the agent
//! copes with by itself; INFO for what changed. The same message repeated within
//! [`QUIET_FOR`] (same place in the code, same fields) is written once: the next one after
//! the quiet period carries `repeated=<n>`, how many were left out. A flood of bad clients
//! or a link down for hours then costs a few lines, not the SD card.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::prelude::*;

/// How long identical messages after the first are left out.
pub const QUIET_FOR: Duration = Duration::from_secs(10);

/// Most distinct messages remembered (the oldest are forgotten past it).
const REMEMBERED: usize = 4096;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber: `format`, `filter` (unless `RUST_LOG` says otherwise),
/// repeated messages left out.
pub fn init(format: Format, filter: &str) {
    let env =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| filter.into());
    let registry = tracing_subscriber::registry().with(env);
    match format {
        Format::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(Repeats::new(Format::Text)),
            )
            .init(),
        Format::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(Repeats::new(Format::Json)),
            )
            .init(),
    }
}

/// Leaves out an event identical to one written less than [`QUIET_FOR`] ago.
pub struct Repeats {
    seen: Mutex<HashMap<u64, (Instant, u64)>>,
    format: Format,
}

/// The fields of an event, as one string, to tell identical events apart.
#[derive(Default)]
struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = write!(self.0, "{}={value:?};", field.name());
    }
}

impl Repeats {
    /// A filter whose notes of left-out messages are written in `format`.
    pub fn new(format: Format) -> Repeats {
        Repeats {
            seen: Mutex::default(),
            format,
        }
    }

    /// Whether to write an event with this `key` now, and how many identical ones were left
    /// out before it.
    fn admit(&self, key: u64, now: Instant) -> (bool, u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= REMEMBERED && !seen.contains_key(&key) {
            let oldest = seen.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                seen.remove(&oldest);
            }
        }
        match seen.get_mut(&key) {
            Some((written, left_out)) if now.duration_since(*written) < QUIET_FOR => {
                *left_out += 1;
                (false, *left_out)
            }
            Some((written, left_out)) => {
                let n = std::mem::take(left_out);
                *written = now;
                (true, n)
            }
            None => {
                seen.insert(key, (now, 0));
                (true, 0)
            }
        }
    }
}

impl<S: Subscriber> Filter<S> for Repeats {
    fn enabled(&self, _: &tracing::Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _: &Context<'_, S>) -> bool {
        use std::hash::{Hash, Hasher};
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        event.metadata().callsite().hash(&mut h);
        fields.0.hash(&mut h);
        let (write, left_out) = self.admit(h.finish(), Instant::now());
        if write && left_out > 0 {
            // Said once, just before the message it is about (an event cannot be emitted from
            // inside the subscriber: it would be dropped).
            let at = humantime::format_rfc3339_micros(std::time::SystemTime::now());
            let what = format!(
                "the next message was repeated {left_out} more times in the last {} s and left out",
                QUIET_FOR.as_secs()
            );
            match self.format {
                Format::Text => eprintln!("{at}  INFO {what}"),
                Format::Json => eprintln!(
                    "{}",
                    serde_json::json!({
                        "timestamp": at.to_string(),
                        "level": "INFO",
                        "fields": { "message": what, "repeated": left_out },
                    })
                ),
            }
        }
        write
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_messages_are_written_once_per_quiet_period() {
        let r = Repeats::new(Format::Text);
        let t0 = Instant::now();
        assert_eq!(r.admit(1, t0), (true, 0));
        assert_eq!(r.admit(1, t0 + Duration::from_secs(1)), (false, 1));
        assert_eq!(r.admit(1, t0 + Duration::from_secs(2)), (false, 2));
        assert_eq!(
            r.admit(2, t0 + Duration::from_secs(2)),
            (true, 0),
            "another message"
        );
        assert_eq!(
            r.admit(1, t0 + QUIET_FOR + Duration::from_secs(1)),
            (true, 2),
            "after the quiet period, with the count left out"
        );
        assert_eq!(
            r.admit(1, t0 + QUIET_FOR + Duration::from_secs(2)),
            (false, 1)
        );
    }
}
