//! The embedded MQTT broker (rumqttd): the gateway's local pub/sub, for subscribers on the
//! gateway. It is not on the durable path: the [`crate::front_door`] keeps every publish
//! itself and relays the rest of each connection here over loopback, with a QoS 0 copy of
//! each publish.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{ConnectionSettings, RouterConfig, ServerSettings};

use crate::config::MqttConfig;

/// The broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A listener address cannot be bound. The agent exits; pick a free address.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        /// Config key of the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// rumqttd refused to set up the broker or its link.
    #[error("embedded MQTT broker failed to start: {0}")]
    Start(String),
}

/// The running broker: its internal loopback addresses (clients reach them through the
/// [`crate::front_door`]) and its thread.
pub struct RunningBroker {
    /// Internal MQTT 3.1.1 address.
    pub internal: SocketAddr,
    /// Internal MQTT 5 address.
    pub internal_v5: SocketAddr,
    /// rumqttd's thread: it ends only if rumqttd failed.
    pub thread: std::thread::JoinHandle<()>,
}

/// Ports the internal rumqttd listeners are picked from: below Linux's ephemeral range
/// (32768–60999), so no outgoing connection (the gate opens one per client) can take the port
/// between the moment it is found free and the moment rumqttd binds it.
const INTERNAL_PORTS: std::ops::Range<u16> = 20_000..26_000;

/// A free loopback address for an internal listener (rumqttd does not report the port it got,
/// so it cannot be given port 0).
fn internal_addr(key: &'static str) -> Result<SocketAddr, BrokerError> {
    let mut last = None;
    for _ in 0..64 {
        let addr = SocketAddr::from(([127, 0, 0, 1], rand::random_range(INTERNAL_PORTS)));
        match TcpListener::bind(addr) {
            Ok(_) => return Ok(addr),
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, source) = last.expect("invariant: at least one attempt");
    Err(BrokerError::Bind { key, addr, source })
}

fn server(name: &str, listen: SocketAddr, config: &MqttConfig) -> ServerSettings {
    ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: config.max_payload_bytes,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// Starts rumqttd on two loopback listeners (MQTT 3.1.1 and 5).
pub fn start(config: &MqttConfig) -> Result<RunningBroker, BrokerError> {
    // rumqttd listens on loopback only; the front door owns the configured addresses.
    let listen = internal_addr("mqtt.listen")?;
    let mut listen_v5 = internal_addr("mqtt.listen")?;
    while listen_v5 == listen {
        listen_v5 = internal_addr("mqtt.listen")?;
    }
    let rumqttd_config = rumqttd::Config {
        id: 0,
        router: RouterConfig {
            // The front door enforces max_connections; rumqttd must never refuse one (a refused
            // connection leaves a stale will handler that panics its next CONNECT of that id),
            // and a taken-over session may briefly hold two.
            max_connections: config.max_connections * 2 + 64,
            max_outgoing_packet_count: 500,
            max_segment_size: config.router_segment_bytes,
            max_segment_count: config.router_segments,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([(
            "v4".to_owned(),
            server("mqtt-v4", listen, config),
        )])),
        v5: Some(HashMap::from([(
            "v5".to_owned(),
            server("mqtt-v5", listen_v5, config),
        )])),
        ..rumqttd::Config::default()
    };
    let mut broker = rumqttd::Broker::new(rumqttd_config);
    let thread = std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    wait_listening(listen, "mqtt.listen", 4)?;
    wait_listening(listen_v5, "mqtt.listen", 5)?;
    Ok(RunningBroker {
        internal: listen,
        internal_v5: listen_v5,
        thread,
    })
}

/// rumqttd binds in a thread of its own and only logs a failure; so wait here until the port
/// answers an MQTT CONNECT with a CONNACK (a bare TCP probe would make rumqttd log an error).
fn wait_listening(
    addr: SocketAddr,
    key: &'static str,
    protocol_level: u8,
) -> Result<(), BrokerError> {
    let target = if addr.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), addr.port())
    } else {
        addr
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match mqtt_handshake(target, protocol_level) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(BrokerError::Bind {
                    key,
                    addr,
                    source: e,
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// CONNECT (clean session), read the CONNACK, DISCONNECT, wait for the broker to close.
fn mqtt_handshake(target: SocketAddr, protocol_level: u8) -> std::io::Result<()> {
    use std::io::{Read, Write};
    const CLIENT_ID: &[u8] = b"edge-agent-probe";
    let mut variable = vec![0, 4, b'M', b'Q', b'T', b'T', protocol_level, 0x02, 0, 10];
    if protocol_level == 5 {
        variable.push(0); // no properties
    }
    variable.extend_from_slice(&(CLIENT_ID.len() as u16).to_be_bytes());
    variable.extend_from_slice(CLIENT_ID);
    let mut packet = vec![0x10, variable.len() as u8];
    packet.extend(variable);
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(&packet)?;
    let mut header = [0u8; 2];
    stream.read_exact(&mut header)?;
    if header[0] != 0x20 || header[1] > 127 {
        return Err(std::io::Error::other("not an MQTT CONNACK"));
    }
    // Read all of it: closing with unread bytes would reset the connection.
    let mut rest = vec![0u8; header[1] as usize];
    stream.read_exact(&mut rest)?;
    stream.write_all(&[0xE0, 0x00])?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let _ = stream.read_to_end(&mut rest);
    Ok(())
}
