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
//! Against hostile peers (see `docs/operations.md`, "Limits"):
//! - with more than [`QuicLimits::retry_above_handshakes`] handshakes in progress, an attempt
//!   from an address that has not been validated gets a stateless **Retry**: the server keeps no
//!   state for it until the peer proves it receives packets at its address (spoofed floods cost
//!   one packet each);
//! - a handshake must finish within [`QuicLimits::handshake_timeout`];
//! - at most [`QuicLimits::max_connections`] connections in all (an attempt beyond it is
//!   refused), and at most [`QuicLimits::max_connections_per_ip`] from one IP address;
//! - a connection must open its stream within [`QuicLimits::checkin_timeout`] (the driver then
//!   gives that stream the same time to check in with a valid token);
//! - quinn buffers at most [`QuicLimits::stream_receive_window`] per stream and
//!   [`QuicLimits::receive_window`] per connection of data the service has not read, and at most
//!   [`QuicLimits::incoming_buffer_bytes`] per connection attempt not yet accepted.
//!
//! Each connection may open at most [`QuicLimits::max_concurrent_streams`] bidirectional streams
//! and no unidirectional ones; each stream is served as one driver connection ([`QuicConnection`]
//! from the SDK, so both ends share an implementation).

use super::driver::CoordinatorHandle;
use quinn::rustls;
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use starling_sdk::transport::quic::{ALPN, QuicConnection, crypto_provider};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Limits of the endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuicLimits {
    /// Most open connections (default 20,000).
    pub max_connections: usize,
    /// Most open connections from one IP address (default 64).
    pub max_connections_per_ip: usize,
    /// Most handshakes in progress at once (default 256).
    pub max_concurrent_handshakes: usize,
    /// With more handshakes than this in progress, unvalidated attempts get a Retry (default
    /// 32; 0: always).
    pub retry_above_handshakes: usize,
    /// A connection must open its first stream within this (default 5 s).
    pub checkin_timeout: Duration,
    /// Unread data quinn buffers per stream (default 512 KiB; at 100 ms round-trip time that
    /// still allows 5 MB/s per upload).
    pub stream_receive_window: u32,
    /// Unread data quinn buffers per connection (default 1 MiB).
    pub receive_window: u32,
    /// Data buffered per connection attempt that has not been accepted yet (default 64 KiB).
    pub incoming_buffer_bytes: u64,
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
            max_connections_per_ip: 64,
            max_concurrent_handshakes: 256,
            retry_above_handshakes: 32,
            checkin_timeout: Duration::from_secs(5),
            stream_receive_window: 512 << 10,
            receive_window: 1 << 20,
            incoming_buffer_bytes: 64 << 10,
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
    /// Connections refused because their IP address had `max_connections_per_ip` open.
    pub refused_per_ip: AtomicU64,
    /// Connection attempts answered with a stateless Retry.
    pub retries: AtomicU64,
    /// Connections closed because they opened no stream in time.
    pub no_stream: AtomicU64,
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
        .stream_receive_window(limits.stream_receive_window.into())
        .receive_window(limits.receive_window.max(limits.stream_receive_window).into())
        .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(idle_ms))));
    config.transport_config(Arc::new(transport));
    // Attempts waiting to be accepted, and what quinn buffers for them.
    let waiting = limits.max_concurrent_handshakes.max(1) * 4;
    config.max_incoming(waiting);
    config.incoming_buffer_size(limits.incoming_buffer_bytes);
    config.incoming_buffer_size_total(limits.incoming_buffer_bytes.saturating_mul(waiting as u64));
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

/// Open connections per IP address; a [`IpSlot`] holds one and gives it back when dropped.
#[derive(Debug, Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<IpSlot> {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = t.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(IpSlot { table: self.clone(), ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut t = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = t.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

/// Accepts connections until the endpoint is closed, pacing handshakes, answering floods with
/// Retry, capping connections in all and per address, and handing every bidirectional stream to
/// the driver.
pub async fn serve(
    endpoint: quinn::Endpoint,
    handle: CoordinatorHandle,
    limits: QuicLimits,
    stats: Arc<QuicStats>,
) {
    let max_handshakes = limits.max_concurrent_handshakes.max(1);
    let handshakes = Arc::new(Semaphore::new(max_handshakes));
    let per_ip = Arc::new(PerIp::default());
    while let Some(incoming) = endpoint.accept().await {
        let in_progress = max_handshakes - handshakes.available_permits();
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && (limits.retry_above_handshakes == 0 || in_progress >= limits.retry_above_handshakes)
        {
            stats.retries.fetch_add(1, Ordering::Relaxed);
            let _ = incoming.retry();
            continue;
        }
        if endpoint.open_connections() >= limits.max_connections {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        }
        let Some(slot) = per_ip.take(incoming.remote_address().ip(), limits.max_connections_per_ip) else {
            stats.refused_per_ip.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        };
        let Ok(permit) = handshakes.clone().acquire_owned().await else { break };
        let (handle, stats, limits) = (handle.clone(), stats.clone(), limits.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let handshake = async { incoming.accept()?.await };
            let conn = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
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
            // A connection that opens no stream would never reach the driver's check-in deadline.
            let first = match tokio::time::timeout(limits.checkin_timeout, conn.accept_bi()).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(_)) => return,
                Err(_) => {
                    stats.no_stream.fetch_add(1, Ordering::Relaxed);
                    conn.close(quinn::VarInt::from_u32(1), b"no check-in in time");
                    return;
                }
            };
            let mut next = Some(first);
            // The stream limit is enforced by QUIC flow control (max_concurrent_bidi_streams).
            while let Some((send, recv)) = next.take() {
                stats.streams.fetch_add(1, Ordering::Relaxed);
                handle.attach(QuicConnection::new(conn.clone(), send, recv));
                next = conn.accept_bi().await.ok();
            }
            // Hold the address's slot until the connection is gone.
            conn.closed().await;
        });
    }
}
