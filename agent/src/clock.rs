//! Time stamps the agent puts on records and batches.

/// Wall-clock now, Unix milliseconds (0 if the clock is before 1970, e.g. no RTC at boot).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
