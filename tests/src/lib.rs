//! End-to-end harnesses: start the REAL `cloud-ingest` and `edge-agent` binaries as processes on
//! 127.0.0.1 with per-test directories, publish with real MQTT clients, read the log back.
//!
//! ```text
//! load (rumqttc sensors) ─MQTT─▶ AgentHarness (edge-agent) ─HTTP─▶ CloudHarness (cloud-ingest) ─▶ log reads
//! ```
//!
//! Binaries are found beside the test executable (`target/<profile>/`), or in `$GATEWAY_BIN_DIR`;
//! build them first with `cargo build --workspace --bins` (the README's test command does).

pub mod brokers;
pub mod fault;
pub mod load;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;

/// Token of the test device.
pub const TOKEN: &str = "test-token-0123456789";
/// The test device.
pub const DEVICE: &str = "dev-test";
/// Its tenant.
pub const TENANT: &str = "acme";

/// Directory holding the built binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GATEWAY_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary, checked to exist.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` (same profile) first",
        path.display()
    );
    path
}

/// The largest a file grows while it is watched, sampled every 20 ms (a missing file counts
/// as empty): [`PeakSize::watch`], then [`PeakSize::stop`].
pub struct PeakSize {
    watching: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<u64>,
}

impl PeakSize {
    /// Starts sampling the size of `path`.
    pub fn watch(path: &Path) -> PeakSize {
        let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (still, path) = (watching.clone(), path.to_owned());
        let sampler = std::thread::spawn(move || {
            let mut largest = 0u64;
            while still.load(std::sync::atomic::Ordering::Relaxed) {
                largest = largest.max(std::fs::metadata(&path).map_or(0, |m| m.len()));
                std::thread::sleep(Duration::from_millis(20));
            }
            largest
        });
        PeakSize { watching, sampler }
    }

    /// Stops sampling; the largest size seen, in bytes.
    pub fn stop(self) -> u64 {
        self.watching
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.sampler.join().expect("size sampler")
    }
}

/// A free TCP port on 127.0.0.1 for a process the test starts later. Picked below Linux's
/// ephemeral range (and away from the agent's internal ports, 20000–25999), so no outgoing
/// connection takes it in the meantime.
pub fn free_port() -> u16 {
    let seed = std::process::id() as u64 ^ unique() as u64;
    let mut x = seed | 1;
    for _ in 0..256 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 26_000 + (x % 6_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 26000-31999");
}

/// Polls `probe` until it returns `Some`, or gives `None` once `timeout` has passed.
pub fn try_eventually<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `probe` until it returns `Some` or `timeout` passes (then panics with `what`).
pub fn eventually<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop, with its stdout lines.
pub struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Where its stderr goes.
    pub stderr_path: PathBuf,
}

impl Process {
    fn spawn(mut cmd: Command, stderr_path: PathBuf) -> Process {
        use std::os::unix::process::CommandExt;
        // A group of its own: a launcher that forks (faketime) is stopped with its child.
        cmd.process_group(0);
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Process {
            child,
            lines,
            stderr_path,
        }
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_owned();
                    }
                }
                Err(_) => panic!(
                    "process never printed {prefix:?}; stderr:\n{}",
                    std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
                ),
            }
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL (its whole process group) and reap.
    pub fn kill(&mut self) {
        self.signal_group("-KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal_group(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
    }

    /// SIGHUP to the process itself (a reload).
    pub fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -HUP {}", self.child.id());
    }

    /// SIGTERM, then waits for the exit status (SIGKILL after 20 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal_group("-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("process ignored SIGTERM for 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Builder and handle of a running `cloud-ingest` with the embedded log.
pub struct CloudHarness {
    dir: PathBuf,
    port: u16,
    extra_devices: Vec<(String, String, String)>,
    limits: String,
    sink: Option<String>,
    tls: String,
    read_api: String,
    extra: String,
    binary: Option<PathBuf>,
}

