//! The file against its volume: checkpoints, the WAL's room, giving free pages back, and what
//! a full disk does (the writer freezes growth, keeps acknowledging nothing new, and drains).

use std::time::Duration;

use super::{BUSY_TIMEOUT, Buffer, BufferError, ensure_reserve, space};

/// How long a WAL restart waits for readers to leave the WAL (a batch read takes a few ms).
const WAL_RESTART_WAIT: Duration = Duration::from_millis(20);

/// How soon a WAL restart that readers kept from succeeding is tried again, doubled after each
/// failure up to [`WAL_RESTART_MAX_BACKOFF`] (a reader that stays, e.g. an operator's `buffer
/// verify`, would otherwise cost the writer 20 ms every 100 ms).
const WAL_RESTART_BACKOFF: Duration = Duration::from_millis(100);

/// The longest wait between two tries of a WAL restart.
const WAL_RESTART_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// When the writer may next try to make the WAL start again ([`Buffer::restart_wal`]).
#[derive(Debug)]
pub(super) struct WalRestart {
    next: std::time::Instant,
    backoff: Duration,
}

impl WalRestart {
    pub(super) fn new() -> WalRestart {
        WalRestart {
            next: std::time::Instant::now(),
            backoff: WAL_RESTART_BACKOFF,
        }
    }

    fn due(&self) -> bool {
        self.next <= std::time::Instant::now()
    }

    /// After a try: the next one at once when it worked (the WAL must fill again first) or
    /// when the background checkpointer held the checkpoint (it lets go within its pass),
    /// otherwise (readers stayed, or an error) after the backoff, which doubles.
    fn tried(&mut self, outcome: Restart) {
        let now = std::time::Instant::now();
        match outcome {
            Restart::Done => {
                self.backoff = WAL_RESTART_BACKOFF;
                self.next = now;
            }
            Restart::Checkpointing => self.next = now,
            Restart::Kept => {
                self.next = now + self.backoff;
                self.backoff = (self.backoff * 2).min(WAL_RESTART_MAX_BACKOFF);
            }
        }
    }
}

/// What a try to make the WAL start again came to ([`Buffer::restart_wal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Restart {
    /// The WAL was copied whole and no reader uses it: the next commit writes it from its start.
    Done,
    /// Another checkpoint (the background checkpointer's) was running: nothing was tried.
    Checkpointing,
    /// Readers stayed in the WAL past the wait (or the try failed).
    Kept,
}

impl Buffer {
    pub(super) fn pragma(&self, name: &str) -> Result<u64, BufferError> {
        self.conn
            .query_row(&format!("PRAGMA {name}"), [], |r| r.get::<_, i64>(0))
            .map(|v| v.max(0) as u64)
            .map_err(|e| self.error(e))
    }

    /// Pages a frozen file may still grow by for housekeeping (see [`Buffer::limit_growth`]):
    /// a sixteenth of the reserve, which was released when the disk filled.
    pub(super) fn headroom_pages(&self) -> u64 {
        (self.reserve_bytes / 16 / self.page_size).max(8)
    }

    /// On a frozen file, before a transaction: new records may not grow it past its ceiling,
    /// but housekeeping (deletes, evictions and the loss reports they write) may, by
    /// [`Buffer::headroom_pages`] at most. Without that headroom a file frozen with no free
    /// page cannot take even the loss report of a refused publish: a B-tree insert (or a
    /// delete that rebalances) needs a page before any is freed, and the commit is refused
    /// for ever. The headroom comes out of the released reserve, so the file stays within
    /// `ceiling + headroom` pages.
    pub(super) fn limit_growth(&mut self, housekeeping: bool) -> Result<(), BufferError> {
        let Some(ceiling) = self.ceiling else {
            return Ok(());
        };
        let pages = self.pragma("page_count")?;
        let limit = if housekeeping {
            ceiling + self.headroom_pages()
        } else {
            ceiling
        };
        self.pragma(&format!("max_page_count = {}", limit.max(pages)))?;
        Ok(())
    }

    /// Whether the file may not grow (the disk filled and space has not come back).
    pub fn is_frozen(&self) -> bool {
        self.ceiling.is_some()
    }

