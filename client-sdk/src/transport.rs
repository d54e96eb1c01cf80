//! How the SDK reaches its coordinator: a [`Transport`] opens [`Connection`]s that carry bytes.
//!
//! The SDK only ever sends and receives whole protocol frames (see `starling_proto::codec`), but a
//! connection may deliver them in any chunking: the receiving side reassembles frames with a
//! `FrameBuffer`. Two transports exist:
//! - [`memory`]: in-process, bounded channels (tests, examples, the fleet simulator);
//! - [`quic`]: QUIC (TLS 1.3 with the coordinator's CA, ALPN `starling/1`), for real deployments.
//!
//! Both ends of a connection implement [`Connection`], so a coordinator can serve in-process and
//! QUIC clients with the same code.

use bytes::Bytes;
use std::future::Future;

pub mod quic;

/// Why a transport operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The coordinator could not be reached (no route, refused, handshake timed out).
    #[error("coordinator unreachable: {0}")]
    Unreachable(String),
    /// The coordinator's certificate is not signed by the configured CA, or names another host.
    #[error("the coordinator's certificate was not accepted: {0}")]
    Certificate(String),
    /// The configuration is unusable (bad address, unreadable CA file, …).
    #[error("transport misconfigured: {0}")]
    Config(String),
    /// The connection was closed (by the peer, or locally).
    #[error("connection closed: {0}")]
    Closed(String),
    /// Any other I/O failure on an open connection.
    #[error("transport I/O error: {0}")]
    Io(String),
}

impl TransportError {
    /// Whether trying again later may help (as opposed to a configuration or certificate problem).
    pub fn is_transient(&self) -> bool {
        matches!(self, TransportError::Unreachable(_) | TransportError::Closed(_) | TransportError::Io(_))
    }
}

/// One open connection to (or from) a peer.
pub trait Connection: Send + 'static {
    /// Sends `bytes` (one or more whole frames). Waits while the peer is not keeping up
    /// (backpressure), never buffers without bound. `Bytes` lets one encoded model be sent to
    /// many clients without a copy per client.
    fn send(&mut self, bytes: Bytes) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// The next bytes from the peer, in any chunking; `Ok(None)` once the peer has finished.
    /// Must be cancel-safe: dropping the future before it completes loses no data.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Vec<u8>>, TransportError>> + Send;
    /// Closes the connection, telling the peer `reason` where the transport can.
    fn close(&mut self, reason: &str) -> impl Future<Output = ()> + Send;
    /// Closes the connection at once, discarding whatever was handed to [`send`](Self::send) but
    /// not yet transmitted (used when a frame is cancelled half-way). The default is
    /// [`close`](Self::close), right for transports whose `send` hands over whole frames only.
    fn abort(&mut self, reason: &str) -> impl Future<Output = ()> + Send {
        self.close(reason)
    }
}

/// A way to open connections to the coordinator.
pub trait Transport: Send + Sync + 'static {
    /// The connections it opens.
    type Connection: Connection;
    /// Opens a connection (one attempt; the caller retries with backoff).
    fn connect(&self) -> impl Future<Output = Result<Self::Connection, TransportError>> + Send;
}

pub mod memory {
    //! In-process transport: bounded channels between an SDK client and a coordinator in the same
    //! process. [`network`] gives a [`MemoryTransport`] (clients connect through it, clone it freely)
    //! and a [`MemoryListener`] (the coordinator accepts from it).

    use super::{Connection, Transport, TransportError};
    use bytes::Bytes;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::sync::mpsc;

    /// Chunks in flight per direction of a connection before the sender waits.
    pub const CHANNEL_DEPTH: usize = 16;

    /// One end of an in-process connection.
    #[derive(Debug)]
    pub struct MemoryConnection {
        tx: Option<mpsc::Sender<Bytes>>,
        rx: mpsc::Receiver<Bytes>,
        id: u64,
    }

    impl MemoryConnection {
        /// A number identifying the connection (the same on both ends).
        pub fn id(&self) -> u64 {
            self.id
        }

        /// A connected pair of ends.
        pub fn pair(id: u64) -> (MemoryConnection, MemoryConnection) {
            let (a_tx, b_rx) = mpsc::channel(CHANNEL_DEPTH);
            let (b_tx, a_rx) = mpsc::channel(CHANNEL_DEPTH);
            (
                MemoryConnection { tx: Some(a_tx), rx: a_rx, id },
                MemoryConnection { tx: Some(b_tx), rx: b_rx, id },
            )
        }
    }

    impl Connection for MemoryConnection {
        async fn send(&mut self, bytes: Bytes) -> Result<(), TransportError> {
            let tx = self.tx.as_ref().ok_or_else(|| TransportError::Closed("closed locally".into()))?;
            tx.send(bytes).await.map_err(|_| TransportError::Closed("peer went away".into()))
        }

        async fn recv(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
            Ok(self.rx.recv().await.map(Vec::from))
        }

        async fn close(&mut self, _reason: &str) {
            self.tx = None;
            self.rx.close();
        }
    }

    /// The client side: connects to the [`MemoryListener`] it was made with.
    #[derive(Clone, Debug)]
    pub struct MemoryTransport {
        accept: mpsc::Sender<MemoryConnection>,
        attempts: Arc<AtomicU64>,
        next_id: Arc<AtomicU64>,
    }

    impl MemoryTransport {
        /// Connection attempts made through this transport (and its clones) so far.
        pub fn connect_attempts(&self) -> u64 {
            self.attempts.load(Ordering::Relaxed)
        }
    }

    impl Transport for MemoryTransport {
        type Connection = MemoryConnection;

        async fn connect(&self) -> Result<MemoryConnection, TransportError> {
            self.attempts.fetch_add(1, Ordering::Relaxed);
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (client, server) = MemoryConnection::pair(id);
            self.accept
                .send(server)
                .await
                .map_err(|_| TransportError::Unreachable("in-process coordinator is not running".into()))?;
            Ok(client)
        }
    }

    /// The coordinator side: yields each connection a client opens.
    #[derive(Debug)]
    pub struct MemoryListener {
        rx: mpsc::Receiver<MemoryConnection>,
    }

    impl MemoryListener {
        /// The next incoming connection; `None` once every [`MemoryTransport`] is gone.
        pub async fn accept(&mut self) -> Option<MemoryConnection> {
            self.rx.recv().await
        }
    }

    /// A new in-process network: at most `backlog` connections wait to be accepted.
    pub fn network(backlog: usize) -> (MemoryTransport, MemoryListener) {
        let (tx, rx) = mpsc::channel(backlog.max(1));
        (
            MemoryTransport {
                accept: tx,
                attempts: Arc::new(AtomicU64::new(0)),
                next_id: Arc::new(AtomicU64::new(1)),
            },
            MemoryListener { rx },
        )
    }
}