/// A running ingest.
pub struct Cloud {
    /// The process.
    pub process: Process,
    /// Its address.
    pub addr: SocketAddr,
    /// Its config file.
    pub config: PathBuf,
    http: reqwest::blocking::Client,
    https: bool,
}

impl CloudHarness {
    /// An ingest keeping its files in `dir`, with the test device registered.
    pub fn new(dir: &Path) -> CloudHarness {
        CloudHarness {
            dir: dir.to_owned(),
            port: 0,
            extra_devices: Vec::new(),
            limits: String::new(),
            sink: None,
            tls: String::new(),
            read_api: "{ enabled: true, allow_without_token: true }".into(),
            extra: String::new(),
            binary: None,
        }
    }

    /// Run the `cloud-ingest` at `path` (another version's, for benchmarks) instead of this
    /// tree's.
    pub fn binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_owned());
        self
    }

    /// Extra top-level config lines.
    pub fn extra(mut self, yaml: &str) -> Self {
        self.extra = yaml.to_owned();
        self
    }

    /// The `read_api:` section as flow YAML (open to anyone by default, for the harness's reads).
    pub fn read_api(mut self, yaml: &str) -> Self {
        self.read_api = yaml.to_owned();
        self
    }

    /// Serve HTTPS: the `tls:` section's body, as YAML indented by two spaces.
    pub fn tls(mut self, yaml: &str) -> Self {
        self.tls = yaml.to_owned();
        self
    }

    /// Append to Kafka at `brokers` instead of the embedded log; a record not acknowledged
    /// within 2 s fails its batch (below the test agent's 5 s request timeout).
    pub fn kafka(self, brokers: &str) -> Self {
        self.sink(&format!(
            "  type: kafka\n  options:\n    brokers: {brokers}\n    delivery_timeout: 2s\n"
        ))
    }

    /// The `sink:` section's body, as YAML indented by two spaces.
    pub fn sink(mut self, yaml: &str) -> Self {
        self.sink = Some(yaml.to_owned());
        self
    }

    /// Append to NATS JetStream at `url` (stream `stream`) instead of the embedded log.
    pub fn nats(self, url: &str, stream: &str) -> Self {
        self.sink(&format!(
            "  type: nats\n  options:\n    url: {url}\n    stream: {stream}\n    ack_timeout: 2s\n"
        ))
    }

    /// Listen on this port (to start it after an agent that already points at it).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Register another device (id, tenant, token).
    pub fn device(mut self, id: &str, tenant: &str, token: &str) -> Self {
        self.extra_devices
            .push((id.into(), tenant.into(), token.into()));
        self
    }

    /// Register a device that logs in with its client certificate only (no token; needs
    /// `tls` with a `client_ca_file`).
    pub fn certificate_device(mut self, id: &str, tenant: &str) -> Self {
        self.extra_devices
            .push((id.into(), tenant.into(), String::new()));
        self
    }

    /// Extra `limits:` YAML lines (indented by two spaces).
    pub fn limits(mut self, yaml: &str) -> Self {
        self.limits = yaml.to_owned();
        self
    }

    /// Writes the config and starts the binary; returns once it listens.
    pub fn run(self) -> Cloud {
        use token_hash as hash;
        let mut devices = format!(
            "  - id: {DEVICE}\n    tenant: {TENANT}\n    token_sha256: {}\n",
            hash(TOKEN)
        );
        for (id, tenant, token) in &self.extra_devices {
            devices.push_str(&format!("  - id: {id}\n    tenant: {tenant}\n"));
            if !token.is_empty() {
                devices.push_str(&format!("    token_sha256: {}\n", hash(token)));
            }
        }
        let limits = if self.limits.is_empty() {
            String::new()
        } else {
            format!("limits:\n{}\n", self.limits)
        };
        let sink = self.sink.clone().unwrap_or_else(|| {
            format!(
                "  type: embedded\n  options:\n    path: {}\n",
                self.dir.join("log.db").display()
            )
        });
        let config = self.dir.join(format!("cloud-ingest-{}.yaml", self.port));
        std::fs::write(
            &config,
            format!(
                "version: 1\nlisten: 127.0.0.1:{}\ndevices:\n{devices}sink:\n{sink}{limits}read_api: {}\n{tls}{}",
                self.port,
                self.read_api,
                self.extra,
                tls = if self.tls.is_empty() {
                    String::new()
                } else {
                    format!("tls:\n{}\n", self.tls)
                },
            ),
        )
        .expect("write config");
        let mut cmd = Command::new(self.binary.clone().unwrap_or_else(|| bin("cloud-ingest")));
        cmd.arg("run").arg("--config").arg(&config);
        let mut process = Process::spawn(cmd, self.dir.join(format!("ingest-{}.stderr", unique())));
        let addr = process
            .wait_line("listening on")
            .parse()
            .expect("ingest address");
        Cloud {
            process,
            addr,
            config,
            // The harness reads its own log back; the tests check certificates themselves.
            http: reqwest::blocking::Client::builder()
                .danger_accept_invalid_certs(true)
                .build()
                .expect("client"),
            https: !self.tls.is_empty(),
        }
    }
}

