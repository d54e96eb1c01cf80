//! Helpers shared by the QUIC service tests: a service directory made by `init`, tokens, and a
//! raw protocol client that can send anything (including garbage) over real QUIC.
#![allow(dead_code)]

use bytes::Bytes;
use starling_coordinator::service::config::ServiceConfig;
use starling_coordinator::service::server;
use starling_coordinator::service::tokens::{TokenAuthority, TokenClaims, unix_now_s};
use starling_coordinator::store::Store;
use starling_proto::codec::{Codec, FrameBuffer, Inbound};
use starling_proto::ids::ClientId;
use starling_proto::message::{Capabilities, CheckIn, ClientMessage, CoordinatorMessage, DeviceConditions};
use starling_sdk::config::CoordinatorEndpoint;
use starling_sdk::transport::quic::{QuicConnection, QuicTransport};
use starling_sdk::transport::{Connection, Transport};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const GOOD: DeviceConditions =
    DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 90 };

/// `starling init` into `dir`, then replaces `starling.toml` with `config` (paths default to
/// the init layout).
pub fn service_dir(dir: &Path, config: &str) -> PathBuf {
    server::init(dir, &["localhost", "127.0.0.1"], false).unwrap();
    let path = dir.join("starling.toml");
    std::fs::write(&path, config).unwrap();
    path
}

pub fn load(path: &Path) -> ServiceConfig {
    ServiceConfig::from_toml(&std::fs::read_to_string(path).unwrap(), Vec::new(), path.parent().unwrap())
        .unwrap()
}

/// Issues a token as `starling token issue` does, valid for `ttl_s` seconds (negative: expired).
/// Opens the service's store as `[storage]` says; on PostgreSQL call it outside the async threads.
pub fn issue(config: &ServiceConfig, client: u64, ttl_s: i64) -> (u64, Vec<u8>) {
    let authority = TokenAuthority::from_secret_file_text(
        &std::fs::read_to_string(&config.server.token_secret_file).unwrap(),
    )
    .unwrap();
    let mut store = Store::open_config(&config.storage).unwrap();
    let expires = (unix_now_s() as i64 + ttl_s).max(0) as u64;
    let token_id = store.record_token(ClientId(client), expires, 0).unwrap();
    (
        token_id,
        authority
            .issue(TokenClaims { token_id, client: ClientId(client), expires_unix_s: expires })
            .into_bytes(),
    )
}

pub fn ca_pem(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("tls/ca.pem")).unwrap()
}

pub fn endpoint_for(addr: SocketAddr, ca: &[u8], server_name: &str) -> CoordinatorEndpoint {
    CoordinatorEndpoint { address: addr.to_string(), server_name: server_name.into(), ca_pem: ca.to_vec() }
}

pub fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

pub fn check_in(client: u64, credential: Vec<u8>) -> ClientMessage {
    ClientMessage::CheckIn(CheckIn {
        client: ClientId(client),
        credential,
        sdk_version: "raw-test".into(),
        model_family: "bpr-mf".into(),
        have_version: None,
        conditions: GOOD,
        capabilities: Capabilities::default(),
    })
}

/// A raw protocol client over one QUIC stream.
pub struct Raw {
    pub conn: QuicConnection,
    frames: FrameBuffer,
    codec: Codec,
}

impl Raw {
    pub async fn connect(transport: &QuicTransport) -> Raw {
        Self::try_connect(transport).await.unwrap()
    }

    /// Connects, or says why not (the coordinator may be down).
    pub async fn try_connect(transport: &QuicTransport) -> Result<Raw, String> {
        let conn = transport.connect().await.map_err(|e| e.to_string())?;
        Ok(Raw { conn, frames: FrameBuffer::new(Codec::default()), codec: Codec::default() })
    }

    /// Sends `m`, or says why not.
    pub async fn try_send(&mut self, m: &ClientMessage) -> Result<(), String> {
        let frame = self.codec.encode_client(m).map_err(|e| e.to_string())?;
        self.conn.send(Bytes::from(frame)).await.map_err(|e| e.to_string())
    }

