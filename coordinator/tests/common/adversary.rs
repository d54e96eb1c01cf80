//! Helpers of the adversarial suite (`tests/adversarial.rs`): the real `starling serve` process
//! and its memory, raw protocol peers over QUIC from chosen loopback addresses, hostile
//! connections that never speak, hand-made QUIC Initial packets, and the honest-only model.
//!
//! Loopback addresses: every address of 127/8 is local on Linux, so attackers bind 127.0.0.1
//! (or 127.0.0.x when a test needs several source addresses) and the honest fleet binds
//! [`HONEST_IP`]; the coordinator's per-address limits then never hit honest clients.
#![allow(dead_code)]

use crate::common::{check_in, issue, load, service_dir};
use bytes::Bytes;
use starling_coordinator::service::config::ServiceConfig;
use starling_coordinator::store::{Checkpoint, Store};
use starling_proto::codec::{Codec, FrameBuffer, Inbound};
use starling_proto::encoding::EncodedUpdate;
use starling_proto::ids::{ClientId, RoundId};
use starling_proto::message::{ClientMessage, ClientUpdate, CoordinatorMessage, LocalMetrics, Task};
use starling_proto::update::ModelShape;
use starling_sdk::config::CoordinatorEndpoint;
use starling_sdk::transport::quic::{QuicConnection, QuicTransport};
use starling_sdk::transport::{Connection, Transport};
use std::collections::HashMap;
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Source address of the honest fleet.
pub const HONEST_IP: [u8; 4] = [127, 0, 0, 2];
/// Source address of attackers (unless a test needs several).
pub const ATTACKER_IP: [u8; 4] = [127, 0, 0, 1];

/// `[server] checkin_timeout_ms` default: a connection that has not checked in with a valid token
/// within this time after its handshake is closed.
pub const CHECKIN_TIMEOUT: Duration = Duration::from_secs(5);
/// `[server] frame_timeout_ms` default: a frame that started arriving must be complete by then.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// `[server] send_timeout_ms` default: a write that makes no progress this long closes the peer.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// `[server] retry_above_handshakes` default.
pub const RETRY_ABOVE_HANDSHAKES: usize = 32;
/// `[server] max_connections_per_ip` default.
pub const MAX_CONNECTIONS_PER_IP: usize = 64;
/// `[server] unauthenticated_max_frame_bytes` default.
pub const UNAUTHENTICATED_MAX_FRAME_BYTES: usize = 16 << 10;
/// Slack on every "closed within" deadline: scheduling on a loaded 2-core CI machine, the
/// coordinator's timer granularity and the close travelling back. Not a performance figure.
pub const SLACK: Duration = Duration::from_secs(10);

/// The `[server]`, `[model]` and `[round]` sections of a test configuration. Rounds close
/// selection as soon as `target` clients checked in (selection pool = target, over-selection 1,
/// so every candidate is selected) and commit once `target` reported, or at the report timeout
/// with at least `min_reports`. Privacy mode "off", fedavg, clip norm 1 (the defaults).
pub fn config(
    server_extra: &str,
    shape: ModelShape,
    target: usize,
    min_reports: usize,
    report_ms: u64,
) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server_extra}
[model]
rows = {rows}
row_len = {row_len}
[round]
target_participants = {target}
min_reports = {min_reports}
over_selection = 1.0
selection_pool = {target}
selection_timeout_ms = 120000
report_timeout_ms = {report_ms}
interval_ms = 100
require_charging = false
require_unmetered = false
require_idle = false
retry_after_ms = 100
retry_window_ms = 100
[privacy]
mode = "off"
clip_norm = 1.0
"#,
        rows = shape.rows,
        row_len = shape.row_len,
    )
}

/// The real `starling serve` process on a fresh `starling init` directory. Killed on drop.
pub struct Serve {
    /// The service directory (config, TLS, secrets, data, `serve.log`).
    pub dir: tempfile::TempDir,
    /// The parsed configuration.
    pub config: ServiceConfig,
    /// The QUIC address it listens on.
    pub quic: SocketAddr,
    /// The CA clients trust.
    pub ca: Vec<u8>,
    tokens: HashMap<u64, (u64, Vec<u8>)>,
    child: Child,
    log: PathBuf,
}

