//! The ingest's answers to a batch, one table for both sides (`SPEC.md`, "Responses"): the
//! ingest answers each outcome with [`Answer::status`], and a client reads a status back with
//! [`Answer::from_status`] and does what [`Answer::action`] says. Pure.

/// An answer of the ingest to `POST /v1/batches`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 200: every record is in the log (appended now, or already there).
    Accepted,
    /// 400 (422 read back the same): not a valid batch.
    Invalid,
    /// 401: unknown device or wrong token.
    Unauthorized,
    /// 403: the batch names another device than the credentials'.
    Forbidden,
    /// 408: the body did not arrive in time.
    BodyTimeout,
    /// 413: too large, as sent or decompressed, or too many records.
    TooLarge,
    /// 428: the body's zstd frame names a dictionary this replica does not have.
    NeedsDictionary,
    /// 429: the device is over its rate.
    RateLimited,
    /// 503 (any 5xx read back the same): the log cannot take it now, or the replica is busy.
    Unavailable,
    /// Read back only: 404, 405 or 415, what a server that is no ingest (or a wrong URL)
    /// answers. The ingest never sends it to a batch.
    NotAnIngest,
    /// Read back only: any other status.
    Unexpected,
}

/// What a client does with a batch after an [`Answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Delete it: the log has it.
    Delete,
    /// Keep it aside as a dead letter and go on: resending it as it is cannot succeed.
    DeadLetter,
    /// Send it again in smaller batches (a lone record too large is a dead letter).
    Split,
    /// Keep it, raise the alarm (credentials or configuration), retry with backoff.
    Alarm,
    /// Register the dictionary, then send it again.
    RegisterDictionary,
    /// Keep it and send it again later (after `Retry-After` when given).
    Retry,
}

impl Answer {
    /// Every answer the ingest sends, with the one status it sends it with.
    pub const SENT: [Answer; 9] = [
        Answer::Accepted,
        Answer::Invalid,
        Answer::Unauthorized,
        Answer::Forbidden,
        Answer::BodyTimeout,
        Answer::TooLarge,
        Answer::NeedsDictionary,
        Answer::RateLimited,
        Answer::Unavailable,
    ];

    /// The HTTP status the ingest answers with.
    pub const fn status(self) -> u16 {
        match self {
            Answer::Accepted => 200,
            Answer::Invalid => 400,
            Answer::Unauthorized => 401,
            Answer::Forbidden => 403,
            Answer::BodyTimeout => 408,
            Answer::TooLarge => 413,
            Answer::NeedsDictionary => 428,
            Answer::RateLimited => 429,
            Answer::Unavailable => 503,
            Answer::NotAnIngest => 404,
            Answer::Unexpected => 500,
        }
    }

    /// A status read back.
    pub const fn from_status(status: u16) -> Answer {
        match status {
            200..=299 => Answer::Accepted,
            400 | 422 => Answer::Invalid,
            401 => Answer::Unauthorized,
            403 => Answer::Forbidden,
            404 | 405 | 415 => Answer::NotAnIngest,
            408 => Answer::BodyTimeout,
            413 => Answer::TooLarge,
            428 => Answer::NeedsDictionary,
            429 => Answer::RateLimited,
            500..=599 => Answer::Unavailable,
            _ => Answer::Unexpected,
        }
    }

    /// What the client does.
    pub const fn action(self) -> Action {
        match self {
            Answer::Accepted => Action::Delete,
            Answer::Invalid => Action::DeadLetter,
            Answer::TooLarge => Action::Split,
            Answer::NeedsDictionary => Action::RegisterDictionary,
            Answer::BodyTimeout | Answer::RateLimited | Answer::Unavailable => Action::Retry,
            // Anything unexpected keeps the data and raises the alarm rather than drop it.
            Answer::Unauthorized | Answer::Forbidden | Answer::NotAnIngest | Answer::Unexpected => {
                Action::Alarm
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the ingest sends is read back as itself: the two sides cannot drift apart.
    #[test]
    fn every_answer_sent_reads_back_as_itself() {
        for answer in Answer::SENT {
            assert_eq!(Answer::from_status(answer.status()), answer, "{answer:?}");
        }
    }

    /// The table of `SPEC.md`, "Responses".
    #[test]
    fn actions() {
        for (status, action) in [
            (200, Action::Delete),
            (204, Action::Delete),
            (400, Action::DeadLetter),
            (422, Action::DeadLetter),
            (401, Action::Alarm),
            (403, Action::Alarm),
            (404, Action::Alarm),
            (405, Action::Alarm),
            (415, Action::Alarm),
            (408, Action::Retry),
            (413, Action::Split),
            (428, Action::RegisterDictionary),
            (429, Action::Retry),
            (500, Action::Retry),
            (503, Action::Retry),
            (302, Action::Alarm),
            (100, Action::Alarm),
        ] {
            assert_eq!(Answer::from_status(status).action(), action, "{status}");
        }
    }
}
