//! The coordinator's async shell around the sans-IO round engine.
//!
//! ```text
//!  connection task ──(decoded ClientMessage)──▶ ┌──────────────┐ ──(encoded frames)──▶ connection task
//!  connection task ──────────────────────────▶ │ driver task  │ ──▶ …
//!  CoordinatorHandle ──(start round, shutdown)▶ │ Orchestrator │ ──(RoundEvent)──▶ hook (persist), broadcast
//!                                              └──────────────┘
//! ```
//!
//! - **One driver task owns the [`Orchestrator`]**: every input (a message, a disconnect, a timer,
//!   a command) is handled in order, then every output is drained. Nothing else touches the engine.
//! - **Per-connection tasks** (one per peer, generic over [`Connection`], so in-process and QUIC
//!   peers are served alike) reassemble and decode frames, answer unsupported protocol versions
//!   with a negotiation frame, drop peers that send invalid frames or go idle, and forward decoded
//!   messages to the driver through a bounded channel (a slow driver slows the readers down:
//!   backpressure, never an unbounded queue).
//! - Outbound frames go through a bounded per-connection queue. A peer that does not drain its
//!   queue is disconnected rather than buffered for. One encoded model frame is shared by every
//!   client that receives the same task ([`Bytes`], no copy per client).
//! - **Events** go to the [`EventHook`] *before the next input is handled*: a committed round's
//!   privacy charge and checkpoint are made durable there, before any later task can ship the
//!   new model. A hook error halts the driver (no further rounds are started).
//! - **Rounds** start on command, or automatically per [`RoundSchedule`].

use bytes::Bytes;
use starling_proto::codec::{Codec, FrameBuffer, Inbound};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::{ClientMessage, CoordinatorMessage};
use starling_proto::round::{Orchestrator, Phase, RoundEvent, StartError};
use starling_proto::time::Instant as ProtoInstant;
use starling_sdk::transport::Connection;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

/// Limits and queue sizes of the driver.
#[derive(Clone, Debug, PartialEq)]
pub struct DriverConfig {
    /// Most simultaneous connections; more are closed at once with a reason.
    pub max_connections: usize,
    /// Decoded messages waiting for the driver, over all connections.
    pub inbound_queue: usize,
    /// Frames waiting to be written, per connection; a peer that falls further behind is dropped.
    pub outbound_queue: usize,
    /// Largest frame accepted from a peer.
    pub max_frame_bytes: u32,
    /// A connection that sends nothing for this long is closed. A client waiting for selection
    /// or training sends nothing, so keep it above the selection plus report timeouts (the
    /// service does).
    pub idle_timeout: Duration,
    /// Messages accepted per connection per second (beyond it the connection is dropped).
    pub max_messages_per_sec: u32,
    /// Automatic rounds, if any.
    pub schedule: Option<RoundSchedule>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            inbound_queue: 1024,
            outbound_queue: 8,
            max_frame_bytes: starling_proto::codec::DEFAULT_MAX_FRAME_BYTES,
            idle_timeout: Duration::from_secs(120),
            max_messages_per_sec: 20,
            schedule: None,
        }
    }
}

/// When rounds start by themselves.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundSchedule {
    /// Pause between the end of a round and the start of the next.
    pub gap: Duration,
    /// Stop after this many rounds have been started by the schedule.
    pub max_rounds: Option<u64>,
}

/// What the driver reports about itself.
#[derive(Clone, Debug, PartialEq)]
pub struct DriverStatus {
    /// The engine's phase.
    pub phase: Phase,
    /// The round running, if any.
    pub round: Option<RoundId>,
    /// The model version served.
    pub model_version: ModelVersion,
    /// Open connections.
    pub connections: usize,
    /// Rounds committed since the driver started.
    pub rounds_committed: u64,
    /// Rounds failed since the driver started.
    pub rounds_failed: u64,
    /// Connections dropped for bad input, idleness, rate or slowness.
    pub connections_dropped: u64,
    /// Why the driver stopped starting rounds, if it did.
    pub halted: Option<String>,
}

/// Receives every engine event in order, before the driver handles its next input.
pub trait EventHook: Send + 'static {
    /// Persist or report `event`. An error halts the driver's round scheduling and is reported in
    /// [`DriverStatus::halted`].
    fn on_event(&mut self, event: &RoundEvent) -> Result<(), String>;
}

impl<F: FnMut(&RoundEvent) -> Result<(), String> + Send + 'static> EventHook for F {
    fn on_event(&mut self, event: &RoundEvent) -> Result<(), String> {
        self(event)
    }
}

/// Why a command to the driver failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The driver task has stopped.
    #[error("the coordinator driver has stopped")]
    Stopped,
    /// The engine refused to start a round.
    #[error(transparent)]
    Start(#[from] StartError),
}

