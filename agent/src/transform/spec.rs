//! What each step is, as configured and checked ([`crate::config`] builds them): the four
//! kinds, their conditions, field paths and topic patterns, and the pure decisions that need
//! no state (a condition holds, a deadband moved).

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::routing::TopicFilter;

/// One step of a stream's chain, as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// What it does.
    pub spec: Spec,
    /// What happens to a payload it cannot read.
    pub on_error: OnError,
}

/// A payload a step cannot read is…
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// …passed on to the next step untouched (the default: nothing is lost for a format).
    #[default]
    Pass,
    /// …dropped, and counted as filtered (`unparsable`).
    Drop,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// Adds fields to a JSON object payload.
    Enrich(Enrich),
    /// Keeps or drops records by topic and by predicates on JSON fields.
    Filter(Filter),
    /// Drops a reading whose field changed by less than a threshold since the last one sent.
    Deadband(Deadband),
    /// Folds readings into one record per topic and interval.
    Window(Window),
}

impl Spec {
    /// The step's name in config and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Spec::Enrich(_) => "enrich",
            Spec::Filter(_) => "filter",
            Spec::Deadband(_) => "deadband",
            Spec::Window(_) => "window",
        }
    }
}

/// `enrich`: static fields, agent facts, and the topic's named segments.
#[derive(Debug, Clone, PartialEq)]
pub struct Enrich {
    /// Added as they are (an existing field of the same name is replaced).
    pub fields: Map<String, Value>,
    /// Add `device_id`.
    pub device_id: bool,
    /// Add `hostname`.
    pub hostname: bool,
    /// A topic pattern whose `{name}` segments become fields, e.g. `plant/{site}/#`.
    pub topic: Option<TopicPattern>,
}

impl Enrich {
    /// Every name it adds: as fields to a JSON object, as attributes to anything else.
    pub fn names(&self) -> std::collections::BTreeSet<&str> {
        let mut names: std::collections::BTreeSet<&str> =
            self.fields.keys().map(String::as_str).collect();
        names.extend(self.topic.iter().flat_map(TopicPattern::names));
        names.extend(self.device_id.then_some("device_id"));
        names.extend(self.hostname.then_some("hostname"));
        names
    }
}

/// `filter`: a record matches when its topic matches one of `topics` (any topic if none) and
/// every condition holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// Keep the records that match (drop the rest), or drop them.
    pub keep: bool,
    /// Topic filters.
    pub topics: Vec<TopicFilter>,
    /// Predicates on JSON fields.
    pub conditions: Vec<Condition>,
}

/// A predicate on one JSON field. A comparison with a missing field, or between a number and a
/// string, is false.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// The field: dot-separated names into nested objects.
    pub field: FieldPath,
    /// The test.
    pub op: Op,
}

/// A test on a field's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Equal (numbers by value).
    Eq(Value),
    /// Not equal.
    Ne(Value),
    /// Less than (numbers or strings).
    Lt(Value),
    /// Less than or equal.
    Le(Value),
    /// Greater than.
    Gt(Value),
    /// Greater than or equal.
    Ge(Value),
    /// Present (any value, null included).
    Exists,
    /// Equal to one of these.
    In(Vec<Value>),
}

/// `deadband`: per topic, a reading of `field` is sent when it moved by at least `absolute`, or
/// by at least `relative` of the last value sent, or when `heartbeat` passed since the last
/// one sent; the first reading of a topic is always sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Deadband {
    /// The numeric field.
    pub field: FieldPath,
    /// Smallest change sent, in the field's unit.
    pub absolute: Option<f64>,
    /// Smallest change sent, as a fraction of the last value sent.
    pub relative: Option<f64>,
    /// Longest silence: a reading is sent after it whatever its value.
    pub heartbeat: Option<Duration>,
}

/// `window`: per topic, tumbling intervals of `every` (aligned to the Unix epoch, by receive
/// time); when one ends, a record with its count and the min, max, mean and last of `fields`.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// The interval.
    pub every: Duration,
    /// Numeric fields to summarise.
    pub fields: Vec<FieldPath>,
    /// Also send every reading as it is (else a reading folded in is counted as filtered).
    pub keep_raw: bool,
}

