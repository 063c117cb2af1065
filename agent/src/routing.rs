//! Topic → stream routing and priority classes. Pure functions, table-tested.
//!
//! Invariant: every topic routes to exactly one stream. Streams are tried in config order and
//! the first matching filter wins; a topic no filter matches goes to the default stream, so
//! nothing is dropped for lack of a route.

use serde::Deserialize;

/// Priority class of a stream, highest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Lowest: evicted first, sent last.
    Bulk,
    /// Ordinary telemetry.
    Normal,
    /// Ahead of normal.
    High,
    /// Always next; evicted last.
    Critical,
}

impl Priority {
    /// The name used in config and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Bulk => "bulk",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }
}

/// A valid MQTT topic filter (`+` and `#` wildcards).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter(String);

impl TopicFilter {
    /// The filter, if `filter` is a valid MQTT topic filter.
    pub fn new(filter: &str) -> Option<TopicFilter> {
        rumqttd::protocol::valid_filter(filter).then(|| TopicFilter(filter.to_owned()))
    }

    /// Whether `topic` matches this filter (MQTT rules: `$` topics match no wildcard).
    pub fn matches(&self, topic: &str) -> bool {
        rumqttd::protocol::matches(topic, &self.0)
    }

    /// The filter text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Routes a topic to the index of its stream.
#[derive(Debug, Clone)]
pub struct Router {
    filters: Vec<(TopicFilter, usize)>,
    default_stream: usize,
}

impl Router {
    /// A router over `streams` (filters per stream, in config order) with a default stream.
    pub fn new<'a>(
        streams: impl IntoIterator<Item = &'a [TopicFilter]>,
        default_stream: usize,
    ) -> Router {
        let filters = streams
            .into_iter()
            .enumerate()
            .flat_map(|(i, filters)| filters.iter().map(move |f| (f.clone(), i)))
            .collect();
        Router {
            filters,
            default_stream,
        }
    }

    /// The stream index for `topic`.
    pub fn route(&self, topic: &str) -> usize {
        self.filters
            .iter()
            .find(|(f, _)| f.matches(topic))
            .map_or(self.default_stream, |&(_, i)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(list: &[&str]) -> Vec<TopicFilter> {
        list.iter()
            .map(|f| TopicFilter::new(f).expect("valid"))
            .collect()
    }

    #[test]
    fn routes_first_match_else_default() {
        let streams = [
            filters(&["plant/+/alarm/#"]),
            filters(&["plant/#", "legacy/temp"]),
            vec![],
        ];
        let router = Router::new(streams.iter().map(Vec::as_slice), 2);
        for (topic, want) in [
            ("plant/1/alarm/fire", 0),
            ("plant/1/alarm", 0),
            ("plant/1/telemetry/temp", 1),
            ("plant", 1),
            ("legacy/temp", 1),
            ("legacy/temp/x", 2),
            ("other", 2),
            ("$SYS/x", 2),
        ] {
            assert_eq!(router.route(topic), want, "{topic}");
        }
    }

    #[test]
    fn filter_validation() {
        for (f, ok) in [
            ("a/+/b", true),
            ("#", true),
            ("a/#/b", false),
            ("a+", false),
            ("", false),
        ] {
            assert_eq!(TopicFilter::new(f).is_some(), ok, "{f}");
        }
    }

    #[test]
    fn priority_order() {
        let mut p = vec![
            Priority::Normal,
            Priority::Critical,
            Priority::Bulk,
            Priority::High,
        ];
        p.sort();
        assert_eq!(
            p,
            vec![
                Priority::Bulk,
                Priority::Normal,
                Priority::High,
                Priority::Critical
            ]
        );
    }
}
