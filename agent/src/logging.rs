//! The agent's logs: text for people, or one JSON object per line for fleet log collectors
//! (`--log-format json`), on stderr (journald takes it from there).
//!
//! Levels: ERROR is kept for "data lost" and "an operator must act"; WARN for what the agent
//! copes with by itself; INFO for what changed. Below ERROR, the same message repeated within
//! [`QUIET_FOR`] (same place in the code, same fields) is written once, and one place in the
//! code writes at most [`PER_PLACE`] lines per [`QUIET_FOR`] whatever its fields (a flood of
//! clients with random ids); the next line written after left-out ones is preceded by a note
//! of how many were left out, and a burst that simply stops gets its note when its quiet
//! period ends. ERROR lines are never left out. A flood of bad clients or a
//! link down for hours then costs a few lines, not the SD card.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::prelude::*;

/// How long identical messages after the first are left out.
pub const QUIET_FOR: Duration = Duration::from_secs(10);

/// Most distinct messages remembered (past it, those older than [`QUIET_FOR`] are forgotten,
/// or all of them if none is).
const REMEMBERED: usize = 4096;

/// Most lines one place in the code writes per [`QUIET_FOR`], whatever their fields.
pub const PER_PLACE: u64 = 20;

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
    let repeats = Repeats::new(format);
    let state = repeats.0.clone();
    // Counts of left-out lines whose message did not come back are written when their quiet
    // period ends, so a burst that simply stops is still counted.
    let _ = std::thread::Builder::new()
        .name("log-repeats".into())
        .spawn(move || {
            loop {
                std::thread::sleep(QUIET_FOR);
                for (message, n) in state.quiet(Instant::now()) {
                    state.note(n, Some(&message));
                }
            }
        });
    match format {
        Format::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colours only on a terminal: journald and log files get plain text.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_filter(repeats),
            )
            .init(),
        Format::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(repeats),
            )
            .init(),
    }
}

/// Leaves out an event identical to one written less than [`QUIET_FOR`] ago, and lines of a
/// place past its budget.
pub struct Repeats(std::sync::Arc<State>);

/// What [`Repeats`] remembers; shared with the thread that writes the counts of bursts that
/// stopped.
pub struct State {
    /// Per message (place and fields): when it was last written, and how many were left out.
    seen: Mutex<HashMap<u64, (Instant, u64)>>,
    /// Per place: when its window began, lines written in it, lines left out.
    places: Mutex<HashMap<u64, (Instant, u64, u64)>>,
    /// The message text of what was left out, by message and by place key.
    messages: Mutex<HashMap<u64, String>>,
    format: Format,
}

impl std::ops::Deref for Repeats {
    type Target = State;
    fn deref(&self) -> &State {
        &self.0
    }
}

/// The fields of an event, as one string, to tell identical events apart; and its message.
#[derive(Default)]
struct Fields {
    all: String,
    message: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = write!(self.all, "{}={value:?};", field.name());
        if field.name() == "message" {
            self.message = format!("{value:?}").chars().take(120).collect();
        }
    }
}

impl Repeats {
    /// A filter whose notes of left-out messages are written in `format`.
    pub fn new(format: Format) -> Repeats {
        Repeats(std::sync::Arc::new(State {
            seen: Mutex::default(),
            places: Mutex::default(),
            messages: Mutex::default(),
            format,
        }))
    }
}

impl State {
    /// Remembers the text of a message left out under `key`.
    fn left_out(&self, key: u64, message: &str) {
        let mut messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        if messages.len() >= REMEMBERED && !messages.contains_key(&key) {
            messages.clear();
        }
        messages.entry(key).or_insert_with(|| message.to_owned());
    }

