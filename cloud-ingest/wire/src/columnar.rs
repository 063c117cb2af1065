//! Body version 2, the columnar batch (`batch_v2.proto`; `SPEC.md`, "Columnar body"): the
//! records of a [`Batch`] laid out as columns, so that zstd sees the payloads one after another
//! and the metadata as runs of small numbers (sequence and time deltas, indexes into a table of
//! the batch's topics and one of its boot ids). Encoding is exact: decoding gives back the same
//! [`Batch`]. Pure.
//!
//! Invariant: a v2 body costs the receiver no more than a v1 body of the same decompressed
//! size. Every column and table is counted before anything is decoded (at most `max_records`
//! values each; a record's attributes at most [`MAX_ATTRIBUTES`]); a table's string moves into
//! the last record that uses it, and what records copy of the entries they share may not pass
//! half the decompressed body plus [`SHARED_BYTES_PER_RECORD`] per record (else 413; a sender
//! checks with [`encode_columnar_within_limits`] and sends version 1 instead). The receiver
//! charges a v2 body [`crate::DECODED_RECORD_BYTES_V2`] per record for it.

use std::collections::HashMap;

use bytes::Bytes;
use prost::Message;

use crate::batch::v2;
use crate::codec::walk;
use crate::{Attribute, Batch, DecodeError, Limits, MAX_ATTRIBUTES, Record};

/// What the records of a v2 body may copy of the table entries they share (topics and boot ids
/// used by more than one record), beyond half the decompressed body: this many bytes per
/// record (charged per record, [`crate::DECODED_RECORD_BYTES_V2`]).
pub const SHARED_BYTES_PER_RECORD: usize = 512;

/// The `qos` column's value for a record whose QoS is not known.
const QOS_UNKNOWN: u32 = 3;

/// Serialises a batch as a v2 (columnar) protobuf message, uncompressed. Columns that would
/// only repeat their default (one topic, one boot id, unknown times or QoS) are left out.
pub fn encode_columnar(batch: &Batch) -> Vec<u8> {
    columns(batch).encode_to_vec()
}

/// [`encode_columnar`], or `None` when the batch's records share so much of their topics and
/// boot ids that a receiver refuses it (413, [`DecodeError::Expands`]): send it as version 1
/// then (long topics shared by many short records).
pub fn encode_columnar_within_limits(batch: &Batch) -> Option<Vec<u8>> {
    let columns = columns(batch);
    let encoded = columns.encode_to_vec();
    let n = batch.records.len();
    (shared_copies(&columns, n) <= may_copy(encoded.len(), n)).then_some(encoded)
}

/// Bytes the `n` records of `b` copy of the table entries they share: each entry's length
/// once more for every record past the first that uses it (the first gets the entry itself).
fn shared_copies(b: &v2::Batch, n: usize) -> u64 {
    fn copies(table: &[String], indexes: &[u32], n: usize) -> u64 {
        let len = |t: usize| table.get(t).map_or(0, |s| s.len() as u64);
        let used: u64 = if indexes.is_empty() {
            len(0) * n as u64
        } else {
            indexes.iter().map(|t| len(*t as usize)).sum()
        };
        used.saturating_sub(table.iter().map(|s| s.len() as u64).sum())
    }
    copies(&b.topics, &b.topic_indexes, n) + copies(&b.boot_ids, &b.boot_indexes, n)
}

/// What the `n` records of a v2 body of `decompressed` bytes may copy of shared entries.
fn may_copy(decompressed: usize, n: usize) -> u64 {
    decompressed as u64 / 2 + SHARED_BYTES_PER_RECORD as u64 * n as u64
}

