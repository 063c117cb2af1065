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

    /// Books an answer of `replica` to a body of version `sent`: its status, and whether it
    /// listed version 2 in `Accept-Post` (absent: it takes version 1 only).
    pub(super) fn answered(
        &mut self,
        replica: usize,
        sent: BodyVersion,
        status: u16,
        accepts_v2: bool,
        now: Instant,
    ) -> Heard {
        let before = self.version(replica, now);
        let Some(c) = self.replicas.get_mut(replica) else {
            return Heard::Same;
        };
        // An ingest from before version 2 answers it 400; a proxy or another server may
        // answer 415 or 422. One that lists version 2 read the body: its 400 is about the batch.
        if sent == BodyVersion::V2 && matches!(status, 400 | 415 | 422) && !accepts_v2 {
            c.held_until = Some(now + HOLD);
            return Heard::RefusedVersion2;
        }
        c.advertised = accepts_v2;
        match self.version(replica, now) {
            now_gets if now_gets != before => Heard::Changed(now_gets),
            _ => Heard::Same,
        }
    }
}

/// What an answer meant for the body versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Heard {
    /// The replica could not read the version 2 body it was sent: resend the records as
    /// version 1 (nothing of them was appended); it gets version 1 for [`HOLD`].
    RefusedVersion2,
    /// The replica gets this version from now on.
    Changed(BodyVersion),
    /// Nothing changed.
    Same,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_2_only_once_advertised_and_not_right_after_a_refusal() {
        use BodyVersion::{V1, V2};
        let now = Instant::now();
        let mut b = Bodies::new(2);
        assert_eq!(b.version(0, now), V1, "nothing heard yet");
        assert_eq!(b.answered(0, V1, 200, true, now), Heard::Changed(V2));
        assert_eq!(b.answered(0, V2, 200, true, now), Heard::Same);
        assert_eq!(b.version(1, now), V1, "per replica");
        // A real 400 from a replica that lists version 2: about the batch, no fallback.
        assert_eq!(b.answered(0, V2, 400, true, now), Heard::Same);
        assert_eq!(b.answered(0, V2, 413, false, now), Heard::Changed(V1));
        assert_eq!(b.answered(0, V1, 200, true, now), Heard::Changed(V2));
        for status in [400, 415, 422] {
            assert_eq!(
                b.answered(0, V2, status, false, now),
                Heard::RefusedVersion2,
                "{status}"
            );
        }
        assert_eq!(
            b.answered(0, V1, 400, false, now),
            Heard::Same,
            "v1 refused: a real 400"
        );
        assert_eq!(b.version(0, now), V1);
        assert_eq!(
            b.answered(0, V1, 200, true, now + HOLD / 2),
            Heard::Same,
            "still held"
        );
        assert_eq!(b.version(0, now + HOLD), V2);
        assert_eq!(
            b.answered(0, V2, 200, false, now + HOLD),
            Heard::Changed(V1),
            "downgraded"
        );
        assert_eq!(b.version(7, now), V1, "unknown replica");
        assert_eq!(b.answered(7, V2, 400, false, now), Heard::Same);
    }
}
