//! Where a topic's records are in the log file, and the SQL that finds them.
//!
//! A log this version creates keeps each record at rowid `topic id << 43 | offset`
//! ([`Layout::Rowid`]): a topic's records in offset order are a range of the table itself,
//! so an append writes the row and nothing else. A log an older version created has a
//! `(topic, offset)` index beside SQLite's own rowids ([`Layout::Indexed`]); it keeps it, and
//! every statement goes through it. The layout is told by that index: an older version
//! opening a newer log creates the index, and from then on the log is read through it.
//!
//! Bounds (Rowid): topic ids 1 to [`MAX_TOPICS`], offsets below 2^43 per topic (8.8 × 10^12:
//! 2.8 years of 100,000 records a second into one topic); a batch past either is refused with
//! 503 and a reason, and nothing of it is written.

use rusqlite::Connection;
use rusqlite::types::Value;

/// Bits of a rowid that hold the offset; the topic id is above them.
pub(super) const OFFSET_BITS: u32 = 43;

/// The first offset a topic cannot have (Rowid layout).
pub(super) const OFFSET_LIMIT: u64 = 1 << OFFSET_BITS;

/// A record's payload and attribute bytes (what `max_bytes_per_topic` counts).
const SIZE: &str = "length(payload) + coalesce(length(CAST(attributes AS BLOB)), 0)";

/// Most topics a Rowid log holds (ids 1 to this; rowids stay positive).
pub const MAX_TOPICS: u64 = (1 << (63 - OFFSET_BITS)) - 1;

/// How the records of a topic are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    /// By a range of rowids: `topic id << 43 | offset`.
    Rowid,
    /// Through the `(topic, offset)` index of a log an older version created.
    Indexed,
}

impl Layout {
    /// The layout of the log `conn` opened (read-only connections too).
    pub(super) fn of(conn: &Connection) -> rusqlite::Result<Layout> {
        let indexed: bool = conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'records_by_offset'",
            [],
            |row| row.get::<_, i64>(0).map(|n| n > 0),
        )?;
        Ok(if indexed {
            Layout::Indexed
        } else {
            Layout::Rowid
        })
    }

    /// The condition on `records` for topic `?1` ([`Layout::topic`]), offsets from `?2` up to
    /// and excluding `?3` (`?2` at most [`OFFSET_LIMIT`]; the sums stay within i64 for the
    /// last topic id too).
    fn range(self) -> String {
        match self {
            Layout::Rowid => format!(
                "id >= (?1 << {OFFSET_BITS}) + ?2 AND id <= (?1 << {OFFSET_BITS}) + (min(?3, {OFFSET_LIMIT}) - 1)"
            ),
            Layout::Indexed => "topic = ?1 AND offset >= ?2 AND offset < ?3".into(),
        }
    }

    /// The column that orders a topic's records by offset without a sort.
    fn order(self) -> &'static str {
        match self {
            Layout::Rowid => "id",
            Layout::Indexed => "offset",
        }
    }

    /// The first offset of topic `?1` in `[?2, ?3)`.
    pub(super) fn first(self) -> String {
        format!(
            "SELECT offset FROM records WHERE {} ORDER BY {} LIMIT 1",
            self.range(),
            self.order()
        )
    }

    /// The first offset of topic `?1` in `[?2, ?3)` ingested at `?4` or later.
    pub(super) fn first_ingested_since(self) -> String {
        format!(
            "SELECT offset FROM records WHERE {} AND ingested_at_ms >= ?4 ORDER BY {} LIMIT 1",
            self.range(),
            self.order()
        )
    }

    /// Each record of topic `?1` in `[?2, ?3)` with its payload and attribute bytes, in
    /// offset order.
    pub(super) fn sizes(self) -> String {
        format!(
            "SELECT offset, {SIZE} FROM records WHERE {} ORDER BY {}",
            self.range(),
            self.order()
        )
    }

    /// The records of topic `?1` in `[?2, ?3)` and their payload and attribute bytes.
    pub(super) fn count(self) -> String {
        format!(
            "SELECT count(*), coalesce(sum({SIZE}), 0) FROM records WHERE {}",
            self.range()
        )
    }

    /// Deletes the records of topic `?1` in `[?2, ?3)`.
    pub(super) fn delete(self) -> String {
        format!("DELETE FROM records WHERE {}", self.range())
    }

    /// `columns` of at most `?4` records of topic `?1` in `[?2, ?3)`, in offset order.
    pub(super) fn read(self, columns: &str) -> String {
        format!(
            "SELECT {columns} FROM records WHERE {} ORDER BY {} LIMIT ?4",
            self.range(),
            self.order()
        )
    }

    /// Every statement on `records` above (the read with its real columns), for the tests of
    /// their query plans.
    #[cfg(test)]
    pub(super) fn statements(self) -> Vec<String> {
        vec![
            self.first(),
            self.first_ingested_since(),
            self.sizes(),
            self.count(),
            self.delete(),
            self.read(super::reader::COLUMNS),
        ]
    }

    /// What `?1` of [`Layout::range`] is for the topic `name` with id `id`.
    pub(super) fn topic(self, name: &str, id: u64) -> Value {
        match self {
            Layout::Rowid => Value::Integer(id as i64),
            Layout::Indexed => Value::Text(name.to_owned()),
        }
    }

    /// The rowid of the record at `offset` of topic `id`; SQLite picks it in an indexed log.
    pub(super) fn row_id(self, id: u64, offset: u64) -> Option<i64> {
        match self {
            Layout::Rowid => Some(((id << OFFSET_BITS) | offset) as i64),
            Layout::Indexed => None,
        }
    }
}