/// A small tmpfs mounted for one test (a volume that fills), unmounted on drop. Needs root,
/// which the test command has in CI.
pub struct SmallDisk(pub PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs of `size` (e.g. "8m") at `path`.
    pub fn mount(path: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (the test command runs as root in CI)"
        );
        SmallDisk(path.to_owned())
    }

    /// Bytes free on it now.
    pub fn available(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.0)
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the free bytes")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Peak resident set size of process `pid` in MiB (VmHWM); 0 when unknown.
pub fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

pub use ingest_wire::now_ms;

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// SHA-256 hex of a token, computed by the ingest binary itself (`cloud-ingest hash-token`).
pub fn token_hash(token: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(bin("cloud-ingest"))
        .arg("hash-token")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("hash-token");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(token.as_bytes())
        .expect("write token");
    let out = child.wait_with_output().expect("hash-token output");
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

/// One record as read back from the embedded log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Offset in its topic.
    pub offset: u64,
    /// Key (device id).
    pub key: String,
    /// Stream.
    pub stream: String,
    /// Sequence.
    pub seq: u64,
    /// MQTT topic.
    pub mqtt_topic: String,
    /// Exact payload bytes.
    pub payload: Vec<u8>,
    /// Its attributes (`wire/SPEC.md`), by name.
    pub attributes: std::collections::BTreeMap<String, String>,
}

