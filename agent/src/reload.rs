//! Reload without a restart: SIGHUP (or `edge-agent reload`, which checks the file first)
//! reads the config again, checks everything it takes ([`check_reload`]), and only then puts
//! it in force (`apply`): users, ACL, certificates and token at once; new streams, uplink,
//! schedule or quota by stopping the forwarder, letting the writer commit what is queued and
//! take the new streams, and starting a new forwarder. A file that fails is refused whole.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::front_door::FrontDoor;
use crate::routing::Router;
use crate::{
    Forwarding, Uplink, access, buffer, buffer_streams, chains, config, forwarder, front_door,
};

/// What a reload puts in force, read and checked: the config, its users, its token, its
/// MQTT TLS acceptor (if it has TLS), and the HTTP client for the ingest (its TLS files).
pub type Reloaded = (
    AgentConfig,
    access::Users,
    String,
    Option<tokio_rustls::TlsAcceptor>,
    reqwest::Client,
);

/// Reads and checks everything a reload of `file` takes, changing nothing (also what
/// `edge-agent reload` checks before it signals the agent); the error names the key.
pub fn check_reload(file: &std::path::Path) -> Result<Reloaded, String> {
    let config = AgentConfig::load(file).map_err(|e| e.to_string())?;
    let users = match &config.mqtt.auth.users_file {
        Some(users) => access::Users::load(users).map_err(|e| e.to_string())?,
        None => access::Users::default(),
    };
    let token = config::resolve_token(file, &config.ingest.token).map_err(|e| e.to_string())?;
    let tls = config
        .mqtt
        .tls
        .as_ref()
        .map(front_door::tls_acceptor)
        .transpose()?;
    let client = forwarder::http_client(&config.ingest)?;
    Ok((config, users, token, tls, client))
}

/// What a reload changes in the running agent.
pub(crate) struct Pipeline<'a> {
    pub(crate) front_door: &'a FrontDoor,
    pub(crate) uplink: &'a Uplink,
    pub(crate) forwarding: &'a mut Forwarding,
    pub(crate) writer: &'a std::thread::JoinHandle<()>,
    pub(crate) shutdown: &'a CancellationToken,
}

/// Once the writer thread has ended.
async fn writer_stopped(writer: &std::thread::JoinHandle<()>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !writer.is_finished() {
        tick.tick().await;
    }
}

/// How long a reload waits for the forwarder to stop before it aborts it.
const FORWARDER_STOP: Duration = Duration::from_secs(5);