    /// After every commit: checkpoints (TRUNCATE) when the WAL holds more growth of the file
    /// than half the reserve ([`space::must_checkpoint`]), so a full disk can always be
    /// checkpointed out of; and when the WAL itself takes much of what is left of the volume
    /// ([`space::wal_too_large`]). Otherwise, when the WAL has stopped starting again from its
    /// beginning ([`space::wal_stalled`]), makes it start again ([`Buffer::restart_wal`]).
    pub fn bound_growth(&mut self) -> Result<(), BufferError> {
        let pages = self.pragma("page_count")?;
        let usage = space::Usage::of(&self.path);
        let wal_too_large = usage.wal > self.reserve_bytes / 2
            && space::Volume::of(&self.path)
                .is_ok_and(|v| space::wal_too_large(usage.wal, v, self.reserve_bytes));
        if wal_too_large
            || space::must_checkpoint(pages, self.page_size, usage.db, self.reserve_bytes)
        {
            self.checkpoint()?;
        } else if usage.wal > self.reserve_bytes
            && self.wal_restart.due()
            && space::Volume::of(&self.path)
                .is_ok_and(|v| space::wal_stalled(usage.wal, self.reserve_bytes, v.available))
        {
            let tried = self.restart_wal();
            self.wal_restart.tried(match &tried {
                Ok(outcome) => *outcome,
                Err(_) => Restart::Kept,
            });
            tried?;
        }
        Ok(())
    }

