//! Real stream-log brokers for the sink tests, run as local processes on 127.0.0.1: the tansu
//! Kafka-protocol broker and Debian's `nats-server` with JetStream. `tests/run.sh` installs
//! both. What lands in Kafka is read with Python's `confluent-kafka` (`tests/kafka_read.py`),
//! a client we did not write; JetStream is read with the `async-nats` client.
//!
//! tansu quirks handled here: memory storage only (a restart starts empty), auto-created
//! topics get several partitions (we read them all), and ListOffsets LATEST is wrong (we read
//! from the earliest offset until the expected count, then a little longer for duplicates).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::{Process, free_port, unique};

/// Where `tests/run.sh` puts the tools it downloads.
pub fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tools")
}

fn tool(env: &str, default: PathBuf) -> PathBuf {
    let path = std::env::var_os(env).map_or(default, PathBuf::from);
    assert!(
        path.exists(),
        "{} is missing: run `bash tests/run.sh` once (it installs the test brokers), or set {env}",
        path.display()
    );
    path
}

fn wait_for_port(addr: SocketAddr, process: &Process, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr}; stderr:\n{}",
            process.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running tansu broker (memory storage).
pub struct Tansu {
    /// The process.
    pub process: Process,
    /// `host:port` for `bootstrap.servers`.
    pub brokers: String,
    port: u16,
    dir: PathBuf,
}

impl Tansu {
    /// Starts tansu on a free port, logging into `dir`.
    pub fn start(dir: &Path) -> Tansu {
        Self::start_on(dir, free_port())
    }

    fn start_on(dir: &Path, port: u16) -> Tansu {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(tool("TANSU_BIN", tools_dir().join("tansu")));
        cmd.arg("broker")
            .arg("--listener-url")
            .arg(&url)
            .arg("--advertised-listener-url")
            .arg(&url)
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .env("RUST_LOG", "warn");
        let process = Process::spawn(cmd, dir.join(format!("tansu-{}.stderr", unique())));
        wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), &process, "tansu");
        Tansu {
            process,
            brokers: format!("127.0.0.1:{port}"),
            port,
            dir: dir.to_owned(),
        }
    }

    /// Kills it (SIGKILL): everything it held is gone (memory storage).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts a fresh, empty broker on the same port.
    pub fn restart(&mut self) {
        self.process.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::net::TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("port {} never freed: {e}", self.port),
            }
        }
        *self = Self::start_on(&self.dir, self.port);
    }
}

/// One record as a Kafka consumer (`confluent-kafka`) read it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct KafkaRecord {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// Key (the device id).
    pub key: String,
    /// Payload, base64.
    value_b64: String,
    /// Message timestamp, Unix ms.
    pub timestamp_ms: i64,
    /// Headers (UTF-8).
    pub headers: BTreeMap<String, String>,
}

impl KafkaRecord {
    /// Payload bytes.
    pub fn value(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.value_b64)
            .expect("base64 from kafka_read.py")
    }

    /// A header that must be there.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("header {name} missing: {self:?}"))
    }

    /// The record's idempotency key: (device, stream, epoch, seq).
    pub fn idempotency_key(&self) -> (String, String, u64, u64) {
        (
            self.header("device").to_owned(),
            self.header("stream").to_owned(),
            self.header("epoch").parse().expect("epoch"),
            self.header("seq").parse().expect("seq"),
        )
    }
}

/// Reads every partition of `topics` from the earliest offset with `confluent-kafka`, until
/// `expect` records arrived and then `linger` more passed (to catch duplicates), or until
/// `timeout`. Records come in (topic, partition, offset) order.
pub fn kafka_read(
    brokers: &str,
    topics: &[String],
    expect: usize,
    linger: Duration,
    timeout: Duration,
) -> Vec<KafkaRecord> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kafka_read.py");
    let out = Command::new("python3")
        .arg(script)
        .arg("--brokers")
        .arg(brokers)
        .arg("--expect")
        .arg(expect.to_string())
        .arg("--linger")
        .arg(linger.as_secs_f64().to_string())
        .arg("--timeout")
        .arg(timeout.as_secs_f64().to_string())
        .args(topics)
        .output()
        .expect("python3 tests/kafka_read.py (run `bash tests/run.sh` to install confluent-kafka)");
    assert!(
        out.status.success(),
        "kafka_read.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut records: Vec<KafkaRecord> = String::from_utf8(out.stdout)
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("kafka_read.py JSON line"))
        .collect();
    records
        .sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    records
}

/// A running `nats-server` with JetStream, storing in its own directory.
pub struct NatsServer {
    /// The process.
    pub process: Process,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
}

impl NatsServer {
    /// Starts `nats-server -js` on a free port, storing under `dir`.
    pub fn start(dir: &Path) -> NatsServer {
        NatsServer::start_with(dir, "")
    }

