//! What the stateful steps remember per topic (a deadband's last value sent, an open window's
//! running figures), saved as JSON in the buffer's transaction, and the record a window makes
//! when it ends.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Deadband, FieldPath, Reading};
use crate::buffer::Attributes;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct DeadbandState {
    pub(super) value: f64,
    pub(super) at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct FieldStats {
    pub(super) name: String,
    pub(super) min: f64,
    pub(super) max: f64,
    pub(super) sum: f64,
    pub(super) last: f64,
}

/// An open window: all it takes to make its record, even under another config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct WindowState {
    pub(super) start_ms: i64,
    pub(super) every_ms: i64,
    pub(super) count: u64,
    pub(super) fields: Vec<FieldStats>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum KeyState {
    Deadband(DeadbandState),
    Window(WindowState),
}

impl WindowState {
    pub(super) fn empty(start_ms: i64, every_ms: i64, fields: &[FieldPath]) -> WindowState {
        WindowState {
            start_ms,
            every_ms,
            count: 0,
            fields: fields
                .iter()
                .map(|f| FieldStats {
                    name: f.text(),
                    min: f64::INFINITY,
                    max: f64::NEG_INFINITY,
                    sum: 0.0,
                    last: 0.0,
                })
                .collect(),
        }
    }

    /// With `values` (in field order) folded in; `None` if a sum would overflow.
    pub(super) fn add(&self, values: &[f64]) -> Option<WindowState> {
        let mut next = self.clone();
        for (s, &v) in next.fields.iter_mut().zip(values) {
            s.min = s.min.min(v);
            s.max = s.max.max(v);
            s.sum += v;
            s.last = v;
            if !s.sum.is_finite() {
                return None;
            }
        }
        next.count += 1;
        Some(next)
    }
}

/// The record a window of `topic` makes when it ends: received at its end.
pub(super) fn summary(topic: &str, state: &WindowState) -> Reading {
    let end = state.start_ms.saturating_add(state.every_ms);
    let mut o = Map::new();
    o.insert("window_start_ms".into(), Value::from(state.start_ms));
    o.insert("window_end_ms".into(), Value::from(end));
    o.insert("count".into(), Value::from(state.count));
    for s in &state.fields {
        let mut f = Map::new();
        f.insert("min".into(), Value::from(s.min));
        f.insert("max".into(), Value::from(s.max));
        f.insert(
            "mean".into(),
            Value::from(s.sum / state.count.max(1) as f64),
        );
        f.insert("last".into(), Value::from(s.last));
        o.insert(s.name.clone(), Value::Object(f));
    }
    Reading {
        topic: topic.to_owned(),
        payload: serde_json::to_vec(&Value::Object(o))
            .expect("invariant: a JSON value serialises")
            .into(),
        received_at_ms: end,
        attributes: Attributes::new(),
    }
}

impl Deadband {
    /// Whether `value` at `at_ms` is sent after `last`.
    pub(super) fn moved(&self, last: &DeadbandState, value: f64, at_ms: i64) -> bool {
        let change = (value - last.value).abs();
        let by_absolute = self.absolute.is_some_and(|a| change >= a);
        let by_relative = self
            .relative
            .is_some_and(|r| change >= r * last.value.abs() && change > 0.0);
        let by_heartbeat = self
            .heartbeat
            .is_some_and(|h| at_ms.saturating_sub(last.at_ms) >= h.as_millis() as i64);
        by_absolute || by_relative || by_heartbeat
    }
}
