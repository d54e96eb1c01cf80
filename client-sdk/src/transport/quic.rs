//! QUIC transport (quinn, TLS 1.3 with rustls' ring provider, ALPN `starling/1`).
//!
//! A [`QuicTransport`] trusts exactly the CA certificate(s) in the configured
//! [`CoordinatorEndpoint::ca_pem`] (no system roots) and checks that the coordinator's certificate
//! names [`CoordinatorEndpoint::server_name`]. Each [`connect`](Transport::connect) opens one QUIC
//! connection and one bidirectional stream on it; a training session is that stream.
//!
//! Errors are sorted for the retry logic: a certificate the CA did not sign or that names another
//! host is [`TransportError::Certificate`], an ALPN or TLS-version mismatch is
//! [`TransportError::Config`] (neither is retried), an unreachable or overloaded coordinator is
//! [`TransportError::Unreachable`] (retried with backoff). A refused token and a protocol-version
//! mismatch arrive as protocol messages and end the session with
//! `SessionOutcome::Refused(Refusal::Unauthenticated)` and `SessionOutcome::VersionMismatch`.
//!
//! [`QuicConnection`] is also what the coordinator wraps around the streams it accepts, so both
//! ends share one implementation of [`Connection`].

use super::{Connection, Transport, TransportError};
use crate::config::CoordinatorEndpoint;
use bytes::Bytes;
use quinn::rustls;
use quinn::rustls::pki_types::CertificateDer;
use quinn::rustls::pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The ALPN protocol id both ends require.
pub const ALPN: &[u8] = b"starling/1";
/// Largest chunk handed out by one [`Connection::recv`].
pub const RECV_CHUNK: usize = 64 * 1024;
/// How long [`Connection::close`] waits for the peer to acknowledge what was sent.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Application close code of a normal end of session.
pub const CLOSE_OK: u32 = 0;
/// Application close code of a connection ended for a problem (the reason text says which).
pub const CLOSE_ERROR: u32 = 1;

/// The rustls provider every Starling endpoint uses (ring), preferring AES-128-GCM/SHA-256:
/// its key schedule hashes with SHA-256, which has hardware support where SHA-384 often has none
/// (a measurable share of a handshake-bound coordinator's CPU). TLS 1.3 suites only.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A quinn client configuration trusting only the CA certificates in `ca_pem`.
pub fn client_config(ca_pem: &[u8]) -> Result<quinn::ClientConfig, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| TransportError::Config(format!("CA PEM: {e}")))?;
        roots.add(cert).map_err(|e| TransportError::Config(format!("CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TransportError::Config("no CA certificate in ca_pem".into()));
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .max_concurrent_uni_streams(0u8.into())
        .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(60_000))));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Connects to the coordinator over QUIC. Clones share one UDP socket.
#[derive(Clone, Debug)]
pub struct QuicTransport {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    address: String,
    server_name: String,
    connect_timeout: Duration,
}

impl QuicTransport {
    /// A transport to `coordinator`, on a new UDP socket. Must be called within a tokio runtime.
    pub fn new(coordinator: &CoordinatorEndpoint) -> Result<Self, TransportError> {
        let bind: SocketAddr = "[::]:0".parse().map_err(|_| TransportError::Config("bind address".into()))?;
        let endpoint = quinn::Endpoint::client(bind)
            .or_else(|_| quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0))))
            .map_err(|e| TransportError::Config(format!("cannot open a UDP socket: {e}")))?;
        Self::with_endpoint(endpoint, coordinator)
    }

    /// A transport to `coordinator` over an existing client `endpoint` (many clients in one
    /// process can share one socket).
    pub fn with_endpoint(
        endpoint: quinn::Endpoint,
        coordinator: &CoordinatorEndpoint,
    ) -> Result<Self, TransportError> {
        Ok(Self {
            endpoint,
            config: client_config(&coordinator.ca_pem)?,
            address: coordinator.address.clone(),
            server_name: coordinator.server_name.clone(),
            connect_timeout: Duration::from_secs(15),
        })
    }

    /// How long one connection attempt may take (default 15 s).
    pub fn set_connect_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.connect_timeout = timeout;
        self
    }

    async fn resolve(&self) -> Result<SocketAddr, TransportError> {
        if let Ok(addr) = self.address.parse() {
            return Ok(addr);
        }
        let mut addrs = tokio::net::lookup_host(&self.address)
            .await
            .map_err(|e| TransportError::Unreachable(format!("cannot resolve {}: {e}", self.address)))?;
        addrs.next().ok_or_else(|| TransportError::Unreachable(format!("{} has no address", self.address)))
    }
}

