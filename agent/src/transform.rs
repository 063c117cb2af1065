//! Edge transforms: what a stream does to its records before they are buffered. Per stream, in
//! the order declared: `enrich` (fields added to JSON objects), `filter` (keep or drop by topic
//! and by predicates on JSON fields), `deadband` (drop a reading that barely changed since the
//! last one sent, with an optional heartbeat), `window` (one record per topic and interval with
//! count, min, max, mean and last of named fields).
//!
//! Where they run: in the buffer writer, on each new record, just before the commit that stores
//! it; their state (the deadbands' last values sent, the open windows) is written in that same
//! transaction ([`Chain::take_changes`]). Invariant: a reading acknowledged to its sensor is in
//! the buffer, or counted as filtered (`agent_records_filtered_total`, per stream and reason),
//! or folded into a window whose state is on disk. A crash or a power cut changes none of that,
//! and a restart resumes every window and deadband where the last commit left it. Filtered
//! records are not losses and never appear in loss reports.
//!
//! Bounds: at most [`MAX_KEYS`] topics per stateful step (readings of further topics pass that
//! step unchanged, and are counted); a payload a step cannot read (not a JSON object, a field
//! missing or not a number) is passed on untouched or dropped, as the step's `on_error` says,
//! and counted. Nothing here panics on input or blocks the stream.
//!
//! `spec` holds what the steps are (as configured), `state` what they remember per topic; this
//! module runs a stream's chain ([`Chain`]) over its records.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};

mod spec;
mod state;

pub use spec::{
    Condition, Deadband, Enrich, FieldPath, Filter, OnError, Op, Spec, Step, TopicPattern, Window,
    attribute_value,
};
use state::{DeadbandState, KeyState, WindowState, summary};

use crate::buffer::Attributes;

/// Most keys (topics) a deadband or window step keeps state for. Beyond, a deadband forgets
/// the topic sent longest ago (its next reading is sent); a window passes readings of new
/// topics unchanged.
pub const MAX_KEYS: usize = 10_000;
/// Longest topic a step keeps state for; a reading of a longer one passes the step unchanged.
pub const MAX_KEY_BYTES: usize = 1024;
/// How long after its end a window stays open for readings still on their way to the writer.
pub const WINDOW_GRACE: Duration = Duration::from_secs(2);
/// Rows of saved state read back per stream at most.
pub const MAX_RESTORED: usize = 4 * MAX_KEYS;

/// A record going through a chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// MQTT topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Receive time, Unix ms.
    pub received_at_ms: i64,
    /// Attributes: what `enrich` adds to a payload that is not a JSON object.
    pub attributes: Attributes,
}

/// Why a record was not sent (the `reason` of `agent_records_filtered_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// A `filter` step.
    Filter,
    /// A `deadband` step: barely changed.
    Deadband,
    /// Folded into a `window` (without `keep_raw`).
    Window,
    /// A step could not read it and its `on_error` is `drop`.
    Unparsable,
}

impl Reason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Filter => "filter",
            Reason::Deadband => "deadband",
            Reason::Window => "window",
            Reason::Unparsable => "unparsable",
        }
    }
}

/// What a chain made of one record (or of a tick).
#[derive(Debug, Default, PartialEq)]
pub struct Output {
    /// Records made by windows that ended, to store before `kept`.
    pub made: Vec<Reading>,
    /// The record itself, possibly changed; `None` when it was filtered or folded.
    pub kept: Option<Reading>,
    /// Why the record itself was not kept.
    pub filtered: Option<Reason>,
    /// Made records dropped by a later step.
    pub made_filtered: Vec<Reason>,
    /// Steps that could not read a payload, and whether they dropped it.
    pub unparsable: Vec<(&'static str, OnError)>,
    /// Stateful steps a record passed unchanged: its topic over [`MAX_KEY_BYTES`], or no room
    /// for another window ([`MAX_KEYS`]).
    pub state_full: Vec<&'static str>,
}

/// Facts `enrich` adds.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The agent's `device_id`.
    pub device_id: String,
    /// The host's name.
    pub hostname: String,
}

impl Facts {
    /// The facts of this host for `device_id`.
    pub fn of_this_host(device_id: &str) -> Facts {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        Facts {
            device_id: device_id.to_owned(),
            hostname,
        }
    }
}

