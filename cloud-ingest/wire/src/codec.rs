//! Encoding and bounded decoding of batch bodies, and the checks every batch must pass.
//!
//! Invariant: decoding never allocates more than `max_decompressed_bytes` for the body, whatever
//! the compression ratio of the input (zstd bombs are cut off, not expanded), plus a zstd window
//! of at most 2^[`MAX_WINDOW_LOG`] bytes; and a batch of more than `max_records` records is
//! refused before any record is decoded (a protobuf body's records are counted by walking its
//! top-level fields; a JSON body's array stops at the limit), so a small body of millions of
//! empty records costs no more than its bytes. The same holds for a record's attributes: at
//! most [`MAX_ATTRIBUTES`] each, counted before decoding.

use std::io::Read;

use prost::Message;

use crate::{
    Batch, CONTENT_TYPE_JSON, ENCODING_ZSTD, MAX_ATTRIBUTE_VALUE_BYTES, MAX_ATTRIBUTES,
    MAX_TOPIC_BYTES, attribute_name_problem, valid_name,
};

/// Limits the receiver applies to one batch body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body once decompressed.
    pub max_decompressed_bytes: usize,
    /// Most records in one batch.
    pub max_records: usize,
}

/// Why a body is not a valid batch. Every variant is the sender's fault: it is answered with
/// 413 ([`DecodeError::TooLarge`], [`DecodeError::TooManyRecords`], [`DecodeError::Expands`]:
/// split and resend) or 400 (all others) and must not be retried as is.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body expands past the decompressed-size limit.
    #[error("body expands past the limit of {limit} bytes once decompressed")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A v2 (columnar) body whose records share so much of its topics and boot ids that
    /// their copies would pass half its decompressed size plus
    /// [`crate::columnar::SHARED_BYTES_PER_RECORD`] per record (answered 413: split and resend).
    #[error(
        "the records share {bytes} bytes of topics and boot ids, past the {limit} this body may copy (half its decompressed size plus {per} per record): split the batch",
        per = crate::columnar::SHARED_BYTES_PER_RECORD
    )]
    Expands {
        /// Bytes the records copy of the entries they share.
        bytes: u64,
        /// What this body may copy.
        limit: u64,
    },
    /// More records than the receiver takes in one batch (answered 413: split and resend).
    #[error("{count} records, more than the limit of {limit} per batch")]
    TooManyRecords {
        /// Records in the batch.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// Content-Encoding other than identity or zstd.
    #[error("unsupported Content-Encoding {0:?} (expected \"zstd\" or none)")]
    Encoding(String),
    /// Content-Type other than the protobuf batch or JSON.
    #[error("unsupported Content-Type {0:?} (expected {v2:?}, {proto:?} or {json:?})", v2 = crate::CONTENT_TYPE_BATCH_V2, proto = crate::CONTENT_TYPE_BATCH, json = CONTENT_TYPE_JSON)]
    ContentType(String),
    /// The zstd stream is corrupt or truncated.
    #[error("body is not a valid zstd stream")]
    Zstd(#[source] std::io::Error),
    /// The protobuf message does not decode.
    #[error("body is not a valid protobuf Batch")]
    Protobuf(#[source] prost::DecodeError),
    /// The JSON batch does not parse.
    #[error("body is not a valid JSON batch: {0}")]
    Json(#[source] serde_json::Error),
    /// It decodes, but breaks a rule of the contract.
    #[error("invalid batch: {0}")]
    Invalid(String),
}

/// Serialises a batch to protobuf bytes (uncompressed).
pub fn encode_batch(batch: &Batch) -> Vec<u8> {
    batch.encode_to_vec()
}

/// Compresses `raw` as one zstd frame at `level`.
pub fn compress(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(raw, level)
}

/// Compresses `raw` as one zstd frame at `level` with `dictionary`; the frame header names the
/// dictionary's id, so the receiver knows which one to decode it with.
pub fn compress_with_dictionary(
    raw: &[u8],
    level: i32,
    dictionary: &[u8],
) -> std::io::Result<Vec<u8>> {
    zstd::bulk::Compressor::with_dictionary(level, dictionary)?.compress(raw)
}

/// Trains a zstd dictionary of at most `max_bytes` on `samples` (typically encoded batches of
/// a single record each); it declares a random id.
pub fn train_dictionary(samples: &[Vec<u8>], max_bytes: usize) -> std::io::Result<Vec<u8>> {
    zstd::dict::from_samples(samples, max_bytes)
}

/// The id a zstd dictionary declares (trained dictionaries carry one); `None` for raw content.
pub fn dictionary_id(dictionary: &[u8]) -> Option<u32> {
    zstd::zstd_safe::get_dict_id_from_dict(dictionary).map(u32::from)
}

/// The dictionary id in the header of a body's first zstd frame, if it names one: the receiver
/// needs that dictionary (registered at [`crate::DICTIONARIES_PATH`]) to decode the body.
pub fn frame_dictionary_id(body: &[u8]) -> Option<u32> {
    zstd::zstd_safe::get_dict_id_from_frame(body).map(u32::from)
}

/// The most bytes `body` can decompress to under `max_decompressed_bytes`: its own length
/// without encoding; for zstd, the size a single frame declares, else the limit. Decoding with
/// this as the limit is what makes it true (a frame that decompresses past its declared size
/// is refused), so a receiver can budget memory by it before decoding.
pub fn decoded_size_bound(
    body: &[u8],
    content_encoding: Option<&str>,
    max_decompressed_bytes: usize,
) -> usize {
    let zstd = content_encoding.is_some_and(|e| e.trim().eq_ignore_ascii_case(ENCODING_ZSTD));
    if !zstd {
        return body.len().min(max_decompressed_bytes);
    }
    let single_frame = zstd::zstd_safe::find_frame_compressed_size(body) == Ok(body.len());
    zstd::zstd_safe::get_frame_content_size(body)
        .ok()
        .flatten()
        .filter(|_| single_frame)
        .and_then(|n| usize::try_from(n).ok())
        .map_or(max_decompressed_bytes, |n| n.min(max_decompressed_bytes))
}

/// Largest zstd window a body may need, as a power of two (16 MiB): the agent's levels and
/// batch sizes stay well under it; a frame asking for more is refused, not allocated.
pub const MAX_WINDOW_LOG: u32 = 24;

/// The records of an encoded [`Batch`], counted without decoding them: its top-level fields
/// walked (field 4, length-delimited, is a record), and each record's own fields walked to count
/// its attributes (field 8): a record with more than [`MAX_ATTRIBUTES`] is refused here, so
/// what decoding costs per record is bounded too. Fails closed: a body it cannot walk to its
/// end (a group, which the decoder would skip and go on; a truncated field) is refused, so
/// nothing it did not count is ever decoded.
fn count_records(raw: &[u8]) -> Result<usize, DecodeError> {
    let mut count = 0usize;
    walk(raw, |field, value| {
        if let (4, Some(record)) = (field, value) {
            let mut attributes = 0usize;
            walk(record, |inner, _| {
                attributes += usize::from(inner == 8);
                Ok(())
            })?;
            if attributes > MAX_ATTRIBUTES {
                return Err(DecodeError::Invalid(format!(
                    "records[{count}] has {attributes} attributes; at most {MAX_ATTRIBUTES}"
                )));
            }
            count += 1;
        }
        Ok(())
    })?;
    Ok(count)
}

/// Walks the fields of one protobuf message, handing `f` each field number and, for a
/// length-delimited field, its bytes. Fails on what it cannot walk to the end (see
/// [`count_records`]).
pub(crate) fn walk(
    raw: &[u8],
    mut f: impl FnMut(u64, Option<&[u8]>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at)?;
            *at += 1;
            v |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let malformed = || {
        DecodeError::Invalid("the protobuf body cannot be walked field by field (groups are not part of the contract)".into())
    };
    let mut at = 0usize;
    while at < raw.len() {
        let key = varint(raw, &mut at).ok_or_else(malformed)?;
        let skipped = match key & 7 {
            0 => varint(raw, &mut at).map(|_| 0),
            1 => Some(8),
            2 => varint(raw, &mut at).and_then(|n| usize::try_from(n).ok()),
            5 => Some(4),
            _ => None,
        };
        let n = skipped.ok_or_else(malformed)?;
        let end = at
            .checked_add(n)
            .filter(|end| *end <= raw.len())
            .ok_or_else(malformed)?;
        f(key >> 3, (key & 7 == 2).then(|| &raw[at..end]))?;
        at = end;
    }
    Ok(())
}

/// Decodes and validates a body given its `Content-Type` and `Content-Encoding` headers.
pub fn decode_body(
    body: &[u8],
    content_type: Option<&str>,
    content_encoding: Option<&str>,
    limits: Limits,
) -> Result<Batch, DecodeError> {
    decode_body_with(body, content_type, content_encoding, limits, None)
}

/// [`decode_body`] for a body compressed with `dictionary` (the one its frame header names).
pub fn decode_body_with(
    body: &[u8],
    content_type: Option<&str>,
    content_encoding: Option<&str>,
    limits: Limits,
    dictionary: Option<&[u8]>,
) -> Result<Batch, DecodeError> {
    let raw = match content_encoding.map(str::trim) {
        None | Some("") | Some("identity") => {
            if body.len() > limits.max_decompressed_bytes {
                return Err(DecodeError::TooLarge {
                    limit: limits.max_decompressed_bytes,
                });
            }
            std::borrow::Cow::Borrowed(body)
        }
        Some(enc) if enc.eq_ignore_ascii_case(ENCODING_ZSTD) => std::borrow::Cow::Owned(
            bounded_unzstd(body, limits.max_decompressed_bytes, dictionary)?,
        ),
        Some(other) => return Err(DecodeError::Encoding(other.to_owned())),
    };
    let mime = content_type
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    let batch = match crate::BodyVersion::of(content_type) {
        Some(crate::BodyVersion::V2) => {
            let raw = match raw {
                std::borrow::Cow::Owned(raw) => bytes::Bytes::from(raw),
                std::borrow::Cow::Borrowed(raw) => bytes::Bytes::copy_from_slice(raw),
            };
            crate::columnar::decode_columnar(raw, limits)?
        }
        Some(crate::BodyVersion::V1) => {
            let count = count_records(&raw)?;
            if count > limits.max_records {
                return Err(DecodeError::TooManyRecords {
                    count,
                    limit: limits.max_records,
                });
            }
            Batch::decode(raw.as_ref()).map_err(DecodeError::Protobuf)?
        }
        None if mime.eq_ignore_ascii_case(CONTENT_TYPE_JSON) => {
            crate::json::parse_bounded(&raw, limits.max_records)?.into_batch()?
        }
        None => {
            return Err(DecodeError::ContentType(
                content_type.unwrap_or("").to_owned(),
            ));
        }
    };
    validate(&batch, limits)?;
    Ok(batch)
}

/// The body version a protobuf `Content-Type` names with its `proto` parameter: 1 for
/// `edgegw.v1.Batch` (or no parameter: the contract's first clients sent none), 2 for
/// `edgegw.v2.Batch`, `None` for anything else.
pub fn body_version(content_type: Option<&str>) -> Option<u32> {
    let proto = content_type?.split(';').skip(1).find_map(|p| {
        let (name, value) = p.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("proto")
            .then(|| value.trim().trim_matches('"'))
    });
    match proto {
        None | Some("edgegw.v1.Batch") => Some(1),
        Some("edgegw.v2.Batch") => Some(2),
        Some(_) => None,
    }
}

fn bounded_unzstd(
    body: &[u8],
    limit: usize,
    dictionary: Option<&[u8]>,
) -> Result<Vec<u8>, DecodeError> {
    let mut decoder = zstd::stream::read::Decoder::with_dictionary(body, dictionary.unwrap_or(&[]))
        .map_err(DecodeError::Zstd)?;
    decoder
        .window_log_max(MAX_WINDOW_LOG)
        .map_err(DecodeError::Zstd)?;
    // A frame that states its size gets exactly that room (when under the limit): no
    // doubling of a large buffer while it is read.
    let stated = zstd::zstd_safe::get_frame_content_size(body)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n <= limit);
    let mut out = Vec::with_capacity(stated.map_or(0, |n| n + 1));
    // Read one byte past the limit: if it arrives, the body is too large.
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(DecodeError::Zstd)?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge { limit });
    }
    Ok(out)
}

