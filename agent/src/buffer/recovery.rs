//! What happens to a buffer file that SQLite cannot trust: it is checked at every start,
//! moved aside (quarantined, never deleted) when corrupt, and whatever rows can still be read
//! are copied into a fresh buffer. Also the offline `edge-agent buffer verify|dump`.
//!
//! Invariants:
//! - a corrupt file never stops the agent from starting, and is never lost: it stays beside the
//!   buffer as `<buffer>.corrupt-<unix ms>` for an operator to inspect; salvage leaves no other
//!   file behind;
//! - a salvaged record is byte-identical to what was received (its checksum is verified) and
//!   keeps its identity (epoch, stream, sequence) whenever the file still tells it, so a record
//!   the ingest already has is deduplicated, not delivered twice;
//! - what the file held but the salvage could not give back is reported lost
//!   (`corrupt_buffer`), with the sequence ranges when the file still tells them (the stream's
//!   next sequence and delivered floor), else with what count it can establish.
//!
//! This module checks and quarantines; `salvage` copies out what can be read; `inspect` is the
//! offline verify and dump; `pages` reads rows from the raw pages when SQLite cannot.

use std::path::{Path, PathBuf};

use ingest_wire::LossReport;
use rusqlite::{Connection, ErrorCode};

use super::space::side;

mod inspect;
mod pages;
mod salvage;

pub use inspect::{DumpedRecord, StreamSummary, VerifyReport, dump, verify};
pub(super) use salvage::salvage;

/// A corrupt buffer that was moved aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    /// Where the corrupt file now is.
    pub moved_to: PathBuf,
    /// What SQLite said about it.
    pub reason: String,
    /// Records read from it, intact, and kept in the fresh buffer.
    pub salvaged: u64,
    /// What it held but could not give back: reported upstream at start.
    pub losses: Vec<LossReport>,
}

pub(super) fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase))
}

/// The marker beside a buffer in which the running agent found damage.
fn suspect(path: &Path) -> PathBuf {
    side(path, ".damaged")
}

/// Marks the buffer at `path` as damaged (the running agent read a page SQLite calls corrupt):
/// its next start salvages it even if `PRAGMA quick_check` passes (that check does not read
/// everything a query may). Written and synced before the agent stops.
pub fn mark_suspect(path: &Path, why: &str) {
    use std::io::Write;
    let marked = std::fs::File::create(suspect(path))
        .and_then(|mut f| f.write_all(why.as_bytes()).and_then(|()| f.sync_all()));
    if let Err(e) = marked {
        tracing::warn!(error = %e, "cannot mark the buffer as damaged; the next start checks it as usual");
    }
}

/// After a salvage: the marker is gone with the file it was about.
pub fn clear_suspect(path: &Path) {
    let _ = std::fs::remove_file(suspect(path));
}

/// The marker beside a buffer that the agent stopped cleanly.
fn clean_marker(path: &Path) -> PathBuf {
    side(path, ".clean")
}

/// What the buffer file looks like on disk: its size and modification time, and its WAL's.
fn file_stamp(path: &Path) -> Option<String> {
    let stamp = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| {
            let modified = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{} {modified}", m.len())
        })
    };
    let wal = stamp(&side(path, "-wal")).unwrap_or_else(|| "none".into());
    Some(format!("{} / wal {wal}", stamp(path)?))
}

/// After a clean stop (everything committed, every connection closed): marks the buffer at
/// `path` so that the next start can skip the full check. The marker holds the file's
/// `file_stamp`: a file changed since (restored, copied over, written by anything) is
/// checked anyway.
pub fn mark_clean(path: &Path) {
    use std::io::Write;
    let Some(stamp) = file_stamp(path) else {
        return;
    };
    let marked = std::fs::File::create(clean_marker(path))
        .and_then(|mut f| f.write_all(stamp.as_bytes()).and_then(|()| f.sync_all()));
    if let Err(e) = marked {
        tracing::warn!(error = %e, "cannot mark the clean stop; the next start checks the whole buffer");
    }
}

/// Takes the clean-stop marker away (durably: a power cut later must not bring it back) and
/// says whether it vouches for the file as it is now.
fn take_clean_marker(path: &Path) -> bool {
    let marker = clean_marker(path);
    let Ok(stamp) = std::fs::read_to_string(&marker) else {
        return false;
    };
    if std::fs::remove_file(&marker).is_err() {
        return false;
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if std::fs::File::open(dir).and_then(|d| d.sync_all()).is_err() {
        return false;
    }
    file_stamp(path).is_some_and(|now| now == stamp)
}

/// Checks the buffer at `path` (absent is fine). `Ok(Some(reason))` when it is corrupt, or
/// was marked damaged while running; `Err` for errors that are not about the file's content
/// (permissions, missing directory). After a clean stop that left the file as it was, the full
/// read (`PRAGMA quick_check`, seconds on a large buffer on an SD card) is skipped: the file
/// was consistent when the agent closed it, every record's checksum is still verified on every
/// read, and damage met while running is marked and salvaged at the next start.
pub fn check(path: &Path) -> rusqlite::Result<Option<String>> {
    let clean = take_clean_marker(path);
    if !path.exists() {
        clear_suspect(path);
        return Ok(None);
    }
    if let Ok(why) = std::fs::read_to_string(suspect(path)) {
        return Ok(Some(format!("damage found while running: {why}")));
    }
    if clean {
        tracing::info!("the buffer was stopped cleanly and is unchanged since: full check skipped");
        return Ok(None);
    }
    let result = Connection::open(path)
        .and_then(|conn| conn.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)));
    match result {
        Ok(verdict) if verdict == "ok" => Ok(None),
        Ok(verdict) => Ok(Some(verdict)),
        Err(e) if is_corruption(&e) => Ok(Some(e.to_string())),
        Err(e) => Err(e),
    }
}

