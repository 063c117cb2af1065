//! Time stamps the agent puts on records and batches: the wall clock (which may be wrong on a
//! gateway that booted without a real-time clock), and the host's boot id with the time since
//! that boot, which is right even then: within one boot it orders records and measures the
//! time between them, whatever the wall clock did.

use std::sync::OnceLock;
use std::time::Instant;

pub use ingest_wire::now_ms;

struct Boot {
    id: String,
    uptime_at_start_ms: u64,
    start: Instant,
}

fn boot() -> &'static Boot {
    static BOOT: OnceLock<Boot> = OnceLock::new();
    BOOT.get_or_init(|| Boot {
        id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        uptime_at_start_ms: std::fs::read_to_string("/proc/uptime")
            .ok()
            .as_deref()
            .and_then(parse_uptime_ms)
            .unwrap_or(0),
        start: Instant::now(),
    })
}

/// The host's boot id (Linux `/proc/sys/kernel/random/boot_id`); empty where there is none.
pub fn boot_id() -> &'static str {
    &boot().id
}

/// Milliseconds since the host booted: `/proc/uptime` read once, then the monotonic clock.
pub fn monotonic_ms() -> u64 {
    let b = boot();
    b.uptime_at_start_ms + b.start.elapsed().as_millis() as u64
}

/// The first field of `/proc/uptime` ("12345.67 …") in milliseconds.
fn parse_uptime_ms(text: &str) -> Option<u64> {
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then_some((seconds * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_parses_and_the_monotonic_clock_never_goes_back() {
        assert_eq!(parse_uptime_ms("350735.47 234388.90\n"), Some(350_735_470));
        assert_eq!(parse_uptime_ms("garbage"), None);
        assert_eq!(parse_uptime_ms(""), None);
        let a = monotonic_ms();
        let b = monotonic_ms();
        assert!(b >= a && a > 0, "{a} {b}");
        assert_eq!(boot_id().len(), 36, "a UUID on Linux: {:?}", boot_id());
    }
}