impl Serve {
    /// Writes `config`, issues a token (valid for an hour) to each of `clients`, starts the
    /// service and waits for it to listen.
    pub fn start(config: &str, clients: impl IntoIterator<Item = u64>) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let path = service_dir(dir.path(), config);
        let parsed = load(&path);
        let tokens = clients.into_iter().map(|c| (c, issue(&parsed, c, 3600))).collect();
        let log = dir.path().join("serve.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_starling"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let quic = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(a) = line.strip_prefix("quic listening on ") {
                        break a.trim().parse::<SocketAddr>().unwrap();
                    }
                }
                _ => {
                    let _ = child.wait();
                    panic!(
                        "starling serve exited before listening:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let ca = std::fs::read(dir.path().join("tls/ca.pem")).unwrap();
        Serve { dir, config: parsed, quic, ca, tokens, child, log }
    }

    /// The token issued to `client`.
    pub fn token(&self, client: u64) -> Vec<u8> {
        self.tokens[&client].1.clone()
    }

    /// The id of the token issued to `client`.
    pub fn token_id(&self, client: u64) -> u64 {
        self.tokens[&client].0
    }

    /// The model's shape.
    pub fn shape(&self) -> ModelShape {
        self.config.shape().unwrap()
    }

    /// The coordinator's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Peak resident memory of the coordinator so far (`VmHWM`), bytes.
    pub fn peak_rss(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:") * 1024
    }

    /// Resident memory now (`VmRSS`), bytes.
    pub fn rss(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:") * 1024
    }

    /// Asserts the coordinator is alive and its peak RSS stayed under `bound` bytes.
    pub fn assert_memory_under(&mut self, bound: u64, what: &str) {
        assert!(self.alive(), "{what}: the coordinator died:\n{}", self.log_text());
        let peak = self.peak_rss();
        assert!(
            peak < bound,
            "{what}: coordinator peak RSS {:.1} MiB, bound {:.1} MiB",
            peak as f64 / MIB as f64,
            bound as f64 / MIB as f64
        );
        eprintln!(
            "{what}: coordinator peak RSS {:.1} MiB (bound {:.1} MiB)",
            peak as f64 / MIB as f64,
            bound as f64 / MIB as f64
        );
    }

    /// What the coordinator logged (warnings and errors).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The coordinator as an SDK endpoint description.
    pub fn endpoint(&self) -> CoordinatorEndpoint {
        CoordinatorEndpoint {
            address: self.quic.to_string(),
            server_name: "localhost".into(),
            ca_pem: self.ca.clone(),
        }
    }

    /// A transport on a new UDP socket bound to `ip` (call inside a tokio runtime).
    pub fn transport(&self, ip: [u8; 4]) -> QuicTransport {
        QuicTransport::with_endpoint(endpoint_on(ip), &self.endpoint()).unwrap()
    }

    /// A client configuration for hostile connections: trusts the CA, sends keep-alives every
    /// second (so no idle timeout ever closes a connection the coordinator means to keep).
    pub fn hostile_client_config(&self) -> quinn::ClientConfig {
        let mut config = starling_sdk::transport::quic::client_config(&self.ca).unwrap();
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(Duration::from_secs(1)))
            .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(120_000))));
        config.transport_config(Arc::new(transport));
        config
    }

    /// Revokes `client`'s token in the live database, as `starling token revoke` does (retrying
    /// while the coordinator holds the write lock).
    pub fn revoke(&self, client: u64) {
        let token = self.token_id(client);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match Store::open(&self.config.storage.path)
                .and_then(|mut s| s.revoke_token(token, starling_coordinator::service::unix_ms()))
            {
                Ok(()) => return,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("revoking: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot revoke the token of client {client}: {e}"),
            }
        }
    }

    /// Waits (polling the live database) until `round` is recorded; returns its base checkpoint
    /// and, if it committed, the new one. `Err` if it failed or did not finish `within`.
    pub async fn committed(
        &self,
        round: RoundId,
        within: Duration,
    ) -> Result<(Checkpoint, Checkpoint), String> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(store) = Store::open(&self.config.storage.path)
                && let Ok(rounds) = store.rounds()
                && let Some(r) = rounds.iter().find(|r| r.round == round)
            {
                match r.state.as_str() {
                    "committed" => {
                        let base = store.checkpoint(r.base_version).map_err(|e| e.to_string())?;
                        let new = store
                            .checkpoint(r.result_version.ok_or("no result version")?)
                            .map_err(|e| e.to_string())?;
                        return Ok((base.ok_or("base checkpoint gone")?, new.ok_or("no new checkpoint")?));
                    }
                    "started" => {}
                    other => return Err(format!("{round} was recorded {other}: {:?}", r.detail)),
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("{round} did not commit within {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        eprintln!("coordinator peak RSS (VmHWM) at the end: {:.1} MiB", self.peak_rss() as f64 / MIB as f64);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes per MiB.
pub const MIB: u64 = 1 << 20;

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A quinn client endpoint on a new UDP socket bound to `ip` (port chosen by the kernel).
pub fn endpoint_on(ip: [u8; 4]) -> quinn::Endpoint {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket.into(), Arc::new(quinn::TokioRuntime))
        .unwrap()
}

/// `127.0.0.x`.
pub fn loopback(x: u8) -> [u8; 4] {
    [127, 0, 0, x]
}

/// What a peer saw next.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// A protocol message.
    Message(CoordinatorMessage),
    /// A frame that is not a message (version negotiation).
    Frame(String),
    /// The coordinator closed the stream or the connection; the reason.
    Closed(String),
    /// Nothing within the time given, and still open.
    Silent,
}

/// A raw protocol client over one QUIC stream: sends anything, reports everything it receives.
pub struct Peer {
    /// The stream (and its connection).
    pub conn: QuicConnection,
    frames: FrameBuffer,
    codec: Codec,
}

impl Peer {
    /// Connects (handshake and stream).
    pub async fn connect(t: &QuicTransport) -> Result<Peer, String> {
        let conn = t.connect().await.map_err(|e| format!("connect: {e}"))?;
        Ok(Peer { conn, frames: FrameBuffer::new(Codec::default()), codec: Codec::default() })
    }

    /// The encoded frame of `m`.
    pub fn frame(m: &ClientMessage) -> Vec<u8> {
        Codec::default().encode_client(m).unwrap()
    }

    /// Sends one message.
    pub async fn send(&mut self, m: &ClientMessage) -> Result<(), String> {
        let frame = self.codec.encode_client(m).unwrap();
        self.send_bytes(&frame).await
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.conn.send(Bytes::copy_from_slice(bytes)).await.map_err(|e| e.to_string())
    }

    /// Whether the QUIC connection is closed, and why.
    pub fn close_reason(&self) -> Option<String> {
        self.conn.connection().close_reason().map(|e| e.to_string())
    }

    /// The next thing received within `within`.
    pub async fn next(&mut self, within: Duration) -> Next {
        let deadline = Instant::now() + within;
        loop {
            match self.frames.next_coordinator() {
                Ok(Some(Inbound::Message { message, .. })) => return Next::Message(message),
                Ok(Some(other)) => return Next::Frame(format!("{other:?}")),
                Ok(None) => {}
                Err(e) => return Next::Closed(format!("invalid frame from the coordinator: {e}")),
            }
            match tokio::time::timeout_at(deadline, self.conn.recv()).await {
                Err(_) => return Next::Silent,
                Ok(Ok(Some(bytes))) => self.frames.push(&bytes),
                Ok(Ok(None)) => {
                    // The stream finished: the reason travels in the connection close.
                    let closed = tokio::time::timeout_at(deadline, self.conn.connection().closed()).await;
                    return match closed {
                        Ok(e) => Next::Closed(e.to_string()),
                        Err(_) => Next::Closed("stream finished, connection still open".into()),
                    };
                }
                Ok(Err(e)) => return Next::Closed(e.to_string()),
            }
        }
    }

    /// Everything received until the connection closes or `within` passes: the messages, and
    /// the close reason if the connection closed.
    pub async fn drain(&mut self, within: Duration) -> (Vec<String>, Option<String>) {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        loop {
            match self.next(deadline.saturating_duration_since(Instant::now())).await {
                Next::Message(m) => got.push(short(&m)),
                Next::Frame(f) => got.push(f),
                Next::Closed(reason) => {
                    // A finished stream on a connection left open is not a close.
                    return (got, self.close_reason().map(|_| reason));
                }
                Next::Silent => return (got, None),
            }
        }
    }
}

/// A message, without the model values of a task.
pub fn short(m: &CoordinatorMessage) -> String {
    match m {
        CoordinatorMessage::Task(t) => format!("Task({}, {})", t.round, t.model_version),
        other => format!("{other:?}"),
    }
}

/// Connects as `client` until it is given a task, within `within`, as an SDK client would:
/// check-ins answered "come back later" are retried on a new connection every 100 ms, and so
/// are connection attempts that fail (a coordinator under attack may refuse or drop a
/// handshake).
pub async fn check_in_until_task(
    t: &QuicTransport,
    client: u64,
    token: Vec<u8>,
    within: Duration,
) -> Result<(Peer, Task), String> {
    let deadline = Instant::now() + within;
    let mut last = String::from("nothing");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("client {client}: no task within {within:?} (last: {last})"));
        }
        let mut p = match tokio::time::timeout(left, Peer::connect(t)).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                last = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => continue,
        };
        p.send(&check_in(client, token.clone())).await?;
        match p.next(left).await {
            Next::Message(CoordinatorMessage::Task(task)) => return Ok((p, task)),
            Next::Message(CoordinatorMessage::ComeBackAt(_)) => {
                last = "come back later".into();
                drop(p);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return Err(format!("client {client}: expected a task, got {other:?}")),
        }
    }
}