    /// The counts of left-out lines whose quiet period has ended without the message coming
    /// back (taken: each is reported once), with their message.
    pub fn quiet(&self, now: Instant) -> Vec<(String, u64)> {
        let messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        let text = |key: &u64| messages.get(key).cloned().unwrap_or_default();
        let mut out = Vec::new();
        for (key, (written, left_out)) in self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            if *left_out > 0 && now.duration_since(*written) >= QUIET_FOR {
                out.push((text(key), std::mem::take(left_out)));
            }
        }
        for (key, (start, _, left_out)) in self
            .places
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            if *left_out > 0 && now.duration_since(*start) >= QUIET_FOR {
                out.push((text(key), std::mem::take(left_out)));
            }
        }
        out
    }

    /// Writes a note that `left_out` lines (like `message`, or like the next line) were left
    /// out. Not through tracing: an event emitted from inside the subscriber would be dropped.
    fn note(&self, left_out: u64, message: Option<&str>) {
        let at = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        let like = message.map_or_else(|| "the next".to_owned(), |m| m.to_owned());
        let what = format!(
            "{left_out} lines like {like} were left out (repeated within {} s, or more than {PER_PLACE} from one place)",
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

    /// Whether a line of `place` fits its budget now, and how many of its lines were left out
    /// since it last wrote one.
    fn admit_place(&self, place: u64, now: Instant) -> (bool, u64) {
        let mut places = self.places.lock().unwrap_or_else(|p| p.into_inner());
        if places.len() >= REMEMBERED && !places.contains_key(&place) {
            places.clear();
        }
        let (start, written, left_out) = places.entry(place).or_insert((now, 0, 0));
        if now.duration_since(*start) >= QUIET_FOR {
            (*start, *written) = (now, 0);
        }
        if *written >= PER_PLACE {
            *left_out += 1;
            return (false, 0);
        }
        *written += 1;
        (true, std::mem::take(left_out))
    }

    /// Whether to write an event with this `key` now, and how many identical ones were left
    /// out before it.
    fn admit(&self, key: u64, now: Instant) -> (bool, u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= REMEMBERED && !seen.contains_key(&key) {
            seen.retain(|_, (at, _)| now.duration_since(*at) < QUIET_FOR);
            if seen.len() >= REMEMBERED {
                seen.clear();
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
        if *event.metadata().level() == tracing::Level::ERROR {
            return true;
        }
        let now = Instant::now();
        let mut place = std::collections::hash_map::DefaultHasher::new();
        event.metadata().callsite().hash(&mut place);
        let place = place.finish();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        place.hash(&mut h);
        fields.all.hash(&mut h);
        let key = h.finish();
        let (write, mut left_out) = self.admit(key, now);
        if !write {
            self.left_out(key, &fields.message);
            return false;
        }
        let (write, place_left_out) = self.admit_place(place, now);
        if !write {
            self.left_out(place, &fields.message);
            return false;
        }
        left_out += place_left_out;
        if left_out > 0 {
            // Said once, just before the message it is about.
            self.note(left_out, None);
        }
        true
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

    #[test]
    fn a_burst_that_stops_is_still_counted() {
        let r = Repeats::new(Format::Text);
        let t0 = Instant::now();
        assert_eq!(r.admit(1, t0), (true, 0));
        for i in 1..=5 {
            assert!(!r.admit(1, t0 + Duration::from_millis(i)).0);
            r.left_out(1, "\"records lost\"");
        }
        assert!(
            r.quiet(t0 + Duration::from_secs(1)).is_empty(),
            "still quiet"
        );
        assert_eq!(
            r.quiet(t0 + QUIET_FOR),
            vec![("\"records lost\"".to_owned(), 5)]
        );
        assert!(r.quiet(t0 + QUIET_FOR * 2).is_empty(), "reported once");
    }

    #[test]
    fn one_place_writes_at_most_its_budget_per_quiet_period() {
        let r = Repeats::new(Format::Text);
        let t0 = Instant::now();
        for _ in 0..PER_PLACE {
            assert!(r.admit_place(7, t0).0);
        }
        assert_eq!(r.admit_place(7, t0), (false, 0));
        assert_eq!(r.admit_place(7, t0), (false, 0));
        assert!(r.admit_place(8, t0).0, "another place");
        assert_eq!(
            r.admit_place(7, t0 + QUIET_FOR),
            (true, 2),
            "a new window, with the count left out"
        );
    }
}