/// Moves the buffer file and its WAL and shared-memory files aside; returns the new path.
pub fn quarantine(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = crate::clock::now_ms();
    let moved_to = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    std::fs::rename(path, &moved_to)?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            std::fs::rename(&side, format!("{}{suffix}", moved_to.display()))?;
        }
    }
    Ok(moved_to)
}

#[cfg(test)]
mod tests {
    use super::salvage::{Salvaged, missing_runs};
    use super::*;
    use crate::buffer::{Buffer, BufferStream, NewRecord, WriterCommand};
    use crate::routing::Priority;

    /// After a clean stop the full check is skipped once (the marker is taken away); a file
    /// written after the marker, or a start without one, gets the full check.
    #[test]
    fn a_clean_stop_skips_the_full_check_only_for_an_unchanged_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("buffer.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE t (v BLOB); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) INSERT INTO t SELECT randomblob(200) FROM n;",
            )
            .expect("fill");
        }
        let corrupt = || {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("file");
            f.seek(SeekFrom::Start(4096 * 3)).expect("seek");
            f.write_all(&[0xA5; 4096 * 4]).expect("garbage");
        };
        mark_clean(&path);
        assert!(clean_marker(&path).exists());
        assert_eq!(check(&path).expect("check"), None);
        assert!(!clean_marker(&path).exists(), "used once");

        mark_clean(&path);
        corrupt();
        assert!(
            check(&path).expect("check").is_some(),
            "written after the clean stop: fully checked, and found corrupt"
        );
        assert!(
            check(&path).expect("check").is_some(),
            "no marker: fully checked"
        );
    }

    fn streams() -> Vec<BufferStream> {
        [
            ("alarms", Priority::Critical),
            ("logs", Priority::Bulk),
            (ingest_wire::LOSS_STREAM, Priority::Critical),
        ]
        .into_iter()
        .map(|(name, priority)| BufferStream {
            name: name.into(),
            priority,
            ttl: None,
        })
        .collect()
    }

    /// A buffer of 3000 records in two streams, checkpointed into its file.
    fn filled(path: &Path) -> u64 {
        let mut b = Buffer::open(path, &streams(), 1 << 30).expect("open");
        let cmds: Vec<_> = (0..3000u32)
            .map(|i| {
                WriterCommand::Append(NewRecord {
                    stream: (i % 2) as usize,
                    topic: format!("plant/{i}"),
                    payload: bytes::Bytes::from(i.to_be_bytes().repeat(50)),
                    received_at_ms: i as i64,
                    monotonic_ms: 1,
                    attributes: Default::default(),
                    receipt: None,
                })
            })
            .collect();
        b.buffer.commit(&cmds, &[], 0, false).expect("commit");
        b.buffer.checkpoint().expect("checkpoint");
        b.epoch
    }

    fn salvaged_from(damage: impl FnOnce(&mut Vec<u8>)) -> (Salvaged, u64, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let epoch = filled(&path);
        let mut bytes = std::fs::read(&path).expect("read");
        damage(&mut bytes);
        std::fs::write(&path, &bytes).expect("write");
        let o = Buffer::open(&path, &streams(), 1 << 30).expect("opens anyway");
        let q = o.quarantine.expect("quarantined");
        let held: u64 = o.buffer.progress()[..2]
            .iter()
            .map(|p| p.backlog_records)
            .sum();
        assert_eq!(held, q.salvaged);
        assert_eq!(o.epoch, epoch, "identity kept");
        (
            Salvaged {
                copied: q.salvaged,
                losses: q.losses,
            },
            held,
            epoch,
        )
    }

    #[test]
    fn a_truncated_file_gives_back_its_intact_head_and_reports_the_rest_by_range() {
        for share in [0.1, 0.5, 0.9] {
            let (s, _, _) = salvaged_from(|b| {
                let len = b.len();
                b.truncate((len as f64 * share) as usize);
            });
            let reported: u64 = s.losses.iter().map(|l| l.count).sum();
            assert_eq!(s.copied + reported, 3000, "{share}: {:?}", s.losses);
            if share > 0.4 {
                assert!(s.copied > 0, "{share}: something comes back");
            }
        }
    }

    /// Property: whatever 64 bytes a bad flash page flips in the middle third of the file, the
    /// salvage ends within seconds (CI once saw a start stall: a damaged interior page sent the
    /// walk backwards), and every record is given back or reported lost, or the file no
    /// longer tells how many it held and an uncounted loss is reported.
    #[test]
    fn flipped_bytes_anywhere_salvage_quickly_and_account_for_every_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good.db");
        filled(&good);
        let clean = std::fs::read(&good).expect("read");
        for seed in 1..=40u64 {
            let mut bytes = clean.clone();
            let len = bytes.len();
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x1234_5678_9ABC_DEF1);
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes[len / 3 + (x as usize % (len / 3))] ^= 0x5A;
            }
            let path = dir.path().join(format!("s{seed}.db"));
            std::fs::write(&path, &bytes).expect("write");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(
                    Buffer::open(&path, &streams(), 1 << 30)
                        .map(|o| o.quarantine.map(|q| (q.salvaged, q.losses))),
                );
            });
            let opened = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("seed {seed}: the salvage never ended"))
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let Some((copied, losses)) = opened else {
                continue; // the flips missed everything SQLite checks
            };
            let reported: u64 = losses.iter().map(|l| l.count).sum();
            let uncounted = losses.iter().any(|l| l.count == 0 && l.stream.is_none());
            assert!(
                copied + reported == 3000 || uncounted,
                "seed {seed}: {copied} copied + {reported} reported: {losses:?}"
            );
        }
    }

    /// A stop in the middle of a salvage loses nothing: an unfinished salvage beside the corrupt
    /// file is started over, and a finished one whose move into place was cut short is moved in.
    #[test]
    fn a_salvage_cut_short_is_redone_or_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        let salvage = dir.path().join("b.db.salvage");
        filled(&path);
        let len = std::fs::metadata(&path).expect("meta").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(len / 2))
            .expect("truncate");
        // Stopped while salvaging: a partial salvage file is beside the corrupt one.
        std::fs::write(&salvage, b"SQLite format 3\0 half written").expect("partial");
        let held = |o: &crate::buffer::Opened| -> u64 {
            o.buffer.progress()[..2]
                .iter()
                .map(|p| p.backlog_records)
                .sum()
        };
        let o = Buffer::open(&path, &streams(), 1 << 30).expect("opens");
        let q = o.quarantine.clone().expect("salvaged over again");
        let reported: u64 = q.losses.iter().map(|l| l.count).sum();
        assert_eq!(q.salvaged + reported, 3000);
        assert_eq!(held(&o), q.salvaged);
        let reports = o.buffer.progress()[2].backlog_records;
        assert!(reports > 0, "the loss reports are in the salvaged file");
        drop(o);
        assert!(!salvage.exists());
        // Stopped between moving the corrupt file aside and moving the salvage in.
        std::fs::rename(&path, &salvage).expect("as if not moved in yet");
        let o = Buffer::open(&path, &streams(), 1 << 30).expect("opens");
        assert_eq!(o.quarantine, None);
        assert_eq!(held(&o), q.salvaged, "the finished salvage is in place");
        assert_eq!(o.buffer.progress()[2].backlog_records, reports);
        assert!(!salvage.exists());
    }

    /// Damage the running agent meets (a read SQLite calls corrupt) marks the file; the next
    /// start salvages it even when its quick check passes, and a sound file salvaged so loses
    /// nothing.
    #[test]
    fn damage_found_while_running_is_salvaged_at_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.db");
        filled(&path);
        let names: Vec<String> = streams().into_iter().map(|s| s.name).collect();
        // Pages of the records' b-tree zeroed under a reader.
        let mut bytes = std::fs::read(&path).expect("read");
        let from = bytes.len() / 2 / 4096 * 4096;
        bytes[from..from + 4 * 4096].fill(0);
        let damaged = dir.path().join("d.db");
        std::fs::write(&damaged, &bytes).expect("write");
        let reader = crate::buffer::BufferReader::open(&damaged, &names).expect("reader");
        let error = (0..2)
            .find_map(|s| {
                reader
                    .read_batch(s, &[(1, crate::buffer::MAX_SEQ)], false, 5000, 1 << 30)
                    .err()
            })
            .expect("a read meets the damage");
        assert!(error.is_corrupt(), "{error}");
        // A sound file marked damaged: salvaged whole.
        mark_suspect(&path, "test");
        let o = Buffer::open(&path, &streams(), 1 << 30).expect("opens");
        let q = o.quarantine.clone().expect("salvaged");
        assert!(
            q.reason.contains("damage found while running"),
            "{}",
            q.reason
        );
        assert_eq!((q.salvaged, q.losses.len()), (3000, 0));
        assert!(!suspect(&path).exists());
        drop(o);
        assert_eq!(
            Buffer::open(&path, &streams(), 1 << 30)
                .expect("opens")
                .quarantine,
            None
        );
    }

    #[test]
    fn missing_runs_are_the_gaps_between_floor_and_next() {
        assert_eq!(
            missing_runs(1, 11, &[1, 2, 5, 10]),
            vec![(3, 4, 2), (6, 9, 4)]
        );
        assert_eq!(missing_runs(3, 6, &[]), vec![(3, 5, 3)]);
        assert_eq!(missing_runs(3, 6, &[1, 3, 4, 5]), vec![]);
    }
}