/// The update message for `task`.
pub fn update_for(task: &Task, update: EncodedUpdate, weight: f32) -> ClientMessage {
    ClientMessage::Update(ClientUpdate {
        round: task.round,
        base_version: task.model_version,
        update,
        weight,
        metrics: LocalMetrics::default(),
    })
}

/// Sends `update` for `task` and expects a receipt.
pub async fn report(p: &mut Peer, task: &Task, update: EncodedUpdate) -> Result<(), String> {
    p.send(&update_for(task, update, 1.0)).await?;
    match p.next(Duration::from_secs(30)).await {
        Next::Message(CoordinatorMessage::Receipt { round }) if round == task.round => Ok(()),
        other => Err(format!("expected a receipt, got {other:?}")),
    }
}

/// The deterministic update honest client `id` sends: two rows, L2 norm below 0.8 (within the
/// clip norm 1, so clipping leaves it unchanged).
pub fn honest_update(id: u64, shape: ModelShape) -> EncodedUpdate {
    let rows_n = u64::from(shape.rows);
    let mut rows = vec![((id * 7) % rows_n) as u32, ((id * 13 + 5) % rows_n) as u32];
    rows.sort_unstable();
    rows.dedup();
    let n = rows.len() * shape.row_len as usize;
    let per = 0.8 / (n as f32).sqrt();
    let values = (0..n as u64)
        .map(|k| {
            let sign = if (id + k).is_multiple_of(2) { 1.0 } else { -1.0 };
            sign * per * (0.5 + 0.5 * ((id * 31 + k * 7) % 10) as f32 / 10.0)
        })
        .collect();
    EncodedUpdate::RowSparse { shape, rows, values }
}

