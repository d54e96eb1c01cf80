//! One `starling serve` node of a cluster: discovery, leadership and the exchange of shares,
//! all through PostgreSQL.
//!
//! - **Discovery** (`starling_nodes`): every node writes a heartbeat row (its QUIC and admin
//!   addresses, role, connections, bytes, model version) every `heartbeat`. A node counts as live
//!   while its heartbeat is younger than three heartbeats (the database's clock).
//! - **Leadership** ([`super::lease`]): a follower tries to take the lease every tick; the holder
//!   renews it every `ttl / 3`. A node that takes it builds its leader role from the store
//!   ([`RoleFactory::leader`]: recovery marks the previous leader's unfinished round `abandoned`,
//!   the ledger is replayed, the newest checkpoint and its optimizer state are served, round ids
//!   continue above every id used) and swaps it into the driver. Its store is fenced with the
//!   lease's epoch: a commit from a leader whose term ended is refused by the database. A leader
//!   whose lease lapses (by its own clock, before the database lets anyone else in) demotes
//!   itself at once, without the database ([`CoordinatorHandle::demote`]).
//! - **Rounds** (`starling_cluster_rounds`, `starling_shares`): when the leader's round starts,
//!   its [`ShardSpec`] is published (fenced). Each follower that is free joins it — it adopts the
//!   round's model version if it has not yet, records that it joined, and runs its share for its
//!   own clients — and writes its [`ShardOutcome`] when the share ends. When the leader's own
//!   part is over it waits until every live follower joined (or `join_wait` passed) and every
//!   node that joined delivered, or until the share deadline; then hands the delivered
//!   shares to its engine, which merges, noises once and commits (checkpoint + ledger + round in
//!   one fenced transaction of the store). A node that died mid-round simply never delivers: its
//!   clients' updates are lost and the round goes on without them.
//! - **Following**: between rounds a follower adopts every newer checkpoint, so it serves the
//!   leader's model to its clients.

use super::lease::{Lease, LeaseConfig, LeaseError};
use crate::service::driver::{CoordinatorHandle, Role};
use starling_proto::ids::{ModelVersion, RoundId};
use starling_proto::round::{RoundEvent, ShardOutcome, ShardSpec};
use starling_proto::strategy::StrategyState;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_postgres::Client;

/// Why the node task stopped or an operation of it failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// The lease failed.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// A database call did not answer in time.
    #[error("the database did not answer within {0:?}")]
    Timeout(Duration),
    /// The role could not be built or swapped in.
    #[error("role: {0}")]
    Role(String),
}

/// A checkpoint's model and the strategy state saved with it.
pub type Checkpointed = (Vec<f32>, Option<StrategyState>);

/// Where a node's roles come from (the service builds them from its configuration and store).
/// Every method blocks (store I/O): the node calls them on the blocking pool.
pub trait RoleFactory: Send + Sync + 'static {
    /// The leader's role, its store fenced with `epoch`: recovers the store, replays the ledger,
    /// serves the newest checkpoint. Its hook forwards the cluster's events to `events`.
    fn leader(
        &self,
        epoch: i64,
        nodes: usize,
        events: mpsc::UnboundedSender<RoundEvent>,
    ) -> Result<Role, String>;
    /// The newest checkpoint's version, if any.
    fn latest_version(&self) -> Result<Option<ModelVersion>, String>;
    /// Checkpoint `version`: its model and strategy state.
    fn checkpoint(&self, version: ModelVersion) -> Result<Option<Checkpointed>, String>;
}

/// The settings of one node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The population and this node's name, the lease's duration and margin.
    pub lease: LeaseConfig,
    /// How often the node writes its heartbeat.
    pub heartbeat: Duration,
    /// How often the node looks at the database.
    pub tick: Duration,
    /// A follower joins a round at most this long after it started (the selection timeout).
    pub join_window: Duration,
    /// The leader waits at most this long after its round started for live followers that have
    /// not joined it (one that is busy, draining or cut off); every follower that joined is
    /// waited for until `share_deadline`.
    pub join_wait: Duration,
    /// The leader waits for shares at most this long after its round started (selection and
    /// report timeouts, plus a grace).
    pub share_deadline: Duration,
    /// Every database call is given up after this (a cut connection must not hang the node).
    pub db_timeout: Duration,
    /// This node's QUIC address, as clients should reach it (published for discovery).
    pub quic_addr: String,
    /// This node's admin address.
    pub admin_addr: String,
    /// Largest share accepted from the database, in bytes.
    pub max_share_bytes: usize,
}

