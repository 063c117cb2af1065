//! The `mqtt` section: the front door's listeners, who may connect, what each client may do,
//! and the embedded broker's bounds.

use std::net::SocketAddr;

use super::raw::{RawMqtt, RawRule};
use super::{AuthConfig, Invalid, MqttConfig, RateLimit, RetainedLimits, TlsConfig};
use crate::routing::TopicFilter;

/// The `mqtt` section, checked.
pub(super) fn validate(raw: RawMqtt) -> Result<MqttConfig, Invalid> {
    let listen = match (raw.enabled, raw.listen) {
        (_, Some(listen)) => listen,
        // Never bound: nothing listens while the embedded broker is off.
        (false, None) => SocketAddr::from(([127, 0, 0, 1], 0)),
        (true, None) => {
            return Err((
                "mqtt.listen".into(),
                "missing: the address sensors publish to (e.g. 0.0.0.0:1883), or mqtt.enabled: false to run on sources alone".into(),
            ));
        }
    };
    let mut mqtt = MqttConfig {
        enabled: raw.enabled,
        listen,
        listen_v5: raw.listen_v5,
        max_payload_bytes: raw.max_payload_bytes.get(),
        max_connections: raw.max_connections.get(),
        router_segment_bytes: raw.router_segment_bytes.get(),
        router_segments: raw.router_segments.get(),
        rate_limit: raw.rate_limit.map(|r| RateLimit {
            messages_per_second: r.messages_per_second,
            bytes_per_second: r.bytes_per_second.map(|b| b.0),
        }),
        retained: RetainedLimits {
            max_messages: raw.retained.max_messages,
            max_bytes: raw.retained.max_bytes.get(),
        },
        auth: AuthConfig {
            allow_anonymous: raw.auth.allow_anonymous,
            users_file: raw.auth.users_file,
        },
        acl: raw.acl.map(acl).transpose()?,
        tls: raw
            .tls
            .map(|t| {
                if t.require_client_cert && t.client_ca_file.is_none() {
                    return Err((
                        "mqtt.tls.require_client_cert".to_owned(),
                        "needs client_ca_file: the CA certificates that sign the sensors' client certificates".to_owned(),
                    ));
                }
                Ok(TlsConfig {
                    listen: t.listen,
                    cert_file: t.cert_file,
                    key_file: t.key_file,
                    client_ca_file: t.client_ca_file,
                    require_client_cert: t.require_client_cert,
                })
            })
            .transpose()?,
    };
    if !mqtt.enabled {
        // Nothing listens: the users file, the ACL and the TLS files are not read (a reload
        // would otherwise be refused for a certificate no listener uses).
        mqtt.tls = None;
        mqtt.acl = None;
        mqtt.auth.users_file = None;
    }
    if mqtt.enabled && !mqtt.auth.allow_anonymous && mqtt.auth.users_file.is_none() {
        return Err((
            "mqtt.auth".into(),
            "no client could connect: set users_file (lines of name:hash, from `edge-agent hash-password`) or allow_anonymous: true".into(),
        ));
    }
    if mqtt.router_segment_bytes < mqtt.max_payload_bytes {
        return Err((
            "mqtt.router_segment_bytes".into(),
            "must be at least mqtt.max_payload_bytes, or large publishes cannot be held".into(),
        ));
    }
    Ok(mqtt)
}

/// ACL rules: who, and valid topic filters once `%u` and `%c` are filled in.
fn acl(rules: Vec<RawRule>) -> Result<Vec<crate::access::Rule>, Invalid> {
    use crate::access::{Rule, Who};
    rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut who: Vec<Who> = r
                .users
                .into_iter()
                .map(|u| if u == "*" { Who::AnyUser } else { Who::User(u) })
                .collect();
            who.extend(r.groups.into_iter().map(Who::Group));
            if r.anonymous {
                who.push(Who::Anonymous);
            }
            if who.is_empty() {
                return Err((
                    format!("mqtt.acl[{i}]"),
                    "says for whom: users (\"*\" for any user), groups, or anonymous: true".into(),
                ));
            }
            for (key, list) in [("publish", &r.publish), ("subscribe", &r.subscribe)] {
                for (j, p) in list.iter().enumerate() {
                    let sample = p.replace("%u", "u").replace("%c", "c");
                    if TopicFilter::new(&sample).is_none() {
                        return Err((
                            format!("mqtt.acl[{i}].{key}[{j}]"),
                            format!("{p:?} is not a valid MQTT topic filter"),
                        ));
                    }
                }
            }
            Ok(Rule {
                who,
                publish: r.publish,
                subscribe: r.subscribe,
            })
        })
        .collect()
}