/// `update` as dense values.
pub fn dense(update: &EncodedUpdate, shape: ModelShape) -> Vec<f32> {
    update.clone().decode(shape, shape.len()).unwrap().to_dense()
}

/// What an honest client did: its id, its task and the update (dense) it had accepted.
#[derive(Clone, Debug)]
pub struct Reported {
    /// The client.
    pub client: u64,
    /// Its task.
    pub task: Task,
    /// Its update, dense.
    pub delta: Vec<f32>,
}

/// One honest client's session (check in, task, deterministic update, receipt), spawned.
pub fn spawn_honest(
    t: &QuicTransport,
    serve: &Serve,
    client: u64,
) -> tokio::task::JoinHandle<Result<Reported, String>> {
    let (t, token, shape) = (t.clone(), serve.token(client), serve.shape());
    tokio::spawn(async move {
        let (mut p, task) = check_in_until_task(&t, client, token, Duration::from_secs(90)).await?;
        let update = honest_update(client, shape);
        report(&mut p, &task, update.clone()).await.map_err(|e| format!("client {client}: {e}"))?;
        Ok(Reported { client, task, delta: dense(&update, shape) })
    })
}

/// The honest fleet: one session per client in `clients`, on one transport from [`HONEST_IP`].
pub fn spawn_fleet(
    serve: &Serve,
    clients: impl IntoIterator<Item = u64>,
) -> Vec<tokio::task::JoinHandle<Result<Reported, String>>> {
    let t = serve.transport(HONEST_IP);
    clients.into_iter().map(|c| spawn_honest(&t, serve, c)).collect()
}