impl Transport for QuicTransport {
    type Connection = QuicConnection;

    async fn connect(&self) -> Result<QuicConnection, TransportError> {
        let addr = self.resolve().await?;
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, &self.server_name)
            .map_err(|e| TransportError::Config(format!("cannot connect to {addr}: {e}")))?;
        let attempt = async {
            let conn = connecting.await.map_err(connection_error)?;
            let (send, recv) = conn.open_bi().await.map_err(connection_error)?;
            Ok(QuicConnection::new(conn, send, recv))
        };
        tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| TransportError::Unreachable(format!("connecting to {addr} timed out")))?
    }
}

/// Sorts a quinn connection error into the SDK's kinds.
pub fn connection_error(e: quinn::ConnectionError) -> TransportError {
    use quinn::ConnectionError as E;
    // TLS alerts travel as crypto errors 0x100 + alert; 120 is no_application_protocol.
    let crypto = |code: quinn::TransportErrorCode, reason: &str| {
        let code = u64::from(code);
        if !(0x100..0x200).contains(&code) {
            return None;
        }
        Some(if code == 0x100 + 120 {
            TransportError::Config(format!("the coordinator does not speak ALPN starling/1: {reason}"))
        } else if code == 0x100 + 70 {
            TransportError::Config(format!("TLS version mismatch (TLS 1.3 required): {reason}"))
        } else {
            TransportError::Certificate(reason.to_string())
        })
    };
    match e {
        E::TransportError(t) => {
            let reason = t.reason.clone();
            crypto(t.code, &reason).unwrap_or_else(|| TransportError::Io(t.to_string()))
        }
        E::ConnectionClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            crypto(c.error_code, &reason)
                .unwrap_or_else(|| TransportError::Closed(format!("aborted by peer: {c}")))
        }
        E::ApplicationClosed(c) => TransportError::Closed(format!(
            "closed by the coordinator: {}",
            String::from_utf8_lossy(&c.reason)
        )),
        E::TimedOut => TransportError::Unreachable("timed out".into()),
        E::VersionMismatch => TransportError::Config("no common QUIC version".into()),
        other => TransportError::Closed(other.to_string()),
    }
}

/// One bidirectional QUIC stream of a connection, as a [`Connection`].
#[derive(Debug)]
pub struct QuicConnection {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl QuicConnection {
    /// Wraps a stream pair of `conn`.
    pub fn new(conn: quinn::Connection, send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self { conn, send, recv }
    }

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}

fn read_error(e: quinn::ReadError) -> TransportError {
    match e {
        quinn::ReadError::ConnectionLost(c) => connection_error(c),
        other => TransportError::Closed(other.to_string()),
    }
}

fn write_error(e: quinn::WriteError) -> TransportError {
    match e {
        quinn::WriteError::ConnectionLost(c) => connection_error(c),
        other => TransportError::Closed(other.to_string()),
    }
}

impl Connection for QuicConnection {
    async fn send(&mut self, bytes: Bytes) -> Result<(), TransportError> {
        // `write_chunk` hands the buffer to quinn without copying and waits on flow control, so a
        // model frame shared by many clients is never duplicated per client.
        self.send.write_chunk(bytes).await.map_err(write_error)
    }

    async fn recv(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        // `read_chunk` is cancel-safe (quinn documents it): a dropped future loses no data.
        match self.recv.read_chunk(RECV_CHUNK, true).await {
            Ok(Some(chunk)) => Ok(Some(Vec::from(chunk.bytes))),
            Ok(None) => Ok(None),
            Err(e) => Err(read_error(e)),
        }
    }

    async fn close(&mut self, reason: &str) {
        // Finish the stream and give the peer a moment to acknowledge it, so that a last frame
        // (a refusal, a version-negotiation frame) is delivered before the connection closes.
        if self.send.finish().is_ok() {
            let _ = tokio::time::timeout(CLOSE_LINGER, self.send.stopped()).await;
        }
        let code = if matches!(reason, "done" | "session over") { CLOSE_OK } else { CLOSE_ERROR };
        let reason = &reason.as_bytes()[..reason.len().min(200)];
        self.conn.close(quinn::VarInt::from_u32(code), reason);
    }

    async fn abort(&mut self, reason: &str) {
        // Reset, not finish: quinn drops the stream's untransmitted data and stops retransmitting.
        let _ = self.send.reset(quinn::VarInt::from_u32(CLOSE_ERROR));
        let reason = &reason.as_bytes()[..reason.len().min(200)];
        self.conn.close(quinn::VarInt::from_u32(CLOSE_ERROR), reason);
    }
}