/// One row of saved state: `state` `None` deletes it.
#[derive(Debug, Clone, PartialEq)]
pub struct StateRow {
    /// Stream name.
    pub stream: String,
    /// Index of the step in the stream's chain.
    pub step: usize,
    /// The step's config, as saved: state under another config is not reused.
    pub fingerprint: String,
    /// The key (topic).
    pub key: String,
    /// The state, JSON.
    pub state: Option<String>,
}

/// A step with its state.
#[derive(Debug)]
struct Running {
    step: Step,
    fingerprint: String,
    keys: HashMap<String, KeyState>,
    /// Keys changed since the last [`Chain::take_changes`].
    changed: BTreeSet<String>,
}

/// A stream's steps, with their state.
#[derive(Debug, Default)]
pub struct Chain {
    steps: Vec<Running>,
}

/// What one step did with one record.
enum Done {
    /// Goes on to the next step.
    Next,
    /// Stops here, for this reason.
    Dropped(Reason),
    /// Folded into a window: stops here (without `keep_raw`) or goes on.
    Folded { goes_on: bool },
}

impl Chain {
    /// A chain of `steps` with no state yet.
    pub fn new(steps: Vec<Step>) -> Chain {
        Chain {
            steps: steps
                .into_iter()
                .map(|step| Running {
                    fingerprint: format!("{step:?}"),
                    step,
                    keys: HashMap::new(),
                    changed: BTreeSet::new(),
                })
                .collect(),
        }
    }

    /// Whether it does anything.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Whether `other` has the same steps (so the same saved state applies).
    pub fn same_steps(&self, other: &Chain) -> bool {
        self.steps.len() == other.steps.len()
            && self
                .steps
                .iter()
                .zip(&other.steps)
                .all(|(a, b)| a.fingerprint == b.fingerprint)
    }

    /// Whether step `step` keeps state saved under `fingerprint` (its config has not changed).
    pub fn fingerprint(&self, step: usize) -> Option<&str> {
        self.steps.get(step).map(|s| s.fingerprint.as_str())
    }

    /// Takes back saved state: `state` (JSON) of `key` at `step`. State that does not parse
    /// (another version) is ignored: the step starts afresh for that key.
    pub fn restore(&mut self, step: usize, key: String, state: &str) {
        let Some(running) = self.steps.get_mut(step) else {
            return;
        };
        let parsed = match running.step.spec {
            Spec::Deadband(_) => serde_json::from_str(state).ok().map(KeyState::Deadband),
            Spec::Window(_) => serde_json::from_str(state).ok().map(KeyState::Window),
            _ => None,
        };
        if let Some(s) = parsed
            && running.keys.len() < MAX_KEYS
        {
            running.keys.insert(key, s);
        }
    }

    /// The record of a window saved under a config no longer in force (`state` of `key`), made
    /// now so that the readings folded into it are not lost; `None` for other state (a
    /// deadband's: forgetting it only sends the next reading).
    pub fn orphan_window(key: &str, state: &str) -> Option<Reading> {
        let w: WindowState = serde_json::from_str(state).ok()?;
        (w.count > 0).then(|| summary(key, &w))
    }

    /// Forgets all state in memory (it is read back from the buffer after a failed commit).
    pub fn forget_state(&mut self) {
        for running in &mut self.steps {
            running.keys.clear();
            running.changed.clear();
        }
    }

    /// Ends every open window now (a reload replaces this chain): their records go through
    /// the steps after each window.
    pub fn close_all(&mut self, facts: &Facts) -> Output {
        self.end_windows(None, facts)
    }

    /// Runs `reading` through every step.
    pub fn run(&mut self, reading: Reading, facts: &Facts) -> Output {
        let mut out = Output::default();
        self.pass(0, reading, true, facts, &mut out);
        out
    }

    /// Ends the windows whose interval is over at `now_ms`: their records go through the steps
    /// after the window.
    pub fn tick(&mut self, now_ms: i64, facts: &Facts) -> Output {
        self.end_windows(Some(now_ms), facts)
    }

