//! Reload without a restart: SIGHUP (what `systemctl reload` sends) reads the config file
//! again and puts in force what can change under running requests: the device registry and
//! tokens, the per-device rates, the read tokens ([`crate::api::Access`], swapped whole) and
//! the TLS certificate files. Every [`tls::CHECK_INTERVAL`] the TLS files are also checked for
//! changes by themselves (a renewed certificate needs no signal).
//!
//! Invariants: requests in flight finish with the access they started with; a file that fails
//! validation is refused as a whole, with the error naming the key, and the running config
//! stays; a change to a setting that needs a restart (listen, sink, limits, template, TLS file
//! paths) is logged as such and not applied. SIGHUP never stops the ingest.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::api::{Access, AppState};
use crate::config::IngestConfig;
use crate::tls;

/// Starts catching SIGHUP (`None`, with a warning, when it cannot be caught). Called before the
/// ingest says it listens: a SIGHUP that came before it is caught would stop the process.
pub fn watch_hangup() -> Option<Signal> {
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP: no reload without a restart (TLS files are still checked for changes)");
            None
        }
    }
}

/// Serves reloads until `shutdown`: on SIGHUP (from [`watch_hangup`]), of `config_file` (if the
/// ingest has one) and of the TLS files; on a timer, of the TLS files if they changed.
/// `running` is the config the ingest started with.
pub async fn run(
    mut hangup: Option<Signal>,
    config_file: Option<PathBuf>,
    running: IngestConfig,
    state: Arc<AppState>,
    tls: Option<Arc<tls::Reloadable>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(tls::CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        if forced && let Some(file) = &config_file {
            let file = file.clone();
            match tokio::task::spawn_blocking(move || IngestConfig::load(&file)).await {
                Ok(Ok(new)) => {
                    let later = needs_restart(&running, &new);
                    state.set_access(Access::from_config(&new));
                    tracing::info!(
                        devices = new.devices.len(),
                        "SIGHUP: config reloaded (device registry, tokens, rates, read tokens)"
                    );
                    if !later.is_empty() {
                        tracing::warn!(settings = ?later, "SIGHUP: these changed in the file but take effect only at the next start");
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "SIGHUP: config refused, the running config stays");
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: config reload failed"),
            }
        }
        if let Some(tls) = &tls {
            let tls = tls.clone();
            let _ = tokio::task::spawn_blocking(move || tls.reload(forced)).await;
        }
    }
}

/// The settings that differ between `running` and `new` and need a restart to change.
pub fn needs_restart(running: &IngestConfig, new: &IngestConfig) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name: &'static str, same: bool| {
        if !same {
            changed.push(name);
        }
    };
    check("listen", running.listen == new.listen);
    check(
        "metrics_listen",
        running.metrics_listen == new.metrics_listen,
    );
    check(
        "topic_template",
        running.topic_template == new.topic_template,
    );
    check("tls (file paths)", running.tls == new.tls);
    check(
        "sink",
        format!("{:?}", running.sink) == format!("{:?}", new.sink),
    );
    check(
        "limits",
        format!("{:?}", running.limits) == format!("{:?}", new.limits),
    );
    check(
        "clock_skew_threshold",
        running.clock_skew_threshold == new.clock_skew_threshold,
    );
    changed
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const CONFIG: &str = "version: 1
listen: 127.0.0.1:8080
devices:
  - id: d1
    tenant: acme
    token_sha256: 2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b
sink:
  type: embedded
  options:
    path: /tmp/log.db
";

    #[test]
    fn only_settings_that_need_a_restart_are_named() {
        let parse = |text: &str| IngestConfig::parse(Path::new("i.yaml"), text).expect("valid");
        let running = parse(CONFIG);
        let more_devices = parse(&CONFIG.replace(
            "devices:\n",
            "devices:\n  - id: d2\n    tenant: acme\n    token_sha256: 2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b\n",
        ));
        assert!(needs_restart(&running, &more_devices).is_empty());
        let moved = parse(
            &CONFIG
                .replace("8080", "9090")
                .replace("/tmp/log.db", "/tmp/other.db"),
        );
        assert_eq!(needs_restart(&running, &moved), ["listen", "sink"]);
    }
}
