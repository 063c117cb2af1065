//! The agent's memory (`BENCH_ONLY=memory`): its peak RSS in each situation that could grow it,
//! with the default config and with the 512 MB board profile (`cross/agent.yaml`'s memory keys):
//! - full speed: 10 publishers, QoS 1, 200 B JSON, as fast as the agent takes them;
//! - a drain: the same records buffered while the ingest is down, then sent in drain-sized
//!   batches once it is up (peak measured from the ingest's return);
//! - every connection: `max_connections` idle MQTT clients connected while the full-speed load
//!   runs beside them;
//! - retained: `retained.max_messages` retained publishes of 1 KiB on distinct topics, half
//!   again over the limit.
//!
//! Each cell is the peak RSS of a phase (the kernel's `VmHWM`, reset with `/proc/PID/clear_refs`
//! where a phase starts later than the process) and, in brackets, the peak of its anonymous
//! part (sampled every 20 ms): RSS also counts the pages of the binary's code the kernel mapped
//! in (file-backed, clean, dropped under memory pressure: about 13 MiB of a release build).
//! With `BENCH_BASELINE`, the baseline's agent runs each cell beside this one, and with
//! `BENCH_PACKAGED_AGENT` (set by `tests/bench.sh`: the `gateway` build) the agent as the
//! packages run it: that build, with the `Environment=` of `cross/edge-agent.service`; medians
//! of [`ROUNDS`] alternating rounds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use e2e::load::{self, LoadSpec, PayloadKind};
use e2e::{AgentHarness, CloudHarness, free_port, peak_rss_mib};
use rumqttc::QoS;

/// The memory keys of `cross/agent.yaml` (the packaged profile for a 512 MB board): `mqtt:`.
pub const BOARD_MQTT: &str = "  router_segment_bytes: 1MiB\n  router_segments: 4\n  max_connections: 500\n  max_payload_bytes: 256KiB\n";
/// ...and `ingest:`.
pub const BOARD_INGEST: &str = "  max_in_flight: 2\n  zstd_level: 3\n";
/// ...and `buffer:`, appended to the harness's.
pub const BOARD_BUFFER: &str = "  queue_records: 5000\n";

/// A config profile.
#[derive(Clone, Copy)]
struct Profile {
    name: &'static str,
    mqtt: &'static str,
    ingest: &'static str,
    buffer: &'static str,
    max_connections: usize,
    max_retained: u64,
}

const PROFILES: [Profile; 2] = [
    Profile {
        name: "default config",
        mqtt: "",
        ingest: "",
        buffer: "",
        max_connections: 1000,
        max_retained: 10_000,
    },
    Profile {
        name: "512 MB board profile",
        mqtt: BOARD_MQTT,
        ingest: BOARD_INGEST,
        buffer: BOARD_BUFFER,
        max_connections: 500,
        max_retained: 10_000,
    },
];

/// Rounds per cell; the agents alternate within each.
const ROUNDS: usize = 3;

/// The peak of a phase, MiB: RSS and its anonymous part.
#[derive(Clone, Copy, Default)]
struct Peak {
    rss: f64,
    anon: f64,
}

/// Samples a process's anonymous RSS until dropped ([`Watch::peak`]).
struct Watch {
    pid: u32,
    stop: Arc<std::sync::atomic::AtomicBool>,
    anon: Arc<std::sync::atomic::AtomicU64>,
}

impl Watch {
    fn start(pid: u32) -> Watch {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let anon = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, a) = (stop.clone(), anon.clone());
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|t| {
                        t.lines()
                            .find(|l| l.starts_with("RssAnon:"))
                            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    })
                    .unwrap_or(0);
                a.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watch { pid, stop, anon }
    }

    fn peak(self) -> Peak {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Peak {
            rss: peak_rss_mib(self.pid),
            anon: self.anon.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0,
        }
    }
}

/// How one agent of the table is started: its binary (`None`: this tree's release build) and
/// the environment it gets on top of the bench's.
#[derive(Clone)]
struct Launch {
    who: &'static str,
    binary: Option<std::path::PathBuf>,
    env: Vec<String>,
}

