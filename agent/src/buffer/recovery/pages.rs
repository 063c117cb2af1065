//! Table rows read straight off a SQLite file's leaf pages, without its b-tree: what a salvage
//! can still find when interior pages were lost (a truncated file, a zeroed range), which
//! would hide every row below them from SQLite itself. The format is SQLite's documented file
//! format (b-tree pages, cells, overflow pages, records; sqlite.org/fileformat2.html).
//!
//! Invariant: whatever the bytes, nothing here panics, reads out of bounds or allocates more
//! than the file holds, and the work is linear in the file's size: overflow pages (the only
//! reads a page can cause beyond itself) are read at most [`OVERFLOW_READS_PER_PAGE`] times
//! per page of the file in all, so damaged cells that all point into one long or looping
//! chain cannot make a salvage run for hours (CI saw a flipped-bytes file stall the start).
//! A cell it cannot decode is skipped, never guessed at. What it returns is raw material: the
//! caller keeps only rows whose checksum holds.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// One column value of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// NULL (also the rowid alias column, whose value is the cell's rowid).
    Null,
    /// An integer.
    Int(i64),
    /// A float.
    Real(f64),
    /// Text, as stored (not checked to be UTF-8).
    Text(Vec<u8>),
    /// A blob.
    Blob(Vec<u8>),
}

/// One row found on a table leaf page.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Its rowid.
    pub rowid: i64,
    /// Its columns, in table order.
    pub values: Vec<Value>,
}

/// Page geometry, from the file header when it is readable (else the agent's page size for a
/// new file, [`crate::buffer::PAGE_SIZE`]; a file made before it, with 4 KiB pages, whose header
/// is gone is misread and its rows reported lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    page_size: usize,
    usable: usize,
    /// Bytes of the file: no payload is longer.
    file: usize,
}

fn geometry(header: &[u8]) -> Geometry {
    let default = Geometry {
        page_size: crate::buffer::PAGE_SIZE as usize,
        usable: crate::buffer::PAGE_SIZE as usize,
        file: 0,
    };
    if header.len() < 100 || &header[..16] != b"SQLite format 3\0" {
        return default;
    }
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n if n >= 512 && n.is_power_of_two() => n as usize,
        _ => return default,
    };
    let usable = page_size.saturating_sub(header[20] as usize);
    if usable < 480 {
        return default;
    }
    Geometry {
        page_size,
        usable,
        file: 0,
    }
}

/// Overflow page reads allowed per page of the file, over a whole scan. In an intact file every
/// overflow page belongs to one cell and is read once (twice with its WAL image).
pub const OVERFLOW_READS_PER_PAGE: u64 = 4;

/// Every row on a table leaf page of the database file `db` and of the page images in its WAL
/// `wal` (if any), passed to `each`. Pages are read one at a time. Returns how many pages were
/// read, the overflow pages included.
pub fn scan(db: &Path, wal: Option<&Path>, mut each: impl FnMut(Row)) -> u64 {
    let Ok(file) = File::open(db) else { return 0 };
    let len = file.metadata().map_or(0, |m| m.len());
    let mut header = [0u8; 100];
    let g = Geometry {
        file: usize::try_from(len).unwrap_or(usize::MAX),
        ..if file.read_exact_at(&mut header, 0).is_ok() {
            geometry(&header)
        } else {
            geometry(&[])
        }
    };
    let pages = len / g.page_size as u64;
    let mut page = vec![0u8; g.page_size];
    let reads = std::cell::Cell::new(0u64);
    let read_page = |n: u64, buf: &mut [u8]| -> bool {
        reads.set(reads.get() + 1);
        n >= 1
            && n <= pages
            && file
                .read_exact_at(buf, (n - 1) * g.page_size as u64)
                .is_ok()
    };
    let budget = std::cell::Cell::new(pages.saturating_mul(OVERFLOW_READS_PER_PAGE));
    let read_overflow = |n: u64, buf: &mut [u8]| -> bool {
        let left = budget.get();
        budget.set(left.saturating_sub(1));
        left > 0 && read_page(n, buf)
    };
    let free = freelist(&header, pages, &read_page);
    for n in 1..=pages {
        if !free.contains(&n) && read_page(n, &mut page) {
            leaf_rows(&page, n == 1, g, &read_overflow, &mut each);
        }
    }
    // A WAL frame is a 24-byte header and a page image.
    let Some(wal) = wal.and_then(|w| File::open(w).ok()) else {
        return reads.get();
    };
    let wal_len = wal.metadata().map_or(0, |m| m.len());
    let frame = 24 + g.page_size as u64;
    let mut at = 32;
    while at + frame <= wal_len {
        let mut number = [0u8; 4];
        if wal.read_exact_at(&mut number, at).is_ok()
            && wal.read_exact_at(&mut page, at + 24).is_ok()
        {
            let n = u32::from_be_bytes(number) as u64;
            leaf_rows(&page, n == 1, g, &read_overflow, &mut each);
        }
        at += frame;
    }
    reads.get()
}

