//! Fuzzing on stable Rust: no nightly toolchain (CI cannot download one), so no `cargo fuzz`.
//!
//! A target is a function of bytes that must not panic; it may assert its own invariants
//! (a decoded batch within its limits, an error that says something). [`run`]:
//! 1. replays every file of `fuzz/regressions/<target>/`: inputs that once failed, kept for
//!    ever once fixed;
//! 2. then feeds the target inputs from a proptest strategy, half arbitrary bytes and half
//!    mutations (bit flips, byte sets, inserts, deletes, truncations, duplicated chunks,
//!    boundary bytes) of valid seeds, until its time budget runs out: `FUZZ_SECONDS`
//!    (2 s by default, so `cargo test` stays quick; the README's test command sets 30);
//! 3. on a failure, writes the input to `target/fuzz-crashes/<target>-<seed>-<n>.bin` and
//!    fails, naming the file and the seed (`FUZZ_SEED` replays the same sequence); an input
//!    that runs over 10 s is saved as `…-hang.bin` and the process aborts. (An abort or a
//!    stack overflow inside a target ends the process without saving: rerun with the seed.)
//!
//! What this is not: coverage-guided. The mutations start from valid seeds, which reach deep
//! into each parser, but nothing steers them towards new branches the way libFuzzer or AFL
//! would. `cargo fuzz` over the same target functions is the next step once a nightly
//! toolchain is available.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// Largest input a mutation makes.
const MAX_INPUT: usize = 1 << 20;

/// Longest one input may run before it counts as a hang.
const MAX_INPUT_TIME: Duration = Duration::from_secs(10);

/// How long each target runs: `FUZZ_SECONDS`, 2 s by default.
pub fn budget() -> Duration {
    std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(2), Duration::from_secs_f64)
}

/// Replays `target`'s regressions, then runs it on `inputs` for [`budget`]; panics on the
/// first input it panics on, after saving that input. Returns how many inputs ran.
pub fn run(
    target: &str,
    inputs: impl Strategy<Value = Vec<u8>>,
    check: impl Fn(&[u8]) + std::panic::RefUnwindSafe,
) -> u64 {
    let regressions = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&regressions)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for file in &files {
        let input = std::fs::read(file).expect("read a regression input");
        if let Err(panic) = catch_unwind(|| check(&input)) {
            panic!(
                "fuzz {target}: regression {} fails again: {}",
                file.display(),
                message(&*panic)
            );
        }
    }

    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let budget = budget();
    let started = Instant::now();
    let mut n = 0u64;
    // A hang is a failure too: a watchdog saves the input that has run too long and aborts.
    let current: Arc<Mutex<(Instant, Vec<u8>)>> =
        Arc::new(Mutex::new((Instant::now(), Vec::new())));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (current, done, target) = (current.clone(), done.clone(), target.to_owned());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let now = current.lock().unwrap_or_else(|p| p.into_inner());
                if now.0.elapsed() > MAX_INPUT_TIME && !done.load(Ordering::Relaxed) {
                    let file = save(&format!("{target}-{seed}-hang"), &now.1);
                    eprintln!(
                        "fuzz {target}: an input of seed {seed} ran over {MAX_INPUT_TIME:?}; saved to {}",
                        file.display()
                    );
                    std::process::abort();
                }
            }
        })
    };
    while started.elapsed() < budget {
        let input = inputs
            .new_tree(&mut runner)
            .expect("invariant: the strategies here never reject")
            .current();
        *current.lock().unwrap_or_else(|p| p.into_inner()) = (Instant::now(), input.clone());
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&input))) {
            done.store(true, Ordering::Relaxed);
            let file = save(&format!("{target}-{seed}-{n}"), &input);
            panic!(
                "fuzz {target}: input {n} of seed {seed} failed: {}; saved to {}: once fixed, copy it into fuzz/regressions/{target}/",
                message(&*panic),
                file.display()
            );
        }
        n += 1;
    }
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    println!(
        "fuzz {target}: {} regressions and {n} inputs in {:.1} s (seed {seed}): none failed",
        files.len(),
        started.elapsed().as_secs_f64()
    );
    n
}

/// Writes a failing input to `target/fuzz-crashes/<name>.bin`; returns the path.
fn save(name: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-crashes");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("{name}.bin"));
    let _ = std::fs::write(&file, input);
    file
}

fn message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic".into())
}

/// Half arbitrary bytes, half mutations of `seeds`.
pub fn bytes_or_mutated(
    seeds: impl Strategy<Value = Vec<u8>> + 'static,
) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 0..2048), mutated(seeds)]
}

/// `seeds` with up to eight random mutations each.
pub fn mutated(seeds: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        seeds,
        vec((0u8..7, any::<usize>(), any::<u8>(), 1usize..64), 0..8),
    )
        .prop_map(|(mut bytes, edits)| {
            for (op, at, byte, len) in edits {
                mutate(&mut bytes, op, at, byte, len);
            }
            bytes
        })
}

/// One edit of `b` at `at` (taken modulo its length).
fn mutate(b: &mut Vec<u8>, op: u8, at: usize, byte: u8, len: usize) {
    let at = at % (b.len() + 1);
    let end = (at + len).min(b.len());
    match op {
        0 if at < b.len() => b[at] ^= 1 << (byte % 8),
        1 if at < b.len() => b[at] = byte,
        2 => b.insert(at, byte),
        3 => {
            b.drain(at..end);
        }
        4 => b.truncate(at),
        5 => {
            let chunk = b[at..end].to_vec();
            b.splice(at..at, chunk);
        }
        6 if at < b.len() => b[at] = [0x00, 0x7f, 0x80, 0xff][usize::from(byte) % 4],
        _ => {}
    }
    b.truncate(MAX_INPUT);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_in_bounds() {
        for op in 0..8 {
            for len in [0usize, 1, 5] {
                for at in [0usize, 1, 7, usize::MAX] {
                    let mut b = vec![1u8; len];
                    mutate(&mut b, op, at, 0xff, 3);
                    assert!(b.len() <= len * 2 + 1);
                }
            }
        }
    }

    #[test]
    fn a_failing_target_fails_and_saves_its_input() {
        let result = catch_unwind(|| {
            run("self-test", Just(vec![0xde, 0xad]), |input| {
                assert_ne!(input, [0xde, 0xad], "found it");
            })
        });
        let message = message(&*result.expect_err("the target fails"));
        assert!(message.contains("found it"), "{message}");
        let saved = message
            .split("saved to ")
            .nth(1)
            .and_then(|s| s.split(": once fixed").next())
            .expect("names the file");
        assert_eq!(std::fs::read(saved).expect("saved"), [0xde, 0xad]);
        let _ = std::fs::remove_file(saved);
    }
}
