//! The `ingest` section: the cloud ingest's URLs, the device's login, the uplink's timing.

use super::raw::RawIngest;
use super::{IngestConfig, Invalid, TokenSource};

/// A zstd level the agent accepts.
pub(super) fn zstd_level(key: &str, level: i32) -> Result<i32, Invalid> {
    if (1..=19).contains(&level) {
        Ok(level)
    } else {
        Err((key.into(), format!("{level} is not in 1..=19")))
    }
}

/// The `ingest` section, checked: where the uplink goes and how it logs in.
pub(super) fn validate(raw: RawIngest) -> Result<IngestConfig, Invalid> {
    let (key, texts) = match (raw.url, raw.urls) {
        (Some(url), None) => ("ingest.url".to_owned(), vec![url]),
        (None, Some(urls)) if !urls.is_empty() => ("ingest.urls".to_owned(), urls),
        _ => {
            return Err((
                "ingest".into(),
                "set exactly one of url (one ingest) or urls (a non-empty list of replicas)".into(),
            ));
        }
    };
    let mut urls = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let url = reqwest::Url::parse(text)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .filter(|u| u.join(ingest_wire::BATCHES_PATH).is_ok())
            .ok_or_else(|| {
                let at = if key == "ingest.urls" {
                    format!("{key}[{i}]")
                } else {
                    key.clone()
                };
                (at, format!("{text:?} is not an http(s) URL"))
            })?;
        let loopback = url.host_str().is_some_and(|h| {
            h.eq_ignore_ascii_case("localhost")
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        if url.scheme() == "http" && !loopback && !raw.allow_insecure_http {
            let at = if key == "ingest.urls" {
                format!("{key}[{i}]")
            } else {
                key.clone()
            };
            return Err((
                at,
                format!(
                    "{text:?} would send the device token and the data unencrypted to another host: use https://, or set ingest.allow_insecure_http: true"
                ),
            ));
        }
        urls.push(url);
    }
    if raw.token.is_some() {
        return Err((
            "ingest.token".into(),
            "tokens are never written inline; put it in a file (ingest.token_file) or an environment variable (ingest.token_env)".into(),
        ));
    }
    let token = match (raw.token_file, raw.token_env) {
        (Some(file), None) => TokenSource::File(file),
        (None, Some(var)) => TokenSource::Env(var),
        (None, None) if raw.client_cert_file.is_some() => {
            if let Some(plain) = urls.iter().find(|u| u.scheme() != "https") {
                return Err((
                    "ingest".into(),
                    format!(
                        "without a token the client certificate is the only login, and {plain} is not https://: set token_file or token_env, or use https://"
                    ),
                ));
            }
            TokenSource::CertificateOnly
        }
        _ => {
            return Err((
                "ingest".into(),
                "set exactly one of token_file or token_env (or neither with client_cert_file and client_key_file: the certificate is then the only login)".into(),
            ));
        }
    };
    let zstd_level = zstd_level("ingest.zstd_level", raw.zstd_level)?;
    let (retry_initial, retry_max) = (raw.retry_initial.0, raw.retry_max.0);
    if retry_max < retry_initial {
        return Err((
            "ingest.retry_max".into(),
            "must be at least ingest.retry_initial".into(),
        ));
    }
    Ok(IngestConfig {
        urls,
        token,
        request_timeout: raw.request_timeout.0,
        connect_timeout: raw.connect_timeout.0,
        retry_initial,
        retry_max,
        zstd_level,
        max_upload_rate: raw.max_upload_rate.map(config_types::Size::get),
        critical_may_exceed_rate: raw.critical_may_exceed_rate,
        max_in_flight: raw.max_in_flight.get(),
        degraded_after: raw.degraded_after.0,
        ca_file: raw.ca_file,
        client_identity: match (raw.client_cert_file, raw.client_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => {
                return Err((
                    "ingest".into(),
                    "set both client_cert_file and client_key_file (mTLS), or neither".into(),
                ));
            }
        },
    })
}