type ConnId = u64;

enum Command {
    Attach { conn: ConnId, out: mpsc::Sender<Outbound>, reply: oneshot::Sender<bool> },
    Message { conn: ConnId, message: ClientMessage },
    Closed { conn: ConnId, reason: Option<String> },
    StartRound { reply: oneshot::Sender<Result<RoundId, StartError>> },
    Shutdown { reply: oneshot::Sender<()> },
}

enum Outbound {
    Frame(Bytes),
    Close(String),
}

/// A handle on a running driver. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CoordinatorHandle {
    tx: mpsc::Sender<Command>,
    status: watch::Receiver<DriverStatus>,
    events: broadcast::Sender<RoundEvent>,
    next_conn: std::sync::Arc<std::sync::atomic::AtomicU64>,
    config: std::sync::Arc<DriverConfig>,
}

impl CoordinatorHandle {
    /// Serves `conn` until it closes (spawns its connection task).
    pub fn attach<C: Connection>(&self, conn: C) {
        let id = self.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tx = self.tx.clone();
        let config = self.config.clone();
        tokio::spawn(connection_task(conn, id, tx, config));
    }

    /// Starts a round now.
    pub async fn start_round(&self) -> Result<RoundId, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::StartRound { reply }).await.map_err(|_| DriverError::Stopped)?;
        Ok(rx.await.map_err(|_| DriverError::Stopped)??)
    }

    /// The latest status.
    pub fn status(&self) -> DriverStatus {
        self.status.borrow().clone()
    }

    /// Waits for the status to change.
    pub async fn status_changed(&mut self) -> Result<DriverStatus, DriverError> {
        self.status.changed().await.map_err(|_| DriverError::Stopped)?;
        Ok(self.status.borrow_and_update().clone())
    }

    /// Every engine event from now on (a receiver that falls behind skips events).
    pub fn subscribe(&self) -> broadcast::Receiver<RoundEvent> {
        self.events.subscribe()
    }

    /// Aborts the running round, refuses further check-ins and stops the driver.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the driver task owning `engine`. Must be called inside a tokio runtime.
pub fn spawn(engine: Orchestrator, config: DriverConfig, hook: impl EventHook) -> CoordinatorHandle {
    let (tx, rx) = mpsc::channel(config.inbound_queue.max(1));
    let (version, _) = engine.model();
    let status = DriverStatus {
        phase: engine.phase(),
        round: engine.current_round(),
        model_version: version,
        connections: 0,
        rounds_committed: 0,
        rounds_failed: 0,
        connections_dropped: 0,
        halted: None,
    };
    let (status_tx, status_rx) = watch::channel(status);
    let (events, _) = broadcast::channel(1024);
    let driver = Driver {
        engine,
        codec: Codec::new(config.max_frame_bytes),
        schedule: config.schedule.clone(),
        scheduled: 0,
        next_start: config.schedule.as_ref().map(|_| Instant::now()),
        epoch: Instant::now(),
        conns: HashMap::new(),
        clients: HashMap::new(),
        status: status_tx,
        events: events.clone(),
        hook: Box::new(hook),
        shared_frames: HashMap::new(),
    };
    tokio::spawn(driver.run(rx));
    CoordinatorHandle {
        tx,
        status: status_rx,
        events,
        next_conn: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1)),
        config: std::sync::Arc::new(config),
    }
}

struct Conn {
    out: mpsc::Sender<Outbound>,
    client: Option<ClientId>,
}

struct Driver {
    engine: Orchestrator,
    codec: Codec,
    schedule: Option<RoundSchedule>,
    scheduled: u64,
    next_start: Option<Instant>,
    epoch: Instant,
    conns: HashMap<ConnId, Conn>,
    clients: HashMap<ClientId, ConnId>,
    status: watch::Sender<DriverStatus>,
    events: broadcast::Sender<RoundEvent>,
    hook: Box<dyn EventHook>,
    /// Encoded task frames of the current round, shared by every recipient of the same task.
    shared_frames: HashMap<(RoundId, Option<ModelVersion>), Bytes>,
}

impl Driver {
    fn now(&self) -> ProtoInstant {
        ProtoInstant::from_micros(self.epoch.elapsed().as_micros().min(u128::from(u64::MAX)) as u64)
    }

