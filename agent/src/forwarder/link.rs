//! The link to the ingest as the loop sees it ([`Link`]), its transitions, and how many
//! batches may start. Pure.

use super::*;

/// The link to the ingest, as the forwarder sees it. Transitions ([`Link::after`]):
///
/// | from | event | to |
/// |---|---|---|
/// | any | a batch is sent | `Up` |
/// | `Up`, `Paused` | a request failed (no answer, 5xx, 408, 429 without a wait) | `Down`, probing after the backoff (or a wait already set) |
/// | `Up`, `Paused` | a refusal that asks for a wait (Retry-After), or a buffer read failed | `Paused` until then |
/// | `Down` | a probe or a request failed | `Down`, probing after the backoff (or the wait asked for) |
/// | `Down` | a probe answered 200, or another request went through | `Up` (`Paused` if a wait was set) |
/// | `Up`, `Paused` | an answer without failure or wait | unchanged |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Link {
    /// Batches go as the scheduler decides.
    Up,
    /// Nothing goes before `until`; then batches go again.
    Paused { until: Instant },
    /// The ingest fails: no batch goes (no records sit in requests to a dead link); a
    /// readiness probe goes once `until` has passed, and batches again after it answers 200.
    Down { until: Option<Instant> },
}

/// What happened to the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkEvent {
    /// A batch left.
    Sent,
    /// Reading a batch from the buffer failed (not damage): wait a second.
    ReadFailed,
    /// A readiness probe or a request was answered (or not): whether the ingest failed, and
    /// how long nothing may go.
    Answered {
        failed: bool,
        wait: Option<Duration>,
    },
}

impl Link {
    /// The state after `event` at `now`. Pure.
    pub(super) fn after(self, event: LinkEvent, now: Instant) -> Link {
        match (self, event) {
            (_, LinkEvent::Sent) => Link::Up,
            (Link::Down { .. }, LinkEvent::ReadFailed) => Link::Down {
                until: Some(now + Duration::from_secs(1)),
            },
            (_, LinkEvent::ReadFailed) => Link::Paused {
                until: now + Duration::from_secs(1),
            },
            // A wait already set stands unless the answer asks for another.
            (state, LinkEvent::Answered { failed: true, wait }) => Link::Down {
                until: wait.map(|w| now + w).or(state.until()),
            },
            (
                _,
                LinkEvent::Answered {
                    failed: false,
                    wait: Some(w),
                },
            ) => Link::Paused { until: now + w },
            // Another request went through while one had failed: the link is up again.
            (
                Link::Down { until },
                LinkEvent::Answered {
                    failed: false,
                    wait: None,
                },
            ) => match until {
                Some(until) => Link::Paused { until },
                None => Link::Up,
            },
            (
                state,
                LinkEvent::Answered {
                    failed: false,
                    wait: None,
                },
            ) => state,
        }
    }

    /// The wait set, if any (past or not).
    pub(super) fn until(self) -> Option<Instant> {
        match self {
            Link::Paused { until } | Link::Down { until: Some(until) } => Some(until),
            Link::Up | Link::Down { until: None } => None,
        }
    }

    /// Whether the ingest is taken for failing (probes, no batches).
    pub(super) fn down(self) -> bool {
        matches!(self, Link::Down { .. })
    }

    /// Until when nothing may go, if that is later than `now`.
    pub(super) fn hold(self, now: Instant) -> Option<Instant> {
        self.until().filter(|&until| until > now)
    }
}

/// How many batches may start now: up to `max` in flight, the last slot only for critical
/// streams; none while the ingest fails (a readiness probe goes instead, so no data is held
/// in requests to a dead link). Pure.
pub(super) fn open_slots(max: usize, in_flight: usize, probing: bool, critical: bool) -> usize {
    if probing {
        return 0;
    }
    let limit = max.max(1);
    let limit = if critical || limit == 1 {
        limit
    } else {
        limit - 1
    };
    limit.saturating_sub(in_flight)
}
