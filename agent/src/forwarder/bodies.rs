//! Which body version each ingest replica gets (`SPEC.md`, "Body versions"): version 1 until
//! the replica lists version 2 in `Accept-Post` (it does on every answer), then version 2; and
//! version 1 again, for [`HOLD`], after a version 2 body is refused with 400, 415 or 422 by an
//! answer that does not list version 2: behind one URL a load balancer may reach an older
//! replica during a rolling upgrade, which refuses what it cannot read. The refused batch is
//! resent as version 1 at once, so no record is dead-lettered for its format. Pure.

use std::time::{Duration, Instant};

use ingest_wire::BodyVersion;

/// How long a replica that refused a version 2 body gets version 1, whatever it advertises.
pub(super) const HOLD: Duration = Duration::from_secs(600);

/// Per replica, the body version it gets.
#[derive(Debug)]
pub(super) struct Bodies {
    replicas: Vec<Choice>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Choice {
    /// It listed version 2 in its last answer.
    advertised: bool,
    /// It refused a version 2 body; version 1 until then.
    held_until: Option<Instant>,
}

impl Bodies {
    pub(super) fn new(replicas: usize) -> Bodies {
        Bodies {
            replicas: vec![Choice::default(); replicas.max(1)],
        }
    }

    /// The version a batch for `replica` is encoded in now.
    pub(super) fn version(&self, replica: usize, now: Instant) -> BodyVersion {
        match self.replicas.get(replica) {
            Some(c) if c.advertised && c.held_until.is_none_or(|until| now >= until) => {
                BodyVersion::V2
            }
            _ => BodyVersion::V1,
        }
    }

    /// Books what `replica` listed in an answer's `Accept-Post` (absent: it takes version 1
    /// only). True when that changes the version it gets.
    pub(super) fn heard(&mut self, replica: usize, accepts_v2: bool, now: Instant) -> bool {
        let before = self.version(replica, now);
        if let Some(c) = self.replicas.get_mut(replica) {
            c.advertised = accepts_v2;
        }
        self.version(replica, now) != before
    }

    /// `replica` refused a version 2 body (it could not read it): version 1 for [`HOLD`].
    pub(super) fn refused(&mut self, replica: usize, now: Instant) {
        if let Some(c) = self.replicas.get_mut(replica) {
            c.held_until = Some(now + HOLD);
        }
    }
}

/// Whether a status to a version 2 body means the receiver could not read the format (an
/// ingest from before version 2 answers 400; a proxy or another server may answer 415 or 422).
pub(super) fn refuses_format(status: u16) -> bool {
    matches!(status, 400 | 415 | 422)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_2_only_once_advertised_and_not_right_after_a_refusal() {
        let now = Instant::now();
        let mut bodies = Bodies::new(2);
        assert_eq!(bodies.version(0, now), BodyVersion::V1, "nothing heard yet");
        assert!(bodies.heard(0, true, now));
        assert!(!bodies.heard(0, true, now), "no change");
        assert_eq!(bodies.version(0, now), BodyVersion::V2);
        assert_eq!(bodies.version(1, now), BodyVersion::V1, "per replica");
        bodies.refused(0, now);
        assert_eq!(bodies.version(0, now), BodyVersion::V1);
        assert!(!bodies.heard(0, true, now + HOLD / 2), "still held");
        assert_eq!(bodies.version(0, now + HOLD), BodyVersion::V2);
        assert!(bodies.heard(0, false, now + HOLD), "downgraded replica");
        assert_eq!(bodies.version(0, now + HOLD), BodyVersion::V1);
        assert_eq!(bodies.version(7, now), BodyVersion::V1, "unknown replica");
        assert!(refuses_format(400) && refuses_format(415) && !refuses_format(413));
    }
}