/// The pages on the file's freelist (trunks and leaves), as far as it can be followed: a freed
/// page keeps the rows it held when it was freed (records delivered or evicted since), which
/// must not come back. Each trunk is visited once; a damaged list ends the walk.
fn freelist(
    header: &[u8; 100],
    pages: u64,
    read_page: &dyn Fn(u64, &mut [u8]) -> bool,
) -> std::collections::HashSet<u64> {
    let mut free = std::collections::HashSet::new();
    if &header[..16] != b"SQLite format 3\0" {
        return free;
    }
    let mut trunk = be32(header, 32).map_or(0, u64::from);
    let mut page = vec![0u8; geometry(header).page_size];
    while trunk >= 1 && trunk <= pages && free.insert(trunk) && read_page(trunk, &mut page) {
        let leaves = be32(&page, 4).map_or(0, |n| n as usize);
        for i in 0..leaves.min(page.len() / 4 - 2) {
            if let Some(leaf) = be32(&page, 8 + 4 * i).map(u64::from)
                && leaf >= 1
                && leaf <= pages
            {
                free.insert(leaf);
            }
        }
        trunk = be32(&page, 0).map_or(0, u64::from);
    }
    free
}

/// The rows of one page, if it is a table leaf page.
fn leaf_rows(
    page: &[u8],
    first: bool,
    g: Geometry,
    read_page: &dyn Fn(u64, &mut [u8]) -> bool,
    each: &mut dyn FnMut(Row),
) {
    let hdr = if first { 100 } else { 0 };
    if page.get(hdr) != Some(&0x0D) {
        return;
    }
    let Some(cells) = be16(page, hdr + 3) else {
        return;
    };
    for i in 0..cells as usize {
        let Some(at) = be16(page, hdr + 8 + 2 * i) else {
            return;
        };
        if let Some(row) = cell(page, at as usize, g, read_page) {
            each(row);
        }
    }
}

/// One table leaf cell: payload length, rowid, payload (local part, then its overflow chain).
fn cell(
    page: &[u8],
    at: usize,
    g: Geometry,
    read_page: &dyn Fn(u64, &mut [u8]) -> bool,
) -> Option<Row> {
    let (total, n) = varint(page.get(at..)?)?;
    let (rowid, m) = varint(page.get(at + n..)?)?;
    let start = at + n + m;
    let total = usize::try_from(total).ok().filter(|t| *t <= g.file)?;
    let (u, x) = (g.usable, g.usable - 35);
    let local = if total <= x {
        total
    } else {
        let min = (u - 12) * 32 / 255 - 23;
        let k = min + (total - min) % (u - 4);
        if k <= x { k } else { min }
    };
    let mut payload = page.get(start..start + local)?.to_vec();
    if local < total {
        // The rest is on overflow pages: 4 bytes of next page number, then content.
        let mut next = be32(page, start + local)? as u64;
        let mut overflow = vec![0u8; g.page_size];
        let mut hops = 0;
        while payload.len() < total {
            hops += 1;
            if next == 0 || hops > total / (u - 4) + 1 || !read_page(next, &mut overflow) {
                return None;
            }
            let want = (total - payload.len()).min(u - 4);
            payload.extend_from_slice(overflow.get(4..4 + want)?);
            next = be32(&overflow, 0)? as u64;
        }
    }
    Some(Row {
        rowid: rowid as i64,
        values: record(&payload)?,
    })
}

