//! The `streams[].transforms` steps ([`crate::transform`]), checked.

use std::time::Duration;

use super::raw::{RawCondition, RawTransform};
use super::{Invalid, topic_filters};
use crate::transform::{
    Condition, Deadband, Enrich, FieldPath, Filter, Op, Spec, Step, TopicPattern, Window,
};

/// One transform step, checked; `key` is its path (`streams[i].transforms[j]`).
pub(super) fn validate(key: &str, raw: RawTransform) -> Result<Step, Invalid> {
    let path = |kind: &str, field: &str, text: &str| {
        FieldPath::new(text).ok_or_else(|| {
            (
                format!("{key}.{kind}.{field}"),
                format!("{text:?} is not a field path (names separated by dots, e.g. sensor.temperature)"),
            )
        })
    };
    Ok(match (raw.enrich, raw.filter, raw.deadband, raw.window) {
        (Some(e), None, None, None) => {
            let mut facts = (false, false);
            for (k, fact) in e.facts.iter().enumerate() {
                match fact.as_str() {
                    "device_id" => facts.0 = true,
                    "hostname" => facts.1 = true,
                    other => {
                        return Err((
                            format!("{key}.enrich.facts[{k}]"),
                            format!("unknown fact {other:?} (expected device_id or hostname)"),
                        ));
                    }
                }
            }
            let topic = e
                .topic
                .as_deref()
                .map(|t| TopicPattern::new(t).map_err(|why| (format!("{key}.enrich.topic"), why)))
                .transpose()?;
            if e.fields.is_empty() && e.facts.is_empty() && topic.is_none() {
                return Err((
                    format!("{key}.enrich"),
                    "adds nothing: give fields, facts or a topic pattern".into(),
                ));
            }
            // The names become headers when the payload is not a JSON object.
            let named = e
                .fields
                .keys()
                .map(|k| (format!("{key}.enrich.fields.{k}"), k.as_str()))
                .chain(
                    topic
                        .iter()
                        .flat_map(TopicPattern::names)
                        .map(|n| (format!("{key}.enrich.topic"), n)),
                );
            for (at, name) in named {
                if let Some(problem) = ingest_wire::attribute_name_problem(name) {
                    return Err((
                        at,
                        format!(
                            "{problem}; enrich names become headers when a payload is not a JSON object"
                        ),
                    ));
                }
            }
            for (k, v) in &e.fields {
                let bytes = crate::transform::attribute_value(v).len();
                if bytes > ingest_wire::MAX_ATTRIBUTE_VALUE_BYTES {
                    return Err((
                        format!("{key}.enrich.fields.{k}"),
                        format!(
                            "is {bytes} bytes; at most {} (it becomes a header when a payload is not a JSON object)",
                            ingest_wire::MAX_ATTRIBUTE_VALUE_BYTES
                        ),
                    ));
                }
            }
            Step {
                spec: Spec::Enrich(Enrich {
                    fields: e.fields,
                    device_id: facts.0,
                    hostname: facts.1,
                    topic,
                }),
                on_error: e.on_error,
            }
        }
        (None, Some(f), None, None) => {
            let keep = match f.action.as_str() {
                "keep" => true,
                "drop" => false,
                other => {
                    return Err((
                        format!("{key}.filter.action"),
                        format!("{other:?} (expected keep or drop)"),
                    ));
                }
            };
            let topics = topic_filters(&format!("{key}.filter.topics"), &f.topics)?;
            let conditions = f
                .conditions
                .into_iter()
                .enumerate()
                .map(|(k, c)| condition(&format!("{key}.filter.where[{k}]"), c))
                .collect::<Result<Vec<_>, _>>()?;
            if topics.is_empty() && conditions.is_empty() {
                return Err((
                    format!("{key}.filter"),
                    "selects nothing: give topics, where, or both".into(),
                ));
            }
            Step {
                spec: Spec::Filter(Filter {
                    keep,
                    topics,
                    conditions,
                }),
                on_error: f.on_error,
            }
        }
        (None, None, Some(d), None) => {
            let field = path("deadband", "field", &d.field)?;
            for (name, v) in [("absolute", d.absolute), ("relative", d.relative)] {
                if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                    return Err((
                        format!("{key}.deadband.{name}"),
                        "must be a number above 0".into(),
                    ));
                }
            }
            if d.absolute.is_none() && d.relative.is_none() {
                return Err((
                    format!("{key}.deadband"),
                    "needs a threshold: absolute, relative, or both".into(),
                ));
            }
            let heartbeat = d.heartbeat.map(|h| h.0);
            if heartbeat.is_some_and(|h| h.is_zero()) {
                return Err((
                    format!("{key}.deadband.heartbeat"),
                    "must be above 0 (leave it out for no heartbeat)".into(),
                ));
            }
            Step {
                spec: Spec::Deadband(Deadband {
                    field,
                    absolute: d.absolute,
                    relative: d.relative,
                    heartbeat,
                }),
                on_error: d.on_error,
            }
        }
        (None, None, None, Some(w)) => {
            let every = w.every.0;
            if every < Duration::from_secs(1) || every > Duration::from_secs(7 * 86_400) {
                return Err((
                    format!("{key}.window.every"),
                    "must be at least 1s and at most 7d".into(),
                ));
            }
            let fields = w
                .fields
                .iter()
                .enumerate()
                .map(|(k, f)| {
                    if ["count", "window_start_ms", "window_end_ms"].contains(&f.as_str()) {
                        return Err((
                            format!("{key}.window.fields[{k}]"),
                            format!("{f:?} is a name the window's record uses itself"),
                        ));
                    }
                    path("window", &format!("fields[{k}]"), f)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Step {
                spec: Spec::Window(Window {
                    every,
                    fields,
                    keep_raw: w.keep_raw,
                }),
                on_error: w.on_error,
            }
        }
        _ => {
            return Err((
                key.to_owned(),
                "a step is one of enrich, filter, deadband or window (one key per list item)"
                    .into(),
            ));
        }
    })
}

/// One `filter.where` condition, checked.
fn condition(key: &str, raw: RawCondition) -> Result<Condition, Invalid> {
    use serde_json::Value;
    let field = FieldPath::new(&raw.field).ok_or_else(|| {
        (
            format!("{key}.field"),
            format!(
                "{:?} is not a field path (names separated by dots)",
                raw.field
            ),
        )
    })?;
    let value = |v: Option<Value>| {
        v.ok_or_else(|| {
            (
                format!("{key}.value"),
                format!("{:?} needs a value", raw.op),
            )
        })
    };
    let ordered = |v: Option<Value>| match value(v)? {
        v @ (Value::Number(_) | Value::String(_)) => Ok(v),
        _ => Err((
            format!("{key}.value"),
            format!("{:?} compares numbers or strings", raw.op),
        )),
    };
    let op = match raw.op.as_str() {
        "==" => Op::Eq(value(raw.value)?),
        "!=" => Op::Ne(value(raw.value)?),
        "<" => Op::Lt(ordered(raw.value)?),
        "<=" => Op::Le(ordered(raw.value)?),
        ">" => Op::Gt(ordered(raw.value)?),
        ">=" => Op::Ge(ordered(raw.value)?),
        "exists" if raw.value.is_none() => Op::Exists,
        "exists" => {
            return Err((format!("{key}.value"), "exists takes no value".into()));
        }
        "in" => match value(raw.value)? {
            Value::Array(list) if !list.is_empty() => Op::In(list),
            _ => {
                return Err((
                    format!("{key}.value"),
                    "in takes a non-empty list, e.g. [ok, warn]".into(),
                ));
            }
        },
        other => {
            return Err((
                format!("{key}.op"),
                format!("unknown operator {other:?} (expected ==, !=, <, <=, >, >=, exists or in)"),
            ));
        }
    };
    Ok(Condition { field, op })
}