/// The columns of `batch`.
fn columns(batch: &Batch) -> v2::Batch {
    let records = &batch.records;
    let mut out = v2::Batch {
        device_id: batch.device_id.clone(),
        stream: batch.stream.clone(),
        sent_at_ms: batch.sent_at_ms,
        epoch: batch.epoch,
        payloads: Bytes::from(
            records
                .iter()
                .flat_map(|r| r.payload.iter().copied())
                .collect::<Vec<u8>>(),
        ),
        ..Default::default()
    };
    let mut topics: HashMap<&str, u32> = HashMap::new();
    let mut boots: HashMap<&str, u32> = HashMap::new();
    let (mut seq, mut received, mut monotonic) = (0u64, batch.sent_at_ms, 0i64);
    for (i, r) in records.iter().enumerate() {
        out.seq_deltas.push(r.seq.wrapping_sub(seq));
        seq = r.seq;
        out.topic_indexes
            .push(index_in(&mut out.topics, &mut topics, &r.topic));
        out.payload_lengths.push(r.payload.len() as u64);
        out.received_at_deltas
            .push(r.received_at_ms.wrapping_sub(received));
        received = r.received_at_ms;
        out.boot_indexes
            .push(index_in(&mut out.boot_ids, &mut boots, &r.boot_id));
        out.monotonic_deltas
            .push((r.monotonic_ms as i64).wrapping_sub(monotonic));
        monotonic = r.monotonic_ms as i64;
        out.qos.push(r.qos.unwrap_or(QOS_UNKNOWN));
        if !r.attributes.is_empty() {
            out.attributes.push(v2::RecordAttributes {
                record: i as u32,
                attributes: r
                    .attributes
                    .iter()
                    .map(|a| v2::Attribute {
                        key: a.key.clone(),
                        value: a.value.clone(),
                    })
                    .collect(),
            });
        }
    }
    if out.topics.len() == 1 {
        out.topic_indexes.clear();
    }
    if out.boot_ids.len() == 1 {
        out.boot_indexes.clear();
        if out.boot_ids[0].is_empty() {
            out.boot_ids.clear();
        }
    }
    if records.iter().all(|r| r.received_at_ms == 0) {
        out.received_at_deltas.clear();
    }
    if records.iter().all(|r| r.monotonic_ms == 0) {
        out.monotonic_deltas.clear();
    }
    if records.iter().all(|r| r.qos.is_none()) {
        out.qos.clear();
    }
    out
}

/// `value`'s index in `table` (whose entries `seen` indexes), added at its end if new.
fn index_in<'a>(table: &mut Vec<String>, seen: &mut HashMap<&'a str, u32>, value: &'a str) -> u32 {
    *seen.entry(value).or_insert_with(|| {
        table.push(value.to_owned());
        table.len() as u32 - 1
    })
}

/// Field numbers of `batch_v2.proto`'s `Batch` that hold one value per record (packed).
const COLUMNS: [(u64, &str); 7] = [
    (6, "seq_deltas"),
    (8, "topic_indexes"),
    (9, "payload_lengths"),
    (11, "received_at_deltas"),
    (13, "boot_indexes"),
    (14, "monotonic_deltas"),
    (15, "qos"),
];
/// Field numbers of its tables and of the per-record attributes: one entry per field.
const ENTRIES: [(u64, &str); 3] = [(7, "topics"), (12, "boot_ids"), (16, "attributes")];

/// Counts the values of every column and table of an encoded v2 batch without decoding it
/// (a packed column's values are its bytes that end a varint), and each record's attributes;
/// refuses any count over `max_records` (or [`MAX_ATTRIBUTES`]). Fails closed like the v1
/// count: a body it cannot walk to its end is refused.
fn count_values(raw: &[u8], max_records: usize) -> Result<(), DecodeError> {
    let mut counts = [0usize; 17];
    walk(raw, |field, value| {
        let Some(slot) = usize::try_from(field).ok().and_then(|f| counts.get_mut(f)) else {
            return Ok(());
        };
        if COLUMNS.iter().any(|(f, _)| *f == field) {
            *slot += value.map_or(1, |packed| packed.iter().filter(|b| **b < 0x80).count());
        } else if ENTRIES.iter().any(|(f, _)| *f == field) {
            *slot += 1;
            if let (16, Some(entry)) = (field, value) {
                let mut attributes = 0usize;
                walk(entry, |inner, _| {
                    attributes += usize::from(inner == 2);
                    Ok(())
                })?;
                if attributes > MAX_ATTRIBUTES {
                    return Err(DecodeError::Invalid(format!(
                        "attributes[{}] holds {attributes} attributes; at most {MAX_ATTRIBUTES}",
                        *slot - 1
                    )));
                }
            }
        }
        Ok(())
    })?;
    match COLUMNS
        .iter()
        .chain(&ENTRIES)
        .find(|(f, _)| counts[*f as usize] > max_records)
    {
        Some((f, _)) => Err(DecodeError::TooManyRecords {
            count: counts[*f as usize],
            limit: max_records,
        }),
        None => Ok(()),
    }
}