/// Most columns a record may have (the buffer's widest table has 9).
const MAX_COLUMNS: usize = 32;

/// Decodes a record: a header of serial types, then the values.
pub fn record(payload: &[u8]) -> Option<Vec<Value>> {
    let (header_len, mut h) = varint(payload)?;
    let header_len = usize::try_from(header_len).ok()?;
    if header_len > payload.len() || header_len == 0 {
        return None;
    }
    let mut body = header_len;
    let mut values = Vec::new();
    while h < header_len {
        // No table of the buffer has more columns; a header claiming more is damage.
        if values.len() == MAX_COLUMNS {
            return None;
        }
        let (serial, n) = varint(payload.get(h..header_len)?)?;
        h += n;
        let int = |len: usize, body: usize| -> Option<i64> {
            let bytes = payload.get(body..body + len)?;
            let mut v: i64 = if bytes.first()? & 0x80 != 0 { -1 } else { 0 };
            for b in bytes {
                v = (v << 8) | *b as i64;
            }
            Some(v)
        };
        let (value, len) = match serial {
            0 => (Value::Null, 0),
            1..=4 => (Value::Int(int(serial as usize, body)?), serial as usize),
            5 => (Value::Int(int(6, body)?), 6),
            6 => (Value::Int(int(8, body)?), 8),
            7 => (Value::Real(f64::from_bits(int(8, body)? as u64)), 8),
            8 => (Value::Int(0), 0),
            9 => (Value::Int(1), 0),
            10 | 11 => return None,
            s => {
                let len = usize::try_from((s - 12) / 2).ok()?;
                let bytes = payload.get(body..body.checked_add(len)?)?.to_vec();
                if s % 2 == 0 {
                    (Value::Blob(bytes), len)
                } else {
                    (Value::Text(bytes), len)
                }
            }
        };
        body = body.checked_add(len)?;
        if body > payload.len() {
            return None;
        }
        values.push(value);
    }
    Some(values)
}

