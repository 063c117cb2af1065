//! How much of its volume the buffer may use, so that a full disk never wedges it.
//!
//! Invariant: whoever fills the disk, the writer can always checkpoint, delete and evict.
//! Why it needs care (SQLite in WAL mode): a checkpoint copies the WAL into the database file
//! and must first grow that file by the pages the WAL added beyond its end (the *pending
//! growth*); until a checkpoint completes the WAL cannot be emptied, and every later write,
//! a delete included, needs more WAL space. A disk that fills while the WAL holds growth is a
//! dead end. So, with `reserve` the size of the reserve file kept beside the buffer:
//! - a commit writes at most `reserve / 4` bytes of records ([`group_bytes`]; one larger
//!   record goes alone, and the config keeps records under that);
//! - the writer checkpoints as soon as a commit leaves more than `reserve / 2` of pending
//!   growth ([`must_checkpoint`]), so growth + one commit always fit in the reserve, and as
//!   soon as the WAL takes much of what the volume has left ([`wal_too_large`]);
//! - the database file may grow only while `2 × reserve` stays free beside it (the reserve,
//!   and as much again for the WAL) ([`db_limit_pages`]), so a buffer alone on its volume
//!   never fills it;
//! - when the disk is full anyway (another program, or the WAL outgrew its room), the reserve
//!   is released: the checkpoint always completes and empties the WAL; from then on the file
//!   may not grow at all (*frozen*), records are evicted by policy to make room inside it,
//!   and deletes need only WAL space, which the emptied WAL provides. Once `2 × reserve` is
//!   free again, the reserve is taken back and the file may grow again.
//!
//! So a volume needs room for the reserve twice plus [`MIN_RECORDS_BYTES`] ([`check`]).

use std::path::{Path, PathBuf};

/// Room a volume must leave for records, beyond the reserve and the WAL's room.
pub const MIN_RECORDS_BYTES: u64 = 1 << 20;
/// The reserve when the config leaves it to the agent: an eighth of the volume, at most this.
pub const MAX_AUTO_RESERVE: u64 = 4 << 20;

/// The volume holding the buffer, as `statvfs` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Volume {
    /// Bytes of the whole filesystem.
    pub total: u64,
    /// Bytes free for this process.
    pub available: u64,
}

impl Volume {
    /// The volume `path` is (or will be) on: the nearest existing ancestor is asked.
    pub fn of(path: &Path) -> std::io::Result<Volume> {
        let mut dir: PathBuf = path.to_owned();
        loop {
            if dir.as_os_str().is_empty() {
                dir = PathBuf::from(".");
            }
            if dir.exists() {
                break;
            }
            if !dir.pop() {
                dir = PathBuf::from(".");
                break;
            }
        }
        let s = rustix::fs::statvfs(&dir).map_err(std::io::Error::from)?;
        Ok(Volume {
            total: s.f_blocks.saturating_mul(s.f_frsize),
            available: s.f_bavail.saturating_mul(s.f_frsize),
        })
    }
}

/// Bytes the buffer's own files take now: the database, its WAL and the reserve file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// The database file.
    pub db: u64,
    /// The WAL file.
    pub wal: u64,
    /// The reserve file (0 while released).
    pub reserve: u64,
}

impl Usage {
    /// Sizes of the files beside `db` (missing files count 0).
    pub fn of(db: &Path) -> Usage {
        let len = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
        Usage {
            db: len(db.to_owned()),
            wal: len(side(db, "-wal")),
            reserve: len(side(db, ".reserve")),
        }
    }
}