    /// Copies what the background checkpointer has not yet copied and waits at most
    /// [`WAL_RESTART_WAIT`] for readers to leave the WAL (RESTART), so that the next commit writes
    /// the WAL from its beginning and cuts its file back; whether it did. Readers still inside
    /// it after that wait keep it growing until the next try ([`WalRestart`]). On the writer's
    /// path, once per [`space::WAL_CYCLE_BYTES`] of WAL: the background checkpointer has
    /// copied most of it by then.
    pub(super) fn restart_wal(&mut self) -> Result<Restart, BufferError> {
        let wait = |conn: &rusqlite::Connection, d| conn.busy_timeout(d);
        wait(&self.conn, WAL_RESTART_WAIT).map_err(|e| self.error(e))?;
        let done = self
            .conn
            .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
            });
        wait(&self.conn, BUSY_TIMEOUT).map_err(|e| self.error(e))?;
        Ok(match done.map_err(|e| self.error(e))? {
            (0, _) => Restart::Done,
            // SQLite does not wait for another checkpoint: it answers busy with no WAL size.
            (_, -1) => Restart::Checkpointing,
            _ => Restart::Kept,
        })
    }

    /// Copies the whole WAL into the file and empties it; `false` when readers kept it busy.
    pub(super) fn checkpoint(&mut self) -> Result<bool, BufferError> {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(|e| self.error(e))?;
        Ok(busy == 0)
    }

    /// Once a second: lets the file grow only as far as the volume allows
    /// ([`space::db_limit_pages`]); while frozen, gives free pages back to the volume and,
    /// once space has come back, takes the reserve back and lets the file grow again.
    pub fn fit_to_volume(&mut self) -> Result<(), BufferError> {
        let volume = match space::Volume::of(&self.path) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the buffer volume's free space");
                return Ok(());
            }
        };
        if self.ceiling.is_some() {
            // Room inside the file again (the ingest took records): the cap that made room
            // is lifted; a new refusal sets a new one from what is held then.
            if self.pragma("freelist_count")? * self.page_size >= self.reserve_bytes {
                self.disk_cap = None;
            }
            self.give_back_free_pages()?;
            let volume = space::Volume::of(&self.path).unwrap_or(volume);
            if space::space_is_back(volume, self.reserve_bytes)
                && ensure_reserve(&self.reserve, self.reserve_bytes)
            {
                tracing::info!(
                    "buffer disk: space is back; the reserve is held again and the full quota applies"
                );
                self.ceiling = None;
                self.disk_cap = None;
            }
        }
        let pages = self.pragma("page_count")?;
        let limit = if let Some(ceiling) = self.ceiling {
            ceiling.max(pages)
        } else {
            space::db_limit_pages(
                volume,
                space::Usage::of(&self.path),
                self.reserve_bytes,
                self.page_size,
                pages,
            )
        };
        self.pragma(&format!("max_page_count = {limit}"))?;
        Ok(())
    }

    /// Frees pages the file no longer uses (beyond half the reserve, kept for reuse) back to
    /// the volume: incremental vacuum, then a checkpoint that shrinks the file. In steps of a
    /// quarter of the reserve, each checkpointed, so the WAL it writes (pages moved from the end
    /// of the file into free slots) always fits. Buffers made before auto_vacuum keep their size.
    pub(super) fn give_back_free_pages(&mut self) -> Result<(), BufferError> {
        if self.pragma("auto_vacuum")? != 2 {
            return Ok(());
        }
        let keep = self.reserve_bytes / 2 / self.page_size;
        let step = (self.reserve_bytes / 4 / self.page_size).max(1);
        for _ in 0..16 {
            let free = self.pragma("freelist_count")?;
            if free <= keep {
                break;
            }
            // Stepped to its end: a single step frees only a page.
            let vacuumed = self
                .conn
                .prepare(&format!(
                    "PRAGMA incremental_vacuum({})",
                    (free - keep).min(step)
                ))
                .and_then(|mut stmt| {
                    let mut rows = stmt.query([])?;
                    while rows.next()?.is_some() {}
                    Ok(())
                });
            vacuumed.map_err(|e| self.error(e))?;
            self.checkpoint()?;
        }
        Ok(())
    }

    /// SQLite said the disk is full while the group held no new records (acks, reports):
    /// only WAL room is missing. Release the reserve if the volume is full, and checkpoint.
    pub fn wal_room(&mut self) {
        let volume_full =
            space::Volume::of(&self.path).map_or(true, |v| v.available < self.reserve_bytes / 2);
        if volume_full && self.reserve.exists() {
            let _ = std::fs::remove_file(&self.reserve);
        }
        let _ = self.checkpoint();
    }

    /// SQLite said the disk is full (the volume, or the file's allowed size): release the
    /// reserve if the volume itself is full, checkpoint (which the reserve always makes
    /// possible, emptying the WAL), stop the file from growing, and keep at most 80% of what
    /// is held from now on, so the retried commit evicts by policy to make room.
    pub fn disk_full(&mut self) {
        let volume_full =
            space::Volume::of(&self.path).map_or(true, |v| v.available < self.reserve_bytes / 2);
        if volume_full && self.reserve.exists() {
            tracing::warn!(reserve = %self.reserve.display(), "buffer volume full: releasing the reserve");
            let _ = std::fs::remove_file(&self.reserve);
        }
        if let Err(e) = self.checkpoint() {
            tracing::warn!(error = %e, "buffer checkpoint on a full disk failed; retried");
        }
        // The file stays at the size it had when the disk first filled: housekeeping's headroom
        // above it is not taken as the new ceiling by a later refusal, so repeated refusals
        // cannot creep into the released reserve.
        if let Ok(pages) = self.pragma("page_count") {
            let ceiling = self.ceiling.map_or(pages, |c| c.min(pages));
            self.ceiling = Some(ceiling);
            let _ = self.pragma(&format!("max_page_count = {}", ceiling.max(pages)));
        }
        let held = self.backlog_bytes();
        self.disk_cap = Some(self.disk_cap.unwrap_or(held).min(held) * 4 / 5);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_kept_by_readers_backs_off_and_one_that_met_the_checkpointer_does_not() {
        let mut w = WalRestart::new();
        assert!(w.due());
        w.tried(Restart::Checkpointing);
        assert!(w.due(), "the checkpointer lets go within its pass");
        w.tried(Restart::Kept);
        assert!(!w.due());
        assert_eq!(w.backoff, WAL_RESTART_BACKOFF * 2);
        for _ in 0..10 {
            w.tried(Restart::Kept);
        }
        assert_eq!(w.backoff, WAL_RESTART_MAX_BACKOFF);
        w.tried(Restart::Done);
        assert!(w.due());
        assert_eq!(w.backoff, WAL_RESTART_BACKOFF);
    }
}
