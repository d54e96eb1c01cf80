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
//!   peers are served alike; see `driver/connection.rs`) reassemble and decode frames under the peer's
//!   current limits, answer unsupported protocol versions with a negotiation frame, enforce the
//!   check-in, frame, send and silence deadlines, and forward decoded messages to the driver
//!   through a bounded channel (a slow driver slows the readers down: backpressure, never an
//!   unbounded queue).
//! - **Authentication happens here, before a connection speaks for anyone**: a check-in's
//!   credential is verified by the [`Authenticator`] *before* the connection is bound to the
//!   client it names. A refused check-in gets `Refusal::Unauthenticated` and its connection is
//!   closed; it never displaces the client's live connection and is never sent anything meant
//!   for that client. Only a verified check-in may replace an older connection of the same
//!   client. The credential is verified again with every update, and [`CoordinatorHandle::reverify`]
//!   re-checks every bound connection (the service calls it after reloading revocations), closing
//!   those whose credential was revoked or expired and counting them as dropouts.
//! - Outbound frames go through a bounded per-connection queue. A peer that does not drain its
//!   queue is disconnected rather than buffered for. One encoded model frame is shared by every
//!   client that receives the same task ([`Bytes`], no copy per client).
//! - **Events** go to the [`EventHook`] *before the next input is handled*; events the hook marks
//!   [`blocking`](EventHook::blocking) (storage with fsync) run on tokio's blocking pool, so the
//!   runtime's threads keep serving connections meanwhile. A committed round's privacy charge and
//!   checkpoint are made durable there, before any later task can ship the new model. A hook
//!   error halts the driver (no further rounds are started, on schedule or on command); if it
//!   failed to record a round's start the round is aborted before any task is sent, and if it
//!   failed to record a commit the engine reverts to the previous model, so a model that was
//!   not recorded is never served and the status keeps showing the recorded version.
//! - **Rounds** start on command, or automatically per [`RoundSchedule`]: with
//!   [`RoundSchedule::evaluate_every`] = N, every N committed training rounds are followed by one
//!   federated-evaluation round ([`Orchestrator::start_evaluation`]). An evaluation the engine
//!   refuses (unsupported, or a privacy budget that cannot afford it) is skipped with a warning
//!   and the schedule goes on with training: only a refused *training* round halts it. An
//!   evaluation's figures reach subscribers only once the hook recorded them (with their
//!   privacy charge).

mod connection;
mod handle;

pub use handle::CoordinatorHandle;

use bytes::Bytes;
use starling_proto::codec::Codec;
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::{ClientMessage, CoordinatorMessage, Refusal};
use starling_proto::round::{Orchestrator, Phase, RoundEvent, ShardOutcome, ShardSpec, StartError};
use starling_proto::secagg::{SecAggClientMessage, SecAggServerMessage};
use starling_proto::strategy::StrategyState;
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
    /// Largest frame accepted from a client that has been sent a task (its update).
    pub max_frame_bytes: u32,
    /// Largest frame accepted from any other peer: before its check-in verified, and while it
    /// holds no task. A frame header announcing more closes the connection before the body is
    /// buffered.
    pub unauthenticated_max_frame_bytes: u32,
    /// A connection whose check-in has not verified this long after it attached is closed.
    pub checkin_timeout: Duration,
    /// A frame whose first bytes arrived must be complete within this (slow-loris).
    pub frame_timeout: Duration,
    /// A frame must be written to the peer within this (a peer that stops reading).
    pub send_timeout: Duration,
    /// A connection that sends no complete message for this long is closed. A client waiting
    /// for selection or training sends nothing, so keep it above the selection plus report
    /// timeouts (the service does).
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
            unauthenticated_max_frame_bytes: 16 << 10,
            checkin_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(10),
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
    /// Stop after this many (training) rounds have been started by the schedule.
    pub max_rounds: Option<u64>,
    /// Run a federated-evaluation round after every this many committed training rounds
    /// (0 = never). Evaluation rounds do not count towards `max_rounds`.
    pub evaluate_every: u64,
    /// Training rounds already begun before this start (a restart continues the count that
    /// `max_rounds` limits; the service reads it from its store).
    pub already_started: u64,
    /// Training rounds committed since the last evaluation round, before this start.
    pub committed_since_evaluation: u64,
    /// Start paused: no round starts by itself until [`CoordinatorHandle::set_paused`] resumes
    /// (an operator's pause survives restarts).
    pub paused: bool,
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
    /// Rounds failed since the driver started (training and evaluation).
    pub rounds_failed: u64,
    /// Evaluation rounds that released their figures since the driver started.
    pub rounds_evaluated: u64,
    /// Connections dropped for bad input, idleness, rate or slowness.
    pub connections_dropped: u64,
    /// Check-ins whose credential did not verify (their connections were closed).
    pub unauthenticated: u64,
    /// Bound connections closed because their credential was revoked or expired.
    pub revoked: u64,
    /// Why the driver stopped starting rounds, if it did.
    pub halted: Option<String>,
    /// N, the enrolled population the engine was last told ([`CoordinatorHandle::set_population`]).
    pub population: Option<u64>,
    /// The schedule is paused: rounds start only on command.
    pub paused: bool,
    /// The node is draining: new connections are refused and no round starts.
    pub draining: bool,
}