/// Reloads `file`. Everything is read and checked before anything changes: a file that fails
/// is refused whole, with an error naming the key, and the running config stays. Then:
/// - the MQTT users file, the ACL and anonymous access ([`FrontDoor::set_access`]; open
///   connections stay unless their credentials are revoked), the MQTT TLS certificate files
///   (new connections) and the ingest token;
/// - if the streams, the default stream, the ingest settings, the schedule or the buffer's
///   quota changed, the pipeline behind the front door is put on the new config: the
///   forwarder stops (what it had in flight stays buffered and is sent again; the ingest drops
///   what it already has), publishes are held while the writer commits what is queued and
///   takes the new streams ([`crate::buffer::WriterCommand::Reconfigure`]), then they are routed by the new
///   config and a new forwarder starts from each stream's oldest record. Connections stay
///   open, and nothing buffered is lost: a stream dropped from the config drains as bulk.
///
/// Other changed settings are named and take effect at the next start. `Err`: the stage that
/// stopped meanwhile (the agent stops).
pub(crate) async fn apply(
    file: &std::path::Path,
    running: &mut AgentConfig,
    p: Pipeline<'_>,
) -> Result<(), &'static str> {
    let path = file.to_owned();
    let loaded = tokio::task::spawn_blocking(move || check_reload(&path)).await;
    let refused = |why: &dyn std::fmt::Display| {
        tracing::error!(error = %why, "SIGHUP: config refused, the running config stays");
        p.uplink
            .metrics
            .config_reloads
            .with_label_values(&["refused"])
            .inc();
    };
    let (new, users, new_token, tls, client) = match loaded {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(e)) => {
            refused(&e);
            return Ok(());
        }
        Err(e) => {
            refused(&e);
            return Ok(());
        }
    };
    let same =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") == format!("{b:?}");
    // What only a start puts in force: compared with the reloadable parts set as running.
    let mut mqtt = new.mqtt.clone();
    (mqtt.auth, mqtt.acl) = (running.mqtt.auth.clone(), running.mqtt.acl.clone());
    if let (Some(t), Some(r)) = (&mut mqtt.tls, &running.mqtt.tls) {
        *t = config::TlsConfig {
            listen: t.listen,
            ..r.clone()
        };
    }
    let mut buffer = new.buffer.clone();
    // The reserve is worked out at start from the volume, not read from the file.
    (buffer.quota_bytes, buffer.reserve_bytes) =
        (running.buffer.quota_bytes, running.buffer.reserve_bytes);
    let later: Vec<&str> = [
        ("device_id", new.device_id == running.device_id),
        (
            "mqtt (other than auth, acl and TLS files)",
            same(&mqtt, &running.mqtt),
        ),
        (
            "buffer (other than quota_bytes)",
            same(&buffer, &running.buffer),
        ),
        (
            "metrics_listen",
            new.metrics_listen == running.metrics_listen,
        ),
        (
            "sources",
            same(&new.sources, &running.sources) && same(&new.mqtt_sources, &running.mqtt_sources),
        ),
    ]
    .into_iter()
    .filter_map(|(name, unchanged)| (!unchanged).then_some(name))
    .collect();
    if let Some(s) = running
        .sources
        .iter()
        .find(|s| !new.streams.iter().any(|n| n.name == s.stream))
    {
        refused(&format!(
            "streams: a running file source sends to stream {:?}; sources change only at a restart",
            s.stream
        ));
        return Ok(());
    }
    let pipeline = !same(&new.streams, &running.streams)
        || new.default_stream != running.default_stream
        || !same(&new.ingest, &running.ingest)
        || !same(&new.schedule, &running.schedule)
        || new.buffer.quota_bytes != running.buffer.quota_bytes;

    p.front_door.set_access(access::Access {
        users,
        allow_anonymous: new.mqtt.auth.allow_anonymous,
        acl: access::Acl::new(new.mqtt.acl.clone()),
    });
    (running.mqtt.auth, running.mqtt.acl) = (new.mqtt.auth.clone(), new.mqtt.acl.clone());
    if let (Some(acceptor), Some(r), Some(t)) = (tls, &mut running.mqtt.tls, &new.mqtt.tls) {
        p.front_door.set_tls(acceptor);
        *r = config::TlsConfig {
            listen: r.listen,
            ..t.clone()
        };
    }
    *p.uplink
        .token
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = new_token;
    *p.uplink
        .client
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = client;
    if pipeline {
        if p.forwarding.task.is_finished() {
            // It stopped on its own (a damaged buffer): the agent stops, as it would have.
            return Err("forwarder");
        }
        p.forwarding.stop.cancel();
        // A stop asked meanwhile wins: the switch is not begun.
        let stopped = async {
            if tokio::time::timeout(FORWARDER_STOP, &mut p.forwarding.task)
                .await
                .is_err()
            {
                p.forwarding.task.abort();
                let _ = (&mut p.forwarding.task).await;
            }
        };
        tokio::select! {
            () = stopped => {}
            () = p.shutdown.cancelled() => return Ok(()),
        }
        // The writer may stop meanwhile (a commit it gives up on): nothing would answer then.
        let switched = async {
            // Its acks are queued; once this is held, every publish routed by the old streams
            // is queued too.
            let mut routes = p.front_door.pause_routing().await;
            let (done, reconfigured) = tokio::sync::oneshot::channel();
            let reconfigure = buffer::Reconfigure {
                streams: buffer_streams(&new),
                quota_bytes: new.buffer.quota_bytes,
                chains: chains(&new),
                done,
            };
            p.uplink
                .commands
                .send_async(buffer::WriterCommand::Reconfigure(reconfigure))
                .await
                .ok()?;
            let reconfigured = reconfigured.await.ok()?;
            let names: Vec<String> = reconfigured
                .streams
                .iter()
                .map(|o| o.name.clone())
                .collect();
            *routes = front_door::Routes::new(
                Router::new(
                    new.streams.iter().map(|s| s.topics.as_slice()),
                    new.default_stream,
                ),
                &names,
                &p.uplink.metrics,
            );
            Some(reconfigured)
        };
        let reconfigured = tokio::select! {
            r = switched => r,
            () = writer_stopped(p.writer) => None,
        };
        let Some(reconfigured) = reconfigured else {
            return Err("buffer writer");
        };
        p.uplink
            .metrics
            .set_degraded_after(new.ingest.degraded_after);
        *p.forwarding = match p
            .uplink
            .start(&new, &reconfigured.streams, &reconfigured.protections)
        {
            Ok(started) => started,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: the forwarder cannot start on the new streams");
                return Err("forwarder");
            }
        };
        for orphan in reconfigured.streams.iter().filter(|o| o.orphan) {
            tracing::warn!(stream = %orphan.name, "stream is no longer configured but has buffered records; draining them as bulk");
        }
        running.streams = new.streams.clone();
        running.default_stream = new.default_stream;
        running.ingest = new.ingest.clone();
        running.schedule = new.schedule;
        running.buffer.quota_bytes = new.buffer.quota_bytes;
    }
    p.uplink
        .metrics
        .config_reloads
        .with_label_values(&["applied"])
        .inc();
    tracing::info!(
        streams_and_uplink = pipeline,
        "SIGHUP: reloaded (MQTT users, ACL, anonymous access, TLS certificates, ingest token; streams, routing, priorities, batching, TTL, ingest settings, schedule and quota when they changed)"
    );
    if !later.is_empty() {
        tracing::warn!(settings = ?later, "SIGHUP: these changed in the file but take effect only at the next start");
    }
    Ok(())
}