/// Waits for the fleet; panics naming the first honest client that failed.
pub async fn join_fleet(fleet: Vec<tokio::task::JoinHandle<Result<Reported, String>>>) -> Vec<Reported> {
    let mut out = Vec::new();
    for h in fleet {
        match tokio::time::timeout(Duration::from_secs(120), h).await {
            Ok(Ok(Ok(r))) => out.push(r),
            Ok(Ok(Err(e))) => panic!("honest client failed: {e}"),
            Ok(Err(e)) => panic!("honest client panicked: {e}"),
            Err(_) => panic!("honest client did not finish within 120 s"),
        }
    }
    out
}

/// `base + mean(deltas)`: the model FedAvg commits from these equally weighted updates.
pub fn honest_only(base: &[f32], deltas: &[&[f32]]) -> Vec<f32> {
    let n = deltas.len() as f64;
    (0..base.len())
        .map(|i| (f64::from(base[i]) + deltas.iter().map(|d| f64::from(d[i])).sum::<f64>() / n) as f32)
        .collect()
}

/// Largest absolute difference, and where.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, usize) {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (x, y))| ((x - y).abs(), i))
        .fold((0.0, 0), |m, d| if d.0 > m.0 { d } else { m })
}

/// L2 distance.
pub fn l2_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>().sqrt()
}

/// Waits for `round` to commit and asserts the committed model is the honest-only model of
/// `honest` (every accepted honest update with weight 1), to 1e-5.
pub async fn assert_honest_only(serve: &Serve, round: RoundId, honest: &[Reported]) {
    let (base, new) = serve.committed(round, Duration::from_secs(90)).await.unwrap_or_else(|e| panic!("{e}"));
    let deltas: Vec<&[f32]> = honest.iter().filter(|r| r.task.round == round).map(|r| &r.delta[..]).collect();
    assert!(!deltas.is_empty(), "no honest update in {round}");
    let expected = honest_only(&base.model, &deltas);
    let (diff, at) = max_abs_diff(&new.model, &expected);
    assert!(
        diff <= 1e-5,
        "{round}: the committed model is not the honest-only model: |Δ| = {diff} at {at} \
         (committed {}, expected {}; L2 distance {})",
        new.model[at],
        expected[at],
        l2_distance(&new.model, &expected)
    );
}

/// A completed QUIC handshake that never opens a stream (and so never checks in), with the
/// time it was established.
pub struct Silent {
    /// The connection.
    pub conn: quinn::Connection,
    /// When the handshake completed.
    pub established: Instant,
}

/// Opens a connection from `endpoint` and completes the handshake; never opens a stream.
pub async fn silent_connection(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    server: SocketAddr,
) -> Result<Silent, String> {
    let connecting = endpoint.connect_with(config.clone(), server, "localhost").map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(Duration::from_secs(30), connecting)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(Silent { conn, established: Instant::now() })
}