/// Receives every engine event in order, before the driver handles its next input.
pub trait EventHook: Send + 'static {
    /// Persist or report `event`. An error halts the driver's round scheduling and is reported in
    /// [`DriverStatus::halted`].
    fn on_event(&mut self, event: &RoundEvent) -> Result<(), String>;

    /// Whether handling `event` blocks (disk writes, fsync): such events are handed to tokio's
    /// blocking pool, and the driver waits for them before its next input.
    fn blocking(&self, _event: &RoundEvent) -> bool {
        false
    }

    /// Records durably that checkpoint `source` is served again as `version` (an operator's
    /// rollback) and returns its model and strategy state. Called by the driver between rounds;
    /// the default refuses (no store).
    fn install_checkpoint(
        &mut self,
        version: ModelVersion,
        source: ModelVersion,
    ) -> Result<(Vec<f32>, Option<starling_proto::strategy::StrategyState>), String> {
        let _ = (version, source);
        Err("this coordinator keeps no checkpoints".into())
    }
}

impl EventHook for Box<dyn EventHook> {
    fn on_event(&mut self, event: &RoundEvent) -> Result<(), String> {
        (**self).on_event(event)
    }
    fn blocking(&self, event: &RoundEvent) -> bool {
        (**self).blocking(event)
    }
    fn install_checkpoint(
        &mut self,
        version: ModelVersion,
        source: ModelVersion,
    ) -> Result<(Vec<f32>, Option<starling_proto::strategy::StrategyState>), String> {
        (**self).install_checkpoint(version, source)
    }
}

/// Verifies a check-in's credential for the client it names. `Err` carries the reason, for
/// logs and metrics; on the wire every failure is `Refusal::Unauthenticated`.
pub trait Authenticator: Send + Sync + 'static {
    /// Whether `credential` lets its holder speak for `client` now.
    fn verify(&self, client: ClientId, credential: &[u8]) -> Result<(), String>;
}

/// Accepts every credential (in-process fleets and tests; never the service).
#[derive(Clone, Copy, Debug, Default)]
pub struct AcceptAll;