/// SQLite's varint: 1 to 9 bytes, big-endian, 7 bits a byte (8 in the ninth). (value, length).
pub fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, b) in bytes.iter().take(9).enumerate() {
        if i == 8 {
            return Some(((v << 8) | *b as u64, 9));
        }
        v = (v << 7) | (*b & 0x7F) as u64;
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        for (bytes, want) in [
            (&[0x00][..], Some((0, 1))),
            (&[0x7F][..], Some((127, 1))),
            (&[0x81, 0x00][..], Some((128, 2))),
            (&[0xFF; 9][..], Some((u64::MAX, 9))),
            (&[0x81][..], None),
            (&[][..], None),
        ] {
            assert_eq!(varint(bytes), want, "{bytes:?}");
        }
    }

    /// Rows written by SQLite itself are read back exactly from the raw pages, large ones
    /// (overflow pages) included.
    #[test]
    fn rows_come_back_from_the_pages_sqlite_wrote() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, s TEXT, b BLOB, f REAL, z);",
        )
        .expect("schema");
        let mut want = Vec::new();
        for i in 0..300i64 {
            let blob: Vec<u8> = (0..(i as usize * 37) % 9000)
                .map(|k| (k * 7 + i as usize) as u8)
                .collect();
            conn.execute(
                "INSERT INTO t (id, n, s, b, f, z) VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
                rusqlite::params![
                    i * 1000 + 1,
                    i - 150,
                    format!("row {i}"),
                    blob,
                    i as f64 / 4.0
                ],
            )
            .expect("insert");
            want.push(Row {
                rowid: i * 1000 + 1,
                values: vec![
                    Value::Null,
                    Value::Int(i - 150),
                    Value::Text(format!("row {i}").into_bytes()),
                    Value::Blob(blob),
                    Value::Real(i as f64 / 4.0),
                    Value::Null,
                ],
            });
        }
        drop(conn);
        let mut got = Vec::new();
        scan(&path, None, |r| {
            if r.values.len() == 6 {
                got.push(r)
            }
        });
        got.sort_by_key(|r| r.rowid);
        // Real 0.0 and small integers are stored compactly; compare what matters.
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((g.rowid, &g.values[1..4]), (w.rowid, &w.values[1..4]));
        }
    }

    /// Leaf pages full of cells that each claim a payload as large as the file, whose overflow
    /// chain loops on itself: the scan's reads stay linear in the file's size.
    #[test]
    fn looping_overflow_chains_cost_reads_linear_in_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("loop.db");
        let pages = 400usize;
        let mut bytes = vec![0u8; pages * 4096];
        for p in 1..pages {
            let page = &mut bytes[p * 4096..(p + 1) * 4096];
            if p % 2 == 1 {
                // A leaf whose 50 cells all start at offset 2048: a payload of the whole
                // file (varint 1,638,400), rowid 1, 1,600 bytes kept on the page, then the
                // number of the next page (an overflow page).
                page[0] = 0x0D;
                page[3..5].copy_from_slice(&50u16.to_be_bytes());
                for i in 0..50 {
                    page[8 + 2 * i..10 + 2 * i].copy_from_slice(&2048u16.to_be_bytes());
                }
                page[2048..2051].copy_from_slice(&[0x80 | 0x64, 0x80, 0x00]);
                page[2051] = 1;
                page[2052 + 1600..2052 + 1604].copy_from_slice(&(p as u32 + 2).to_be_bytes());
            } else {
                // An overflow page pointing at itself.
                page[..4].copy_from_slice(&(p as u32 + 1).to_be_bytes());
            }
        }
        std::fs::write(&path, &bytes).expect("write");
        let reads = scan(&path, None, |_| {});
        let bound = pages as u64 * (1 + OVERFLOW_READS_PER_PAGE);
        assert!(reads <= bound, "{reads} reads for {pages} pages");
    }

    /// Rows deleted from the table stay on the pages SQLite freed; they are not read back.
    #[test]
    fn rows_on_freed_pages_stay_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB);")
            .expect("schema");
        for i in 0..2000i64 {
            conn.execute(
                "INSERT INTO t (id, b) VALUES (?1, ?2)",
                rusqlite::params![i, vec![i as u8; 300]],
            )
            .expect("insert");
        }
        conn.execute("DELETE FROM t WHERE id < 1500", [])
            .expect("delete");
        let free: i64 = conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .expect("freelist");
        assert!(free > 50, "pages were freed: {free}");
        drop(conn);
        let mut ids = Vec::new();
        scan(&path, None, |r| {
            if r.values.len() == 2 {
                ids.push(r.rowid)
            }
        });
        ids.sort_unstable();
        assert_eq!(ids, (1500..2000).collect::<Vec<_>>());
    }

    /// Property: arbitrary bytes, as a whole file or as a record, never panic.
    #[test]
    fn garbage_never_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200 {
            let len = (next() % 20_000) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 && len > 200 {
                // Plausible headers and leaf pages, to get deeper.
                bytes[..16].copy_from_slice(b"SQLite format 3\0");
                bytes[16] = 0x02;
                bytes[17] = 0x00;
                for p in (0..len).step_by(512) {
                    bytes[p] = 0x0D;
                }
            }
            let _ = record(&bytes);
            let path = dir.path().join(format!("g{round}.db"));
            std::fs::write(&path, &bytes).expect("write");
            scan(&path, Some(&path), |_| {});
        }
    }
}
