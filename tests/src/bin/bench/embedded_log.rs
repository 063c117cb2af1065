//! The ingest's embedded log alone (`BENCH_ONLY=log`): records/s and disk bytes written per
//! record when batches are POSTed straight to the ingest, in four shapes: one sender with the
//! drain's 5,000-record batches (a stream has one request in flight, so each batch waits for
//! the one before it), four senders with 1,000-record batches, and ten senders with 10-record
//! batches (gateways sending as records come), either ten streams of one device (ten topics)
//! or ten devices on one stream (one topic, as a fleet's gateways share their streams). This
//! tree's ingest against the baseline's (`BENCH_BASELINE_DIR`), alternating rounds, medians.

use std::time::Instant;

use e2e::{CloudHarness, DEVICE, TENANT, TOKEN};

use crate::network::disk_writes;
use crate::{baseline_ingest, json_batches_of, median, post_until_ok};

/// Rounds of the table.
const ROUNDS: usize = 3;

/// A shape of load: its description, senders, batches per sender, records per batch, and
/// whether each sender is a device of its own on one shared stream (else the test device on
/// a stream per sender).
struct Shape {
    name: &'static str,
    senders: usize,
    batches: u64,
    per_batch: u64,
    devices: bool,
}

const SHAPES: [Shape; 4] = [
    Shape {
        name: "1 sender × 200 batches of 5,000 (a drain)",
        senders: 1,
        batches: 200,
        per_batch: 5_000,
        devices: false,
    },
    Shape {
        name: "4 streams × 100 batches of 1,000",
        senders: 4,
        batches: 100,
        per_batch: 1_000,
        devices: false,
    },
    Shape {
        name: "10 streams (10 topics) × 1,000 batches of 10",
        senders: 10,
        batches: 1_000,
        per_batch: 10,
        devices: false,
    },
    Shape {
        name: "10 devices on one stream (1 topic) × 1,000 batches of 10",
        senders: 10,
        batches: 1_000,
        per_batch: 10,
        devices: true,
    },
];

/// Sender `i`'s device and token in a shape with a device per sender.
fn device(i: usize) -> (String, String) {
    (
        format!("bench-gw-{i}"),
        format!("bench-token-{i}-0123456789"),
    )
}

/// One run's figures.
struct Run {
    records_per_s: f64,
    disk_bytes_per_record: f64,
}

/// Posts `bodies` (one list per sender, each sender's in order, as `senders[i]`) to a fresh
/// ingest (the baseline's `binary`, or this tree's) on an embedded log; times from the first
/// POST to the last 2xx.
fn run(
    bodies: &[Vec<Vec<u8>>],
    senders: &[(String, String)],
    records: u64,
    binary: Option<&std::path::Path>,
) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut harness = CloudHarness::new(dir.path());
    for (id, token) in senders.iter().filter(|(id, _)| id != DEVICE) {
        harness = harness.device(id, TENANT, token);
    }
    if let Some(binary) = binary {
        harness = harness.binary(binary);
    }
    let cloud = harness.run();
    let url = format!("{}{}", cloud.url(), ingest_wire::BATCHES_PATH);
    let pid = cloud.process.pid();
    let writes_before = disk_writes(pid);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for (sender, (device, token)) in bodies.iter().zip(senders) {
            let url = &url;
            scope.spawn(move || {
                let http = reqwest::blocking::Client::new();
                for body in sender {
                    post_until_ok(
                        &http,
                        url,
                        ingest_wire::CONTENT_TYPE_BATCH_V2,
                        device,
                        token,
                        body,
                    );
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let written = disk_writes(pid) - writes_before;
    assert_eq!(cloud.total_records(), records, "every record in the log");
    Run {
        records_per_s: records as f64 / seconds,
        disk_bytes_per_record: written as f64 / records as f64,
    }
}

/// The table.
pub fn table(scale: u64) {
    let baseline = baseline_ingest();
    println!();
    println!(
        "| into the embedded log, 200 B JSON, v2 bodies (zstd 1), medians of {ROUNDS} | records/s | disk bytes written per record |{}",
        if baseline.is_some() {
            " baseline records/s | baseline disk bytes per record | records/s, this / baseline |"
        } else {
            ""
        }
    );
    println!(
        "|---|---:|---:|{}",
        if baseline.is_some() {
            "---:|---:|---:|"
        } else {
            ""
        }
    );
    for shape in SHAPES {
        let batches = shape.batches * scale;
        let senders: Vec<(String, String)> = (0..shape.senders)
            .map(|i| {
                if shape.devices {
                    device(i)
                } else {
                    (DEVICE.to_owned(), TOKEN.to_owned())
                }
            })
            .collect();
        let bodies: Vec<Vec<Vec<u8>>> = senders
            .iter()
            .enumerate()
            .map(|(i, (device, _))| {
                let stream = if shape.devices {
                    "bench".to_owned()
                } else {
                    format!("bench{i}")
                };
                json_batches_of(device, &stream, i, batches, shape.per_batch)
                    .iter()
                    .map(|b| {
                        ingest_wire::compress(&ingest_wire::encode_columnar(b), 1).expect("zstd")
                    })
                    .collect()
            })
            .collect();
        let records = shape.senders as u64 * batches * shape.per_batch;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            ours.push(run(&bodies, &senders, records, None));
            if let Some(bin) = &baseline {
                theirs.push(run(&bodies, &senders, records, Some(bin)));
            }
        }
        let medians = |runs: &[Run]| {
            (
                median(runs.iter().map(|r| r.records_per_s).collect()),
                median(runs.iter().map(|r| r.disk_bytes_per_record).collect()),
            )
        };
        let (rate, disk) = medians(&ours);
        print!("| {} | {rate:.0} | {disk:.0} |", shape.name);
        if !theirs.is_empty() {
            let (base_rate, base_disk) = medians(&theirs);
            print!(
                " {base_rate:.0} | {base_disk:.0} | {:.2} |",
                rate / base_rate
            );
        }
        println!();
    }
}