impl Cloud {
    /// Base URL.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Every record of `topic`, in offset order (paged reads of `GET /v1/log/{topic}`).
    pub fn read_topic(&self, topic: &str) -> Vec<LogRecord> {
        let mut out = Vec::new();
        let mut from = 0;
        loop {
            let page: serde_json::Value = self
                .http
                .get(format!(
                    "{}/v1/log/{topic}?from={from}&limit=5000",
                    self.url()
                ))
                .send()
                .and_then(|r| r.error_for_status())
                .and_then(|r| r.json())
                .expect("read log");
            let records = page["records"].as_array().expect("records");
            if records.is_empty() {
                return out;
            }
            for r in records {
                let payload = match (r["payload"].as_str(), r["payload_base64"].as_str()) {
                    (Some(text), _) => text.as_bytes().to_vec(),
                    (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .expect("base64"),
                    _ => panic!("record without payload: {r}"),
                };
                out.push(LogRecord {
                    offset: r["offset"].as_u64().expect("offset"),
                    key: r["key"].as_str().expect("key").to_owned(),
                    stream: r["stream"].as_str().expect("stream").to_owned(),
                    seq: r["seq"].as_u64().expect("seq"),
                    mqtt_topic: r["mqtt_topic"].as_str().expect("mqtt_topic").to_owned(),
                    payload,
                    attributes: serde_json::from_value(r["attributes"].clone()).unwrap_or_default(),
                });
            }
            from = page["next_offset"].as_u64().expect("next_offset");
        }
    }

    /// Every loss report of the test tenant (topic `iot.{TENANT}._losses`), in log order.
    pub fn loss_reports(&self) -> Vec<ingest_wire::LossReport> {
        self.read_topic(&format!("iot.{TENANT}.{}", ingest_wire::LOSS_STREAM))
            .iter()
            .map(|r| serde_json::from_slice(&r.payload).expect("a loss report is JSON"))
            .collect()
    }

    /// Records per topic in the log (end offsets); empty when the ingest does not answer.
    pub fn topic_counts(&self) -> std::collections::HashMap<String, u64> {
        let topics: serde_json::Value = match self
            .http
            .get(format!("{}/v1/log", self.url()))
            .send()
            .and_then(|r| r.json())
        {
            Ok(v) => v,
            Err(_) => return Default::default(),
        };
        topics.as_array().map_or_else(Default::default, |a| {
            a.iter()
                .filter_map(|t| Some((t["topic"].as_str()?.to_owned(), t["end_offset"].as_u64()?)))
                .collect()
        })
    }

    /// Waits until the log holds `total` records (polling every 10 ms); panics after `within`.
    pub fn wait_for_records(&self, total: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.total_records() < total {
            assert!(
                Instant::now() < deadline,
                "{} of {total} records in the log after {within:?}",
                self.total_records()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Records in the log, over every topic.
    pub fn total_records(&self) -> u64 {
        self.topic_counts().values().sum()
    }

    /// The value of one of its metric series; 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric(self.addr, series)
    }

    /// HTTP status of `/readyz` (0 when it does not answer).
    pub fn readyz(&self) -> u16 {
        self.http
            .get(format!("{}/readyz", self.url()))
            .send()
            .map_or(0, |r| r.status().as_u16())
    }

    /// GETs `path` (with `Authorization: Bearer token` if given); returns (status, body).
    pub fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut req = self.http.get(format!("{}{path}", self.url()));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let response = req.send().expect("GET");
        let status = response.status().as_u16();
        (status, response.text().unwrap_or_default())
    }

    /// POSTs a raw body to the batches endpoint; returns (status, body).
    pub fn post(
        &self,
        device: &str,
        token: &str,
        content_type: &str,
        encoding: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, String) {
        let mut req = self
            .http
            .post(format!("{}{}", self.url(), ingest_wire::BATCHES_PATH))
            .header("content-type", content_type)
            .header(ingest_wire::HEADER_DEVICE_ID, device)
            .bearer_auth(token)
            .body(body);
        if let Some(enc) = encoding {
            req = req.header("content-encoding", enc);
        }
        let resp = req.send().expect("post");
        let status = resp.status().as_u16();
        (status, resp.text().unwrap_or_default())
    }
}

/// Builder of a running `edge-agent`.
pub struct AgentHarness {
    dir: PathBuf,
    ingest_url: String,
    device: (String, String),
    streams: String,
    extra: String,
    quota: String,
    mqtt_port: u16,
    buffer: Option<PathBuf>,
    mqtt_extra: String,
    mqtt_auth: String,
    ingest_extra: String,
    buffer_extra: String,
    launcher: Vec<PathBuf>,
}

/// A running agent.
pub struct Agent {
    /// The process.
    pub process: Process,
    /// MQTT 3.1.1 address.
    pub mqtt: SocketAddr,
    /// MQTT 5 address.
    pub mqtt5: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
    /// The config file.
    pub config: PathBuf,
}

/// Two streams, critical `alarms` and bulk `logs`, under `plant/+/…`: for drains after an
/// outage.
pub const CRITICAL_AND_BULK: &str = "
  - name: alarms
    topics: [\"plant/+/alarm/#\"]
    priority: critical
    batch: { max_records: 100, linger: 0ms }
  - name: logs
    topics: [\"plant/+/logs/#\"]
    priority: bulk
    batch: { max_records: 1000, linger: 100ms }
";

/// Three streams (critical, normal, bulk) under `plant/+/…`.
pub const THREE_STREAMS: &str = "
  - name: alarms
    topics: [\"plant/+/alarm/#\"]
    priority: critical
    batch: { max_records: 100, linger: 0ms }
  - name: telemetry
    topics: [\"plant/+/telemetry/#\"]
    priority: normal
    batch: { max_records: 1000, linger: 50ms }
  - name: logs
    topics: [\"plant/+/logs/#\"]
    priority: bulk
    batch: { max_records: 1000, linger: 100ms }
";

impl AgentHarness {
    /// An agent keeping its files in `dir`, sending to `cloud_url`.
    pub fn new(dir: &Path, cloud_url: &str) -> AgentHarness {
        AgentHarness {
            dir: dir.to_owned(),
            ingest_url: cloud_url.to_owned(),
            device: (DEVICE.to_owned(), TOKEN.to_owned()),
            streams: THREE_STREAMS.to_owned(),
            extra: String::new(),
            quota: "256MiB".into(),
            mqtt_port: 0,
            buffer: None,
            mqtt_extra: String::new(),
            mqtt_auth: "  auth: { allow_anonymous: true }\n".into(),
            ingest_extra: String::new(),
            buffer_extra: String::new(),
            launcher: Vec::new(),
        }
    }

    /// Replace the `mqtt.auth` (and `mqtt.acl`) keys, indented by two spaces (the default lets
    /// anonymous clients in).
    pub fn mqtt_auth(mut self, yaml: &str) -> Self {
        self.mqtt_auth = yaml.to_owned();
        self
    }

    /// Run this command instead of the native binary, e.g. `[qemu-aarch64-static, <arm binary>]`.
    pub fn launcher(mut self, command: &[PathBuf]) -> Self {
        self.launcher = command.to_vec();
        self
    }

    /// Run as this device (id, token) instead of the test device.
    pub fn device(mut self, id: &str, token: &str) -> Self {
        self.device = (id.to_owned(), token.to_owned());
        self
    }

    /// Send to these ingest replicas (`ingest.urls`) instead of one URL.
    pub fn ingest_urls(mut self, urls: &[String]) -> Self {
        self.ingest_url = format!("[{}]", urls.join(", "));
        self
    }

    /// Extra keys of the `ingest:` section (indented by two spaces, newline-terminated).
    pub fn ingest_extra(mut self, yaml: &str) -> Self {
        self.ingest_extra = yaml.to_owned();
        self
    }

    /// Extra keys of the `mqtt:` section (indented by two spaces, newline-terminated).
    pub fn mqtt_extra(mut self, yaml: &str) -> Self {
        self.mqtt_extra = yaml.to_owned();
        self
    }

    /// Extra keys of the `buffer:` section (indented by two spaces, newline-terminated).
    pub fn buffer_extra(mut self, yaml: &str) -> Self {
        self.buffer_extra = yaml.to_owned();
        self
    }

    /// Put the buffer file here instead of `dir/buffer.db`.
    pub fn buffer_path(mut self, path: &Path) -> Self {
        self.buffer = Some(path.to_owned());
        self
    }

    /// Buffer quota, e.g. "300KiB".
    pub fn quota(mut self, quota: &str) -> Self {
        self.quota = quota.to_owned();
        self
    }

    /// A fixed MQTT 3.1.1 port (so publishers can reconnect after a restart).
    pub fn mqtt_port(mut self, port: u16) -> Self {
        self.mqtt_port = port;
        self
    }

    /// Replace the streams (YAML list items).
    pub fn streams(mut self, yaml: &str) -> Self {
        self.streams = yaml.to_owned();
        self
    }

    /// Extra top-level YAML appended to the config.
    pub fn extra(mut self, yaml: &str) -> Self {
        self.extra = yaml.to_owned();
        self
    }

    /// The config text this harness writes.
    pub fn config_text(&self) -> String {
        format!(
            "version: 1
device_id: {device}
ingest:
  {url_key}: {url}
  token_file: {token}
  retry_initial: 50ms
  retry_max: 500ms
  request_timeout: 5s
{ingest_extra}mqtt:
  listen: 127.0.0.1:{mqtt_port}
  listen_v5: 127.0.0.1:0
{mqtt_auth}{mqtt_extra}buffer:
  path: {buffer}
  quota_bytes: {quota}
{buffer_extra}streams:{streams}
metrics_listen: 127.0.0.1:0
{extra}",
            device = self.device.0,
            url_key = if self.ingest_url.starts_with('[') {
                "urls"
            } else {
                "url"
            },
            url = self.ingest_url,
            token = self.dir.join("token").display(),
            buffer = self
                .buffer
                .clone()
                .unwrap_or_else(|| self.dir.join("buffer.db"))
                .display(),
            streams = self.streams,
            extra = self.extra,
            quota = self.quota,
            mqtt_port = self.mqtt_port,
            mqtt_extra = self.mqtt_extra,
            mqtt_auth = self.mqtt_auth,
            ingest_extra = self.ingest_extra,
            buffer_extra = self.buffer_extra,
        )
    }

    /// Writes the config and token, starts the binary; returns once MQTT listens.
    pub fn run(self) -> Agent {
        std::fs::write(self.dir.join("token"), format!("{}\n", self.device.1)).expect("token");
        let config = self.dir.join("agent.yaml");
        std::fs::write(&config, self.config_text()).expect("config");
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args);
                cmd
            }
            None => Command::new(bin("edge-agent")),
        };
        cmd.arg("run").arg("--config").arg(&config);
        launch_agent(&self.dir, &config, cmd)
    }
}

/// Starts `edge-agent run --config CONFIG` with stderr in `dir`.
pub fn start_agent(dir: &Path, config: &Path) -> Agent {
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.arg("run").arg("--config").arg(config);
    launch_agent(dir, config, cmd)
}

/// Starts `edge-agent run --config CONFIG` for a config with `mqtt.enabled: false`; returns
/// once it says it runs without MQTT (its `mqtt` and `mqtt5` addresses are unspecified).
pub fn start_agent_without_mqtt(dir: &Path, config: &Path) -> Agent {
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.arg("run").arg("--config").arg(config);
    let mut process = Process::spawn(cmd, dir.join(format!("agent-{}.stderr", unique())));
    let metrics = process
        .wait_line("metrics listening on")
        .parse()
        .expect("metrics addr");
    process.wait_line("mqtt disabled");
    let nowhere = SocketAddr::from(([0, 0, 0, 0], 0));
    let agent = Agent {
        process,
        mqtt: nowhere,
        mqtt5: nowhere,
        metrics,
        config: config.to_owned(),
    };
    agent.settle_ready();
    agent
}

fn launch_agent(dir: &Path, config: &Path, cmd: Command) -> Agent {
    let mut process = Process::spawn(cmd, dir.join(format!("agent-{}.stderr", unique())));
    let metrics = process
        .wait_line("metrics listening on")
        .parse()
        .expect("metrics addr");
    let mqtt = process
        .wait_line("mqtt listening on")
        .parse()
        .expect("mqtt addr");
    let mqtt5 = process
        .wait_line("mqtt5 listening on")
        .parse()
        .expect("mqtt5 addr");
    let agent = Agent {
        process,
        mqtt,
        mqtt5,
        metrics,
        config: config.to_owned(),
    };
    agent.settle_ready();
    agent
}

/// One plain-HTTP client for polling local endpoints (metrics, readiness). Building a client
/// per call loads the TLS roots and starts a thread each time: polled every 50 ms, that took
/// ~5% of the CPU the benchmarks measure.
fn local_http() -> &'static reqwest::blocking::Client {
    static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        // No idle connections kept: an agent restarted on the same port must not get a
        // request on its predecessor's dead connection.
        reqwest::blocking::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client")
    })
}

/// GETs a local URL's body as text ("" when it does not answer).
fn local_text(url: &str) -> String {
    local_http()
        .get(url)
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default()
}

/// The value of a Prometheus series (name with labels, exactly as exposed) at `addr`; 0 if absent.
pub fn metric(addr: SocketAddr, series: &str) -> f64 {
    let text = local_text(&format!("http://{addr}/metrics"));
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

impl Agent {
    /// Waits for a stdout line starting with `prefix` (after those the harness read); the rest.
    pub fn printed(&mut self, prefix: &str) -> String {
        self.process.wait_line(prefix)
    }

    /// Waits, at most 5 s, for `/readyz` to answer 200: the listeners are up a moment before
    /// the agent says it is ready (its uplink and sources start in between). An agent that is not
    /// ready by then is left to the test to judge.
    fn settle_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.readyz() != 200 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// HTTP status of `/readyz`.
    pub fn readyz(&self) -> u16 {
        local_http()
            .get(format!("http://{}/readyz", self.metrics))
            .send()
            .map_or(0, |r| r.status().as_u16())
    }

    /// The value of one of its metric series; 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric(self.metrics, series)
    }

    /// Records in its buffer, over every stream.
    pub fn backlog(&self) -> f64 {
        let text = local_text(&format!("http://{}/metrics", self.metrics));
        text.lines()
            .filter(|l| l.starts_with("agent_backlog_records{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Runs openssl with `args`; panics on failure.
pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>-ca.pem`/`.key`) in `dir`, and a certificate and key it signs for each
/// subject (`<file>.pem`, `<file>.key`), with 127.0.0.1 as a name.
pub fn certificates(dir: &std::path::Path, name: &str, subjects: &[(&str, &str)]) -> String {
    let at = |f: String| dir.join(f).display().to_string();
    let (ca, ca_key) = (at(format!("{name}-ca.pem")), at(format!("{name}-ca.key")));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509", "-days", "1", "-subj", "/CN=test CA"];
    args.extend(ec);
    args.extend(["-keyout", &ca_key, "-out", &ca]);
    openssl(&args);
    for (file, subject) in subjects {
        let (cert, key, csr) = (
            at(format!("{file}.pem")),
            at(format!("{file}.key")),
            at(format!("{file}.csr")),
        );
        let mut args = vec!["req", "-subj", subject, "-keyout", &key, "-out", &csr];
        args.extend(ec);
        openssl(&args);
        let ext = at(format!("{file}.ext"));
        std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("ext");
        openssl(&[
            "x509",
            "-req",
            "-days",
            "1",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ]);
    }
    ca
}

/// `edge-agent hash-password` for `password`: a line `name:HASH` of a users file.
pub fn hash_password(password: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(bin("edge-agent"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("hash-password");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(password.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success(), "hash-password");
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

/// `mosquitto_pub -q 1` of one `message` on `topic` to the agent at `mqtt`; whether it
/// succeeded (its PUBACK came).
pub fn mosquitto_pub_qos1(mqtt: SocketAddr, topic: &str, message: &str) -> bool {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt.port().to_string(), "-q", "1"])
        .args(["-t", topic, "-m", message])
        .status()
        .expect("mosquitto_pub")
        .success()
}

/// `mosquitto_pub -l` at `qos` on `topic`: one publish per line of `lines`, as fast as it
/// goes; whether it succeeded.
pub fn mosquitto_pub_lines(
    mqtt: SocketAddr,
    qos: u8,
    topic: &str,
    lines: impl IntoIterator<Item = String>,
) -> bool {
    use std::io::Write;
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt.port().to_string()])
        .args(["-q", &qos.to_string(), "-t", topic, "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    {
        let mut stdin = publisher.stdin.take().expect("stdin");
        for line in lines {
            writeln!(stdin, "{line}").expect("line");
        }
    }
    publisher.wait().expect("mosquitto_pub").success()
}
