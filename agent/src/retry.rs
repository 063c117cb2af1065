//! What to do with a batch after the ingest answered (or did not), and how long to wait: the
//! contract's table ([`ingest_wire::Answer`], which the ingest answers from), plus the wait a
//! `Retry-After` asks for. Pure.

use std::time::Duration;

use ingest_wire::{Action, Answer};

/// What the forwarder does with the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: delete it from the buffer.
    Delivered,
    /// 400 and other contract violations: move it to the dead-letter table and go on.
    Reject,
    /// 413: too large for the ingest; resend in smaller batches (a lone record is rejected).
    TooLarge,
    /// 401/403, or an endpoint that does not exist (404/405/415: misconfiguration): keep the
    /// data, raise the alarm, retry with backoff until an operator fixes it.
    Alarm,
    /// 428: the batch uses a zstd dictionary this ingest replica does not have: register it
    /// and resend at once.
    NeedsDictionary,
    /// 408/429/5xx or no answer: keep the data and retry, after Retry-After when given.
    Retry {
        /// The ingest's Retry-After, if any.
        after: Option<Duration>,
    },
}

/// Classifies an HTTP status (with its Retry-After header value, if any).
pub fn classify(status: u16, retry_after: Option<&str>) -> Outcome {
    match Answer::from_status(status).action() {
        Action::Delete => Outcome::Delivered,
        Action::DeadLetter => Outcome::Reject,
        Action::Split => Outcome::TooLarge,
        Action::Alarm => Outcome::Alarm,
        Action::RegisterDictionary => Outcome::NeedsDictionary,
        Action::Retry => Outcome::Retry {
            after: retry_after
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let retry = |s| Outcome::Retry {
            after: Some(Duration::from_secs(s)),
        };
        for (status, after, want) in [
            (200, None, Outcome::Delivered),
            (204, None, Outcome::Delivered),
            (400, None, Outcome::Reject),
            (413, None, Outcome::TooLarge),
            (428, None, Outcome::NeedsDictionary),
            (401, None, Outcome::Alarm),
            (403, None, Outcome::Alarm),
            (404, None, Outcome::Alarm),
            (429, Some("3"), retry(3)),
            (503, Some(" 1 "), retry(1)),
            (503, Some("soon"), Outcome::Retry { after: None }),
            (500, None, Outcome::Retry { after: None }),
            (408, None, Outcome::Retry { after: None }),
            (302, None, Outcome::Alarm),
        ] {
            assert_eq!(classify(status, after), want, "{status} {after:?}");
        }
    }
}
