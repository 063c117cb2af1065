//! The fuzz targets: every parser of input we do not control. Each runs for `FUZZ_SECONDS`
//! (see the `fuzz` crate) on arbitrary bytes and on mutations of valid inputs, after
//! replaying its saved regressions.

use std::path::Path;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use edge_agent::mqtt;
use fuzz::{bytes_or_mutated, run};
use ingest_wire::{
    Batch, CONTENT_TYPE_BATCH, CONTENT_TYPE_BATCH_V2, CONTENT_TYPE_JSON, DecodeError, Limits,
    Record, decode_body_with, encode_batch, encode_columnar,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// The limits every wire target decodes under (small, so that limits are reached often).
const LIMITS: Limits = Limits {
    max_decompressed_bytes: 256 * 1024,
    max_records: 200,
};

/// Records with strictly increasing sequence numbers (as the contract wants), so most
/// generated batches are valid and the mutations start from deep inside the decoder.
fn records() -> impl Strategy<Value = Vec<Record>> {
    (
        0u64..u64::MAX / 2,
        vec(
            (
                1u64..1_000,
                "[a-z0-9/+#\n]{1,24}",
                vec(any::<u8>(), 0..64),
                proptest::option::of(0u32..3),
                any::<i64>(),
                "[a-f0-9-]{0,8}",
                any::<u64>(),
                // Valid names (none reserved, each once), so that nearly every batch is valid.
                proptest::collection::btree_map("x[a-z_.-]{0,7}", "[ -~\n]{0,12}", 0..4),
            ),
            1..12,
        ),
    )
        .prop_map(|(mut seq, fields)| {
            fields
                .into_iter()
                .map(
                    |(
                        gap,
                        topic,
                        payload,
                        qos,
                        received_at_ms,
                        boot_id,
                        monotonic_ms,
                        attributes,
                    )| {
                        seq += gap;
                        Record {
                            seq,
                            topic,
                            payload: Bytes::from(payload),
                            qos,
                            received_at_ms,
                            boot_id,
                            monotonic_ms,
                            attributes: attributes
                                .into_iter()
                                .map(|(key, value)| ingest_wire::Attribute { key, value })
                                .collect(),
                        }
                    },
                )
                .collect()
        })
}

/// Batches, nearly all valid; the mutations make the invalid ones.
fn batches() -> impl Strategy<Value = Batch> {
    (
        "[a-zA-Z0-9_.-]{1,12}",
        "[a-zA-Z0-9_.-]{1,12}",
        any::<i64>(),
        records(),
        any::<u64>(),
    )
        .prop_map(|(device_id, stream, sent_at_ms, records, epoch)| Batch {
            device_id,
            stream,
            sent_at_ms,
            records,
            epoch,
        })
}

/// What every wire target checks of a decode: it returned (no panic), and what it accepted
/// is within the limits.
fn within_limits(result: Result<Batch, DecodeError>) {
    match result {
        Ok(batch) => {
            assert!(
                batch.records.len() <= LIMITS.max_records,
                "{} records accepted over a limit of {}",
                batch.records.len(),
                LIMITS.max_records
            );
            for r in &batch.records {
                assert!(r.attributes.len() <= ingest_wire::MAX_ATTRIBUTES);
                assert!(
                    r.attributes
                        .iter()
                        .all(|a| ingest_wire::attribute_name_problem(&a.key).is_none())
                );
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// Decodes `input` under [`LIMITS`]; checks what [`within_limits`] checks.
fn decodes_within_limits(
    input: &[u8],
    content_type: &str,
    encoding: Option<&str>,
    dictionary: Option<&[u8]>,
) {
    within_limits(decode_body_with(
        input,
        Some(content_type),
        encoding,
        LIMITS,
        dictionary,
    ));
}

fn json_of(b: &Batch) -> Vec<u8> {
    let records: Vec<serde_json::Value> = b
        .records
        .iter()
        .map(|r| {
            serde_json::json!({
                "seq": r.seq, "topic": r.topic, "qos": r.qos,
                "payload": String::from_utf8_lossy(&r.payload),
                "received_at_ms": r.received_at_ms, "boot_id": r.boot_id,
                "monotonic_ms": r.monotonic_ms,
                "attributes": r.attributes.iter().map(|a| (a.key.clone(), serde_json::Value::from(a.value.clone())))
                    .collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "device_id": b.device_id, "stream": b.stream, "sent_at_ms": b.sent_at_ms,
        "epoch": b.epoch, "records": records,
    }))
    .expect("JSON")
}

#[test]
fn wire_protobuf() {
    run(
        "wire_protobuf",
        bytes_or_mutated(batches().prop_map(|b| encode_batch(&b))),
        |input| decodes_within_limits(input, CONTENT_TYPE_BATCH, None, None),
    );
}

#[test]
fn wire_columnar() {
    run(
        "wire_columnar",
        bytes_or_mutated(batches().prop_map(|b| encode_columnar(&b))),
        |input| decodes_within_limits(input, CONTENT_TYPE_BATCH_V2, None, None),
    );
}

#[test]
fn wire_columnar_zstd() {
    run(
        "wire_columnar_zstd",
        bytes_or_mutated((batches(), 1i32..4).prop_map(|(b, level)| {
            ingest_wire::compress(&encode_columnar(&b), level).expect("compress")
        })),
        |input| decodes_within_limits(input, CONTENT_TYPE_BATCH_V2, Some("zstd"), None),
    );
}

#[test]
fn wire_json() {
    run(
        "wire_json",
        bytes_or_mutated(batches().prop_map(|b| json_of(&b))),
        |input| decodes_within_limits(input, CONTENT_TYPE_JSON, None, None),
    );
}

#[test]
fn wire_zstd() {
    run(
        "wire_zstd",
        bytes_or_mutated((batches(), 1i32..4).prop_map(|(b, level)| {
            ingest_wire::compress(&encode_batch(&b), level).expect("compress")
        })),
        |input| decodes_within_limits(input, CONTENT_TYPE_BATCH, Some("zstd"), None),
    );
}

/// A dictionary trained the way the agent trains one, on encoded batches.
static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let samples: Vec<Vec<u8>> = (0..400u64)
        .map(|i| {
            json_of(&Batch {
                device_id: "dev-1".into(),
                stream: "telemetry".into(),
                sent_at_ms: 1_700_000_000_000 + i as i64,
                epoch: 1,
                records: vec![Record {
                    seq: i,
                    topic: format!("plant/{}/telemetry/t", i % 7),
                    payload: Bytes::from(format!("{{\"temp\":{}.{}}}", 20 + i % 5, i % 10)),
                    ..Default::default()
                }],
            })
        })
        .collect();
    ingest_wire::train_dictionary(&samples, 4096).expect("train a dictionary")
});

#[test]
fn wire_zstd_with_a_dictionary() {
    let dictionary: &[u8] = &DICTIONARY;
    run(
        "wire_zstd_with_a_dictionary",
        bytes_or_mutated(batches().prop_map(|b| {
            ingest_wire::compress_with_dictionary(&encode_batch(&b), 3, &DICTIONARY)
                .expect("compress")
        })),
        |input| decodes_within_limits(input, CONTENT_TYPE_BATCH, Some("zstd"), Some(dictionary)),
    );
}

/// Seeds for a config loader: the shipped, annotated file and a few trimmed variants.
fn config_seeds(shipped: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let lines: Vec<&'static str> = shipped.lines().collect();
    (0..lines.len(), 0..lines.len()).prop_map(move |(a, b)| {
        let (from, to) = (a.min(b), a.max(b));
        // The whole file, or the file without a run of lines.
        let kept: Vec<&str> = if from == to {
            lines.clone()
        } else {
            lines[..from].iter().chain(&lines[to..]).copied().collect()
        };
        kept.join("\n").into_bytes()
    })
}

#[test]
fn ingest_config() {
    run(
        "ingest_config",
        bytes_or_mutated(config_seeds(include_str!("../../config/cloud-ingest.yaml"))),
        |input| {
            let text = String::from_utf8_lossy(input);
            if let Err(e) = cloud_ingest::config::IngestConfig::parse(Path::new("fuzz.yaml"), &text)
            {
                assert!(e.to_string().contains("fuzz.yaml"), "{e}");
            }
        },
    );
}

#[test]
fn agent_config() {
    run(
        "agent_config",
        bytes_or_mutated(config_seeds(include_str!("../../config/agent.yaml"))),
        |input| {
            let text = String::from_utf8_lossy(input);
            if let Err(e) = edge_agent::config::AgentConfig::parse(Path::new("fuzz.yaml"), &text) {
                assert!(e.to_string().contains("fuzz.yaml"), "{e}");
            }
        },
    );
}

/// A frame: `byte1`, the remaining length, `body`.
fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// A valid session's first packets, MQTT 3.1.1 or 5: CONNECT (with a will, a user name and a
/// password), PUBLISH at QoS 0, 1 and 2, SUBSCRIBE, PUBREL, PINGREQ, DISCONNECT.
fn sessions() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        "[a-z0-9/]{0,16}",
        vec(any::<u8>(), 0..32),
        any::<u16>(),
    )
        .prop_map(|(v5, topic, payload, pkid)| {
            let props = |out: &mut Vec<u8>| {
                if v5 {
                    out.push(0);
                }
            };
            let mut connect = string(b"MQTT");
            connect.push(if v5 { 5 } else { 4 });
            connect.push(0b1110_1110); // user, password, will retain, will QoS 1, will, clean
            connect.extend_from_slice(&60u16.to_be_bytes());
            props(&mut connect);
            connect.extend(string(b"sensor-1"));
            props(&mut connect);
            connect.extend(string(b"plant/1/status"));
            connect.extend(string(b"offline"));
            connect.extend(string(b"user"));
            connect.extend(string(b"secret"));
            let mut session = frame(0x10, &connect);
            for qos in 0..3u8 {
                let mut publish = string(topic.as_bytes());
                if qos > 0 {
                    publish.extend_from_slice(&pkid.to_be_bytes());
                }
                props(&mut publish);
                publish.extend_from_slice(&payload);
                session.extend(frame(0x30 | (qos << 1), &publish));
            }
            let mut subscribe = pkid.to_be_bytes().to_vec();
            props(&mut subscribe);
            subscribe.extend(string(b"plant/+/alarm/#"));
            subscribe.push(1);
            session.extend(frame(0x82, &subscribe));
            session.extend(frame(0x62, &pkid.to_be_bytes()));
            session.extend(frame(0xC0, &[]));
            session.extend(frame(0xE0, &[]));
            session
        })
}

/// Everything the front door does with a client's bytes: frames them, then decodes each
/// frame as every packet it could be, and rewrites what it rewrites.
#[test]
fn mqtt_frames() {
    const LIMIT: usize = 4096;
    run("mqtt_frames", bytes_or_mutated(sessions()), |input| {
        let mut buf = BytesMut::from(input);
        while let Ok(Some(f)) = mqtt::next_frame(&mut buf, LIMIT) {
            assert!(f.body().len() <= LIMIT);
            if let Ok(c) = mqtt::connect(&f) {
                let renamed = mqtt::rename_client(&f, &c, "door-1", 30);
                let mut again = BytesMut::from(&renamed[..]);
                let f2 = mqtt::next_frame(&mut again, usize::MAX)
                    .expect("a renamed CONNECT frames")
                    .expect("whole");
                let c2 = mqtt::connect(&f2).expect("a renamed CONNECT decodes");
                assert_eq!(c2.client_id, "door-1");
            }
            for v5 in [false, true] {
                if let Ok(p) = mqtt::publish(&f, v5) {
                    // What local subscribers get is the same message, at QoS 0.
                    let copy = mqtt::as_qos0(&f, &p, &p.topic.clone(), v5);
                    let mut again = BytesMut::from(&copy[..]);
                    let f2 = mqtt::next_frame(&mut again, usize::MAX)
                        .expect("a QoS 0 copy frames")
                        .expect("whole");
                    let p2 = mqtt::publish(&f2, v5).expect("a QoS 0 copy decodes");
                    assert_eq!((p2.qos, &p2.topic, &p2.payload), (0, &p.topic, &p.payload));
                }
                if let Ok(s) = mqtt::subscribe(&f, v5)
                    && !s.filters.is_empty()
                {
                    let keep: Vec<bool> = (0..s.filters.len()).map(|i| i % 2 == 0).collect();
                    let _ = mqtt::keep_filters(&f, &s, &keep);
                }
                let _ = mqtt::suback_codes(&f, v5);
            }
            let _ = mqtt::pubrel(&f);
        }
    });
}

/// The wire round trip, as a property: whatever the batch, decoding its encoding (raw,
/// zstd, zstd with a dictionary; body version 1 and 2) gives it back, when it is within the
/// limits.
#[test]
fn wire_round_trip() {
    let config = proptest::test_runner::Config {
        failure_persistence: None,
        ..Default::default()
    };
    proptest!(config, |(batch in batches(), level in 1i32..4)| {
        let raw = encode_batch(&batch);
        let decode = |body: &[u8], encoding: Option<&str>, dictionary: Option<&[u8]>| {
            decode_body_with(body, Some(CONTENT_TYPE_BATCH), encoding, LIMITS, dictionary)
        };
        let plain = decode(&raw, None, None);
        let zstd = decode(&ingest_wire::compress(&raw, level).expect("compress"), Some("zstd"), None);
        let with_dictionary = decode(
            &ingest_wire::compress_with_dictionary(&raw, level, &DICTIONARY).expect("compress"),
            Some("zstd"),
            Some(&DICTIONARY),
        );
        let columnar = encode_columnar(&batch);
        let v2 = |body: &[u8], encoding: Option<&str>, dictionary: Option<&[u8]>| {
            decode_body_with(body, Some(CONTENT_TYPE_BATCH_V2), encoding, LIMITS, dictionary)
        };
        let v2_plain = v2(&columnar, None, None);
        let v2_dictionary = v2(
            &ingest_wire::compress_with_dictionary(&columnar, level, &DICTIONARY).expect("compress"),
            Some("zstd"),
            Some(&DICTIONARY),
        );
        prop_assert_eq!(plain.expect("a valid batch decodes"), batch.clone());
        prop_assert_eq!(zstd.expect("zstd agrees"), batch.clone());
        prop_assert_eq!(with_dictionary.expect("dictionary agrees"), batch.clone());
        prop_assert_eq!(v2_plain.expect("version 2 agrees"), batch.clone());
        prop_assert_eq!(v2_dictionary.expect("version 2 with a dictionary agrees"), batch);
    });
}
