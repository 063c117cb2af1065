//! systemd integration: readiness and a watchdog that tells the truth.
//!
//! - `READY=1` (for `Type=notify`) once the buffer is open and MQTT accepts connections;
//!   `STOPPING=1` when a stop begins.
//! - `WATCHDOG=1` every half of `WatchdogSec` (systemd passes `WATCHDOG_USEC`), but only while
//!   every stage that must make progress does: the buffer writer and the forwarder each beat a
//!   [`Beat`] on every turn of their loops (at least once a second, idle or not). A stage that
//!   has not beaten for a whole watchdog period is stuck; the pings stop and systemd restarts
//!   the agent. (A stage that *stops* is caught sooner, by the supervision in `lib.rs`.)
//!
//! Messages go to the datagram socket in `NOTIFY_SOCKET` (a path, or `@` for an abstract
//! name); without it (not under systemd) nothing is sent. No library: the protocol is one
//! datagram of `KEY=VALUE` lines.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Sends `state` (such as `READY=1`) to systemd, if it is listening; errors are logged once
/// at debug level, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let socket = UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(&path)?,
        };
        socket.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::debug!(error = %e, state, "cannot notify systemd");
    }
}

/// While alive, tells systemd every 20 s that the start goes on (`EXTEND_TIMEOUT_USEC`, a
/// minute each time): a buffer check or salvage of a large file on an SD card outlasts the
/// start timeout, and being killed in the middle would only start it over.
pub struct Extending {
    stop: Option<std::sync::mpsc::Sender<()>>,
}

impl Extending {
    /// Starts telling systemd (nothing happens outside systemd).
    pub fn start() -> Extending {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Extending { stop: None };
        }
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let _ = std::thread::Builder::new()
            .name("start-extender".into())
            .spawn(move || {
                notify("EXTEND_TIMEOUT_USEC=60000000");
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(Duration::from_secs(20))
                {
                    notify("EXTEND_TIMEOUT_USEC=60000000");
                }
            });
        Extending { stop: Some(stop) }
    }
}

impl Drop for Extending {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// A stage's heartbeat: when it last went round its loop.
#[derive(Debug, Clone)]
pub struct Beat {
    stage: &'static str,
    last_ms: Arc<AtomicU64>,
}

impl Beat {
    /// The heartbeat of `stage`, beaten now.
    pub fn new(stage: &'static str) -> Beat {
        let beat = Beat {
            stage,
            last_ms: Arc::new(AtomicU64::new(0)),
        };
        beat.beat();
        beat
    }

    /// Records that the stage went round its loop now.
    pub fn beat(&self) {
        if stalled_for_test(self.stage) {
            return;
        }
        self.last_ms
            .store(epoch().elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since the last beat.
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        epoch().elapsed().saturating_sub(last)
    }

    /// The stage's name.
    pub fn stage(&self) -> &'static str {
        self.stage
    }
}

/// Test hook: `EDGE_AGENT_TEST_STALL=<stage>` (`buffer writer` or `forwarder`) stops that
/// stage's heartbeat from 2 s after the agent starts, as if the stage were stuck (the stage
/// itself goes on). Only the watchdog's end-to-end test sets it.
fn stalled_for_test(stage: &str) -> bool {
    static STALL: OnceLock<Option<(String, Instant)>> = OnceLock::new();
    STALL
        .get_or_init(|| {
            std::env::var("EDGE_AGENT_TEST_STALL")
                .ok()
                .map(|s| (s, Instant::now() + Duration::from_secs(2)))
        })
        .as_ref()
        .is_some_and(|(name, from)| name == stage && Instant::now() >= *from)
}

/// Sends `WATCHDOG=1` every half of `WATCHDOG_USEC` while every stage in `stages` beat within
/// the whole period, until `stop`. Does nothing when systemd set no watchdog.
pub async fn watchdog(stages: Vec<Beat>, stop: CancellationToken) {
    let Some(period) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&us| us > 0)
        .map(Duration::from_micros)
    else {
        return;
    };
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        && pid != std::process::id()
    {
        return;
    }
    let mut tick = tokio::time::interval(period / 2);
    let mut silent = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        match stages.iter().find(|beat| beat.age() >= period) {
            None => {
                if std::mem::take(&mut silent) {
                    tracing::info!("every stage makes progress again: watchdog pings resume");
                }
                notify("WATCHDOG=1");
            }
            Some(beat) => {
                if !silent {
                    tracing::error!(stage = beat.stage(), stuck_for = ?beat.age(), "a stage makes no progress: watchdog pings stop, systemd will restart the agent");
                    silent = true;
                }
            }
        }
    }
}