/// Decodes a v2 body (decompressed) into the [`Batch`] it stands for, checking its columns
/// against each other; the contract's rules for every batch are checked after, as for v1.
pub(crate) fn decode_columnar(raw: Bytes, limits: Limits) -> Result<Batch, DecodeError> {
    count_values(&raw, limits.max_records)?;
    let raw_len = raw.len();
    let mut b = v2::Batch::decode(raw).map_err(DecodeError::Protobuf)?;
    let invalid = |reason: String| Err(DecodeError::Invalid(reason));
    let n = b.payload_lengths.len();
    if n == 0 {
        return invalid("a batch needs at least one record (payload_lengths is empty)".into());
    }
    let total = b
        .payload_lengths
        .iter()
        .try_fold(0u64, |sum, len| sum.checked_add(*len));
    if total != Some(b.payloads.len() as u64) {
        return invalid(format!(
            "payload_lengths add up to {} bytes, but payloads holds {} (a v2 body is one message: two concatenated ones are not a batch)",
            total.map_or_else(|| "more than 2^64".into(), |t| t.to_string()),
            b.payloads.len()
        ));
    }
    for (name, len, may_be_empty) in [
        ("seq_deltas", b.seq_deltas.len(), false),
        ("topic_indexes", b.topic_indexes.len(), b.topics.len() == 1),
        ("received_at_deltas", b.received_at_deltas.len(), true),
        ("boot_indexes", b.boot_indexes.len(), b.boot_ids.len() <= 1),
        ("monotonic_deltas", b.monotonic_deltas.len(), true),
        ("qos", b.qos.len(), true),
    ] {
        if len != n && !(len == 0 && may_be_empty) {
            return invalid(format!(
                "{name} has {len} values for {n} records (payload_lengths); it needs one per record{}",
                if may_be_empty { " or none" } else { "" }
            ));
        }
    }
    let topic_of = column_of("topic", &b.topic_indexes, b.topics.len())?;
    let boot_of = column_of("boot id", &b.boot_indexes, b.boot_ids.len())?;
    let copied = shared_copies(&b, n);
    let allowed = may_copy(raw_len, n);
    if copied > allowed {
        return Err(DecodeError::Expands {
            bytes: copied,
            limit: allowed,
        });
    }
    if let Some(q) = b.qos.iter().find(|q| **q > QOS_UNKNOWN) {
        return invalid(format!("qos {q} is not 0, 1, 2 or {QOS_UNKNOWN} (unknown)"));
    }
    let mut previous = None;
    for a in &b.attributes {
        if a.record as usize >= n || previous.is_some_and(|p| a.record <= p) {
            return invalid(format!(
                "attributes for record {} out of order or past the {n} records",
                a.record
            ));
        }
        previous = Some(a.record);
    }
    // Each table entry goes into its last record and is cloned for the others: the strings
    // are never held twice.
    let last_use = |table: usize, index: &dyn Fn(usize) -> Option<usize>| {
        let mut last = vec![usize::MAX; table];
        for i in 0..n {
            if let Some(t) = index(i) {
                last[t] = i;
            }
        }
        last
    };
    let (topic_last, boot_last) = (
        last_use(b.topics.len(), &topic_of),
        last_use(b.boot_ids.len(), &boot_of),
    );
    if let Some(t) = topic_last.iter().position(|i| *i == usize::MAX) {
        return invalid(format!("topics[{t}] is used by no record"));
    }
    if let Some(t) = boot_last.iter().position(|i| *i == usize::MAX) {
        return invalid(format!("boot_ids[{t}] is used by no record"));
    }
    let take = |table: &mut [String], last: &[usize], t: usize, i: usize| {
        if last[t] == i {
            std::mem::take(&mut table[t])
        } else {
            table[t].clone()
        }
    };
    let mut attributes = std::mem::take(&mut b.attributes).into_iter().peekable();
    let mut records = Vec::with_capacity(n);
    let (mut seq, mut received, mut monotonic, mut at) = (0u64, b.sent_at_ms, 0i64, 0usize);
    for i in 0..n {
        seq = seq.wrapping_add(b.seq_deltas[i]);
        let received_at_ms = match b.received_at_deltas.get(i) {
            Some(delta) => {
                received = received.wrapping_add(*delta);
                received
            }
            None => 0,
        };
        monotonic = monotonic.wrapping_add(b.monotonic_deltas.get(i).copied().unwrap_or(0));
        let len = b.payload_lengths[i] as usize;
        let topic =
            topic_of(i).map_or_else(String::new, |t| take(&mut b.topics, &topic_last, t, i));
        let boot_id =
            boot_of(i).map_or_else(String::new, |t| take(&mut b.boot_ids, &boot_last, t, i));
        let attributes = match attributes.next_if(|a| a.record as usize == i) {
            Some(a) => a
                .attributes
                .into_iter()
                .map(|a| Attribute {
                    key: a.key,
                    value: a.value,
                })
                .collect(),
            None => Vec::new(),
        };
        records.push(Record {
            seq,
            topic,
            // A copy, not a slice: a record may outlive the request (a sink's send queue), and
            // a slice would keep the whole body alive, uncharged.
            payload: Bytes::copy_from_slice(&b.payloads[at..at + len]),
            qos: b.qos.get(i).copied().filter(|q| *q != QOS_UNKNOWN),
            received_at_ms,
            boot_id,
            monotonic_ms: monotonic as u64,
            attributes,
        });
        at += len;
    }
    Ok(Batch {
        device_id: b.device_id,
        stream: b.stream,
        sent_at_ms: b.sent_at_ms,
        records,
        epoch: b.epoch,
    })
}