    /// As [`NatsServer::start`], with `config` (nats-server's config file syntax, such as
    /// `max_payload: 65536`).
    pub fn start_with(dir: &Path, config: &str) -> NatsServer {
        let port = free_port();
        let store = dir.join(format!("jetstream-{port}"));
        std::fs::create_dir_all(&store).expect("jetstream dir");
        let mut cmd = Command::new(tool(
            "NATS_SERVER_BIN",
            PathBuf::from("/usr/sbin/nats-server"),
        ));
        cmd.arg("-js")
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(port.to_string())
            .arg("-sd")
            .arg(&store);
        if !config.is_empty() {
            let file = dir.join(format!("nats-{port}.conf"));
            std::fs::write(&file, config).expect("nats config");
            cmd.arg("-c").arg(file);
        }
        let process = Process::spawn(cmd, dir.join(format!("nats-{}.stderr", unique())));
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            &process,
            "nats-server",
        );
        NatsServer {
            process,
            url: format!("nats://127.0.0.1:{port}"),
        }
    }
}

/// One message read back from a JetStream stream.
#[derive(Debug, Clone)]
pub struct JsMessage {
    /// Its subject.
    pub subject: String,
    /// Stream sequence.
    pub sequence: u64,
    /// Payload.
    pub payload: Vec<u8>,
    /// Headers (first value of each).
    pub headers: BTreeMap<String, String>,
}

/// Every message of JetStream stream `stream`, in stream order, read by sequence.
pub fn jetstream_read(url: &str, stream: &str) -> Vec<JsMessage> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let client = async_nats::connect(url).await.expect("connect to nats");
            let js = async_nats::jetstream::new(client);
            let mut s = js.get_stream(stream).await.expect("stream");
            let info = s.info().await.expect("stream info").clone();
            let mut out = Vec::new();
            for seq in info.state.first_sequence..=info.state.last_sequence {
                if info.state.messages == 0 {
                    break;
                }
                let m = s.get_raw_message(seq).await.expect("message by sequence");
                let headers = m
                    .headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.to_string(), v.first()?.to_string())))
                    .collect();
                out.push(JsMessage {
                    subject: m.subject.to_string(),
                    sequence: m.sequence,
                    payload: m.payload.to_vec(),
                    headers,
                });
            }
            out
        })
}

/// Debian's Mosquitto, as the MQTT broker already on a site (the upstream broker source's
/// tests): on a free port, anonymous, with persistence under its directory, so queued messages
/// of persistent sessions survive its restart.
pub struct Mosquitto {
    /// The process.
    pub process: Process,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

impl Mosquitto {
    /// Starts it, storing under `dir`.
    pub fn start(dir: &Path) -> Mosquitto {
        let port = free_port();
        let dir = dir.join(format!("mosquitto-{port}"));
        std::fs::create_dir_all(&dir).expect("mosquitto dir");
        // `user root`: started as root (as the tests are), Mosquitto otherwise drops to the
        // user `mosquitto`, cannot write its persistence file into this directory, and a
        // restart loses every session and what was queued for it.
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 100000\nmax_inflight_messages 100\nuser root\nlog_dest file {}/mosquitto.log\n",
                dir.display(),
                dir.display()
            ),
        )
        .expect("mosquitto config");
        let process = Mosquitto::spawn(&dir, port);
        Mosquitto { process, port, dir }
    }

    /// Starts it as a plain broker for the benchmarks: persistence off (as the comparison
    /// in issue 16 measured it), Mosquitto's defaults otherwise, but an unbounded queue per
    /// client, so a slow subscriber gets every message instead of Mosquitto dropping some.
    pub fn start_in_memory(dir: &Path) -> Mosquitto {
        let port = free_port();
        let dir = dir.join(format!("mosquitto-{port}"));
        std::fs::create_dir_all(&dir).expect("mosquitto dir");
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nuser root\n"
            ),
        )
        .expect("mosquitto config");
        let process = Mosquitto::spawn(&dir, port);
        Mosquitto { process, port, dir }
    }

    fn spawn(dir: &Path, port: u16) -> Process {
        let mut cmd = Command::new(tool("MOSQUITTO_BIN", PathBuf::from("/usr/sbin/mosquitto")));
        cmd.arg("-c").arg(dir.join("mosquitto.conf"));
        let process = Process::spawn(cmd, dir.join(format!("mosquitto-{}.stderr", unique())));
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            &process,
            "mosquitto",
        );
        process
    }

    /// Stops it cleanly (it saves its persistent state) and starts it again on the same port.
    pub fn restart(&mut self) {
        let _ = self.process.terminate();
        self.process = Mosquitto::spawn(&self.dir, self.port);
    }
}