/// One node as the discovery table shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct NodeRow {
    /// Its name.
    pub node: String,
    /// Its QUIC address.
    pub quic_addr: String,
    /// Its admin address.
    pub admin_addr: String,
    /// `leader` or `follower`.
    pub role: String,
    /// Open client connections.
    pub connections: i64,
    /// The model version it serves.
    pub model_version: i64,
    /// Bytes received and sent over QUIC.
    pub bytes_in: i64,
    /// See `bytes_in`.
    pub bytes_out: i64,
    /// Milliseconds since its last heartbeat (the database's clock).
    pub heartbeat_age_ms: i64,
}

/// What this node knows about the cluster, for `/status` and the dashboard.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ClusterView {
    /// This node's name.
    pub node: String,
    /// The population.
    pub population: String,
    /// Whether this node leads.
    pub leader: bool,
    /// The leader's name, as the lease table says.
    pub current_leader: Option<String>,
    /// The lease's epoch (this node's term, if it leads; else the holder's).
    pub epoch: Option<i64>,
    /// Live nodes.
    pub nodes: Vec<NodeRow>,
    /// Unix ms when this node last took the lease, and when it last gave it up.
    pub leading_since_ms: Option<i64>,
    /// See `leading_since_ms`.
    pub stopped_leading_ms: Option<i64>,
    /// Terms this node took, and rounds it served shares of.
    pub terms: u64,
    /// See `terms`.
    pub shares_served: u64,
    /// The last error talking to the database, if the last attempt failed.
    pub db_error: Option<String>,
}

/// Byte counters this node publishes (the QUIC endpoint's).
pub type ByteCounters = Arc<dyn Fn() -> (u64, u64) + Send + Sync>;

/// Connects to the cluster's database (NoTls: a private network or a local socket; see
/// docs/operations.md).
pub async fn connect(config: &tokio_postgres::Config) -> Result<Client, NodeError> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "cluster: database connection closed");
        }
    });
    Ok(client)
}

/// Creates the cluster's tables if missing (serialised: several nodes may start at once).
pub async fn migrate(db: &Client) -> Result<(), NodeError> {
    super::lease::migrate(db).await?;
    db.batch_execute(
        "BEGIN;
         SELECT pg_advisory_xact_lock(1398031428);
         CREATE TABLE IF NOT EXISTS starling_nodes (
             population   TEXT        NOT NULL,
             node         TEXT        NOT NULL,
             quic_addr    TEXT        NOT NULL,
             admin_addr   TEXT        NOT NULL,
             role         TEXT        NOT NULL,
             connections  BIGINT      NOT NULL,
             model_version BIGINT     NOT NULL,
             bytes_in     BIGINT      NOT NULL DEFAULT 0,
             bytes_out    BIGINT      NOT NULL DEFAULT 0,
             heartbeat_at TIMESTAMPTZ NOT NULL,
             PRIMARY KEY (population, node)
         );
         CREATE TABLE IF NOT EXISTS starling_cluster_rounds (
             population TEXT        NOT NULL,
             round      BIGINT      NOT NULL,
             version    BIGINT      NOT NULL,
             target     BIGINT      NOT NULL,
             enrolled   BIGINT,
             leader     TEXT        NOT NULL,
             epoch      BIGINT      NOT NULL,
             state      TEXT        NOT NULL,
             started_at TIMESTAMPTZ NOT NULL,
             PRIMARY KEY (population, round)
         );
         CREATE TABLE IF NOT EXISTS starling_shares (
             population   TEXT        NOT NULL,
             round        BIGINT      NOT NULL,
             node         TEXT        NOT NULL,
             joined_at    TIMESTAMPTZ NOT NULL,
             outcome      BYTEA,
             delivered_at TIMESTAMPTZ,
             PRIMARY KEY (population, round, node)
         );
         COMMIT;",
    )
    .await?;
    Ok(())
}

/// The leader's round waiting for the other nodes' shares.
struct Pending {
    round: RoundId,
    since: Instant,
}