impl Launch {
    /// The command that starts it: `env K=V … <binary>`.
    fn command(&self) -> Vec<std::path::PathBuf> {
        let binary = self
            .binary
            .clone()
            .unwrap_or_else(|| e2e::bin("edge-agent"));
        if self.env.is_empty() {
            return vec![binary];
        }
        let mut command = vec!["env".into()];
        command.extend(self.env.iter().map(Into::into));
        command.push(binary);
        command
    }
}

/// The `Environment=` assignments of the packaged systemd unit (`cross/edge-agent.service`),
/// but its log level (the harness sets its own).
fn unit_environment() -> Vec<String> {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../cross/edge-agent.service");
    std::fs::read_to_string(unit)
        .expect("cross/edge-agent.service")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Environment="))
        .filter(|a| !a.starts_with("RUST_LOG="))
        .map(str::to_owned)
        .collect()
}

fn agent(dir: &std::path::Path, ingest_url: &str, p: Profile, launch: &Launch) -> e2e::Agent {
    let harness = AgentHarness::new(dir, ingest_url)
        .mqtt_extra(p.mqtt)
        .ingest_extra(p.ingest)
        .buffer_extra(p.buffer);
    // BENCH_HEAP_PROFILE=<dir>: the agent runs under heaptrack, one profile per run in <dir>
    // (`heaptrack_print` reads them); its RSS figures then include heaptrack's own.
    match std::env::var_os("BENCH_HEAP_PROFILE") {
        Some(out) => {
            let out = std::path::PathBuf::from(out);
            let n = std::fs::read_dir(&out).map_or(0, |d| d.count());
            harness
                .launcher(&[
                    "heaptrack".into(),
                    "-o".into(),
                    out.join(format!("agent-{n}")),
                    e2e::bin("edge-agent"),
                ])
                .run()
        }
        None => harness.launcher(&launch.command()).run(),
    }
}

fn full_speed(mqtt: SocketAddr, total: u64, prefix: &str) -> load::LoadReport {
    let clients = 10;
    let spec = LoadSpec {
        mqtt,
        clients,
        messages_per_client: total / clients as u64,
        rate_per_client: None,
        payload_bytes: 200,
        kind: PayloadKind::Json,
        qos: QoS::AtLeastOnce,
        topic: Arc::new(|client, i| format!("plant/{client}/telemetry/t{}", i % 4)),
        client_prefix: prefix.into(),
    };
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(load::publish(spec))
}

/// Resets the process's peak RSS to its current RSS (Linux ≥ 4.0).
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn at_full_speed(p: Profile, total: u64, launch: &Launch) -> Peak {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = agent(dir.path(), &cloud.url(), p, launch);
    let watch = Watch::start(agent.process.pid());
    let report = full_speed(agent.mqtt, total, "full-");
    assert_eq!(report.acked, total);
    cloud.wait_for_records(total, Duration::from_secs(300));
    watch.peak()
}

fn draining(p: Profile, total: u64, launch: &Launch) -> Peak {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let agent = agent(dir.path(), &format!("http://127.0.0.1:{port}"), p, launch);
    let report = full_speed(agent.mqtt, total, "drain-");
    assert_eq!(report.acked, total);
    reset_peak(agent.process.pid());
    let watch = Watch::start(agent.process.pid());
    let cloud = CloudHarness::new(dir.path()).port(port).run();
    cloud.wait_for_records(total, Duration::from_secs(600));
    watch.peak()
}

/// An idle MQTT 3.1.1 client: CONNECT (keep-alive 10 min) answered by CONNACK 0.
fn idle_client(mqtt: SocketAddr, id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(mqtt).expect("connect");
    let mut variable = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0x02, 0x58];
    variable.extend((id.len() as u16).to_be_bytes());
    variable.extend(id.as_bytes());
    let mut packet = vec![0x10, variable.len() as u8];
    packet.extend(variable);
    stream.write_all(&packet).expect("CONNECT");
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack[3], 0, "connection {id} accepted");
    stream
}