/// `<db><suffix>`, e.g. the WAL or the reserve file.
pub fn side(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The reserve the agent uses when the config does not set one: an eighth of the volume,
/// between what the largest record needs (4 ×) and [`MAX_AUTO_RESERVE`]. Pure.
pub fn auto_reserve(volume_total: u64, max_record: u64) -> u64 {
    let floor = 4 * max_record;
    (volume_total / 8).min(MAX_AUTO_RESERVE).max(floor)
}

/// Most record bytes one commit writes. Pure.
pub fn group_bytes(reserve: u64) -> u64 {
    reserve / 4
}

/// Whether a checkpoint must run now: the WAL holds more growth of the database file than
/// half the reserve. Pure.
pub fn must_checkpoint(page_count: u64, page_size: u64, db_file: u64, reserve: u64) -> bool {
    (page_count * page_size).saturating_sub(db_file) > reserve / 2
}

/// Whether the WAL file takes too much of the volume: more than half the reserve and more than
/// a quarter of what is free. On a roomy volume the WAL may grow between the checkpointer's
/// rounds; on a tight one it is emptied as soon as a commit leaves it that large. Pure.
pub fn wal_too_large(wal: u64, volume: Volume, reserve: u64) -> bool {
    wal > reserve / 2 && wal > volume.available / 4
}

/// WAL bytes after which the writer makes the WAL start again from its beginning
/// ([`wal_stalled`]).
pub const WAL_CYCLE_BYTES: u64 = 16 << 20;

/// Whether the WAL has stopped starting again from its beginning: its file holds more than
/// `reserve` (its `journal_size_limit`: a WAL that started again is cut back to it at its next
/// commit) and more than [`WAL_CYCLE_BYTES`], or an eighth of what the volume has free if that
/// is less (on a tight volume the WAL keeps to the reserve that [`db_limit_pages`] leaves it).
/// Under steady load the background checkpoint never copies the whole WAL (a commit lands while
/// it copies), so nothing ever starts it again and it grows without end: 132 MB in 10 s at
/// 10,000 records/s on the bench VM. Pure.
pub fn wal_stalled(wal: u64, reserve: u64, available: u64) -> bool {
    wal > reserve.max(WAL_CYCLE_BYTES.min(available / 8))
}

/// Largest size, in pages, the database may reach now: what the volume has free plus what the
/// buffer's files already take, less the reserve and as much again for the WAL. Never less
/// than `page_count` (SQLite cannot shrink by this; it only stops growing). Pure.
pub fn db_limit_pages(
    volume: Volume,
    usage: Usage,
    reserve: u64,
    page_size: u64,
    page_count: u64,
) -> u64 {
    let ours = volume
        .available
        .saturating_add(usage.db)
        .saturating_add(usage.wal)
        .saturating_add(usage.reserve);
    (ours.saturating_sub(2 * reserve) / page_size.max(1)).max(page_count)
}

/// Whether the reserve can be taken back and the file allowed to grow again. Pure.
pub fn space_is_back(volume: Volume, reserve: u64) -> bool {
    volume.available >= 2 * reserve + MIN_RECORDS_BYTES
}

/// Checks that the volume can hold the buffer: the reserve twice (the reserve file and the
/// WAL's room) plus [`MIN_RECORDS_BYTES`], and that the quota fits beside them, by the
/// volume's size. `Err` is (config key, reason). Pure.
pub fn check(
    volume: Volume,
    usage: Usage,
    reserve: u64,
    quota: u64,
    max_record: u64,
) -> Result<(), (&'static str, String)> {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    if reserve < 4 * max_record {
        return Err((
            "buffer.reserve_bytes",
            format!(
                "{} is too small for records of up to {} (mqtt.max_payload_bytes): it needs at least 4 times that",
                mib(reserve),
                mib(max_record)
            ),
        ));
    }
    // Judged on the volume's size, not on what is free now: a volume another program filled
    // must not keep the agent from starting and draining (the full-disk path handles it).
    let needed = 2 * reserve + MIN_RECORDS_BYTES;
    if volume.total < needed {
        return Err((
            "buffer.path",
            format!(
                "the volume is {} in all ({} free, {} of it the buffer's own files); it needs at least {} (buffer.reserve_bytes {} twice, plus {} of records): use a larger volume or a smaller buffer.reserve_bytes",
                mib(volume.total),
                mib(volume.available),
                mib(usage.db + usage.wal + usage.reserve),
                mib(needed),
                mib(reserve),
                mib(MIN_RECORDS_BYTES)
            ),
        ));
    }
    let most = volume.total - 2 * reserve;
    if quota > most {
        return Err((
            "buffer.quota_bytes",
            format!(
                "{} does not fit on the volume ({} in all, of which buffer.reserve_bytes takes {} twice): set it to at most {}",
                mib(quota),
                mib(volume.total),
                mib(reserve),
                mib(most)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn reserve_follows_the_volume_within_bounds() {
        for (total, record, want) in [
            (8 * MIB, 256 << 10, MIB),
            (6 * MIB, 256 << 10, MIB),
            (16 * MIB, 256 << 10, 2 * MIB),
            (64 << 30, 256 << 10, 4 * MIB),
            (64 << 30, 2 * MIB, 8 * MIB),
        ] {
            assert_eq!(auto_reserve(total, record), want, "{total} {record}");
        }
    }

    #[test]
    fn checkpoint_when_pending_growth_passes_half_the_reserve() {
        let page = 4096;
        for (pages, file, want) in [
            (100, 100 * page, false),
            (100 + 128, 100 * page, false),
            (100 + 129, 100 * page, true),
            (10, 100 * page, false),
        ] {
            assert_eq!(
                must_checkpoint(pages, page, file, MIB),
                want,
                "{pages} {file}"
            );
        }
    }

    #[test]
    fn the_wal_is_emptied_early_only_on_a_tight_volume() {
        let v = |available| Volume {
            total: 1 << 40,
            available,
        };
        assert!(
            !wal_too_large(MIB / 2, v(0), MIB),
            "within half the reserve"
        );
        assert!(wal_too_large(MIB, v(3 * MIB), MIB));
        assert!(!wal_too_large(8 * MIB, v(64 << 30), MIB), "roomy volume");
    }

    #[test]
    fn the_wal_is_made_to_start_again_past_its_cycle_or_an_eighth_of_the_free_space() {
        let r = 4 * MIB;
        for (wal, reserve, available, want) in [
            (16 * MIB, r, 1 << 40, false),
            (16 * MIB + 1, r, 1 << 40, true),
            // Tight volume: the cycle shrinks to an eighth of what is free, never below the
            // reserve (the WAL's share in the space model).
            (5 * MIB, r, 32 * MIB, true),
            (4 * MIB, r, 8 * MIB, false),
            (4 * MIB + 1, r, 8 * MIB, true),
            // A reserve larger than the cycle is the WAL's journal_size_limit: no restart below it.
            (20 * MIB, 32 * MIB, 1 << 40, false),
            (32 * MIB + 1, 32 * MIB, 1 << 40, true),
        ] {
            assert_eq!(
                wal_stalled(wal, reserve, available),
                want,
                "{wal} {reserve} {available}"
            );
        }
    }

    #[test]
    fn the_file_grows_only_while_twice_the_reserve_stays_free() {
        let v = |available| Volume {
            total: 16 * MIB,
            available,
        };
        let u = Usage {
            db: 4 * MIB,
            wal: MIB,
            reserve: MIB,
        };
        // 10 MiB free + 6 MiB ours - 2 MiB = 14 MiB = 3584 pages.
        assert_eq!(db_limit_pages(v(10 * MIB), u, MIB, 4096, 1024), 3584);
        // Nothing free, reserve released: the file keeps its size.
        let released = Usage { reserve: 0, ..u };
        assert_eq!(db_limit_pages(v(0), released, MIB, 4096, 1500), 1500);
        assert!(space_is_back(v(3 * MIB), MIB));
        assert!(!space_is_back(v(3 * MIB - 1), MIB));
    }

    #[test]
    fn volumes_too_small_for_the_reserve_or_the_quota_are_refused() {
        let vol = |total| Volume {
            total,
            available: total,
        };
        let none = Usage::default();
        let record = 256 << 10;
        assert!(check(vol(6 * MIB), none, MIB, 4 * MIB, record).is_ok());
        let (key, reason) = check(vol(2 * MIB), none, MIB, MIB, record).expect_err("too small");
        assert_eq!(key, "buffer.path");
        assert!(reason.contains("2.0 MiB in all (2.0 MiB free"), "{reason}");
        let (key, _) = check(vol(64 * MIB), none, 512 << 10, 8 * MIB, record).expect_err("reserve");
        assert_eq!(key, "buffer.reserve_bytes");
        let (key, reason) = check(vol(8 * MIB), none, MIB, 1 << 30, record).expect_err("quota");
        assert_eq!(key, "buffer.quota_bytes");
        assert!(reason.contains("at most 6.0 MiB"), "{reason}");
        // A full volume is fine: it is judged on its size (the full-disk path makes room).
        let full = Volume {
            total: 8 * MIB,
            available: 0,
        };
        let ours = Usage {
            db: 5 * MIB,
            wal: MIB,
            reserve: MIB,
        };
        assert!(check(full, ours, MIB, 4 * MIB, record).is_ok());
    }
}