    fn at(&self, t: ProtoInstant) -> Instant {
        self.epoch + Duration::from_micros(t.as_micros())
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut shutdown_reply = None;
        loop {
            let engine_timer = self.engine.poll_timeout().map(|t| self.at(t));
            let start_timer =
                if self.engine.current_round().is_none() && self.status.borrow().halted.is_none() {
                    self.next_start
                } else {
                    None
                };
            let timer = match (engine_timer, start_timer) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => break,
                    Some(Command::Shutdown { reply }) => {
                        let now = self.now();
                        self.engine.shutdown(now);
                        shutdown_reply = Some(reply);
                    }
                    Some(cmd) => self.handle(cmd),
                },
                _ = tokio::time::sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                    let now = self.now();
                    self.engine.handle_timeout(now);
                    if start_timer.is_some_and(|t| Instant::now() >= t) {
                        self.scheduled_start();
                    }
                }
            }
            self.drain();
            if let Some(reply) = shutdown_reply.take() {
                for conn in self.conns.values() {
                    let _ = conn.out.try_send(Outbound::Close("coordinator shutting down".into()));
                }
                let _ = reply.send(());
                break;
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        let now = self.now();
        match cmd {
            Command::Attach { conn, out, reply } => {
                self.conns.insert(conn, Conn { out, client: None });
                let _ = reply.send(true);
                self.status.send_modify(|s| s.connections = self.conns.len());
            }
            Command::Message { conn, message } => {
                let Some(c) = self.conns.get_mut(&conn) else { return };
                let claimed = match &message {
                    ClientMessage::CheckIn(ci) => Some(ci.client),
                    _ => None,
                };
                let client = match (c.client, claimed) {
                    // A connection speaks for one client only.
                    (Some(bound), Some(claim)) if bound != claim => {
                        self.drop_conn(conn, "a connection may not speak for two clients");
                        return;
                    }
                    (Some(bound), _) => bound,
                    (None, Some(claim)) => {
                        c.client = Some(claim);
                        // A newer connection for the same client replaces the older one.
                        if let Some(old) = self.clients.insert(claim, conn)
                            && old != conn
                            && let Some(o) = self.conns.get_mut(&old)
                        {
                            o.client = None;
                            let _ = o.out.try_send(Outbound::Close("replaced by a newer connection".into()));
                        }
                        claim
                    }
                    (None, None) => {
                        self.drop_conn(conn, "the first message must be a check-in");
                        return;
                    }
                };
                self.engine.handle_message(now, client, message);
            }
            Command::Closed { conn, reason } => {
                if let Some(c) = self.conns.remove(&conn) {
                    if reason.is_some() {
                        self.status.send_modify(|s| s.connections_dropped += 1);
                    }
                    if let Some(client) = c.client
                        && self.clients.get(&client) == Some(&conn)
                    {
                        self.clients.remove(&client);
                        self.engine.handle_disconnect(now, client);
                    }
                }
                self.status.send_modify(|s| s.connections = self.conns.len());
            }
            Command::StartRound { reply } => {
                let r = self.engine.start_round(now);
                let _ = reply.send(r);
            }
            Command::Shutdown { .. } => unreachable!("handled by the run loop"),
        }
    }

    fn scheduled_start(&mut self) {
        let Some(schedule) = &self.schedule else { return };
        if schedule.max_rounds.is_some_and(|m| self.scheduled >= m) {
            self.next_start = None;
            return;
        }
        let now = self.now();
        match self.engine.start_round(now) {
            Ok(_) => {
                self.scheduled += 1;
                self.next_start = None;
            }
            Err(StartError::Busy(_)) => self.next_start = None,
            Err(e) => {
                tracing::warn!(error = %e, "round refused; no more rounds will be started");
                self.next_start = None;
                self.status.send_modify(|s| s.halted = Some(e.to_string()));
            }
        }
    }

    fn drop_conn(&mut self, conn: ConnId, reason: &str) {
        if let Some(c) = self.conns.get(&conn) {
            tracing::debug!(conn, reason, "dropping connection");
            let _ = c.out.try_send(Outbound::Close(reason.into()));
        }
    }

    fn drain(&mut self) {
        while let Some(t) = self.engine.poll_transmit() {
            let Some(&conn) = self.clients.get(&t.to) else { continue };
            let frame = match self.frame_for(&t.message) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, client = t.to.0, "cannot encode a message");
                    continue;
                }
            };
            let Some(c) = self.conns.get(&conn) else { continue };
            if c.out.try_send(Outbound::Frame(frame)).is_err() {
                // The peer is not draining its queue: drop it rather than buffer for it.
                let _ = c.out.try_send(Outbound::Close("too slow".into()));
                self.clients.remove(&t.to);
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.client = None;
                }
                let now = self.now();
                self.engine.handle_disconnect(now, t.to);
                self.status.send_modify(|s| s.connections_dropped += 1);
            }
        }
        let mut changed = false;
        while let Some(event) = self.engine.poll_event() {
            changed = true;
            if let Err(e) = self.hook.on_event(&event) {
                tracing::error!(error = %e, "event hook failed; halting round scheduling");
                self.status.send_modify(|s| s.halted = Some(e));
            }
            match &event {
                RoundEvent::Committed(_) | RoundEvent::Failed { .. } => {
                    let committed = matches!(event, RoundEvent::Committed(_));
                    let (version, _) = self.engine.model();
                    // One update, so a watcher never sees the count without the new version.
                    self.status.send_modify(|s| {
                        if committed {
                            s.rounds_committed += 1
                        } else {
                            s.rounds_failed += 1
                        }
                        s.model_version = version;
                    });
                    self.shared_frames.clear();
                    if let Some(s) = &self.schedule {
                        self.next_start = Some(Instant::now() + s.gap);
                    }
                }
                _ => {}
            }
            let _ = self.events.send(event);
        }
        if changed {
            let (version, _) = self.engine.model();
            let (phase, round) = (self.engine.phase(), self.engine.current_round());
            self.status.send_modify(|s| {
                s.phase = phase;
                s.round = round;
                s.model_version = version;
            });
        }
    }

    fn frame_for(
        &mut self,
        message: &CoordinatorMessage,
    ) -> Result<Bytes, starling_proto::codec::EncodeError> {
        if let CoordinatorMessage::Task(task) = message {
            let base = match &task.model {
                starling_proto::message::ModelPayload::Patch { from, .. } => Some(*from),
                _ => None,
            };
            let key = (task.round, base);
            if let Some(f) = self.shared_frames.get(&key) {
                return Ok(f.clone());
            }
            let f = Bytes::from(self.codec.encode_coordinator(message)?);
            self.shared_frames.insert(key, f.clone());
            return Ok(f);
        }
        Ok(Bytes::from(self.codec.encode_coordinator(message)?))
    }
}