    pub async fn send(&mut self, m: &ClientMessage) {
        let frame = self.codec.encode_client(m).unwrap();
        self.conn.send(Bytes::from(frame)).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.conn.send(Bytes::copy_from_slice(bytes)).await;
    }

    /// The next frame, or `Err(reason)` once the coordinator closed the stream or connection.
    pub async fn next(&mut self) -> Result<Inbound<CoordinatorMessage>, String> {
        loop {
            match self.frames.next_coordinator() {
                Ok(Some(inbound)) => return Ok(inbound),
                Ok(None) => {}
                Err(e) => return Err(format!("invalid frame from coordinator: {e}")),
            }
            match tokio::time::timeout(Duration::from_secs(60), self.conn.recv()).await {
                Err(_) => return Err("no answer within 60 s".into()),
                Ok(Ok(Some(bytes))) => self.frames.push(&bytes),
                Ok(Ok(None)) => {
                    // The reason travels in the connection close that follows the stream's end.
                    let closed =
                        tokio::time::timeout(Duration::from_secs(10), self.conn.connection().closed());
                    return Err(match closed.await {
                        Ok(e) => e.to_string(),
                        Err(_) => "stream finished".into(),
                    });
                }
                Ok(Err(e)) => return Err(e.to_string()),
            }
        }
    }

    /// The next protocol message (panics on anything else).
    pub async fn message(&mut self) -> CoordinatorMessage {
        match self.next().await {
            Ok(Inbound::Message { message, .. }) => message,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Waits until the coordinator closes; returns the reason.
    pub async fn closed(&mut self) -> String {
        loop {
            match self.next().await {
                Ok(_) => continue,
                Err(reason) => return reason,
            }
        }
    }
}

/// A real SDK client over QUIC with a few purchases recorded and training consent given.
pub fn sdk_client(
    id: u64,
    credential: Vec<u8>,
    items: u32,
    dim: u32,
    transport: QuicTransport,
) -> starling_sdk::Client<QuicTransport> {
    use starling_models::data::events::{Context, DeviceClass, Event, EventKind};
    use starling_sdk::{Client, ClientConfig, Consent, ModelSpec, Storage};
    let mut config =
        ClientConfig::new(ClientId(id), credential, ModelSpec::mf(items, dim), Storage::InMemory);
    config.seed = Some(id);
    config.retry.initial_backoff = Duration::from_millis(100);
    config.retry.max_backoff = Duration::from_millis(500);
    let client = Client::open(config, transport).unwrap();
    client.set_consent(Consent { personalization: true, training: true }).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let events: Vec<Event> = (0..6)
        .map(|k| Event {
            item: ((id * 7 + k * 3) % u64::from(items)) as u32,
            at_ms: now - 60_000 + k as i64,
            kind: EventKind::Purchase,
            context: Context::at(now / 1000, DeviceClass::Phone),
        })
        .collect();
    client.record_batch(&events).unwrap();
    client.set_conditions(GOOD);
    client
}

/// Runs rounds with `client` until `stop`, as an app's scheduler would: after "come back later"
/// it waits what it was told (at most `max_wait`), after any other failure (the coordinator is
/// down, a round failed) 100 ms.
pub async fn keep_taking_part(
    client: starling_sdk::Client<QuicTransport>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    max_wait: Duration,
) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match client.run_round().await {
            Ok(_) => {}
            Err(starling_sdk::RoundError::ComeBackLater { after }) => {
                tokio::time::sleep(after.min(max_wait)).await
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// An HTTP/1.1 request to the admin endpoint: `(status, body)`.
pub async fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}X-Starling-Operator: test-operator\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response");
        let head = String::from_utf8_lossy(&out[..split]).to_string();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let mut body = out[split + 4..].to_vec();
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            body = unchunk(&body);
        }
        (status, body)
    })
    .await
    .unwrap()
}

pub fn unchunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..line_end]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[line_end + 2..line_end + 2 + n]);
        b = &b[line_end + 2 + n + 2..];
    }
}
