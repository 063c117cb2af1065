//! The MQTT front door: the agent owns the listening sockets and relays every connection to
//! rumqttd's internal loopback listener.
//!
//! Invariant: once [`Gate::close`] is called, no byte from a client reaches the broker any
//! more, so the broker acknowledges nothing new; what it already acknowledged is then drained
//! into the buffer before the agent exits. rumqttd itself cannot stop accepting or acking, which
//! is why this relay exists: it is what makes a clean stop (SIGTERM) lose nothing.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerError;

/// Relay buffer per connection and direction.
const RELAY_BUFFER: usize = 32 * 1024;

/// The gate in front of the broker.
pub struct Gate {
    closing: CancellationToken,
}

/// Binds a client-facing listener; the error names the config key.
pub async fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, BrokerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BrokerError::Bind { key, addr, source })
}

impl Gate {
    /// A gate, open.
    pub fn new() -> Gate {
        Gate {
            closing: CancellationToken::new(),
        }
    }

    /// Relays every connection accepted on `listener` to the broker at `upstream`.
    pub fn serve(&self, listener: TcpListener, upstream: SocketAddr) {
        let closing = self.closing.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = closing.cancelled() => return,
                };
                match accepted {
                    Ok((client, _)) => {
                        tokio::spawn(relay(client, upstream, closing.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }

    /// Stops accepting connections and relaying client bytes; answers still flow to clients.
    pub fn close(&self) {
        self.closing.cancel();
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, closing: CancellationToken) {
    let broker = match TcpStream::connect(upstream).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "embedded broker unreachable; MQTT connection refused");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut broker_rx, mut broker_tx) = broker.into_split();
    // Broker → client: acknowledgements and deliveries, until either side closes.
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut broker_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
    });
    // Client → broker: only while the gate is open.
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = tokio::select! {
            n = client_rx.read(&mut buf) => n,
            _ = closing.cancelled() => {
                // Stop here; keep the broker side open so acks of what it got still go out.
                let _ = down.await;
                return;
            }
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if broker_tx.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = broker_tx.shutdown().await;
    let _ = down.await;
}