struct Node {
    db: Client,
    /// How to reach the database again after a failure.
    connect: tokio_postgres::Config,
    /// A call was cancelled mid-way: reconnect before the next one.
    broken: bool,
    cfg: NodeConfig,
    lease: Lease,
    handle: CoordinatorHandle,
    factory: Arc<dyn RoleFactory>,
    events_tx: mpsc::UnboundedSender<RoundEvent>,
    view: Arc<Mutex<ClusterView>>,
    bytes: ByteCounters,
    leading: bool,
    last_renewal: Instant,
    last_heartbeat: Option<Instant>,
    /// The newest cluster round this node has seen (it never joins older ones).
    last_seen: i64,
    pending: Option<Pending>,
    /// When the running leader round started (the share deadline counts from it).
    round_started: Option<(RoundId, Instant)>,
    /// Until when this node may lead, for the watchdog (`None`: it does not lead).
    deadline: tokio::sync::watch::Sender<Option<Instant>>,
}

/// Demotes the node the moment its lease lapses by its own clock, whatever the node task is
/// waiting for (a database call can take up to `db_timeout`; the lease's margin need not cover
/// it).
async fn watchdog(
    mut deadline: tokio::sync::watch::Receiver<Option<Instant>>,
    handle: CoordinatorHandle,
    view: Arc<Mutex<ClusterView>>,
) {
    loop {
        let until = *deadline.borrow_and_update();
        let Some(until) = until else {
            if deadline.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(until)) => {
                tracing::warn!("cluster: the lease lapsed by this node's clock; it stops leading now");
                if let Ok(mut v) = view.lock() {
                    v.leader = false;
                    v.stopped_leading_ms = Some(unix_ms());
                }
                let _ = handle.demote().await;
                if deadline.changed().await.is_err() {
                    return;
                }
            }
            changed = deadline.changed() => if changed.is_err() { return },
        }
    }
}

/// Runs the node until the driver stops. `events` receives the cluster's events from the hook
/// of whatever role the driver runs (the factory's leader hooks and the follower hook the
/// service installed at start-up send to `events_tx`).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    connect: tokio_postgres::Config,
    cfg: NodeConfig,
    handle: CoordinatorHandle,
    factory: Arc<dyn RoleFactory>,
    events_tx: mpsc::UnboundedSender<RoundEvent>,
    mut events: mpsc::UnboundedReceiver<RoundEvent>,
    view: Arc<Mutex<ClusterView>>,
    bytes: ByteCounters,
) -> Result<(), NodeError> {
    let lease = Lease::new(cfg.lease.clone())?;
    // The database may be down while the node starts: keep trying (the node serves its model
    // to its devices meanwhile; it neither leads nor joins rounds).
    let db = loop {
        let attempt = timed(cfg.db_timeout, async {
            let db = self::connect(&connect).await?;
            migrate(&db).await?;
            Ok(db)
        });
        match attempt.await {
            Ok(db) => break db,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot reach the database yet; retrying");
                if let Ok(mut v) = view.lock() {
                    v.db_error = Some(e.to_string());
                }
                tokio::time::sleep(cfg.heartbeat).await;
                if handle.is_stopped() {
                    return Ok(());
                }
            }
        }
    };
    // A node that starts (or restarts) mid-round still joins it, within the join window.
    let last_seen = 0;
    if let Ok(mut v) = view.lock() {
        v.node.clone_from(&cfg.lease.node);
        v.population.clone_from(&cfg.lease.population);
    }
    let (deadline, deadline_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(watchdog(deadline_rx, handle.clone(), view.clone()));
    let mut node = Node {
        deadline,
        db,
        connect,
        broken: false,
        lease,
        handle,
        factory,
        events_tx,
        view,
        bytes,
        leading: false,
        last_renewal: Instant::now(),
        last_heartbeat: None,
        last_seen,
        pending: None,
        round_started: None,
        cfg,
    };
    let mut tick = tokio::time::interval(node.cfg.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => node.on_event(ev).await,
                None => return Ok(()),
            },
            _ = tick.tick() => {
                let r = node.on_tick().await;
                if matches!(r, Err(NodeError::Timeout(_))) {
                    node.broken = true;
                }
                let failed = r.as_ref().err().map(ToString::to_string);
                if let Ok(mut v) = node.view.lock() {
                    // Logged when it starts failing and when it recovers: not every tick.
                    match (&v.db_error, &failed) {
                        (None, Some(e)) => tracing::warn!(error = %e, "cluster: database step failed"),
                        (Some(_), None) => tracing::info!("cluster: the database answers again"),
                        _ => {}
                    }
                    v.db_error = failed;
                }
                if node.handle.is_stopped() {
                    return Ok(());
                }
            }
        }
    }
}