/// A dot-separated path into nested JSON objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    /// The path, if `text` is one: non-empty names separated by dots.
    pub fn new(text: &str) -> Option<FieldPath> {
        let parts: Vec<String> = text.split('.').map(str::to_owned).collect();
        (!text.is_empty() && parts.iter().all(|p| !p.is_empty())).then_some(FieldPath(parts))
    }

    pub(super) fn get<'a>(&self, object: &'a Map<String, Value>) -> Option<&'a Value> {
        let (last, parents) = self.0.split_last()?;
        let mut at = object;
        for name in parents {
            at = at.get(name)?.as_object()?;
        }
        at.get(last)
    }

    pub(super) fn number(&self, object: &Map<String, Value>) -> Option<f64> {
        self.get(object)?.as_f64().filter(|v| v.is_finite())
    }

    /// The path as written.
    pub fn text(&self) -> String {
        self.0.join(".")
    }
}

/// A topic pattern for `enrich.topic`: segments are literal, `+` (any one), `{name}` (any one,
/// captured as field `name`), or a last `#` (the rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Literal(String),
    Any,
    Capture(String),
    Rest,
}

impl TopicPattern {
    /// The pattern, or why `text` is not one.
    pub fn new(text: &str) -> Result<TopicPattern, String> {
        let parts: Vec<&str> = text.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "#" if i + 1 == parts.len() => Segment::Rest,
                "#" => return Err("`#` may only be the last segment".into()),
                "+" => Segment::Any,
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => {
                    let name = &p[1..p.len() - 1];
                    if !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        return Err(format!("{p:?}: a field name is [A-Za-z0-9_-]"));
                    }
                    Segment::Capture(name.to_owned())
                }
                p if p.contains(['+', '#', '{', '}']) => {
                    return Err(format!(
                        "{p:?}: a segment is a name, `+`, `{{name}}` or `#`"
                    ));
                }
                p => Segment::Literal(p.to_owned()),
            });
        }
        if !segments.iter().any(|s| matches!(s, Segment::Capture(_))) {
            return Err("captures nothing: name a segment, e.g. plant/{site}/#".into());
        }
        Ok(TopicPattern(segments))
    }

    /// The names it captures, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|s| match s {
            Segment::Capture(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The captured segments of `topic`, if it matches.
    pub(super) fn captures(&self, topic: &str) -> Option<Vec<(String, String)>> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = Vec::new();
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Rest => return Some(out),
                _ if i >= levels.len() => return None,
                Segment::Literal(l) if l != levels[i] => return None,
                Segment::Literal(_) | Segment::Any => {}
                Segment::Capture(name) => out.push((name.clone(), levels[i].to_owned())),
            }
        }
        (levels.len() == self.0.len()).then_some(out)
    }
}

/// A configured field's value as an attribute: a string as it is, anything else as its JSON
/// text (`3`, `true`, `{"a":1}`).
pub fn attribute_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Condition {
    pub(super) fn holds(&self, o: &Map<String, Value>) -> bool {
        let value = self.field.get(o);
        let order = |want: &Value| -> Option<std::cmp::Ordering> {
            match (value?, want) {
                (Value::Number(a), Value::Number(b)) => a.as_f64()?.partial_cmp(&b.as_f64()?),
                (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
                _ => None,
            }
        };
        let equal = |want: &Value| match (value, want) {
            (Some(Value::Number(a)), Value::Number(b)) => a.as_f64() == b.as_f64(),
            (Some(v), w) => v == w,
            (None, _) => false,
        };
        use std::cmp::Ordering::{Equal, Greater, Less};
        match &self.op {
            Op::Eq(v) => equal(v),
            Op::Ne(v) => value.is_some() && !equal(v),
            Op::Lt(v) => order(v) == Some(Less),
            Op::Le(v) => matches!(order(v), Some(Less | Equal)),
            Op::Gt(v) => order(v) == Some(Greater),
            Op::Ge(v) => matches!(order(v), Some(Greater | Equal)),
            Op::Exists => value.is_some(),
            Op::In(list) => list.iter().any(equal),
        }
    }
}