/// The table index of each record for a column of indexes into a table of `table` entries
/// (empty column: every record has entry 0, or none when the table is empty); checks every
/// index is in the table.
fn column_of<'a>(
    what: &str,
    indexes: &'a [u32],
    table: usize,
) -> Result<impl Fn(usize) -> Option<usize> + 'a, DecodeError> {
    if let Some(bad) = indexes.iter().find(|t| **t as usize >= table) {
        return Err(DecodeError::Invalid(format!(
            "a {what} index {bad} is past the table's {table} entries"
        )));
    }
    Ok(move |i: usize| {
        if indexes.is_empty() {
            (table > 0).then_some(0)
        } else {
            Some(indexes[i] as usize)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_decompressed_bytes: 1 << 20,
        max_records: 100,
    };

    fn record(seq: u64, topic: &str, boot: &str) -> Record {
        Record {
            seq,
            topic: topic.into(),
            payload: Bytes::from(format!("{{\"t\":{seq}}}")),
            qos: None,
            received_at_ms: 1_795_000_000_000 + seq as i64 * 10,
            boot_id: boot.into(),
            monotonic_ms: 60_000 + seq * 10,
            attributes: Vec::new(),
        }
    }

    fn batch(records: Vec<Record>) -> Batch {
        Batch {
            device_id: "dev-1".into(),
            stream: "telemetry".into(),
            sent_at_ms: 1_795_000_001_000,
            records,
            epoch: 7,
        }
    }

    fn round_trip(b: &Batch) -> Batch {
        decode_columnar(Bytes::from(encode_columnar(b)), LIMITS).expect("decodes")
    }

    #[test]
    fn round_trips_and_leaves_out_what_says_nothing() {
        let mut b = batch(
            (1..=5)
                .map(|s| record(s, "plant/1/temp", "boot-a"))
                .collect(),
        );
        assert_eq!(round_trip(&b), b);
        let message = v2::Batch::decode(encode_columnar(&b).as_slice()).expect("decode");
        assert!(message.topic_indexes.is_empty() && message.boot_indexes.is_empty());
        assert!(message.qos.is_empty());
        assert_eq!(message.topics, ["plant/1/temp"]);
        assert_eq!(message.seq_deltas, [1, 1, 1, 1, 1]);
        // Two topics, a reboot with the clock set back, gaps, QoS, attributes, no times.
        b.records[1].topic = "plant/1/hum".into();
        b.records[3].boot_id = "boot-b".into();
        b.records[3].monotonic_ms = 5;
        b.records[3].received_at_ms = 3;
        b.records[4].seq = 90;
        b.records[2].qos = Some(2);
        b.records[4].attributes = vec![Attribute {
            key: "site".into(),
            value: "north".into(),
        }];
        assert_eq!(round_trip(&b), b);
        for r in &mut b.records {
            (r.received_at_ms, r.monotonic_ms, r.boot_id) = (0, 0, String::new());
        }
        assert_eq!(round_trip(&b), b);
        let message = v2::Batch::decode(encode_columnar(&b).as_slice()).expect("decode");
        assert!(message.received_at_deltas.is_empty() && message.boot_ids.is_empty());
    }

    #[test]
    fn columns_that_disagree_are_refused() {
        let good = v2::Batch::decode(
            encode_columnar(&batch(vec![record(1, "a", "x"), record(2, "b", "x")])).as_slice(),
        )
        .expect("decode");
        let refused = |change: &dyn Fn(&mut v2::Batch), why: &str| {
            let mut m = good.clone();
            change(&mut m);
            let err = decode_columnar(Bytes::from(m.encode_to_vec()), LIMITS).unwrap_err();
            assert!(err.to_string().contains(why), "{why}: {err}");
        };
        refused(&|m| m.payload_lengths.clear(), "at least one record");
        refused(
            &|m| m.seq_deltas.pop().map(drop).unwrap_or(()),
            "seq_deltas has 1",
        );
        refused(&|m| m.topic_indexes[1] = 5, "past the table");
        refused(&|m| m.topics.push("c".into()), "used by no record");
        refused(&|m| m.payload_lengths[0] += 1, "add up to");
        refused(&|m| m.qos = vec![4, 0], "qos 4");
        refused(
            &|m| {
                m.attributes = vec![
                    v2::RecordAttributes {
                        record: 1,
                        attributes: vec![],
                    },
                    v2::RecordAttributes {
                        record: 0,
                        attributes: vec![],
                    },
                ]
            },
            "out of order",
        );
        refused(
            &|m| {
                m.topic_indexes.clear();
                m.topics.clear();
            },
            "topic_indexes has 0 values",
        );
        // Two messages one after the other: the payloads of the second replace the first's.
        let mut two = good.encode_to_vec();
        two.extend(good.encode_to_vec());
        let err = decode_columnar(Bytes::from(two), LIMITS).unwrap_err();
        assert!(err.to_string().contains("concatenated"), "{err}");
    }

    #[test]
    fn a_small_body_that_writes_out_large_is_refused() {
        // One 60 KiB topic shared by 100 records: 6 MB written out, from a few KB.
        let topic = "t".repeat(60_000);
        let b = batch((1..=100).map(|s| record(s, &topic, "x")).collect());
        let raw = encode_columnar(&b);
        assert!(raw.len() < 70_000, "{}", raw.len());
        let err = decode_columnar(Bytes::from(raw), LIMITS).unwrap_err();
        assert!(matches!(err, DecodeError::Expands { .. }), "{err}");
    }

    #[test]
    fn a_sender_knows_before_sending_that_a_batch_would_be_refused() {
        let long = "t".repeat(2_000);
        let b = batch((1..=100).map(|s| record(s, &long, "x")).collect());
        assert!(encode_columnar_within_limits(&b).is_none());
        assert_eq!(
            crate::BodyVersion::V2.encode(&b).1,
            crate::BodyVersion::V1,
            "sent as version 1 instead"
        );
        let err = decode_columnar(Bytes::from(encode_columnar(&b)), LIMITS).unwrap_err();
        assert!(matches!(err, DecodeError::Expands { .. }), "{err}");
        let b = batch((1..=100).map(|s| record(s, "plant/1/t", "x")).collect());
        let encoded = encode_columnar_within_limits(&b).expect("fits");
        assert_eq!(
            decode_columnar(Bytes::from(encoded), LIMITS).expect("decodes"),
            b
        );
    }

    #[test]
    fn columns_are_counted_before_decoding() {
        let mut m =
            v2::Batch::decode(encode_columnar(&batch(vec![record(1, "a", "x")])).as_slice())
                .expect("decode");
        m.qos = vec![0; 1_000_000];
        let err = count_values(&m.encode_to_vec(), 100).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::TooManyRecords {
                    count: 1_000_000,
                    limit: 100
                }
            ),
            "{err}"
        );
        m.qos.clear();
        m.attributes = vec![v2::RecordAttributes {
            record: 0,
            attributes: (0..=MAX_ATTRIBUTES)
                .map(|i| v2::Attribute {
                    key: format!("a{i}"),
                    value: "v".into(),
                })
                .collect(),
        }];
        let err = count_values(&m.encode_to_vec(), 100).unwrap_err();
        assert!(err.to_string().contains("at most 16"), "{err}");
    }
}