    /// Ends the windows over at `now_ms` (and [`WINDOW_GRACE`] after), or all of them.
    fn end_windows(&mut self, now_ms: Option<i64>, facts: &Facts) -> Output {
        let grace = WINDOW_GRACE.as_millis() as i64;
        let mut out = Output::default();
        for i in 0..self.steps.len() {
            if !matches!(self.steps[i].step.spec, Spec::Window(_)) {
                continue;
            }
            let running = &mut self.steps[i];
            let mut due: Vec<String> = running
                .keys
                .iter()
                .filter(|(_, s)| match (s, now_ms) {
                    (KeyState::Window(w), Some(now)) => {
                        w.start_ms.saturating_add(w.every_ms).saturating_add(grace) <= now
                    }
                    (KeyState::Window(_), None) => true,
                    _ => false,
                })
                .map(|(k, _)| k.clone())
                .collect();
            due.sort();
            let mut made = Vec::new();
            for key in due {
                if let Some(KeyState::Window(state)) = running.keys.remove(&key) {
                    made.push(summary(&key, &state));
                    running.changed.insert(key);
                }
            }
            for record in made {
                self.pass(i + 1, record, false, facts, &mut out);
            }
        }
        out
    }

    /// The state changed since the last call, as rows to save (in the commit that stores what
    /// the changes made).
    pub fn take_changes(&mut self, stream: &str) -> Vec<StateRow> {
        let mut rows = Vec::new();
        for (i, running) in self.steps.iter_mut().enumerate() {
            for key in std::mem::take(&mut running.changed) {
                let state = running.keys.get(&key).map(|s| match s {
                    KeyState::Deadband(d) => serde_json::to_string(d),
                    KeyState::Window(w) => serde_json::to_string(w),
                });
                rows.push(StateRow {
                    stream: stream.to_owned(),
                    step: i,
                    fingerprint: running.fingerprint.clone(),
                    key,
                    state: state.map(|s| s.expect("invariant: plain numbers serialise")),
                });
            }
        }
        rows
    }

    fn pass(
        &mut self,
        from: usize,
        mut reading: Reading,
        original: bool,
        facts: &Facts,
        out: &mut Output,
    ) {
        // Parsed once for the whole chain; written back once, if a step changed it.
        let mut parsed = Parsed::NotYet;
        for i in from..self.steps.len() {
            let mut made = Vec::new();
            let done = self.steps[i].apply(&mut reading, &mut parsed, facts, &mut made, out);
            // A window that ended is stored before the reading that ended it.
            for record in made {
                self.pass(i + 1, record, false, facts, out);
            }
            let stop = match done {
                Done::Next | Done::Folded { goes_on: true } => None,
                Done::Dropped(reason) => Some(reason),
                Done::Folded { goes_on: false } => Some(Reason::Window),
            };
            if let Some(reason) = stop {
                if original {
                    out.filtered = Some(reason);
                } else {
                    out.made_filtered.push(reason);
                }
                return;
            }
        }
        if let Parsed::Changed(o) = parsed {
            reading.payload = serde_json::to_vec(&Value::Object(o))
                .expect("invariant: a JSON value serialises")
                .into();
        }
        if original {
            out.kept = Some(reading);
        } else {
            out.made.push(reading);
        }
    }
}

/// A payload as the steps of one pass see it.
enum Parsed {
    /// Not read yet.
    NotYet,
    /// Not a JSON object.
    NotObject,
    /// The object, as received.
    Object(Map<String, Value>),
    /// The object, changed by a step: written back at the end.
    Changed(Map<String, Value>),
}

impl Parsed {
    /// The object `payload` holds, read at the first call.
    fn object(&mut self, payload: &[u8]) -> Option<&mut Map<String, Value>> {
        if let Parsed::NotYet = self {
            *self = match object(payload) {
                Some(o) => Parsed::Object(o),
                None => Parsed::NotObject,
            };
        }
        match self {
            Parsed::Object(o) | Parsed::Changed(o) => Some(o),
            Parsed::NotYet | Parsed::NotObject => None,
        }
    }

    /// Marks the object changed.
    fn change(&mut self) {
        *self = match std::mem::replace(self, Parsed::NotYet) {
            Parsed::Object(o) => Parsed::Changed(o),
            other => other,
        };
    }
}

/// The JSON object a payload holds, if it is one.
fn object(payload: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(payload) {
        Ok(Value::Object(o)) => Some(o),
        _ => None,
    }
}