/// `name` quoted for an error message, cut to its first 64 characters (with its length) when
/// longer: a refused name is never echoed back or logged in full.
pub fn shown(name: &str) -> String {
    match name.char_indices().nth(64) {
        None => format!("{name:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &name[..cut], name.len()),
    }
}

/// The rules of the contract that a decoded batch must follow.
fn validate(batch: &Batch, limits: Limits) -> Result<(), DecodeError> {
    let invalid = |reason: String| Err(DecodeError::Invalid(reason));
    if !valid_name(&batch.device_id) {
        return invalid(format!(
            "device_id {} must be 1-256 characters of [A-Za-z0-9_.-]",
            shown(&batch.device_id)
        ));
    }
    if !valid_name(&batch.stream) {
        return invalid(format!(
            "stream {} must be 1-256 characters of [A-Za-z0-9_.-]",
            shown(&batch.stream)
        ));
    }
    if batch.records.is_empty() {
        return invalid("a batch needs at least one record".into());
    }
    if batch.records.len() > limits.max_records {
        return Err(DecodeError::TooManyRecords {
            count: batch.records.len(),
            limit: limits.max_records,
        });
    }
    let mut previous: Option<u64> = None;
    for (i, record) in batch.records.iter().enumerate() {
        if previous.is_some_and(|p| record.seq <= p) {
            return invalid(format!(
                "records[{i}].seq {} is not greater than the previous seq; sequences must strictly increase within a batch",
                record.seq
            ));
        }
        previous = Some(record.seq);
        if record.topic.is_empty() || record.topic.len() > MAX_TOPIC_BYTES {
            return invalid(format!("records[{i}].topic must be 1-65535 bytes"));
        }
        if let Some(qos) = record.qos.filter(|&q| q > 2) {
            return invalid(format!("records[{i}].qos {qos} is not 0, 1 or 2"));
        }
        if record.attributes.len() > MAX_ATTRIBUTES {
            return invalid(format!(
                "records[{i}] has {} attributes; at most {MAX_ATTRIBUTES}",
                record.attributes.len()
            ));
        }
        for (j, a) in record.attributes.iter().enumerate() {
            if let Some(problem) = attribute_name_problem(&a.key) {
                return invalid(format!("records[{i}].attributes: {problem}"));
            }
            if a.value.len() > MAX_ATTRIBUTE_VALUE_BYTES {
                return invalid(format!(
                    "records[{i}].attributes[{:?}] is {} bytes; at most {MAX_ATTRIBUTE_VALUE_BYTES}",
                    a.key,
                    a.value.len()
                ));
            }
            // Without case: consumers that read header names without case would merge them.
            if record.attributes[..j]
                .iter()
                .any(|b| b.key.eq_ignore_ascii_case(&a.key))
            {
                return invalid(format!("records[{i}].attributes names {:?} twice", a.key));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn refused_names_are_cut_short() {
        assert_eq!(shown("dev-1"), "\"dev-1\"");
        let long = "x".repeat(1 << 20);
        let message = shown(&long);
        assert!(
            message.len() < 100 && message.contains("1048576 bytes"),
            "{message}"
        );
        assert!(shown(&"é".repeat(100)).ends_with("(200 bytes)"));
    }

    #[test]
    fn decoded_size_bounds() {
        let raw = vec![7u8; 10_000];
        let single = zstd::bulk::compress(&raw, 1).expect("compress");
        assert_eq!(
            super::decoded_size_bound(&single, Some("zstd"), 1 << 20),
            10_000
        );
        assert_eq!(
            super::decoded_size_bound(&single, Some("zstd"), 5_000),
            5_000
        );
        let mut two = single.clone();
        two.extend_from_slice(&single);
        assert_eq!(
            super::decoded_size_bound(&two, Some("zstd"), 1 << 20),
            1 << 20,
            "a second frame is not covered by the first's size"
        );
        let undeclared = zstd::stream::encode_all(&raw[..], 1).expect("compress");
        assert_eq!(
            super::decoded_size_bound(&undeclared, Some("zstd"), 1 << 20),
            1 << 20
        );
        assert_eq!(super::decoded_size_bound(&raw, None, 1 << 20), 10_000);
        assert_eq!(super::decoded_size_bound(&raw, None, 100), 100);
        // Held to its bound, a frame cannot decompress past what it declared.
        let limits = Limits {
            max_decompressed_bytes: 5_000,
            max_records: 10,
        };
        assert!(matches!(
            super::bounded_unzstd(&single, limits.max_decompressed_bytes, None),
            Err(DecodeError::TooLarge { .. })
        ));
    }
    use crate::{CONTENT_TYPE_BATCH, Record};

    const LIMITS: Limits = Limits {
        max_decompressed_bytes: 1 << 20,
        max_records: 100,
    };

    fn batch(seqs: &[u64]) -> Batch {
        Batch {
            device_id: "dev-1".into(),
            stream: "telemetry".into(),
            sent_at_ms: 1,
            epoch: 0,
            records: seqs
                .iter()
                .map(|&seq| Record {
                    seq,
                    topic: "s/1".into(),
                    payload: Bytes::from_static(b"\x00\xffbinary"),
                    qos: Some(1),
                    received_at_ms: 2,
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// The issue's bomb: 4,000,000 empty records in a few hundred bytes of zstd are refused
    /// by their count before any is decoded.
    #[test]
    fn millions_of_empty_records_are_refused_before_they_are_decoded() {
        let mut raw = batch(&[1]).encode_to_vec();
        raw.extend([0x22u8, 0x00].repeat(4_000_000));
        let body = compress(&raw, 19).expect("zstd");
        assert!(body.len() < 2048, "{} bytes", body.len());
        let limits = Limits {
            max_decompressed_bytes: 64 << 20,
            max_records: 10_000,
        };
        let err = decode_body(&body, Some(CONTENT_TYPE_BATCH), Some("zstd"), limits).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::TooManyRecords {
                    count: 4_000_001,
                    limit: 10_000
                }
            ),
            "{err}"
        );
        assert_eq!(
            count_records(&batch(&[1, 2, 3]).encode_to_vec()).expect("count"),
            3
        );
        // A group (which the decoder would skip) before millions of records: refused, not
        // under-counted.
        let mut raw = batch(&[1]).encode_to_vec();
        raw.extend([0x33u8, 0x34]);
        raw.extend([0x22u8, 0x00].repeat(1_000_000));
        let err = decode_body(&raw, Some(CONTENT_TYPE_BATCH), None, limits).unwrap_err();
        assert!(matches!(err, DecodeError::Invalid(_)), "{err}");
        let mut cut = batch(&[1, 2]).encode_to_vec();
        cut.truncate(cut.len() - 3);
        assert!(count_records(&cut).is_err(), "a truncated field");
    }

    #[test]
    fn a_json_batch_stops_at_the_record_past_the_limit() {
        let json = |n: usize| {
            let records: Vec<String> = (1..=n)
                .map(|i| format!(r#"{{"seq":{i},"topic":"t","payload":"x"}}"#))
                .collect();
            format!(
                r#"{{"device_id":"dev-1","stream":"s","records":[{}]}}"#,
                records.join(",")
            )
        };
        let ok = decode_body(json(100).as_bytes(), Some(CONTENT_TYPE_JSON), None, LIMITS);
        assert_eq!(ok.expect("at the limit").records.len(), 100);
        let err =
            decode_body(json(101).as_bytes(), Some(CONTENT_TYPE_JSON), None, LIMITS).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooManyRecords { limit: 100, .. }),
            "{err}"
        );
        // Other JSON errors stay what they are.
        let err =
            decode_body(b"{\"records\": 5}", Some(CONTENT_TYPE_JSON), None, LIMITS).unwrap_err();
        assert!(matches!(err, DecodeError::Json(_)), "{err}");
    }

    #[test]
    fn a_zstd_frame_asking_for_a_window_over_the_cap_is_refused() {
        use std::io::Write;
        let raw = batch(&[1]).encode_to_vec();
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).expect("encoder");
        encoder.window_log(MAX_WINDOW_LOG + 2).expect("window");
        encoder.include_contentsize(false).expect("no size");
        encoder.write_all(&raw).expect("write");
        let body = encoder.finish().expect("finish");
        let err = decode_body(&body, Some(CONTENT_TYPE_BATCH), Some("zstd"), LIMITS).unwrap_err();
        assert!(matches!(err, DecodeError::Zstd(_)), "{err}");
        let within = {
            let mut e = zstd::stream::Encoder::new(Vec::new(), 3).expect("encoder");
            e.window_log(MAX_WINDOW_LOG).expect("window");
            e.include_contentsize(false).expect("no size");
            e.write_all(&raw).expect("write");
            e.finish().expect("finish")
        };
        assert!(decode_body(&within, Some(CONTENT_TYPE_BATCH), Some("zstd"), LIMITS).is_ok());
    }

    #[test]
    fn a_dictionary_named_in_the_frame_is_needed_to_decode() {
        let samples: Vec<Vec<u8>> = (0..500u64)
            .map(|i| {
                let mut b = batch(&[i + 1]);
                b.records[0].payload = Bytes::from(format!(
                    "{{\"sensor\":\"s-{}\",\"temperature\":{}.{},\"status\":\"ok\"}}",
                    i % 7,
                    15 + i % 10,
                    i % 9
                ));
                encode_batch(&b)
            })
            .collect();
        let dict = train_dictionary(&samples, 2048).expect("train");
        let id = dictionary_id(&dict).expect("a trained dictionary has an id");
        let body = compress_with_dictionary(&samples[3], 1, &dict).expect("compress");
        assert_eq!(frame_dictionary_id(&body), Some(id));
        assert_eq!(
            frame_dictionary_id(&compress(&samples[3], 1).expect("zstd")),
            None
        );
        let decoded = decode_body_with(
            &body,
            Some(CONTENT_TYPE_BATCH),
            Some("zstd"),
            LIMITS,
            Some(&dict),
        )
        .expect("decodes with its dictionary");
        assert_eq!(decoded.records[0].seq, 4);
        assert!(matches!(
            decode_body(&body, Some(CONTENT_TYPE_BATCH), Some("zstd"), LIMITS),
            Err(DecodeError::Zstd(_))
        ));
    }

    #[test]
    fn attributes_round_trip_and_are_counted_before_decoding() {
        let limits = Limits {
            max_decompressed_bytes: 1 << 20,
            max_records: 10,
        };
        let attribute = |i: usize| crate::Attribute {
            key: format!("a{i}"),
            value: "v".into(),
        };
        let mut b = batch(&[1, 2]);
        b.records[1].attributes = (0..MAX_ATTRIBUTES).map(attribute).collect();
        let raw = encode_batch(&b);
        let back = decode_body(&raw, Some(crate::CONTENT_TYPE_BATCH), None, limits).unwrap();
        assert_eq!(back, b);

        // One past the limit, as repeated map entries: refused by the walk, before decoding.
        b.records[1].attributes.push(attribute(99));
        let raw = encode_batch(&b);
        assert_eq!(
            count_records(&raw).unwrap_err().to_string(),
            DecodeError::Invalid(format!(
                "records[1] has {} attributes; at most {MAX_ATTRIBUTES}",
                MAX_ATTRIBUTES + 1
            ))
            .to_string()
        );
        for (attributes, why) in [
            (vec![attribute(1), attribute(1)], "twice"),
            (
                vec![crate::Attribute {
                    key: "Nats-Msg-Id".into(),
                    value: "x".into(),
                }],
                "metadata",
            ),
            (
                vec![crate::Attribute {
                    key: "a".into(),
                    value: "v".repeat(MAX_ATTRIBUTE_VALUE_BYTES + 1),
                }],
                "at most 65535",
            ),
        ] {
            b.records[1].attributes = attributes;
            let err = decode_body(
                &encode_batch(&b),
                Some(crate::CONTENT_TYPE_BATCH),
                None,
                limits,
            )
            .unwrap_err();
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn round_trip_zstd_keeps_bytes() {
        let b = batch(&[1, 2, 3]);
        let body = compress(&encode_batch(&b), 1).expect("compress");
        let got = decode_body(&body, Some(CONTENT_TYPE_BATCH), Some("zstd"), LIMITS).expect("ok");
        assert_eq!(got, b);
    }

    #[test]
    fn concatenated_frames_merge_into_one_batch() {
        let mut body = compress(&encode_batch(&batch(&[1, 2])), 1).expect("compress");
        let mut second = batch(&[3]);
        second.device_id.clear(); // default fields are not encoded, so the first frame's stay
        second.stream.clear();
        body.extend(compress(&encode_batch(&second), 1).expect("compress"));
        let got = decode_body(&body, Some(CONTENT_TYPE_BATCH), Some("zstd"), LIMITS).expect("ok");
        assert_eq!(got.records.len(), 3);
        assert_eq!(got.stream, "telemetry");
    }

    #[test]
    fn zstd_bomb_is_cut_off() {
        let zeros = vec![0u8; 64 << 20];
        let bomb = compress(&zeros, 19).expect("compress");
        assert!(bomb.len() < 10_000);
        let err = decode_body(&bomb, Some(CONTENT_TYPE_BATCH), Some("zstd"), LIMITS).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooLarge { limit } if limit == 1 << 20),
            "{err}"
        );
    }

    #[test]
    fn rejects() {
        let cases: Vec<(Batch, &str)> = vec![
            (batch(&[]), "at least one record"),
            (batch(&[2, 1]), "strictly increase"),
            (batch(&[1, 1]), "strictly increase"),
            (
                batch(&(0..101).collect::<Vec<_>>()),
                "limit of 100 per batch",
            ),
            (
                Batch {
                    stream: "a/b".into(),
                    ..batch(&[1])
                },
                "stream",
            ),
            (
                Batch {
                    device_id: String::new(),
                    ..batch(&[1])
                },
                "device_id",
            ),
        ];
        for (b, needle) in cases {
            let err = decode_body(&encode_batch(&b), Some(CONTENT_TYPE_BATCH), None, LIMITS)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    #[test]
    fn garbage_and_unknown_headers() {
        let garbage = b"\xff\xff\xff not a batch";
        for (ct, enc) in [
            (Some(CONTENT_TYPE_BATCH), Some("zstd")),
            (Some(CONTENT_TYPE_BATCH), None),
            (Some(CONTENT_TYPE_JSON), None),
            (Some("text/plain"), None),
            (Some(CONTENT_TYPE_BATCH), Some("gzip")),
        ] {
            assert!(
                decode_body(garbage, ct, enc, LIMITS).is_err(),
                "{ct:?} {enc:?}"
            );
        }
    }
}
