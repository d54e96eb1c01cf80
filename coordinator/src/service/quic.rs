//! The coordinator's QUIC endpoint: TLS 1.3 (ring), ALPN `starling/1`, transport limits, and the
//! accept loop that hands every client stream to the driver.
//!
//! A round start is a burst of handshakes. Two things keep it from turning into packet loss and
//! retransmission stalls (measured in `shared/docs/crate-notes.md`: 21 s for 1000 simultaneous
//! handshakes with default buffers, 0.56 s with these settings):
//! - the UDP socket is created with socket2 and a large receive buffer
//!   ([`QuicLimits::recv_buffer_bytes`], capped by the kernel's `net.core.rmem_max`);
//! - at most [`QuicLimits::max_concurrent_handshakes`] handshakes are in progress; further
//!   connection attempts wait in quinn's bounded incoming queue.
//!
//! Beyond [`QuicLimits::max_connections`] open connections new ones are refused at once. Each
//! connection may open at most [`QuicLimits::max_concurrent_streams`] bidirectional streams and
//! no unidirectional ones; each stream is served as one driver connection
//! ([`QuicConnection`] from the SDK, so both ends share an implementation).

use super::driver::CoordinatorHandle;
use quinn::rustls;
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use starling_sdk::transport::quic::{ALPN, QuicConnection, crypto_provider};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Limits of the endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuicLimits {
    /// Most open connections (default 20,000).
    pub max_connections: usize,
    /// Most handshakes in progress at once (default 256).
    pub max_concurrent_handshakes: usize,
    /// Bidirectional streams one connection may have open (default 2).
    pub max_concurrent_streams: u32,
    /// QUIC idle timeout (default 30 s).
    pub idle_timeout: Duration,
    /// Requested UDP receive buffer (default 4 MiB).
    pub recv_buffer_bytes: usize,
    /// A handshake not done after this long is abandoned (default 10 s).
    pub handshake_timeout: Duration,
}

impl Default for QuicLimits {
    fn default() -> Self {
        Self {
            max_connections: 20_000,
            max_concurrent_handshakes: 256,
            max_concurrent_streams: 2,
            idle_timeout: Duration::from_secs(30),
            recv_buffer_bytes: 4 << 20,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicError {
    /// rustls refused the certificate or key, or the protocol settings.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    /// The TLS configuration does not suit QUIC.
    #[error("QUIC crypto setup failed: {0}")]
    Crypto(String),
    /// A limit is out of range.
    #[error("invalid limit: {0}")]
    Limit(String),
    /// The socket could not be created or bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Counters of the accept loop.
#[derive(Debug, Default)]
pub struct QuicStats {
    /// Connections whose handshake completed.
    pub accepted: AtomicU64,
    /// Connections refused because `max_connections` were open.
    pub refused: AtomicU64,
    /// Handshakes that failed or timed out (bad certificate on the client side, ALPN, loss).
    pub handshake_failures: AtomicU64,
    /// Streams handed to the driver.
    pub streams: AtomicU64,
}

/// The quinn server configuration for `certs`/`key` under `limits`.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    limits: &QuicLimits,
) -> Result<quinn::ServerConfig, QuicError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| QuicError::Crypto(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let idle_ms = u32::try_from(limits.idle_timeout.as_millis()).unwrap_or(u32::MAX);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(limits.max_concurrent_streams.into())
        .max_concurrent_uni_streams(0u8.into())
        .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(idle_ms))));
    config.transport_config(Arc::new(transport));
    config.max_incoming(limits.max_connections.max(1));
    Ok(config)
}

/// Binds the endpoint at `addr` on a socket with the requested receive buffer. Returns the
/// endpoint and the receive buffer the kernel granted.
pub fn bind(
    addr: SocketAddr,
    config: quinn::ServerConfig,
    limits: &QuicLimits,
) -> Result<(quinn::Endpoint, usize), QuicError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind_err = |source| QuicError::Bind { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(bind_err)?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    if let Err(e) = socket.set_recv_buffer_size(limits.recv_buffer_bytes) {
        tracing::warn!(error = %e, "cannot raise the UDP receive buffer");
    }
    let granted = socket.recv_buffer_size().unwrap_or(0);
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_err)?;
    Ok((endpoint, granted))
}

/// Accepts connections until the endpoint is closed, pacing handshakes and handing every
/// bidirectional stream to the driver.
pub async fn serve(
    endpoint: quinn::Endpoint,
    handle: CoordinatorHandle,
    limits: QuicLimits,
    stats: Arc<QuicStats>,
) {
    let handshakes = Arc::new(Semaphore::new(limits.max_concurrent_handshakes.max(1)));
    while let Some(incoming) = endpoint.accept().await {
        if endpoint.open_connections() > limits.max_connections {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        }
        let Ok(permit) = handshakes.clone().acquire_owned().await else { break };
        let (handle, stats, timeout) = (handle.clone(), stats.clone(), limits.handshake_timeout);
        tokio::spawn(async move {
            let conn = match tokio::time::timeout(timeout, async { incoming.accept()?.await }).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "handshake failed");
                    return;
                }
                Err(_) => {
                    stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            drop(permit);
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            // The stream limit is enforced by QUIC flow control (max_concurrent_bidi_streams).
            while let Ok((send, recv)) = conn.accept_bi().await {
                stats.streams.fetch_add(1, Ordering::Relaxed);
                handle.attach(QuicConnection::new(conn.clone(), send, recv));
            }
        });
    }
}