fn every_connection(p: Profile, total: u64, launch: &Launch) -> Peak {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = agent(dir.path(), &cloud.url(), p, launch);
    let watch = Watch::start(agent.process.pid());
    // Room for the 10 publishers.
    let idle: Vec<TcpStream> = (0..p.max_connections - 10)
        .map(|i| idle_client(agent.mqtt, &format!("idle-{i}")))
        .collect();
    let report = full_speed(agent.mqtt, total, "busy-");
    assert_eq!(report.acked, total);
    cloud.wait_for_records(total, Duration::from_secs(300));
    drop(idle);
    watch.peak()
}

fn retained(p: Profile, launch: &Launch) -> Peak {
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = CloudHarness::new(dir.path()).run();
    let agent = agent(dir.path(), &cloud.url(), p, launch);
    let watch = Watch::start(agent.process.pid());
    let mut options = rumqttc::MqttOptions::new("retainer", "127.0.0.1", agent.mqtt.port());
    options.set_max_packet_size(1 << 20, 1 << 20);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let count = p.max_retained * 3 / 2;
    runtime.block_on(async {
        let (client, mut events) = rumqttc::AsyncClient::new(options, 100);
        let publisher = tokio::spawn(async move {
            for i in 0..count {
                let payload = load::payload(PayloadKind::Json, 0, i, 1024);
                client
                    .publish(
                        format!("site/retained/{i}"),
                        QoS::AtLeastOnce,
                        true,
                        payload,
                    )
                    .await
                    .expect("publish");
            }
            client
        });
        let mut acked = 0;
        while acked < count {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                events.poll().await.expect("event")
            {
                acked += 1;
            }
        }
        drop(publisher.await);
    });
    cloud.wait_for_records(count, Duration::from_secs(300));
    watch.peak()
}

/// The medians of each cell over the rounds.
fn medians(runs: &[[Peak; 4]]) -> [Peak; 4] {
    std::array::from_fn(|c| Peak {
        rss: crate::median(runs.iter().map(|r| r[c].rss).collect()),
        anon: crate::median(runs.iter().map(|r| r[c].anon).collect()),
    })
}

/// Prints the table.
pub fn table(scale: u64) {
    let total = 200_000 * scale;
    let mut agents = vec![Launch {
        who: "this agent",
        binary: None,
        env: Vec::new(),
    }];
    if let Some(binary) = crate::baseline_agent() {
        agents.push(Launch {
            who: "baseline (BENCH_BASELINE)",
            binary: Some(binary),
            env: Vec::new(),
        });
    }
    if let Some(binary) = std::env::var_os("BENCH_PACKAGED_AGENT") {
        agents.push(Launch {
            who: "this agent as packaged (gateway build, the unit's environment)",
            binary: Some(binary.into()),
            env: unit_environment(),
        });
    }
    println!();
    println!(
        "| agent peak RSS MiB (anonymous part), medians of {ROUNDS} | full speed ({total} × 200 B, QoS 1, 10 publishers) | draining {total} | max_connections clients + full speed | retained.max_messages × 1.5 retained 1 KiB publishes |"
    );
    println!("|---|---:|---:|---:|---:|");
    for p in PROFILES {
        let mut runs: Vec<Vec<[Peak; 4]>> = vec![Vec::new(); agents.len()];
        for _ in 0..ROUNDS {
            for (a, launch) in agents.iter().enumerate() {
                runs[a].push([
                    at_full_speed(p, total, launch),
                    draining(p, total, launch),
                    every_connection(p, total, launch),
                    retained(p, launch),
                ]);
            }
        }
        for (a, Launch { who, .. }) in agents.iter().enumerate() {
            let m = medians(&runs[a]);
            let cell = |c: usize| format!("{:.1} ({:.1})", m[c].rss, m[c].anon);
            println!(
                "| {}, {who} | {} | {} | {} ({}) | {} ({}) |",
                p.name,
                cell(0),
                cell(1),
                cell(2),
                p.max_connections,
                cell(3),
                p.max_retained * 3 / 2,
            );
        }
    }
}