/// `f`, given up after `limit`.
async fn timed<T, F>(limit: Duration, f: F) -> Result<T, NodeError>
where
    F: std::future::Future<Output = Result<T, NodeError>>,
{
    tokio::time::timeout(limit, f).await.map_err(|_| NodeError::Timeout(limit))?
}

fn unix_ms() -> i64 {
    crate::service::unix_ms()
}

impl Node {
    fn population(&self) -> &str {
        &self.cfg.lease.population
    }

    fn name(&self) -> &str {
        &self.cfg.lease.node
    }

    async fn on_tick(&mut self) -> Result<(), NodeError> {
        // Leadership first, by the local clock alone: a leader whose lease lapsed stops now.
        if self.leading && !self.lease.is_leader() {
            self.stop_leading("the lease lapsed").await;
        }
        if self.broken || self.db.is_closed() {
            let fresh = tokio::time::timeout(self.cfg.db_timeout, connect(&self.connect))
                .await
                .map_err(|_| NodeError::Timeout(self.cfg.db_timeout))??;
            self.db = fresh;
            self.broken = false;
        }
        if self.last_heartbeat.is_none_or(|t| t.elapsed() >= self.cfg.heartbeat) {
            self.last_heartbeat = Some(Instant::now());
            timed(self.cfg.db_timeout, self.heartbeat()).await?;
        }
        if self.leading {
            if self.last_renewal.elapsed() >= self.cfg.lease.ttl / 3 {
                let sent = Instant::now();
                let renewed = tokio::time::timeout(self.cfg.db_timeout, self.lease.renew(&self.db)).await;
                match renewed {
                    Ok(Ok(())) => {
                        self.last_renewal = sent;
                        self.deadline.send_replace(self.lease.valid_until());
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "cluster: lease renewal failed"),
                    Err(_) => tracing::warn!("cluster: lease renewal timed out"),
                }
                if !self.lease.is_leader() {
                    self.stop_leading("the lease could not be renewed").await;
                    return Ok(());
                }
            }
            timed(self.cfg.db_timeout, self.collect_shares()).await?;
        } else {
            let sent = Instant::now();
            let acquired =
                timed(self.cfg.db_timeout, async { Ok(self.lease.try_acquire(&self.db).await?) }).await?;
            if let Some(epoch) = acquired {
                self.last_renewal = sent;
                self.start_leading(epoch).await?;
            } else {
                timed(self.cfg.db_timeout, self.follow()).await?;
            }
        }
        Ok(())
    }

