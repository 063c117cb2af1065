//! Cloud ingest: the cloud end of the edge gateway.
//!
//! ```text
//! POST /v1/batches ─▶ auth (bearer, per device) ─▶ bounded unzstd + decode ─▶ dedup ─▶ Publisher (stream log) ─▶ 2xx
//! ```
//!
//! Guarantees: a 2xx means every record of the batch is durably in the log; a record is in the
//! log once whatever the retries (dedup by device, stream and sequence); records of a
//! (device, stream) keep their order; a device writes only into its own tenant's topics.
//! Stateless with the Kafka and NATS sinks; the embedded log keeps its state in one file.

pub mod api;
pub mod auth;
pub mod config;
pub mod dictionaries;
pub mod metrics;
pub mod naming;
pub mod publish;
pub mod rates;
pub mod reload;
pub mod tls;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::config::{IngestConfig, SinkConfig};
use crate::metrics::Metrics;
use crate::publish::embedded::EmbeddedLog;
use crate::publish::kafka::KafkaLog;
use crate::publish::nats::NatsLog;

/// Bytes of registered zstd dictionaries a replica keeps (about 16,000 of 4 KiB).
const DICTIONARY_CACHE_BYTES: usize = 64 << 20;

/// Starts the ingest on `config.listen` and serves until `shutdown` is cancelled; SIGHUP
/// reloads `config_file` ([`reload`]). Requests in flight are finished before it returns.
pub async fn serve(
    config: IngestConfig,
    config_file: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let (publisher, embedded_log): (Arc<dyn publish::Publisher>, _) = match &config.sink {
        SinkConfig::Embedded {
            path,
            retention,
            max_topics_per_tenant,
        } => (
            Arc::new(
                EmbeddedLog::open(path, *retention, *max_topics_per_tenant)
                    .map_err(StartError::EmbeddedLog)?,
            ),
            Some(path.clone()),
        ),
        SinkConfig::Kafka(kafka) => (
            KafkaLog::start(kafka)
                .map_err(|e| StartError::Sink(format!("cannot create the Kafka producer: {e}")))?,
            None,
        ),
        SinkConfig::Nats(nats) => {
            (
                Arc::new(NatsLog::start(nats).await.map_err(|e| {
                    StartError::Sink(format!("cannot set up the NATS client: {e}"))
                })?),
                None,
            )
        }
    };
    let state = Arc::new(AppState {
        access: std::sync::RwLock::new(Arc::new(api::Access::from_config(&config))),
        publisher,
        limits: config.limits,
        naming: naming::Naming::parse(&config.topic_template).map_err(StartError::TopicTemplate)?,
        clock_skew_threshold_ms: i64::try_from(config.clock_skew_threshold.as_millis())
            .unwrap_or(i64::MAX),
        metrics: Metrics::new(),
        embedded_log,
        dictionaries: dictionaries::Dictionaries::new(DICTIONARY_CACHE_BYTES),
        decoding: api::decoding_budget(&config.limits),
        reads: Arc::new(tokio::sync::Semaphore::new(api::MAX_CONCURRENT_READS)),
    });
    // Caught before "listening on": a reload right after the start must not stop the ingest.
    let hangup = reload::watch_hangup();
    let listen = |key, addr| move |source| StartError::Listen { key, addr, source };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(listen("listen", config.listen))?;
    let local = listener
        .local_addr()
        .map_err(listen("listen", config.listen))?;
    // The harness and operators read this line to learn the bound port.
    tracing::info!(addr = %local, "cloud-ingest listening");
    println!("listening on {local}");
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(tls::Reloadable::load(files.clone())?)),
        None => None,
    };
    tokio::spawn(reload::run(
        hangup,
        config_file,
        config.clone(),
        state.clone(),
        tls.clone(),
        shutdown.clone(),
    ));
    if let Some(addr) = config.metrics_listen {
        let metrics = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(listen("metrics_listen", addr))?;
        let local = metrics
            .local_addr()
            .map_err(listen("metrics_listen", addr))?;
        tracing::info!(addr = %local, "metrics, health and readiness listening");
        println!("metrics on {local}");
        let (router, stop) = (api::operations(state.clone(), true), shutdown.clone());
        tokio::spawn(async move {
            let _ = axum::serve(metrics, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
    }
    let public = api::app(state, config.metrics_listen.is_none());
    serve_http(listener, public, config.limits, tls, shutdown).await;
    Ok(())
}

/// Why the ingest could not start; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The embedded log's file cannot be opened.
    #[error(transparent)]
    EmbeddedLog(publish::embedded::LogError),
    /// The Kafka or NATS client cannot be set up.
    #[error("{0}")]
    Sink(String),
    /// `topic_template` is not a template.
    #[error("topic_template: {0}")]
    TopicTemplate(String),
    /// An address cannot be listened on.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Listen {
        /// Its config key.
        key: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Longest a stop waits for the requests in flight (their appends) to finish.
pub const STOP_BOUND: std::time::Duration = std::time::Duration::from_secs(20);

/// Serves HTTP/1.1 on `listener` until `shutdown`: a client has `header_timeout` to send a
/// request's headers (a slow one is disconnected), and a stop waits at most [`STOP_BOUND`] for
/// the requests in flight.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: config::RequestLimits,
    tls: Option<Arc<tls::Reloadable>>,
    shutdown: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, mostly: wait rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Some(acceptor) = tls.as_ref().map(|t| t.current()) else {
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "HTTP connection ended");
                }
            });
            continue;
        };
        // The handshake counts against the header timeout; the certificate's device goes
        // with every request of the connection.
        let (app, http, watcher) = (app.clone(), http.clone(), graceful.watcher());
        let timeout = limits.header_timeout;
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let peer = api::PeerDevice(tls::certificate_device(&stream));
            let app = app.layer(axum::Extension(peer));
            let service = hyper_util::service::TowerToHyperService::new(app);
            let connection = watcher.watch(http.serve_connection(TokioIo::new(stream), service));
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTPS connection ended");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(STOP_BOUND, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(bound = ?STOP_BOUND, "requests still in flight at the stop bound; their devices retry");
    }
}