/// [`silent_connection`], retried (up to 10 attempts, 100 ms apart) when refused or dropped,
/// as a determined attacker would.
pub async fn silent_connection_retrying(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    server: SocketAddr,
) -> Result<Silent, String> {
    let mut last = String::new();
    for _ in 0..10 {
        match silent_connection(endpoint, config, server).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

/// Deterministic bytes (splitmix64), for garbage.
pub struct Garbage(u64);

impl Garbage {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// QUIC long-header packet types (RFC 9000 §17.2, version 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LongType {
    /// Initial.
    Initial,
    /// 0-RTT.
    ZeroRtt,
    /// Handshake.
    Handshake,
    /// Retry.
    Retry,
}

/// The type, destination and source connection ids of a datagram's first packet, if it has a
/// QUIC v1 long header.
pub fn long_header(d: &[u8]) -> Option<(LongType, Vec<u8>, Vec<u8>)> {
    let first = *d.first()?;
    if first & 0x80 == 0 || d.get(1..5)? != [0, 0, 0, 1] {
        return None;
    }
    let kind = match (first >> 4) & 0x3 {
        0 => LongType::Initial,
        1 => LongType::ZeroRtt,
        2 => LongType::Handshake,
        _ => LongType::Retry,
    };
    let dlen = *d.get(5)? as usize;
    let dcid = d.get(6..6 + dlen)?.to_vec();
    let slen = *d.get(6 + dlen)? as usize;
    let scid = d.get(7 + dlen..7 + dlen + slen)?.to_vec();
    Some((kind, dcid, scid))
}

/// Half-open handshakes: real QUIC v1 Initial packets (made by a `quinn_proto` client endpoint,
/// so the coordinator's TLS sees a genuine ClientHello) sent from a plain UDP socket that never
/// answers the coordinator. Each connection is identified by its source connection id, which the
/// coordinator echoes as the destination id of everything it sends back.
pub struct HalfOpen {
    endpoint: quinn_proto::Endpoint,
    /// Kept so that their connection ids stay reserved.
    conns: Vec<quinn_proto::Connection>,
    config: quinn::ClientConfig,
    server: SocketAddr,
    socket: Arc<std::net::UdpSocket>,
    by_cid: Arc<std::sync::Mutex<HashMap<Vec<u8>, usize>>>,
    /// Per connection: answered with a server Initial (handshake state), answered with a Retry.
    pub answers: Arc<std::sync::Mutex<Vec<(bool, bool)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl HalfOpen {
    /// A socket bound to `ip` aimed at `server`, with a thread recording the answers.
    pub fn new(ip: [u8; 4], server: SocketAddr, config: quinn::ClientConfig) -> Self {
        let socket = Arc::new(std::net::UdpSocket::bind(SocketAddr::from((ip, 0))).unwrap());
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let by_cid: Arc<std::sync::Mutex<HashMap<Vec<u8>, usize>>> = Arc::default();
        let answers: Arc<std::sync::Mutex<Vec<(bool, bool)>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (socket, by_cid, answers, stop) =
                (socket.clone(), by_cid.clone(), answers.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(n) = socket.recv(&mut buf) else { continue };
                    let Some((kind, dcid, _)) = long_header(&buf[..n]) else { continue };
                    let Some(&i) = by_cid.lock().unwrap().get(&dcid) else { continue };
                    let mut a = answers.lock().unwrap();
                    match kind {
                        LongType::Retry => a[i].1 = true,
                        _ => a[i].0 = true,
                    }
                }
            });
        }
        let endpoint =
            quinn_proto::Endpoint::new(Arc::new(quinn::EndpointConfig::default()), None, false, None);
        HalfOpen { endpoint, conns: Vec::new(), config, server, socket, by_cid, answers, stop }
    }

    /// Sends the first Initial of `n` new connections, `per_ms` of them per millisecond at most.
    /// Returns the index range of the new connections.
    pub fn send(&mut self, n: usize) -> std::ops::Range<usize> {
        let start = self.conns.len();
        let now = std::time::Instant::now();
        for k in 0..n {
            let (_, mut conn) =
                self.endpoint.connect(now, self.config.clone(), self.server, "localhost").unwrap();
            let mut buf = Vec::new();
            let t = conn.poll_transmit(now, 1, &mut buf).expect("a client Initial");
            let datagram = &buf[..t.size];
            let (kind, _, scid) = long_header(datagram).expect("a long header");
            assert_eq!(kind, LongType::Initial);
            let i = self.conns.len();
            self.by_cid.lock().unwrap().insert(scid, i);
            self.answers.lock().unwrap().push((false, false));
            self.socket.send_to(datagram, self.server).unwrap();
            self.conns.push(conn);
            // Paced a little, so the kernel does not drop them before the coordinator reads them.
            if k % 50 == 49 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        start..self.conns.len()
    }

    /// Of the connections in `range`: (answered with handshake state, answered with a Retry).
    pub fn counts(&self, range: std::ops::Range<usize>) -> (usize, usize) {
        let a = self.answers.lock().unwrap();
        a[range].iter().fold((0, 0), |(i, r), (gi, gr)| (i + usize::from(*gi), r + usize::from(*gr)))
    }
}

impl Drop for HalfOpen {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The IP of a socket address as the 4 bytes `[u8; 4]` helpers take.
pub fn v4(ip: IpAddr) -> [u8; 4] {
    match ip {
        IpAddr::V4(v) => v.octets(),
        IpAddr::V6(_) => panic!("IPv4 only"),
    }
}

/// Convenience: a client id.
pub fn cid(c: u64) -> ClientId {
    ClientId(c)
}
