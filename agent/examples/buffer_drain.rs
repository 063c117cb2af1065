//! The buffer alone: how long it takes to read and delete a backlog, with no network, no
//! compression and no ingest. The drain bench (`tests/src/bin/bench/network.rs`) runs it in
//! the same run as the agent's drain: this is the limit the drain is compared with.
//!
//! Usage: `buffer_drain [RECORDS] [BATCH]` (default 1,000,000 records of the bench's 200 B
//! JSON, batches of 5,000: the agent's `drain_max_records`). Fills a fresh buffer through the
//! writer thread (not timed), then reads it batch after batch with a [`BufferReader`] and hands
//! each batch's ack to the writer, as the forwarder does after a 2xx: the next batch is read
//! while the writer deletes the last. Prints one line: `seconds <s> records <n>`, timed from
//! the first read to the last delete committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edge_agent::buffer::{
    Buffer, BufferReader, BufferStream, BufferWriter, MAX_SEQ, NewRecord, Protected, Protection,
    WriterCommand, spawn_checkpointer,
};
use edge_agent::metrics::Metrics;
use edge_agent::routing::Priority;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut arg = |default: u64| {
        args.next()
            .map_or(default, |a| a.parse().expect("a whole number"))
    };
    let (records, batch) = (arg(1_000_000), arg(5_000) as usize);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("buffer.db");
    let streams = [BufferStream {
        name: "logs".into(),
        priority: Priority::Bulk,
        ttl: None,
    }];
    let opened = Buffer::open(&path, &streams, 4 << 30).expect("open the buffer");
    let names: Vec<String> = opened.streams.iter().map(|s| s.name.clone()).collect();
    let (commands, command_rx) = flume::bounded(10_000);
    let (progress_tx, progress) = tokio::sync::watch::channel(opened.buffer.progress());
    let protected = Arc::new(Protected::new(vec![Protection::floor(0); names.len()]));
    let writer = BufferWriter::new(
        opened.buffer,
        command_rx,
        Duration::from_millis(10),
        64 << 20,
        progress_tx,
        Metrics::new(),
        names.clone(),
        protected,
    );
    let writer = std::thread::spawn(move || writer.run());
    // As in the agent: the checkpointer keeps the WAL small beside the writer.
    let stop_checkpoints = Arc::new(AtomicBool::new(false));
    let checkpointer =
        spawn_checkpointer(&path, stop_checkpoints.clone()).expect("start the checkpointer");

    // Fill: the bench's 200 B JSON readings, on the drain bench's topics.
    for i in 0..records {
        let payload = format!(
            "{{\"ts\":{i},\"v\":{:.3},\"pad\":\"{}\"}}",
            (i % 997) as f64 / 7.0,
            "x".repeat(160)
        );
        let now = 1_700_000_000_000 + i as i64;
        commands
            .send(WriterCommand::Append(NewRecord {
                stream: 0,
                topic: format!("plant/{}/logs/l{}", i % 10, i % 4),
                payload: Bytes::from(payload),
                received_at_ms: now,
                monotonic_ms: i,
                attributes: Default::default(),
                receipt: None,
            }))
            .expect("writer alive");
    }
    // The writer publishes its progress after every commit: wait on it, not on a clock.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let backlog_is = |n: u64| {
        let mut progress = progress.clone();
        runtime
            .block_on(progress.wait_for(|p| p[0].backlog_records == n))
            .map(|_| ())
            .expect("writer alive");
    };
    backlog_is(records);
    let reader = BufferReader::open(&path, &names).expect("open a reader");

    // Drain: read a batch, hand its ack to the writer, read the next.
    let started = Instant::now();
    let mut next = 1u64;
    loop {
        let read = reader
            .read_batch(0, &[(next, MAX_SEQ)], false, batch, usize::MAX)
            .expect("read a batch");
        let Some((first, last)) = read.covered else {
            break;
        };
        assert!(read.corrupt.is_empty(), "a fresh buffer holds no damage");
        commands
            .send(WriterCommand::Ack {
                stream: 0,
                first,
                last,
            })
            .expect("writer alive");
        next = last + 1;
    }
    backlog_is(0);
    let seconds = started.elapsed().as_secs_f64();
    drop(commands);
    writer.join().expect("writer thread");
    stop_checkpoints.store(true, Ordering::Relaxed);
    let _ = checkpointer.join();
    println!("seconds {seconds:.3} records {records}");
}
