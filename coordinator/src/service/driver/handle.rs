//! [`CoordinatorHandle`]: what the rest of the service holds of a running driver — attach a
//! connection, send a command (start a round, pause, drain, roll back; a cluster node's shares,
//! adoptions and role changes), read the status, subscribe to events.

use super::{ByteStats, Command, DriverConfig, DriverError, DriverStatus, Role, connection};
use starling_proto::ids::{ModelVersion, RoundId};
use starling_proto::round::{RoundEvent, ShardOutcome, ShardSpec};
use starling_proto::strategy::StrategyState;
use starling_sdk::transport::Connection;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// A handle on a running driver. Cheap to clone.
#[derive(Clone, Debug)]
pub struct CoordinatorHandle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) status: watch::Receiver<DriverStatus>,
    pub(super) events: broadcast::Sender<RoundEvent>,
    pub(super) next_conn: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub(super) bytes: std::sync::Arc<ByteStats>,
    pub(super) config: std::sync::Arc<DriverConfig>,
}

impl CoordinatorHandle {
    /// Serves `conn` until it closes (spawns its connection task).
    pub fn attach<C: Connection>(&self, conn: C) {
        let id = self.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tx = self.tx.clone();
        let config = self.config.clone();
        tokio::spawn(connection::connection_task(conn, id, tx, config, self.bytes.clone()));
    }

    /// Bytes received from and sent to clients so far (frames, over every connection).
    pub fn bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.bytes.received.load(Relaxed), self.bytes.sent.load(Relaxed))
    }

    /// The driver's limits.
    pub fn config(&self) -> &DriverConfig {
        &self.config
    }

    /// Starts a round now (refused while the driver is halted).
    pub async fn start_round(&self) -> Result<RoundId, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::StartRound { reply }).await.map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// Verifies every bound connection's credential again (after revocations were reloaded, and
    /// to catch expiries); closes those that fail and treats their clients as dropped out.
    /// Returns how many were closed.
    pub async fn reverify(&self) -> Result<usize, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Reverify { reply }).await.map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)
    }

    /// Tells the round engine N, the number of enrolled (unrevoked, unexpired) devices: central
    /// DP samples each device with probability `q = min(1, target / N)` in rounds started after
    /// this. The service calls it at start-up and whenever it reloads revocations.
    pub async fn set_population(&self, n: u64) -> Result<(), DriverError> {
        self.tx.send(Command::SetPopulation { n }).await.map_err(|_| DriverError::Stopped)
    }

    /// Pauses (or resumes) the schedule: while paused no round starts by itself (a running
    /// round finishes; `start_round` still works).
    pub async fn set_paused(&self, paused: bool) -> Result<(), DriverError> {
        self.tx.send(Command::SetPaused { paused }).await.map_err(|_| DriverError::Stopped)
    }

    /// Whether the driver task has stopped.
    pub fn is_stopped(&self) -> bool {
        self.tx.is_closed()
    }

    async fn send(&self, cmd: Command) -> Result<(), DriverError> {
        self.tx.send(cmd).await.map_err(|_| DriverError::Stopped)
    }

    /// Starts this node's share of the leader's round (a follower of a cluster).
    pub async fn start_shard(&self, spec: ShardSpec) -> Result<(), DriverError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::StartShard { spec, reply }).await?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// The running round's spec for the followers, when this node leads a cluster round.
    pub async fn shard_spec(&self) -> Result<Option<ShardSpec>, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ShardSpec { reply }).await?;
        rx.await.map_err(|_| DriverError::Stopped)
    }

    /// Hands the other nodes' shares of `round` to the leader's engine, which then finishes it.
    pub async fn deliver_shares(
        &self,
        round: RoundId,
        shares: Vec<ShardOutcome>,
    ) -> Result<usize, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Shares { round, shares, reply }).await?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// Serves the leader's checkpoint `version` exactly (a follower keeping up; between rounds).
    pub async fn adopt(
        &self,
        version: ModelVersion,
        model: Vec<f32>,
        state: Option<StrategyState>,
    ) -> Result<(), DriverError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Adopt { version, model, state, reply }).await?;
        rx.await.map_err(|_| DriverError::Stopped)?
    }

    /// Tells the engine it leads a cluster of `nodes` nodes (`None`: alone).
    pub async fn set_cluster_nodes(&self, nodes: Option<usize>) -> Result<(), DriverError> {
        self.send(Command::ClusterNodes { nodes }).await
    }

    /// Swaps the engine, hook and schedule (a node that became leader, or stopped being one).
    /// The running round, if any, is dropped: its training clients are told it was aborted and
    /// nothing of it is recorded by either hook. Connections stay open. A halt is lifted.
    pub async fn replace(&self, role: Role) -> Result<(), DriverError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Replace { role: Box::new(role), reply }).await?;
        rx.await.map_err(|_| DriverError::Stopped)
    }

    /// Stops leading at once, without touching the database (a leader whose lease lapsed): the
    /// running round is dropped (its training clients are told; nothing of it reaches the hook),
    /// no round starts by itself any more and the engine no longer waits for shares. The engine
    /// keeps serving its model and can serve followers' shares.
    pub async fn demote(&self) -> Result<(), DriverError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Demote { reply }).await?;
        rx.await.map_err(|_| DriverError::Stopped)
    }

    /// Drains the node: new connections are refused, no round starts (a running one finishes);
    /// the operator stops the process once `status().round` is `None`.
    pub async fn drain(&self) -> Result<(), DriverError> {
        self.tx.send(Command::Drain).await.map_err(|_| DriverError::Stopped)
    }

    /// Serves checkpoint `source` again, as the next version (an operator's rollback), between
    /// rounds: the hook records it durably first. Returns the new version.
    pub async fn install_checkpoint(&self, source: ModelVersion) -> Result<ModelVersion, DriverError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Install { source, reply }).await.map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?
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
