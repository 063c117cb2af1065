//! A fault-injecting HTTP/1.1 proxy between the agent and the real ingest, for the tests that
//! need a network or an ingest that misbehaves on purpose. It understands just enough HTTP
//! (headers, Content-Length bodies, keep-alive) to act per request.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Picks the request bodies to refuse.
pub type Picker = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// What the proxy does with a request.
#[derive(Clone)]
pub enum Mode {
    /// Forward to the ingest and relay the answer.
    Forward,
    /// Forward to the ingest, wait for its answer, then close the client connection without
    /// relaying it: the ingest acted, the client never hears.
    DropAnswer,
    /// Accept and read, never answer.
    BlackHole,
    /// Answer 400 (without forwarding) to requests whose body the predicate picks; forward others.
    Reject(Picker),
    /// Forward to the ingest and relay its answer this long after it came: a slow link.
    Delay(Duration),
}

/// A running proxy. Requests go to `upstream`; the mode can change at any time.
pub struct FaultProxy {
    /// Where the agent connects.
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    /// Requests that got the fault (dropped answers, 400s, black-holed).
    pub faults: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Listens on `port` (0: any) in front of `upstream`.
    pub fn start(port: u16, upstream: SocketAddr, mode: Mode) -> FaultProxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let mode = Arc::new(Mutex::new(mode));
        let faults = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, f, s) = (mode.clone(), faults.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (m, f) = (m.clone(), f.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &m, &f);
                });
            }
        });
        FaultProxy {
            addr,
            mode,
            faults,
            stop,
        }
    }

    /// Changes what happens to the next requests.
    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().expect("mode lock") = mode;
    }

    /// Base URL for the agent.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Limits wide enough for any batch an agent sends in the tests.
const AGENT_BATCHES: ingest_wire::Limits = ingest_wire::Limits {
    max_decompressed_bytes: 64 << 20,
    max_records: 100_000,
};

/// The batch an agent's request body (zstd) holds in `content_type`, if it does.
fn decoded(body: &[u8], content_type: &str) -> Option<ingest_wire::Batch> {
    ingest_wire::decode_body(body, Some(content_type), Some("zstd"), AGENT_BATCHES).ok()
}

/// The batch an agent's request body holds (zstd, body version 1 or 2: each fails to decode
/// as the other), or `None` if it holds none.
pub fn batch_of(body: &[u8]) -> Option<ingest_wire::Batch> {
    decoded(body, ingest_wire::CONTENT_TYPE_BATCH_V2)
        .or_else(|| decoded(body, ingest_wire::CONTENT_TYPE_BATCH))
}

/// Whether a request body is a body version 2 batch (zstd).
pub fn is_version_2(body: &[u8]) -> bool {
    decoded(body, ingest_wire::CONTENT_TYPE_BATCH_V2).is_some()
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

/// Reads one HTTP message (head + Content-Length body); `None` at a clean end of stream.
fn read_message(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Some((head, body)))
}

fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mode: &Mutex<Mode>,
    faults: &AtomicU64,
) -> std::io::Result<()> {
    let mut writer = client.try_clone()?;
    let mut reader = BufReader::new(client);
    while let Some((head, body)) = read_message(&mut reader)? {
        let current = mode.lock().expect("mode lock").clone();
        match current {
            Mode::BlackHole => {
                faults.fetch_add(1, Ordering::Relaxed);
                // Hold the connection open and silent until the client gives up.
                let mut sink = [0u8; 4096];
                while reader.read(&mut sink)? > 0 {}
                return Ok(());
            }
            Mode::Reject(pick) if pick(&body) => {
                faults.fetch_add(1, Ordering::Relaxed);
                let answer = br#"{"error":"invalid batch: rejected by the fault proxy"}"#;
                write!(
                    writer,
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    answer.len()
                )?;
                writer.write_all(answer)?;
            }
            Mode::Delay(wait) => {
                let (answer_head, answer_body) = exchange(upstream, &head, &body)?;
                faults.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(wait);
                writer.write_all(&answer_head)?;
                writer.write_all(&answer_body)?;
            }
            Mode::Forward | Mode::Reject(_) => {
                let (answer_head, answer_body) = exchange(upstream, &head, &body)?;
                writer.write_all(&answer_head)?;
                writer.write_all(&answer_body)?;
            }
            Mode::DropAnswer => {
                exchange(upstream, &head, &body)?;
                faults.fetch_add(1, Ordering::Relaxed);
                return Ok(()); // dropping the socket closes the client's connection
            }
        }
    }
    Ok(())
}

fn exchange(upstream: SocketAddr, head: &[u8], body: &[u8]) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut up = TcpStream::connect_timeout(&upstream, Duration::from_secs(2))?;
    up.write_all(head)?;
    up.write_all(body)?;
    let mut reader = BufReader::new(up);
    read_message(&mut reader)?
        .ok_or_else(|| std::io::Error::other("ingest closed without answering"))
}