async fn connection_task<C: Connection>(
    mut conn: C,
    id: ConnId,
    driver: mpsc::Sender<Command>,
    config: std::sync::Arc<DriverConfig>,
) {
    let (out_tx, mut out_rx) = mpsc::channel(config.outbound_queue.max(1));
    let (reply, accepted) = oneshot::channel();
    if driver.send(Command::Attach { conn: id, out: out_tx, reply }).await.is_err()
        || accepted.await != Ok(true)
    {
        conn.close("coordinator unavailable").await;
        return;
    }
    let codec = Codec::new(config.max_frame_bytes);
    let mut frames = FrameBuffer::new(codec);
    let mut window = (Instant::now(), 0u32);
    let reason: Option<String> = 'serve: loop {
        tokio::select! {
            received = tokio::time::timeout(config.idle_timeout, conn.recv()) => {
                let bytes = match received {
                    Err(_) => break 'serve Some("idle timeout".into()),
                    Ok(Err(e)) => break 'serve Some(e.to_string()),
                    Ok(Ok(None)) => break 'serve None,
                    Ok(Ok(Some(bytes))) => bytes,
                };
                frames.push(&bytes);
                loop {
                    match frames.next_client() {
                        Ok(None) => break,
                        Ok(Some(Inbound::Message { message, .. })) => {
                            let now = Instant::now();
                            if now.duration_since(window.0) >= Duration::from_secs(1) {
                                window = (now, 0);
                            }
                            window.1 += 1;
                            if window.1 > config.max_messages_per_sec {
                                break 'serve Some("rate limit exceeded".into());
                            }
                            if driver.send(Command::Message { conn: id, message }).await.is_err() {
                                break 'serve Some("coordinator stopped".into());
                            }
                        }
                        Ok(Some(Inbound::UnsupportedVersion { version })) => {
                            let _ = conn.send(Bytes::from(codec.encode_version_negotiation())).await;
                            break 'serve Some(format!("unsupported protocol version {version}"));
                        }
                        Ok(Some(Inbound::VersionNegotiation { .. })) => {
                            break 'serve Some("unexpected version negotiation from a client".into());
                        }
                        Err(e) => break 'serve Some(format!("invalid frame: {e}")),
                    }
                }
            }
            out = out_rx.recv() => match out {
                Some(Outbound::Frame(frame)) => {
                    if let Err(e) = conn.send(frame).await {
                        break 'serve Some(e.to_string());
                    }
                }
                Some(Outbound::Close(reason)) => break 'serve Some(reason),
                None => break 'serve None,
            }
        }
    };
    if let Some(r) = &reason {
        tracing::debug!(conn = id, reason = %r, "connection closed");
    }
    conn.close(reason.as_deref().unwrap_or("done")).await;
    let _ = driver.send(Command::Closed { conn: id, reason }).await;
}

/// Accepts in-process connections from `listener` until it closes.
pub async fn serve_memory(
    mut listener: starling_sdk::transport::memory::MemoryListener,
    handle: CoordinatorHandle,
) {
    while let Some(conn) = listener.accept().await {
        if handle.status().connections >= handle.config.max_connections {
            let mut conn = conn;
            conn.close("too many connections").await;
            continue;
        }
        handle.attach(conn);
    }
}
