//! From (tenant, stream) to a log topic or subject, one-to-one by construction.
//!
//! Invariant: two different (tenant, stream) pairs never map to the same topic, nor to topics
//! Kafka takes for the same one (it treats `.` and `_` alike), nor to NATS subjects one
//! tenant's wildcard (`iot.acme.>`) could cover for another. The template is
//! `<prefix>{tenant}<separator>{stream}<suffix>` (the separator not empty; `{tenant}` first,
//! since a first name may not contain `_` and the reserved stream `_losses` does; the literal
//! text of `[A-Za-z0-9._-]`, Kafka's topic characters); then:
//! - the first name may not contain `.`, `_` or any character of the separator: it ends where
//!   the separator begins, even once Kafka folds `.` into `_`;
//! - the second name may not contain `.` (it stays one NATS token, and Kafka's folding leaves it
//!   unchanged);
//! - the topic is at most [`MAX_TOPIC_CHARS`] characters (Kafka's limit).
//!
//! A tenant that breaks these is refused when the config loads; a stream, with 400 naming it.

/// Longest topic Kafka accepts.
pub const MAX_TOPIC_CHARS: usize = 249;

/// A parsed `topic_template`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    prefix: String,
    separator: String,
    suffix: String,
}

impl Naming {
    /// Parses `template`; the error says what it must look like.
    pub fn parse(template: &str) -> Result<Naming, String> {
        let shape = "must be <prefix>{tenant}<separator>{stream}<suffix>, each once, with a separator between them and only [A-Za-z0-9._-] around them, like \"iot.{tenant}.{stream}\"";
        let (t, s) = match (template.find("{tenant}"), template.find("{stream}")) {
            (Some(t), Some(s))
                if template.matches("{tenant}").count() == 1
                    && template.matches("{stream}").count() == 1 =>
            {
                (t, s)
            }
            _ => return Err(shape.into()),
        };
        if t > s {
            return Err(shape.into());
        }
        let (first_at, second_at) = (t, s);
        let separator = &template[first_at + 8..second_at];
        let literal = |text: &str| {
            text.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        if separator.is_empty()
            || !literal(separator)
            || !literal(&template[..first_at])
            || !literal(&template[second_at + 8..])
        {
            return Err(shape.into());
        }
        Ok(Naming {
            prefix: template[..first_at].to_owned(),
            separator: separator.to_owned(),
            suffix: template[second_at + 8..].to_owned(),
        })
    }

    /// Why `name` cannot be the first name, if it cannot.
    fn first_ok(&self, name: &str) -> Result<(), String> {
        match name
            .chars()
            .find(|c| *c == '.' || *c == '_' || self.separator.contains(*c))
        {
            Some(c) => Err(format!(
                "may not contain {c:?} (nor '.', '_' or any of {:?}): the log topic would be ambiguous",
                self.separator
            )),
            None => Ok(()),
        }
    }

    /// Why `name` cannot be the second name, if it cannot.
    fn second_ok(name: &str) -> Result<(), String> {
        if name.contains('.') {
            return Err("may not contain '.': the log topic would be ambiguous".into());
        }
        Ok(())
    }

    /// Whether `tenant` can name topics (checked when the config loads).
    pub fn check_tenant(&self, tenant: &str) -> Result<(), String> {
        self.first_ok(tenant)
    }

    /// The topic of `stream` for `tenant` (a tenant [`Naming::check_tenant`] accepted), or why
    /// the stream's name cannot be used.
    pub fn topic(&self, tenant: &str, stream: &str) -> Result<String, String> {
        self.first_ok(tenant)?;
        Self::second_ok(stream).map_err(|e| format!("stream {stream:?} {e}"))?;
        let topic = format!(
            "{}{tenant}{}{stream}{}",
            self.prefix, self.separator, self.suffix
        );
        if topic.chars().count() > MAX_TOPIC_CHARS {
            return Err(format!(
                "stream {stream:?} makes the topic longer than {MAX_TOPIC_CHARS} characters"
            ));
        }
        Ok(topic)
    }

    /// The tenant whose topic `topic` is, if it is one this template makes.
    pub fn tenant_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let inner = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_suffix(self.suffix.as_str())?;
        let (tenant, stream) = inner.split_once(self.separator.as_str())?;
        (!tenant.is_empty() && !stream.is_empty() && self.first_ok(tenant).is_ok())
            .then_some(tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How Kafka tells topics apart: `.` and `_` are the same.
    fn kafka_key(topic: &str) -> String {
        topic.replace('.', "_")
    }

    #[test]
    fn templates_parse_or_say_why_not() {
        assert!(Naming::parse("iot.{tenant}.{stream}").is_ok());
        assert!(Naming::parse("{tenant}-x-{stream}.log").is_ok());
        for bad in [
            "iot.{stream}",
            "{tenant}{stream}",
            "{tenant}.{stream}.{tenant}",
            "{stream}-{tenant}",
            "a/{tenant}.{stream}",
            "x",
        ] {
            assert!(Naming::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topics_name_their_tenant() {
        let n = Naming::parse("t-{tenant}-x-{stream}.log").expect("template");
        let topic = n.topic("acme", "alarms").expect("topic");
        assert_eq!(n.tenant_of(&topic), Some("acme"));
        for other in [
            "t-acme-x-.log",
            "acme-x-alarms.log",
            "t--x-a.log",
            "t-acme-alarms.log",
        ] {
            assert_eq!(n.tenant_of(other), None, "{other}");
        }
    }

    #[test]
    fn the_issues_collision_is_refused() {
        let n = Naming::parse("iot.{tenant}.{stream}").expect("template");
        assert!(n.check_tenant("acme.eu").is_err());
        assert!(n.check_tenant("acme_eu").is_err());
        assert!(n.topic("acme", "eu.telemetry").is_err());
        assert_eq!(
            n.topic("acme", "_losses").as_deref(),
            Ok("iot.acme._losses")
        );
        assert!(n.topic("acme", &"s".repeat(250)).is_err());
    }

    /// Property: over names drawn from the characters that matter (separators, `.`, `_`, `-`),
    /// every pair of different accepted (tenant, stream) pairs maps to different topics, and
    /// to topics Kafka tells apart, for several templates.
    #[test]
    fn accepted_names_map_one_to_one_even_for_kafka() {
        let alphabet = ['a', 'b', '.', '_', '-', '/'];
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for template in [
            "iot.{tenant}.{stream}",
            "{tenant}_{stream}",
            "{tenant}.{stream}",
            "t-{tenant}-x-{stream}.log",
        ] {
            let n = Naming::parse(template).expect("template");
            let mut seen: std::collections::HashMap<String, (String, String)> =
                std::collections::HashMap::new();
            for _ in 0..20_000 {
                let mut name = || -> String {
                    let len = 1 + next() as usize % 4;
                    (0..len)
                        .map(|_| alphabet[next() as usize % alphabet.len()])
                        .collect()
                };
                let (tenant, stream) = (name(), name());
                if n.check_tenant(&tenant).is_err() {
                    continue;
                }
                let Ok(topic) = n.topic(&tenant, &stream) else {
                    continue;
                };
                if let Some(other) =
                    seen.insert(kafka_key(&topic), (tenant.clone(), stream.clone()))
                {
                    assert_eq!(
                        other,
                        (tenant.clone(), stream.clone()),
                        "{template}: {other:?} and ({tenant:?}, {stream:?}) both make {topic:?}"
                    );
                }
            }
            assert!(seen.len() > 100, "{template}: enough accepted pairs");
        }
    }
}