impl Authenticator for AcceptAll {
    fn verify(&self, _client: ClientId, _credential: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

impl<F: Fn(ClientId, &[u8]) -> Result<(), String> + Send + Sync + 'static> Authenticator for F {
    fn verify(&self, client: ClientId, credential: &[u8]) -> Result<(), String> {
        self(client, credential)
    }
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
    /// The driver halted after a storage (hook) failure and starts no rounds.
    #[error("the coordinator is halted: {0}")]
    Halted(String),
    /// A rollback was refused (a round is running, the checkpoint is not kept, …).
    #[error("cannot install the checkpoint: {0}")]
    Install(String),
    /// The leader's shares could not be handed to the engine.
    #[error(transparent)]
    Shares(#[from] starling_proto::round::SharesError),
}

/// Bytes of frames received from and sent to clients, over every connection.
#[derive(Debug, Default)]
pub struct ByteStats {
    /// Received.
    pub received: std::sync::atomic::AtomicU64,
    /// Sent.
    pub sent: std::sync::atomic::AtomicU64,
}

/// What a node of a cluster runs: its engine, its event hook and its schedule (the leader's) or
/// none (a follower's). See [`CoordinatorHandle::replace`].
pub struct Role {
    /// The engine.
    pub engine: Orchestrator,
    /// The hook its events go to.
    pub hook: Box<dyn EventHook>,
    /// Automatic rounds (the leader's), if any.
    pub schedule: Option<RoundSchedule>,
}

type ConnId = u64;

enum Command {
    Attach {
        conn: ConnId,
        out: mpsc::Sender<Outbound>,
        reply: oneshot::Sender<bool>,
    },
    Message {
        conn: ConnId,
        message: ClientMessage,
    },
    Closed {
        conn: ConnId,
        reason: Option<String>,
    },
    StartRound {
        reply: oneshot::Sender<Result<RoundId, DriverError>>,
    },
    Reverify {
        reply: oneshot::Sender<usize>,
    },
    SetPopulation {
        n: u64,
    },
    SetPaused {
        paused: bool,
    },
    Drain,
    Install {
        source: ModelVersion,
        reply: oneshot::Sender<Result<ModelVersion, DriverError>>,
    },
    StartShard {
        spec: ShardSpec,
        reply: oneshot::Sender<Result<(), DriverError>>,
    },
    ShardSpec {
        reply: oneshot::Sender<Option<ShardSpec>>,
    },
    Shares {
        round: RoundId,
        shares: Vec<ShardOutcome>,
        reply: oneshot::Sender<Result<usize, DriverError>>,
    },
    Adopt {
        version: ModelVersion,
        model: Vec<f32>,
        state: Option<StrategyState>,
        reply: oneshot::Sender<Result<(), DriverError>>,
    },
    ClusterNodes {
        nodes: Option<usize>,
    },
    Replace {
        role: Box<Role>,
        reply: oneshot::Sender<()>,
    },
    Demote {
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

enum Outbound {
    /// A frame to write; `upload` lets the peer send one model-sized frame (it was sent a task).
    Frame {
        bytes: Bytes,
        upload: bool,
    },
    /// The peer's check-in verified: its check-in deadline is lifted.
    Authenticated,
    Close(String),
}

/// Starts the driver task owning `engine`, accepting every credential ([`AcceptAll`]). Must be
/// called inside a tokio runtime.
pub fn spawn(engine: Orchestrator, config: DriverConfig, hook: impl EventHook) -> CoordinatorHandle {
    spawn_with_auth(engine, config, hook, std::sync::Arc::new(AcceptAll))
}

/// Starts the driver task owning `engine`, verifying check-ins with `auth`. Must be called
/// inside a tokio runtime.
pub fn spawn_with_auth(
    engine: Orchestrator,
    config: DriverConfig,
    hook: impl EventHook,
    auth: std::sync::Arc<dyn Authenticator>,
) -> CoordinatorHandle {
    let (tx, rx) = mpsc::channel(config.inbound_queue.max(1));
    let (version, _) = engine.model();
    let status = DriverStatus {
        phase: engine.phase(),
        round: engine.current_round(),
        model_version: version,
        connections: 0,
        rounds_committed: 0,
        rounds_failed: 0,
        rounds_evaluated: 0,
        connections_dropped: 0,
        unauthenticated: 0,
        revoked: 0,
        halted: None,
        population: None,
        paused: config.schedule.as_ref().is_some_and(|s| s.paused),
        draining: false,
    };
    let (status_tx, status_rx) = watch::channel(status);
    let (events, _) = broadcast::channel(1024);
    let driver = Driver {
        engine,
        codec: Codec::new(config.max_frame_bytes),
        schedule: config.schedule.clone(),
        scheduled: config.schedule.as_ref().map_or(0, |s| s.already_started),
        committed_since_evaluation: config.schedule.as_ref().map_or(0, |s| s.committed_since_evaluation),
        next_start: config.schedule.as_ref().map(|_| Instant::now()),
        epoch: Instant::now(),
        conns: HashMap::new(),
        clients: HashMap::new(),
        status: status_tx,
        events: events.clone(),
        hook: Some(Box::new(hook)),
        auth,
        max_connections: config.max_connections,
        shared_frames: HashMap::new(),
    };
    tokio::spawn(driver.run(rx));
    CoordinatorHandle {
        tx,
        status: status_rx,
        events,
        next_conn: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1)),
        bytes: std::sync::Arc::new(ByteStats::default()),
        config: std::sync::Arc::new(config),
    }
}

struct Conn {
    out: mpsc::Sender<Outbound>,
    /// The client this connection speaks for: set only once a check-in's credential verified.
    client: Option<ClientId>,
    /// The credential that verified (checked again with every update and on [`Command::Reverify`]).
    credential: Vec<u8>,
}

struct Driver {
    engine: Orchestrator,
    codec: Codec,
    schedule: Option<RoundSchedule>,
    scheduled: u64,
    /// Training rounds committed since the last evaluation round (or start).
    committed_since_evaluation: u64,
    next_start: Option<Instant>,
    epoch: Instant,
    conns: HashMap<ConnId, Conn>,
    clients: HashMap<ClientId, ConnId>,
    status: watch::Sender<DriverStatus>,
    events: broadcast::Sender<RoundEvent>,
    /// `None` only while a blocking event is being handled on the blocking pool (or after the
    /// hook panicked there).
    hook: Option<Box<dyn EventHook>>,
    auth: std::sync::Arc<dyn Authenticator>,
    max_connections: usize,
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
            let start_timer = {
                let s = self.status.borrow();
                if self.engine.current_round().is_none() && s.halted.is_none() && !s.paused && !s.draining {
                    self.next_start
                } else {
                    None
                }
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
            self.drain().await;
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
                if self.conns.len() >= self.max_connections || self.status.borrow().draining {
                    let _ = reply.send(false);
                    return;
                }
                self.conns.insert(conn, Conn { out, client: None, credential: Vec::new() });
                let _ = reply.send(true);
                self.status.send_modify(|s| s.connections = self.conns.len());
            }
            Command::Message { conn, message } => self.handle_message(conn, message),
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
                let r = match self.status.borrow().halted.clone() {
                    Some(why) => Err(DriverError::Halted(why)),
                    None => self.engine.start_round(now).map_err(DriverError::from),
                };
                let _ = reply.send(r);
            }
            Command::Reverify { reply } => {
                let bound: Vec<(ConnId, ClientId)> =
                    self.conns.iter().filter_map(|(id, c)| c.client.map(|client| (*id, client))).collect();
                let mut closed = 0;
                for (conn, client) in bound {
                    let verdict = self.auth.verify(client, &self.conns[&conn].credential);
                    if let Err(why) = verdict {
                        self.unbind(conn, &format!("credential no longer valid: {why}"));
                        closed += 1;
                    }
                }
                if closed > 0 {
                    self.status.send_modify(|s| s.revoked += closed as u64);
                }
                let _ = reply.send(closed);
            }
            Command::SetPopulation { n } => {
                self.engine.set_population(n);
                self.status.send_modify(|s| s.population = Some(n));
            }
            Command::SetPaused { paused } => {
                self.status.send_modify(|s| s.paused = paused);
                if !paused && self.next_start.is_none() && self.schedule.is_some() {
                    self.next_start = Some(Instant::now());
                }
            }
            Command::Drain => self.status.send_modify(|s| s.draining = true),
            Command::Install { source, reply } => {
                let _ = reply.send(self.install(source));
            }
            Command::StartShard { spec, reply } => {
                let r = match self.status.borrow().halted.clone() {
                    Some(why) => Err(DriverError::Halted(why)),
                    None => self.engine.start_shard(now, &spec).map_err(DriverError::from),
                };
                let _ = reply.send(r);
            }
            Command::ShardSpec { reply } => {
                let _ = reply.send(self.engine.shard_spec());
            }
            Command::Shares { round, shares, reply } => {
                let _ = reply.send(self.engine.handle_shares(now, round, shares).map_err(DriverError::from));
            }
            Command::Adopt { version, model, state, reply } => {
                let r = self
                    .engine
                    .adopt_model(version, model, state.as_ref())
                    .map_err(|e| DriverError::Install(e.to_string()));
                if r.is_ok() {
                    self.shared_frames.clear();
                    self.status.send_modify(|s| s.model_version = version);
                }
                let _ = reply.send(r);
            }
            Command::ClusterNodes { nodes } => self.engine.set_cluster_nodes(nodes),
            Command::Replace { role, reply } => {
                // The old engine's round ends here: its training clients are told, and nothing
                // of it reaches either hook (the new role's store decides what it was).
                self.engine.abort_round(now, "this node's role in the cluster changed");
                self.send_transmits();
                while self.engine.poll_event().is_some() {}
                let Role { engine, hook, schedule } = *role;
                self.engine = engine;
                self.hook = Some(hook);
                self.scheduled = schedule.as_ref().map_or(0, |s| s.already_started);
                self.committed_since_evaluation =
                    schedule.as_ref().map_or(0, |s| s.committed_since_evaluation);
                self.next_start = schedule.as_ref().map(|_| Instant::now());
                let paused = schedule.as_ref().is_some_and(|s| s.paused);
                self.schedule = schedule;
                self.shared_frames.clear();
                let (version, _) = self.engine.model();
                let (phase, round) = (self.engine.phase(), self.engine.current_round());
                self.status.send_modify(|s| {
                    s.halted = None;
                    s.paused = paused;
                    s.model_version = version;
                    s.phase = phase;
                    s.round = round;
                });
                let _ = reply.send(());
            }
            Command::Demote { reply } => {
                self.engine.abort_round(now, "this node is no longer the cluster's leader");
                self.send_transmits();
                while self.engine.poll_event().is_some() {}
                self.engine.set_cluster_nodes(None);
                self.schedule = None;
                self.next_start = None;
                let (phase, round) = (self.engine.phase(), self.engine.current_round());
                // A storage failure of the leader's term (a commit the fence refused) is not the
                // follower's: it writes nothing.
                self.status.send_modify(|s| {
                    s.phase = phase;
                    s.round = round;
                    s.halted = None;
                });
                let _ = reply.send(());
            }
            Command::Shutdown { .. } => unreachable!("handled by the run loop"),
        }
    }

    /// A message from `conn`: authentication and binding first, then the engine.
    fn handle_message(&mut self, conn: ConnId, message: ClientMessage) {
        let now = self.now();
        let Some(c) = self.conns.get(&conn) else { return };
        let client = match (c.client, &message) {
            (None, ClientMessage::CheckIn(check_in)) => {
                let claim = check_in.client;
                if let Err(why) = self.auth.verify(claim, &check_in.credential) {
                    tracing::debug!(conn, client = claim.0, reason = %why, "check-in refused");
                    self.refuse_unauthenticated(conn);
                    return;
                }
                self.bind(conn, claim, check_in.credential.clone());
                claim
            }
            (None, _) => return self.drop_conn(conn, "the first message must be a check-in"),
            (Some(bound), ClientMessage::CheckIn(check_in)) => {
                if check_in.client != bound {
                    return self.drop_conn(conn, "a connection may not speak for two clients");
                }
                if let Err(why) = self.auth.verify(bound, &check_in.credential) {
                    tracing::debug!(conn, client = bound.0, reason = %why, "check-in refused");
                    self.unbind(conn, "unauthenticated");
                    self.status.send_modify(|s| s.unauthenticated += 1);
                    return;
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.credential.clone_from(&check_in.credential);
                }
                bound
            }
            (
                Some(bound),
                ClientMessage::Update(_) | ClientMessage::SecAgg(SecAggClientMessage::Masked(_)),
            ) => {
                // Revocation and expiry take effect at the latest here, not only at check-in.
                if let Err(why) = self.auth.verify(bound, &c.credential) {
                    self.unbind(conn, &format!("credential no longer valid: {why}"));
                    self.status.send_modify(|s| s.revoked += 1);
                    return;
                }
                bound
            }
            (Some(bound), _) => bound,
        };
        self.engine.handle_message(now, client, message);
    }

    /// `conn` now speaks for `client` (its credential verified). It replaces an older connection
    /// of the same client, which is closed without counting as a dropout: the client goes on
    /// over the new one.
    fn bind(&mut self, conn: ConnId, client: ClientId, credential: Vec<u8>) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.client = Some(client);
            c.credential = credential;
            let _ = c.out.try_send(Outbound::Authenticated);
        }
        if let Some(old) = self.clients.insert(client, conn)
            && old != conn
            && let Some(o) = self.conns.get_mut(&old)
        {
            o.client = None;
            let _ = o.out.try_send(Outbound::Close("replaced by a newer connection".into()));
        }
    }

    /// Closes `conn`, which no longer speaks for its client; a client that was training counts
    /// as dropped out.
    fn unbind(&mut self, conn: ConnId, reason: &str) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        let client = c.client.take();
        let _ = c.out.try_send(Outbound::Close(reason.into()));
        if let Some(client) = client
            && self.clients.get(&client) == Some(&conn)
        {
            self.clients.remove(&client);
            let now = self.now();
            self.engine.handle_disconnect(now, client);
        }
    }

    /// Answers a check-in whose credential did not verify, then closes its connection.
    fn refuse_unauthenticated(&mut self, conn: ConnId) {
        self.status.send_modify(|s| s.unauthenticated += 1);
        let Some(c) = self.conns.get(&conn) else { return };
        if let Ok(frame) =
            self.codec.encode_coordinator(&CoordinatorMessage::Refusal(Refusal::Unauthenticated))
        {
            let _ = c.out.try_send(Outbound::Frame { bytes: Bytes::from(frame), upload: false });
        }
        let _ = c.out.try_send(Outbound::Close("unauthenticated".into()));
    }

    /// An operator's rollback: recorded by the hook, then served. See
    /// [`CoordinatorHandle::install_checkpoint`].
    fn install(&mut self, source: ModelVersion) -> Result<ModelVersion, DriverError> {
        if let Some(r) = self.engine.current_round() {
            return Err(DriverError::Install(format!(
                "{r} is running: pause, wait for it to end, then roll back"
            )));
        }
        if let Some(why) = self.status.borrow().halted.clone() {
            return Err(DriverError::Halted(why));
        }
        let (current, _) = self.engine.model();
        let version = current.next();
        let Some(hook) = self.hook.as_mut() else {
            return Err(DriverError::Install("the event hook was lost after a panic".into()));
        };
        let (model, state) = hook.install_checkpoint(version, source).map_err(DriverError::Install)?;
        // Recorded: from here the engine must serve it. The model was validated by the store
        // (shape, finite values); a state that no longer fits the configured strategy is
        // dropped (the optimizer starts afresh), which cannot make the install fail.
        let installed = match self.engine.install_model(model.clone(), state.as_ref()) {
            Err(starling_proto::round::InstallError::State(e)) => {
                tracing::warn!(error = %e, "the checkpoint's strategy state does not fit; starting it afresh");
                self.engine.install_model(model, None)
            }
            other => other,
        };
        match installed {
            Ok(v) => {
                self.status.send_modify(|s| s.model_version = v);
                Ok(v)
            }
            Err(e) => {
                // Recorded but not served: nothing may be committed over it.
                let why = format!("rollback recorded as {version} but not served: {e}");
                self.status.send_modify(|s| s.halted = Some(why.clone()));
                Err(DriverError::Install(why))
            }
        }
    }

    fn scheduled_start(&mut self) {
        let Some(schedule) = &self.schedule else { return };
        let done = schedule.max_rounds.is_some_and(|m| self.scheduled >= m);
        let now = self.now();
        let every = schedule.evaluate_every;
        if every > 0 && self.committed_since_evaluation >= every {
            self.committed_since_evaluation = 0;
            match self.engine.start_evaluation(now) {
                Ok(_) => {
                    self.next_start = None;
                    return;
                }
                Err(StartError::Busy(_)) => {
                    self.next_start = None;
                    return;
                }
                // Only this evaluation is skipped: training goes on (a training round the
                // budget cannot afford halts the schedule below, on its own admission).
                Err(e) => tracing::warn!(error = %e, "evaluation round refused; training goes on"),
            }
        }
        // The evaluation owed after the last scheduled round still runs (above); no more training.
        if done {
            self.next_start = None;
            return;
        }
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

    /// Hands `event` to the hook: on the blocking pool when the hook says it blocks.
    async fn run_hook(&mut self, event: &RoundEvent) -> Result<(), String> {
        let Some(mut hook) = self.hook.take() else {
            return Err("the event hook was lost after a panic".into());
        };
        if !hook.blocking(event) {
            let r = hook.on_event(event);
            self.hook = Some(hook);
            return r;
        }
        let owned = event.clone();
        match tokio::task::spawn_blocking(move || {
            let r = hook.on_event(&owned);
            (hook, r)
        })
        .await
        {
            Ok((hook, r)) => {
                self.hook = Some(hook);
                r
            }
            Err(e) => Err(format!("the event hook panicked: {e}")),
        }
    }

    async fn drain(&mut self) {
        loop {
            self.send_transmits();
            let Some(event) = self.engine.poll_event() else { break };
            let hooked = self.run_hook(&event).await;
            let mut committed = matches!(event, RoundEvent::Committed(_));
            // An evaluation's figures are released only once recorded (with their charge).
            let evaluated = matches!(event, RoundEvent::Evaluated(_)) && hooked.is_ok();
            if let Err(e) = &hooked {
                tracing::error!(error = %e, "event hook failed; halting round scheduling");
                // The first failure is the cause; later ones (e.g. recording the abort) follow from it.
                self.status.send_modify(|s| {
                    s.halted.get_or_insert_with(|| e.clone());
                });
                let now = self.now();
                match &event {
                    // The round's start is not on record: no task of it may leave.
                    RoundEvent::Started { .. } => {
                        self.engine.abort_round(now, format!("the round's start was not recorded: {e}"))
                    }
                    // The commit is not on record: the new model must never be served.
                    RoundEvent::Committed(_) => committed = !self.engine.revert_commit(),
                    _ => {}
                }
            }
            if let RoundEvent::Committed(_) | RoundEvent::Failed { .. } | RoundEvent::Evaluated(_) = &event {
                let (version, _) = self.engine.model();
                if committed {
                    self.committed_since_evaluation += 1;
                }
                // One update, so a watcher never sees the count without the new version.
                self.status.send_modify(|s| {
                    if committed {
                        s.rounds_committed += 1
                    } else if evaluated {
                        s.rounds_evaluated += 1
                    } else {
                        // Failed, or a commit or evaluation the hook could not record.
                        s.rounds_failed += 1
                    }
                    s.model_version = version;
                });
                self.shared_frames.clear();
                if let Some(s) = &self.schedule {
                    self.next_start = Some(Instant::now() + s.gap);
                }
            }
            let (version, _) = self.engine.model();
            let (phase, round) = (self.engine.phase(), self.engine.current_round());
            self.status.send_modify(|s| {
                s.phase = phase;
                s.round = round;
                s.model_version = version;
            });
            // Subscribers see the commit only if it stands, an evaluation only if recorded.
            let unreleased = matches!(event, RoundEvent::Committed(_)) && !committed
                || matches!(event, RoundEvent::Evaluated(_)) && !evaluated;
            if !unreleased {
                let _ = self.events.send(event);
            }
        }
    }

    fn send_transmits(&mut self) {
        while let Some(t) = self.engine.poll_transmit() {
            let Some(&conn) = self.clients.get(&t.to) else { continue };
            // Messages after which the client sends its (model-sized) update or masked input.
            let upload = matches!(
                t.message,
                CoordinatorMessage::Task(_)
                    | CoordinatorMessage::SecAgg(
                        SecAggServerMessage::Neighbourhood(_) | SecAggServerMessage::RoutedShares(_)
                    )
            );
            let frame = match self.frame_for(&t.message) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, client = t.to.0, "cannot encode a message");
                    continue;
                }
            };
            let Some(c) = self.conns.get(&conn) else { continue };
            if c.out.try_send(Outbound::Frame { bytes: frame, upload }).is_err() {
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
