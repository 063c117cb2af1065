//! The ingest's embedded log alone (`BENCH_ONLY=log`): records/s and disk bytes written per
//! record when batches are POSTed straight to the ingest, in three shapes: one sender with the
//! drain's 5,000-record batches (a stream has one request in flight, so each batch waits for
//! the one before it), four senders with 1,000-record batches, and ten senders with
//! 10-record batches (many gateways sending as records come). This tree's ingest against the
//! baseline's (`BENCH_BASELINE_DIR`), alternating rounds, medians.

use std::time::Instant;

use e2e::CloudHarness;

use crate::network::disk_writes;
use crate::{baseline_ingest, json_batches, median, post_until_ok};

/// Rounds of the table.
const ROUNDS: usize = 3;

/// (description, senders, batches per sender, records per batch) at scale 1.
const SHAPES: [(&str, usize, u64, u64); 3] = [
    ("1 sender × 200 batches of 5,000 (a drain)", 1, 200, 5_000),
    ("4 senders × 100 batches of 1,000", 4, 100, 1_000),
    ("10 senders × 1,000 batches of 10", 10, 1_000, 10),
];

/// One run's figures.
struct Run {
    records_per_s: f64,
    disk_bytes_per_record: f64,
}

/// Posts `bodies` (one list per sender, each sender's in order) to a fresh ingest (the
/// baseline's `binary`, or this tree's) on an embedded log; times from the first POST to the
/// last 2xx.
fn run(bodies: &[Vec<Vec<u8>>], records: u64, binary: Option<&std::path::Path>) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut harness = CloudHarness::new(dir.path());
    if let Some(binary) = binary {
        harness = harness.binary(binary);
    }
    let cloud = harness.run();
    let url = format!("{}{}", cloud.url(), ingest_wire::BATCHES_PATH);
    let pid = cloud.process.pid();
    let writes_before = disk_writes(pid);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for sender in bodies {
            let url = &url;
            scope.spawn(move || {
                let http = reqwest::blocking::Client::new();
                for body in sender {
                    post_until_ok(&http, url, ingest_wire::CONTENT_TYPE_BATCH_V2, body);
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
    for (name, senders, batches, per_batch) in SHAPES {
        let batches = batches * scale;
        let bodies: Vec<Vec<Vec<u8>>> = (0..senders)
            .map(|s| {
                json_batches(s, batches, per_batch)
                    .iter()
                    .map(|b| {
                        ingest_wire::compress(&ingest_wire::encode_columnar(b), 1).expect("zstd")
                    })
                    .collect()
            })
            .collect();
        let records = senders as u64 * batches * per_batch;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            ours.push(run(&bodies, records, None));
            if let Some(bin) = &baseline {
                theirs.push(run(&bodies, records, Some(bin)));
            }
        }
        let medians = |runs: &[Run]| {
            (
                median(runs.iter().map(|r| r.records_per_s).collect()),
                median(runs.iter().map(|r| r.disk_bytes_per_record).collect()),
            )
        };
        let (rate, disk) = medians(&ours);
        print!("| {name} | {rate:.0} | {disk:.0} |");
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