impl Running {
    fn unreadable(&self, out: &mut Output) -> Done {
        out.unparsable
            .push((self.step.spec.name(), self.step.on_error));
        match self.step.on_error {
            OnError::Pass => Done::Next,
            OnError::Drop => Done::Dropped(Reason::Unparsable),
        }
    }
}

impl Running {
    fn apply(
        &mut self,
        reading: &mut Reading,
        parsed: &mut Parsed,
        facts: &Facts,
        made: &mut Vec<Reading>,
        out: &mut Output,
    ) -> Done {
        match &self.step.spec {
            Spec::Enrich(e) => {
                // What the topic (the sensor's choice) says first: the agent's facts and the
                // configured fields win over it.
                let captures = e.topic.as_ref().and_then(|p| p.captures(&reading.topic));
                let facts = [
                    e.device_id.then_some(("device_id", &facts.device_id)),
                    e.hostname.then_some(("hostname", &facts.hostname)),
                ];
                let Some(o) = parsed.object(&reading.payload) else {
                    // Not a JSON object: the same names and values become the record's
                    // attributes (headers in Kafka and NATS), the payload is kept as it is.
                    let a = &mut reading.attributes;
                    for (k, v) in captures.into_iter().flatten() {
                        a.insert(k, v);
                    }
                    for (k, v) in facts.into_iter().flatten() {
                        a.insert(k.to_owned(), v.clone());
                    }
                    for (k, v) in &e.fields {
                        a.insert(k.clone(), attribute_value(v));
                    }
                    return Done::Next;
                };
                for (k, v) in captures.into_iter().flatten() {
                    o.insert(k, Value::from(v));
                }
                for (k, v) in facts.into_iter().flatten() {
                    o.insert(k.to_owned(), Value::from(v.clone()));
                }
                for (k, v) in &e.fields {
                    o.insert(k.clone(), v.clone());
                }
                parsed.change();
                Done::Next
            }
            Spec::Filter(f) => {
                let topic_matches =
                    f.topics.is_empty() || f.topics.iter().any(|t| t.matches(&reading.topic));
                let matches = if !topic_matches {
                    false
                } else if f.conditions.is_empty() {
                    true
                } else {
                    let Some(o) = parsed.object(&reading.payload) else {
                        return self.unreadable(out);
                    };
                    f.conditions.iter().all(|c| c.holds(o))
                };
                if matches == f.keep {
                    Done::Next
                } else {
                    Done::Dropped(Reason::Filter)
                }
            }
            Spec::Deadband(d) => {
                let Some(value) = parsed
                    .object(&reading.payload)
                    .and_then(|o| d.field.number(o))
                else {
                    return self.unreadable(out);
                };
                if reading.topic.len() > MAX_KEY_BYTES {
                    out.state_full.push("deadband");
                    return Done::Next;
                }
                let key = reading.topic.clone();
                if !self.keys.contains_key(&key) && self.keys.len() >= MAX_KEYS {
                    // Forgetting the topic sent longest ago only sends its next reading.
                    let oldest = self
                        .keys
                        .iter()
                        .filter_map(|(k, s)| match s {
                            KeyState::Deadband(d) => Some((d.at_ms, k)),
                            KeyState::Window(_) => None,
                        })
                        .min()
                        .map(|(_, k)| k.clone());
                    if let Some(k) = oldest {
                        self.keys.remove(&k);
                        self.changed.insert(k);
                    }
                    out.state_full.push("deadband");
                }
                let send = match self.keys.get(&key) {
                    Some(KeyState::Deadband(last)) => d.moved(last, value, reading.received_at_ms),
                    _ => true,
                };
                if !send {
                    return Done::Dropped(Reason::Deadband);
                }
                self.keys.insert(
                    key.clone(),
                    KeyState::Deadband(DeadbandState {
                        value,
                        at_ms: reading.received_at_ms,
                    }),
                );
                self.changed.insert(key);
                Done::Next
            }
            Spec::Window(w) => {
                let values: Option<Vec<f64>> = parsed
                    .object(&reading.payload)
                    .and_then(|o| w.fields.iter().map(|f| f.number(o)).collect());
                let Some(values) = values else {
                    return self.unreadable(out);
                };
                if reading.topic.len() > MAX_KEY_BYTES
                    || (!self.keys.contains_key(&reading.topic) && self.keys.len() >= MAX_KEYS)
                {
                    out.state_full.push("window");
                    return Done::Next;
                }
                let key = reading.topic.clone();
                let every = w.every.as_millis().max(1) as i64;
                let start = reading.received_at_ms.div_euclid(every) * every;
                let keep_raw = w.keep_raw;
                let open = match self.keys.get(&key) {
                    Some(KeyState::Window(open)) => Some(open),
                    _ => None,
                };
                // A later interval ends the open window. A reading of an earlier one (late, or
                // the clock stepped back) is folded into the open window.
                let (ended, state) = match open {
                    Some(open) if start > open.start_ms => (
                        Some(summary(&key, open)),
                        WindowState::empty(start, every, &w.fields).add(&values),
                    ),
                    Some(open) => (None, open.add(&values)),
                    None => (
                        None,
                        WindowState::empty(start, every, &w.fields).add(&values),
                    ),
                };
                let Some(state) = state else {
                    // A sum that no longer fits a float: the window stays as it was.
                    return self.unreadable(out);
                };
                made.extend(ended);
                self.keys.insert(key.clone(), KeyState::Window(state));
                self.changed.insert(key);
                Done::Folded { goes_on: keep_raw }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(topic: &str, payload: &str, at: i64) -> Reading {
        Reading {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            received_at_ms: at,
            attributes: Attributes::new(),
        }
    }

    fn path(p: &str) -> FieldPath {
        FieldPath::new(p).expect("path")
    }

    fn json(r: &Reading) -> Value {
        serde_json::from_slice(&r.payload).expect("json")
    }

    fn facts() -> Facts {
        Facts {
            device_id: "gw-7".into(),
            hostname: "box".into(),
        }
    }

    /// The seed's example, our way: enrich with a location and the site from the topic, keep
    /// temperatures above -40, send on a change of 0.5 or after 10 s, and a 60 s window.
    fn chain() -> Chain {
        let mut fields = Map::new();
        fields.insert("device_location".into(), Value::from("factory-floor-1"));
        Chain::new(vec![
            Step {
                spec: Spec::Enrich(Enrich {
                    fields,
                    device_id: true,
                    hostname: false,
                    topic: Some(TopicPattern::new("plant/{site}/#").expect("pattern")),
                }),
                on_error: OnError::Pass,
            },
            Step {
                spec: Spec::Filter(Filter {
                    keep: true,
                    topics: vec![],
                    conditions: vec![Condition {
                        field: path("t"),
                        op: Op::Gt(Value::from(-40)),
                    }],
                }),
                on_error: OnError::Drop,
            },
            Step {
                spec: Spec::Deadband(Deadband {
                    field: path("t"),
                    absolute: Some(0.5),
                    relative: None,
                    heartbeat: Some(Duration::from_secs(10)),
                }),
                on_error: OnError::Pass,
            },
            Step {
                spec: Spec::Window(Window {
                    every: Duration::from_secs(60),
                    fields: vec![path("t")],
                    keep_raw: true,
                }),
                on_error: OnError::Pass,
            },
        ])
    }

    /// The table of inputs and outputs: (time s, payload) → sent (t), or why not.
    #[test]
    fn a_scripted_sequence_gives_exactly_the_expected_records() {
        let mut c = chain();
        let f = facts();
        let cases: Vec<(i64, &str, Result<f64, Reason>)> = vec![
            (0, r#"{"t": 20.0}"#, Ok(20.0)),
            (1, r#"{"t": 20.2}"#, Err(Reason::Deadband)),
            (2, r#"{"t": 20.6}"#, Ok(20.6)),
            (3, r#"{"t": -50}"#, Err(Reason::Filter)),
            (4, "not json", Err(Reason::Unparsable)),
            (5, r#"{"t": 20.7}"#, Err(Reason::Deadband)),
            (13, r#"{"t": 20.7}"#, Ok(20.7)), // heartbeat: 11 s after 20.6 was sent
            (14, r#"{"t": 20.1}"#, Ok(20.1)),
        ];
        for (at, payload, want) in cases {
            let out = c.run(reading("plant/berlin/t1", payload, at * 1000), &f);
            assert!(out.made.is_empty(), "no window ended yet at {at}");
            match want {
                Ok(t) => {
                    let kept = out.kept.expect("kept");
                    let v = json(&kept);
                    assert_eq!(v["t"], Value::from(t), "at {at}");
                    assert_eq!(v["device_location"], "factory-floor-1");
                    assert_eq!(v["device_id"], "gw-7");
                    assert_eq!(v["site"], "berlin");
                }
                Err(reason) => assert_eq!((out.kept, out.filtered), (None, Some(reason)), "{at}"),
            }
        }
        // The next reading falls in the next minute: the first window ends, before it.
        let out = c.run(reading("plant/berlin/t1", r#"{"t": 30}"#, 61_000), &f);
        assert_eq!(out.made.len(), 1);
        let w = json(&out.made[0]);
        assert_eq!(
            (w["window_start_ms"].clone(), w["window_end_ms"].clone()),
            (Value::from(0), Value::from(60_000))
        );
        assert_eq!(w["count"], 4, "the four readings the deadband sent: {w}");
        assert_eq!(w["t"]["min"], 20.0);
        assert_eq!(w["t"]["max"], 20.7);
        assert_eq!(w["t"]["last"], 20.1);
        assert!((w["t"]["mean"].as_f64().expect("mean") - 20.35).abs() < 1e-9);
        assert!(out.kept.is_some(), "keep_raw");
        // A tick after the minute (and the grace) ends the second window on its own.
        assert!(c.tick(121_000, &f).made.is_empty(), "still in its grace");
        let out = c.tick(122_000, &f);
        assert_eq!(out.made.len(), 1);
        assert_eq!(json(&out.made[0])["count"], 1);
        assert!(c.tick(200_000, &f).made.is_empty(), "nothing left open");
    }

    #[test]
    fn enrich_gives_a_payload_that_is_not_a_json_object_attributes() {
        let mut fields = Map::new();
        fields.insert("device_location".into(), Value::from("factory-floor-1"));
        fields.insert("floor".into(), Value::from(3));
        let mut c = Chain::new(vec![Step {
            spec: Spec::Enrich(Enrich {
                fields,
                device_id: true,
                hostname: false,
                topic: Some(TopicPattern::new("plant/{site}/#").expect("pattern")),
            }),
            on_error: OnError::Drop,
        }]);
        for payload in ["21.5 C", "21.5", "[1, 2]", "\u{0}\u{ff}"] {
            let out = c.run(reading("plant/berlin/t1", payload, 0), &facts());
            let kept = out.kept.expect("kept");
            assert_eq!(kept.payload.as_ref(), payload.as_bytes(), "untouched");
            let want: Attributes = [
                ("device_id", "gw-7"),
                ("device_location", "factory-floor-1"),
                ("floor", "3"),
                ("site", "berlin"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            assert_eq!(kept.attributes, want, "{payload:?}");
            assert!(out.unparsable.is_empty(), "not an error for enrich");
        }
        // A JSON object gets fields, and no attributes.
        let out = c.run(reading("plant/berlin/t1", r#"{"t": 1}"#, 0), &facts());
        let kept = out.kept.expect("kept");
        assert!(kept.attributes.is_empty());
        assert_eq!(json(&kept)["floor"], 3);
        assert_eq!(json(&kept)["site"], "berlin");
    }

    #[test]
    fn state_saved_and_restored_resumes_where_it_was() {
        let f = facts();
        let mut c = chain();
        c.run(reading("plant/a/x", r#"{"t": 10}"#, 1_000), &f);
        c.run(reading("plant/a/x", r#"{"t": 11}"#, 2_000), &f);
        let rows = c.take_changes("telemetry");
        assert_eq!(rows.len(), 2, "deadband and window, one topic: {rows:?}");
        assert!(c.take_changes("telemetry").is_empty(), "taken");
        let mut again = chain();
        for r in &rows {
            assert_eq!(again.fingerprint(r.step), Some(r.fingerprint.as_str()));
            again.restore(r.step, r.key.clone(), r.state.as_deref().expect("state"));
        }
        let out = again.run(reading("plant/a/x", r#"{"t": 11.2}"#, 3_000), &f);
        assert_eq!(
            out.filtered,
            Some(Reason::Deadband),
            "the last value sent came back"
        );
        let out = again.tick(62_000, &f);
        assert_eq!(json(&out.made[0])["count"], 2, "the open window came back");
        let rows = again.take_changes("telemetry");
        assert!(
            rows.iter().any(|r| r.step == 3 && r.state.is_none()),
            "an ended window's row is deleted: {rows:?}"
        );
    }

    #[test]
    fn late_readings_fold_into_the_open_window_and_a_saved_window_under_another_config_is_sent() {
        let f = facts();
        let mut c = Chain::new(vec![Step {
            spec: Spec::Window(Window {
                every: Duration::from_secs(10),
                fields: vec![path("t")],
                keep_raw: false,
            }),
            on_error: OnError::Pass,
        }]);
        c.run(reading("x", r#"{"t": 1}"#, 12_000), &f);
        // From the interval before (late, or the clock stepped back): no early end.
        let out = c.run(reading("x", r#"{"t": 5}"#, 9_000), &f);
        assert!(out.made.is_empty());
        let rows = c.take_changes("s");
        let state = rows[0].state.as_deref().expect("open");
        let made = Chain::orphan_window("x", state).expect("its record");
        let w = json(&made);
        assert_eq!(
            (w["count"].clone(), w["t"]["max"].clone()),
            (Value::from(2), Value::from(5.0))
        );
        assert_eq!(w["window_start_ms"], 10_000);
        assert!(Chain::orphan_window("x", r#"{"value": 1.0, "at_ms": 3}"#).is_none());
        // A sum past f64: the reading is not folded, the window keeps what it had.
        let out = c.run(reading("x", r#"{"t": 1e308}"#, 13_000), &f);
        assert!(out.unparsable.is_empty());
        let out = c.run(reading("x", r#"{"t": 1e308}"#, 13_000), &f);
        assert_eq!(out.unparsable, vec![("window", OnError::Pass)]);
        let out = c.close_all(&f);
        assert_eq!(json(&out.made[0])["count"], 3);
    }

    #[test]
    fn a_full_deadband_forgets_the_topic_sent_longest_ago_and_long_topics_pass() {
        let f = facts();
        let mut c = Chain::new(vec![Step {
            spec: Spec::Deadband(Deadband {
                field: path("t"),
                absolute: Some(1.0),
                relative: None,
                heartbeat: None,
            }),
            on_error: OnError::Pass,
        }]);
        for i in 0..MAX_KEYS as i64 {
            c.run(reading(&format!("t/{i}"), r#"{"t": 1}"#, i), &f);
        }
        let out = c.run(reading("t/new", r#"{"t": 1}"#, 1_000_000), &f);
        assert_eq!((out.kept.is_some(), out.state_full.len()), (true, 1));
        // t/0 was forgotten: its next reading is sent; t/1 is still held.
        assert!(
            c.run(reading("t/0", r#"{"t": 1}"#, 1_000_001), &f)
                .kept
                .is_some()
        );
        assert_eq!(
            c.run(reading("t/2", r#"{"t": 1}"#, 1_000_002), &f).filtered,
            Some(Reason::Deadband)
        );
        let long = "x".repeat(MAX_KEY_BYTES + 1);
        let out = c.run(reading(&long, r#"{"t": 1}"#, 5), &f);
        assert_eq!(
            (out.kept.is_some(), out.state_full.clone()),
            (true, vec!["deadband"])
        );
    }

    #[test]
    fn a_window_without_raw_folds_readings_and_unreadable_ones_follow_on_error() {
        let f = facts();
        let window = |on_error| Step {
            spec: Spec::Window(Window {
                every: Duration::from_secs(10),
                fields: vec![path("a.b")],
                keep_raw: false,
            }),
            on_error,
        };
        let mut c = Chain::new(vec![window(OnError::Pass)]);
        let out = c.run(reading("x", r#"{"a": {"b": 1}}"#, 0), &f);
        assert_eq!(out.filtered, Some(Reason::Window));
        let out = c.run(reading("x", r#"{"a": {"b": "high"}}"#, 1), &f);
        assert!(out.kept.is_some(), "passed on untouched");
        assert_eq!(out.unparsable, vec![("window", OnError::Pass)]);
        let mut c = Chain::new(vec![window(OnError::Drop)]);
        let out = c.run(reading("x", "\u{1}garbage", 1), &f);
        assert_eq!(out.filtered, Some(Reason::Unparsable));
    }

    #[test]
    fn conditions() {
        let o = object(br#"{"t": 21.5, "s": "ok", "n": {"v": 3}, "z": null}"#).expect("object");
        let c = |field: &str, op: Op| {
            Condition {
                field: path(field),
                op,
            }
            .holds(&o)
        };
        for (got, want, what) in [
            (c("t", Op::Gt(Value::from(21))), true, "t > 21"),
            (c("t", Op::Le(Value::from(21.5))), true, "t <= 21.5"),
            (c("t", Op::Lt(Value::from(21.5))), false, "t < 21.5"),
            (c("t", Op::Eq(Value::from(21.5))), true, "t == 21.5"),
            (c("n.v", Op::Eq(Value::from(3.0))), true, "3 == 3.0"),
            (c("s", Op::Ne(Value::from("bad"))), true, "s != bad"),
            (c("s", Op::Gt(Value::from(1))), false, "string > number"),
            (c("s", Op::Ge(Value::from("ok"))), true, "s >= ok"),
            (c("missing", Op::Ne(Value::from(1))), false, "missing != 1"),
            (c("z", Op::Exists), true, "null exists"),
            (c("missing", Op::Exists), false, "missing exists"),
            (
                c("s", Op::In(vec![Value::from("warn"), Value::from("ok")])),
                true,
                "s in [warn, ok]",
            ),
        ] {
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn topic_patterns() {
        let p = TopicPattern::new("plant/{site}/+/{sensor}").expect("pattern");
        assert_eq!(
            p.captures("plant/b/telemetry/t1"),
            Some(vec![
                ("site".into(), "b".into()),
                ("sensor".into(), "t1".into())
            ])
        );
        assert_eq!(p.captures("plant/b/telemetry"), None);
        assert_eq!(p.captures("plant/b/telemetry/t1/x"), None);
        assert_eq!(p.captures("other/b/telemetry/t1"), None);
        let rest = TopicPattern::new("{site}/#").expect("pattern");
        assert_eq!(
            rest.captures("s1/a/b"),
            Some(vec![("site".into(), "s1".into())])
        );
        for bad in ["plant/#/x", "plant/+", "plant/{a b}", "a/x{y}"] {
            assert!(TopicPattern::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deadband_thresholds() {
        let last = DeadbandState {
            value: 100.0,
            at_ms: 0,
        };
        let d = |absolute, relative, heartbeat: Option<u64>| Deadband {
            field: path("v"),
            absolute,
            relative,
            heartbeat: heartbeat.map(Duration::from_millis),
        };
        for (band, value, at, want) in [
            (d(Some(1.0), None, None), 100.9, 5, false),
            (d(Some(1.0), None, None), 101.0, 5, true),
            (d(Some(1.0), None, None), 99.0, 5, true),
            (d(None, Some(0.05), None), 104.0, 5, false),
            (d(None, Some(0.05), None), 95.0, 5, true),
            (d(None, None, Some(1000)), 100.0, 999, false),
            (d(None, None, Some(1000)), 100.0, 1000, true),
        ] {
            assert_eq!(
                band.moved(&last, value, at),
                want,
                "{band:?} {value} at {at}"
            );
        }
    }

    proptest::proptest! {
        /// Whatever the payloads and times, a chain never panics, and each reading is kept or
        /// has a reason, never both.
        #[test]
        fn any_input_is_kept_or_counted(
            inputs in proptest::collection::vec(
                (proptest::collection::vec(proptest::num::u8::ANY, 0..40), 0i64..500_000, 0usize..3),
                1..60,
            ),
        ) {
            let mut c = chain();
            let f = facts();
            for (bytes, at, topic) in inputs {
                let mut payload = bytes.clone();
                if topic == 0 {
                    payload = format!(r#"{{"t": {}}}"#, at % 97).into_bytes();
                }
                let out = c.run(
                    Reading {
                        topic: format!("plant/s{topic}/x"),
                        payload: payload.into(),
                        received_at_ms: at,
                        attributes: Attributes::new(),
                    },
                    &f,
                );
                proptest::prop_assert!(out.kept.is_some() != out.filtered.is_some());
                let _ = c.tick(at, &f);
            }
        }
    }
}
