//! zstd dictionaries for streams whose batches are small (`zstd_dictionary: true`): trained on
//! the stream's own first records, registered at each ingest replica before a batch uses it.
//!
//! Invariant: a batch is compressed with a dictionary only once one was trained; a batch the
//! ingest cannot decode for want of it (428) is not lost: it stays buffered, the dictionary is
//! registered again and the batch resent. An ingest that cannot take dictionaries (an older
//! one, or answers 428 again and again) turns the stream's dictionary off, never the data.
//!
//! Measured (`BENCH_ONLY=network bash tests/bench.sh`): a 4 KiB dictionary shrinks 10-record
//! batches of JSON telemetry by ~18% and makes 100- and 1000-record batches slightly larger,
//! so it is for streams sent a few records at a time (critical, low-rate), not for bulk.

use std::sync::Arc;

use bytes::Bytes;
use ingest_wire::{Batch, Record};

use crate::buffer::StoredRecord;

/// Records a dictionary is trained on.
pub const SAMPLES: usize = 1000;
/// Size of a trained dictionary.
pub const DICTIONARY_BYTES: usize = 4096;
/// Samples after which a stream whose records train no dictionary gives up.
const MAX_SAMPLES: usize = 4 * SAMPLES;
/// 428 answers in a row after which a stream stops using its dictionary.
const MAX_MISSES: u32 = 3;

/// A trained dictionary.
#[derive(Debug)]
pub struct Trained {
    /// The id it declares (in every frame compressed with it).
    pub id: u32,
    /// Its bytes, as registered at the ingest.
    pub bytes: Vec<u8>,
}

/// One stream's dictionary.
#[derive(Debug)]
pub enum StreamDictionary {
    /// The stream does not use one (or stopped using it).
    Off,
    /// Collecting encoded single-record batches to train on.
    Sampling(Vec<Vec<u8>>),
    /// In use; `misses` counts 428 answers in a row.
    Ready {
        /// The dictionary.
        trained: Arc<Trained>,
        /// 428 answers in a row.
        misses: u32,
    },
}

impl StreamDictionary {
    /// A stream's dictionary: sampling when `enabled`, else off.
    pub fn new(enabled: bool) -> StreamDictionary {
        if enabled {
            StreamDictionary::Sampling(Vec::new())
        } else {
            StreamDictionary::Off
        }
    }

    /// The dictionary batches use now, if any.
    pub fn current(&self) -> Option<Arc<Trained>> {
        match self {
            StreamDictionary::Ready { trained, .. } => Some(trained.clone()),
            _ => None,
        }
    }

    /// Whether records should be handed to [`StreamDictionary::learn`].
    pub fn wants_samples(&self) -> bool {
        matches!(self, StreamDictionary::Sampling(_))
    }

    /// Learns from `records` (as the ingest will see them: one-record batches); trains once
    /// [`SAMPLES`] are in. Returns the dictionary when this call trained it.
    pub fn learn(
        &mut self,
        device: &str,
        stream: &str,
        records: &[StoredRecord],
    ) -> Option<Arc<Trained>> {
        let StreamDictionary::Sampling(samples) = self else {
            return None;
        };
        let before = samples.len();
        samples.extend(records.iter().map(|r| sample(device, stream, r)));
        // Train when a multiple of SAMPLES is crossed: first at SAMPLES, then, if the records
        // were too few or too alike to train on, with more of them.
        if before / SAMPLES == samples.len() / SAMPLES {
            return None;
        }
        match ingest_wire::train_dictionary(samples, DICTIONARY_BYTES) {
            Ok(bytes) => match ingest_wire::dictionary_id(&bytes) {
                Some(id) => {
                    let trained = Arc::new(Trained { id, bytes });
                    *self = StreamDictionary::Ready {
                        trained: trained.clone(),
                        misses: 0,
                    };
                    Some(trained)
                }
                None => {
                    *self = StreamDictionary::Off;
                    None
                }
            },
            Err(e) if samples.len() >= MAX_SAMPLES => {
                tracing::warn!(%stream, error = %e, samples = samples.len(), "no zstd dictionary can be trained on this stream's records; compressing without one");
                *self = StreamDictionary::Off;
                None
            }
            Err(_) => None,
        }
    }

    /// The ingest answered 428 for a batch using it; true when that happened too often and the
    /// dictionary is now off.
    pub fn missed(&mut self) -> bool {
        if let StreamDictionary::Ready { misses, .. } = self {
            *misses += 1;
            if *misses >= MAX_MISSES {
                *self = StreamDictionary::Off;
                return true;
            }
        }
        false
    }

    /// A batch using it was delivered.
    pub fn hit(&mut self) {
        if let StreamDictionary::Ready { misses, .. } = self {
            *misses = 0;
        }
    }
}

/// One record as the ingest sees it: a batch of one, encoded.
fn sample(device: &str, stream: &str, r: &StoredRecord) -> Vec<u8> {
    ingest_wire::encode_batch(&Batch {
        device_id: device.to_owned(),
        stream: stream.to_owned(),
        records: vec![Record {
            seq: r.seq,
            topic: r.topic.clone(),
            payload: Bytes::copy_from_slice(&r.payload),
            qos: None,
            received_at_ms: r.received_at_ms,
            boot_id: r.boot_id.clone(),
            monotonic_ms: r.monotonic_ms,
            attributes: r
                .attributes
                .iter()
                .map(|(key, value)| ingest_wire::Attribute {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
        }],
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(from: u64, n: u64) -> Vec<StoredRecord> {
        (from..from + n)
            .map(|i| StoredRecord {
                seq: i,
                topic: format!("plant/{}/alarm/a", i % 5),
                payload: format!(
                    "{{\"sensor\":\"s-{}\",\"level\":{},\"state\":\"{}\"}}",
                    i % 11,
                    i % 4,
                    if i % 3 == 0 { "raised" } else { "cleared" }
                )
                .into_bytes(),
                received_at_ms: 1_795_000_000_000 + i as i64,
                boot_id: "b".into(),
                monotonic_ms: i,
                attributes: Default::default(),
            })
            .collect()
    }

    #[test]
    fn trains_after_enough_samples_and_turns_off_after_repeated_misses() {
        let mut d = StreamDictionary::new(true);
        assert!(d.wants_samples() && d.current().is_none());
        assert!(
            d.learn("dev", "alarms", &records(1, 999)).is_none(),
            "not yet"
        );
        let trained = d
            .learn("dev", "alarms", &records(1000, 10))
            .expect("trained");
        assert_eq!(d.current().map(|t| t.id), Some(trained.id));
        assert!(!d.wants_samples());
        assert!(!d.missed() && !d.missed(), "two misses: kept");
        d.hit();
        assert!(!d.missed() && !d.missed(), "a hit resets the count");
        assert!(d.missed(), "three in a row: off");
        assert!(d.current().is_none());
        assert!(StreamDictionary::new(false).current().is_none());
        assert!(!StreamDictionary::new(false).wants_samples());
    }
}