    async fn heartbeat(&self) -> Result<(), NodeError> {
        let status = self.handle.status();
        let (bytes_in, bytes_out) = (self.bytes)();
        let role = if self.leading { "leader" } else { "follower" };
        self.db
            .execute(
                "INSERT INTO starling_nodes (population, node, quic_addr, admin_addr, role, connections,
                     model_version, bytes_in, bytes_out, heartbeat_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now())
                 ON CONFLICT (population, node) DO UPDATE SET quic_addr = $3, admin_addr = $4, role = $5,
                     connections = $6, model_version = $7, bytes_in = $8, bytes_out = $9, heartbeat_at = now()",
                &[
                    &self.population(),
                    &self.name(),
                    &self.cfg.quic_addr,
                    &self.cfg.admin_addr,
                    &role,
                    &(status.connections as i64),
                    &(status.model_version.0 as i64),
                    &(bytes_in.min(i64::MAX as u64) as i64),
                    &(bytes_out.min(i64::MAX as u64) as i64),
                ],
            )
            .await?;
        let live = (self.cfg.heartbeat * 3).as_millis() as f64 / 1000.0;
        let rows = self
            .db
            .query(
                "SELECT node, quic_addr, admin_addr, role, connections, model_version, bytes_in, bytes_out,
                        (EXTRACT(EPOCH FROM (now() - heartbeat_at)) * 1000)::BIGINT
                 FROM starling_nodes
                 WHERE population = $1 AND heartbeat_at > now() - make_interval(secs => $2)
                 ORDER BY node",
                &[&self.population(), &live],
            )
            .await?;
        let nodes: Vec<NodeRow> = rows
            .iter()
            .map(|r| NodeRow {
                node: r.get(0),
                quic_addr: r.get(1),
                admin_addr: r.get(2),
                role: r.get(3),
                connections: r.get(4),
                model_version: r.get(5),
                bytes_in: r.get(6),
                bytes_out: r.get(7),
                heartbeat_age_ms: r.get(8),
            })
            .collect();
        let holder = self
            .db
            .query_opt(
                "SELECT holder, epoch FROM starling_leases WHERE population = $1 AND expires_at > now()",
                &[&self.population()],
            )
            .await?;
        if self.leading {
            let _ = self.handle.set_cluster_nodes(Some(nodes.len().max(1))).await;
            // An operator's pause or resume may have been sent to any node: it is in the store.
            let paused = self
                .db
                .query_opt("SELECT value FROM starling_service_state WHERE key = 'paused'", &[])
                .await?
                .is_some_and(|r| r.get::<_, String>(0) == "true");
            if paused != self.handle.status().paused {
                tracing::info!(paused, "cluster: the operator's pause switch changed");
                let _ = self.handle.set_paused(paused).await;
            }
        }
        if let Ok(mut v) = self.view.lock() {
            v.nodes = nodes;
            v.current_leader = holder.as_ref().map(|r| r.get(0));
            v.epoch = holder.as_ref().map(|r| r.get(1));
            v.leader = self.leading;
        }
        Ok(())
    }

    async fn start_leading(&mut self, epoch: i64) -> Result<(), NodeError> {
        tracing::info!(epoch, node = self.name(), "cluster: this node took the lease; taking over");
        let nodes = self.view.lock().map(|v| v.nodes.len().max(1)).unwrap_or(1);
        let factory = self.factory.clone();
        let tx = self.events_tx.clone();
        let built = tokio::task::spawn_blocking(move || factory.leader(epoch, nodes, tx))
            .await
            .map_err(|e| NodeError::Role(e.to_string()))?;
        let role = match built {
            Ok(role) => role,
            Err(e) => {
                // Without its role the node must not hold the lease: let another node try.
                self.lease_release().await;
                return Err(NodeError::Role(e));
            }
        };
        self.handle.replace(role).await.map_err(|e| NodeError::Role(e.to_string()))?;
        // Rounds the previous leader published but never finished are over.
        let pop = self.population().to_string();
        self.fenced(|db, _| async move {
            db.execute(
                "UPDATE starling_cluster_rounds SET state = 'abandoned' WHERE population = $1 AND state = 'started'",
                &[&pop],
            )
            .await?;
            Ok(())
        })
        .await?;
        self.leading = true;
        self.pending = None;
        self.round_started = None;
        self.deadline.send_replace(self.lease.valid_until());
        if let Ok(mut v) = self.view.lock() {
            v.leader = true;
            v.terms += 1;
            v.leading_since_ms = Some(unix_ms());
            v.current_leader = Some(self.name().to_string());
            v.epoch = Some(epoch);
        }
        Ok(())
    }

    async fn lease_release(&mut self) {
        // Nothing to do in the database: the term simply expires. Locally, stop counting on it.
        self.lease = match Lease::new(self.cfg.lease.clone()) {
            Ok(l) => l,
            Err(_) => return,
        };
    }

    async fn stop_leading(&mut self, why: &str) {
        tracing::warn!(node = self.name(), reason = why, "cluster: this node stopped leading");
        self.deadline.send_replace(None);
        // Local and immediate: no database needed.
        let _ = self.handle.demote().await;
        self.leading = false;
        self.pending = None;
        self.round_started = None;
        self.lease_release().await;
        if let Ok(mut v) = self.view.lock() {
            v.leader = false;
            // The watchdog may have recorded the moment already (it does not wait for the
            // database); keep the earlier one.
            let since = v.leading_since_ms.unwrap_or(0);
            if v.stopped_leading_ms.is_none_or(|t| t < since) {
                v.stopped_leading_ms = Some(unix_ms());
            }
        }
    }

    async fn on_event(&mut self, ev: RoundEvent) {
        let r = match ev {
            RoundEvent::Started { round, .. } if self.leading => {
                self.round_started = Some((round, Instant::now()));
                timed(self.cfg.db_timeout, self.publish(round)).await
            }
            RoundEvent::AwaitingShares { round } if self.leading => {
                self.pending = Some(Pending { round, since: Instant::now() });
                timed(self.cfg.db_timeout, self.collect_shares()).await
            }
            RoundEvent::Committed(c) if self.leading => {
                timed(self.cfg.db_timeout, self.mark(c.round, "committed")).await
            }
            RoundEvent::Failed { round, .. } if self.leading => {
                timed(self.cfg.db_timeout, self.mark(round, "failed")).await
            }
            RoundEvent::ShardDone(outcome) => timed(self.cfg.db_timeout, self.deliver(*outcome)).await,
            _ => Ok(()),
        };
        if let Err(e) = r {
            if matches!(e, NodeError::Timeout(_)) {
                self.broken = true;
            }
            tracing::warn!(error = %e, "cluster: could not record a round event");
        }
    }

    /// The leader's round started: publish its spec for the followers (fenced).
    async fn publish(&self, round: RoundId) -> Result<(), NodeError> {
        let Some(spec) = self.handle.shard_spec().await.map_err(|e| NodeError::Role(e.to_string()))? else {
            return Ok(());
        };
        if spec.round != round {
            return Ok(());
        }
        let pop = self.population().to_string();
        let name = self.name().to_string();
        let (round, version, target) = (spec.round.0 as i64, spec.version.0 as i64, spec.target as i64);
        let enrolled = spec.population.map(|n| n as i64);
        self.fenced(|db, epoch| async move {
            db.execute(
                "INSERT INTO starling_cluster_rounds (population, round, version, target, enrolled, leader, epoch, state, started_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'started', now())",
                &[&pop, &round, &version, &target, &enrolled, &name, &epoch],
            )
            .await?;
            Ok(())
        })
        .await
    }

    /// Runs `f` in a transaction that first checks this node still holds its term (the lease
    /// row is locked until the commit). The node's client serves this task alone, so BEGIN and
    /// COMMIT on it frame exactly these statements; a failure rolls back, and a cancelled call
    /// (a timeout) marks the connection for reconnection, so nothing runs in a stale transaction.
    async fn fenced<'a, F, Fut>(&'a self, f: F) -> Result<(), NodeError>
    where
        F: FnOnce(&'a Client, i64) -> Fut,
        Fut: std::future::Future<Output = Result<(), NodeError>> + 'a,
    {
        self.db.batch_execute("BEGIN").await?;
        let r = async {
            let epoch = self.lease.fence(&self.db).await?;
            f(&self.db, epoch).await
        }
        .await;
        match r {
            Ok(()) => {
                self.db.batch_execute("COMMIT").await?;
                Ok(())
            }
            Err(e) => {
                let _ = self.db.batch_execute("ROLLBACK").await;
                Err(e)
            }
        }
    }

    /// Records how the leader's round ended and forgets the shares of rounds long over.
    async fn mark(&self, round: RoundId, state: &str) -> Result<(), NodeError> {
        self.db
            .execute(
                "UPDATE starling_cluster_rounds SET state = $3 WHERE population = $1 AND round = $2",
                &[&self.population(), &(round.0 as i64), &state],
            )
            .await?;
        self.db
            .execute(
                "DELETE FROM starling_shares WHERE population = $1 AND round <= $2",
                &[&self.population(), &(round.0 as i64)],
            )
            .await?;
        Ok(())
    }

    /// The leader: hand the shares over once every node that joined delivered (after the join
    /// window), or at the share deadline.
    async fn collect_shares(&mut self) -> Result<(), NodeError> {
        let Some(p) = &self.pending else { return Ok(()) };
        let round = p.round;
        let started = match self.round_started {
            Some((r, t)) if r == round => t,
            _ => p.since,
        };
        let rows = self
            .db
            .query(
                "SELECT node, outcome FROM starling_shares WHERE population = $1 AND round = $2",
                &[&self.population(), &(round.0 as i64)],
            )
            .await?;
        let joined = rows.len();
        let delivered: Vec<Vec<u8>> = rows.iter().filter_map(|r| r.get::<_, Option<Vec<u8>>>(1)).collect();
        // The live followers, from the last heartbeat round (this node is one of the nodes).
        let followers = self.view.lock().map(|v| v.nodes.len().saturating_sub(1)).unwrap_or(0);
        let elapsed = started.elapsed();
        let everyone_joined = joined >= followers || elapsed >= self.cfg.join_wait;
        let all_in = delivered.len() == joined && everyone_joined;
        if !all_in && elapsed < self.cfg.share_deadline {
            return Ok(());
        }
        let mut shares = Vec::with_capacity(delivered.len());
        for bytes in &delivered {
            match starling_proto::codec::decode_shard_outcome(bytes, self.cfg.max_share_bytes) {
                Ok(s) => shares.push(s),
                Err(e) => {
                    tracing::warn!(round = round.0, error = %e, "cluster: a share could not be decoded; left out")
                }
            }
        }
        if delivered.len() < joined {
            tracing::warn!(
                round = round.0,
                joined,
                delivered = delivered.len(),
                "cluster: some nodes did not deliver their share in time; their clients' updates are lost"
            );
        }
        self.pending = None;
        let n = shares.len();
        match self.handle.deliver_shares(round, shares).await {
            Ok(merged) => tracing::info!(round = round.0, merged, offered = n, "cluster: shares combined"),
            Err(e) => tracing::warn!(round = round.0, error = %e, "cluster: the shares were not taken"),
        }
        Ok(())
    }

    /// A follower's share ended: write it for the leader.
    async fn deliver(&self, outcome: ShardOutcome) -> Result<(), NodeError> {
        let bytes = starling_proto::codec::encode_shard_outcome(&outcome);
        self.db
            .execute(
                "UPDATE starling_shares SET outcome = $4, delivered_at = now()
                 WHERE population = $1 AND round = $2 AND node = $3",
                &[&self.population(), &(outcome.round.0 as i64), &self.name(), &bytes],
            )
            .await?;
        if let Ok(mut v) = self.view.lock() {
            v.shares_served += 1;
        }
        Ok(())
    }

    /// A follower: join the leader's running round, or keep up with its checkpoints.
    async fn follow(&mut self) -> Result<(), NodeError> {
        let status = self.handle.status();
        if status.round.is_some() || status.draining {
            return Ok(());
        }
        let join_ms = self.cfg.join_window.as_millis() as f64 / 1000.0;
        let row = self
            .db
            .query_opt(
                "SELECT round, version, target, enrolled FROM starling_cluster_rounds
                 WHERE population = $1 AND round > $2 AND state = 'started'
                   AND started_at > now() - make_interval(secs => $3)
                 ORDER BY round DESC LIMIT 1",
                &[&self.population(), &self.last_seen, &join_ms],
            )
            .await?;
        if let Some(row) = row {
            let spec = ShardSpec {
                round: RoundId(row.get::<_, i64>(0) as u64),
                version: ModelVersion(row.get::<_, i64>(1) as u64),
                target: row.get::<_, i64>(2).max(1) as usize,
                population: row.get::<_, Option<i64>>(3).map(|n| n as u64),
            };
            self.last_seen = spec.round.0 as i64;
            if spec.version != status.model_version {
                self.adopt(spec.version).await?;
            }
            // Joined before the share starts: the leader then waits for it.
            self.db
                .execute(
                    "INSERT INTO starling_shares (population, round, node, joined_at) VALUES ($1, $2, $3, now())
                     ON CONFLICT DO NOTHING",
                    &[&self.population(), &(spec.round.0 as i64), &self.name()],
                )
                .await?;
            if let Err(e) = self.handle.start_shard(spec.clone()).await {
                tracing::warn!(round = spec.round.0, error = %e, "cluster: could not serve the round's share");
                // The leader must not wait for a share that will never come.
                let empty = ShardOutcome {
                    round: spec.round,
                    version: spec.version,
                    partial: None,
                    failure: Some(e.to_string()),
                    stats: Default::default(),
                };
                self.deliver(empty).await?;
            }
            return Ok(());
        }
        let factory = self.factory.clone();
        let latest = tokio::task::spawn_blocking(move || factory.latest_version())
            .await
            .map_err(|e| NodeError::Role(e.to_string()))?
            .map_err(NodeError::Role)?;
        if let Some(v) = latest.filter(|v| *v > status.model_version) {
            self.adopt(v).await?;
        }
        Ok(())
    }

    async fn adopt(&self, version: ModelVersion) -> Result<(), NodeError> {
        let factory = self.factory.clone();
        let found = tokio::task::spawn_blocking(move || factory.checkpoint(version))
            .await
            .map_err(|e| NodeError::Role(e.to_string()))?
            .map_err(NodeError::Role)?;
        let Some((model, state)) = found else {
            return Err(NodeError::Role(format!("checkpoint v{} is not in the store", version.0)));
        };
        self.handle.adopt(version, model, state).await.map_err(|e| NodeError::Role(e.to_string()))?;
        tracing::info!(version = version.0, "cluster: adopted the leader's checkpoint");
        Ok(())
    }
}
