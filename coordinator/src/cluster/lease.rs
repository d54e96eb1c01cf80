//! The leader lease of one population, in PostgreSQL, with a fencing epoch.
//!
//! - **Table** `starling_leases(population, holder, epoch, expires_at)`: one row per population.
//!   `expires_at` is the database's clock (`now() + ttl`), so nodes' clocks never have to agree.
//! - **Acquire** ([`Lease::try_acquire`]): takes the row if it is free or expired, incrementing
//!   `epoch` (the fencing token of this term). A holder that still holds it cannot be displaced.
//! - **Renew** ([`Lease::renew`]): extends `expires_at` only for the same holder and epoch, and
//!   only while not expired (an expired lease must be acquired again, with a new epoch).
//! - **Local validity**: a node counts itself leader until `sent + ttl − margin`, where `sent` is
//!   its own monotonic time *before* the renewal (or acquisition) was sent. The database set the
//!   expiry at `now() + ttl` when it executed the statement, which is after `sent`; so, with
//!   clocks that run at the same rate to within `margin / ttl`, a node always stops considering
//!   itself leader before the database lets another node in. A partitioned leader (its database
//!   connection cut) therefore stops committing before the new leader starts.
//! - **Fencing** ([`Lease::fence`]): inside the commit's transaction, the lease row is locked and
//!   checked (same holder, same epoch, not expired). A commit from a stale leader — paused for
//!   longer than the margin, say — is refused by the database, whatever the node believes.

use std::time::{Duration, Instant};
use tokio_postgres::{Client, GenericClient};

/// Why a lease operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// The database failed or could not be reached.
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// This node does not hold the lease (never had it, lost it, or it expired).
    #[error("this node does not hold the lease of {population}")]
    NotLeader {
        /// The population.
        population: String,
    },
    /// The settings are unusable (`margin` must be below `ttl`).
    #[error("invalid lease settings: {0}")]
    Config(String),
}

/// How long a lease lasts and how much safety margin a node keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The population (one lease each).
    pub population: String,
    /// This node's name (unique among the nodes).
    pub node: String,
    /// Lease duration on the database's clock.
    pub ttl: Duration,
    /// How much earlier than the database a node gives its lease up (clock-rate drift, the time
    /// between a local check and a commit).
    pub margin: Duration,
}

/// Creates the lease table if missing (several nodes may start at once: the creation is
/// serialised by an advisory lock, since `CREATE TABLE IF NOT EXISTS` alone races).
pub async fn migrate(db: &Client) -> Result<(), LeaseError> {
    db.batch_execute(
        "BEGIN;
         SELECT pg_advisory_xact_lock(1398031427);
         CREATE TABLE IF NOT EXISTS starling_leases (
             population TEXT PRIMARY KEY,
             holder     TEXT        NOT NULL,
             epoch      BIGINT      NOT NULL,
             expires_at TIMESTAMPTZ NOT NULL
         );
         COMMIT;",
    )
    .await?;
    Ok(())
}

/// One node's view of one population's lease.
#[derive(Debug)]
pub struct Lease {
    config: LeaseConfig,
    /// The epoch of the term this node holds, if any.
    epoch: Option<i64>,
    /// Until when (local monotonic time) this node counts itself leader.
    valid_until: Option<Instant>,
}

impl Lease {
    /// A node's lease handle (holding nothing yet).
    pub fn new(config: LeaseConfig) -> Result<Self, LeaseError> {
        if config.margin >= config.ttl || config.ttl < Duration::from_millis(100) {
            return Err(LeaseError::Config(format!(
                "ttl {:?} must be at least 100 ms and above margin {:?}",
                config.ttl, config.margin
            )));
        }
        Ok(Self { config, epoch: None, valid_until: None })
    }

    /// The settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.config.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    fn held_until(&self, sent: Instant) -> Instant {
        sent + self.config.ttl - self.config.margin
    }

    /// Takes the lease if it is free or expired; returns the new term's epoch, or `None` if
    /// another node holds it.
    pub async fn try_acquire(&mut self, db: &impl GenericClient) -> Result<Option<i64>, LeaseError> {
        let sent = Instant::now();
        let row = db
            .query_opt(
                "INSERT INTO starling_leases (population, holder, epoch, expires_at)
                 VALUES ($1, $2, 1, now() + $3::bigint * interval '1 millisecond')
                 ON CONFLICT (population) DO UPDATE
                     SET holder = EXCLUDED.holder, epoch = starling_leases.epoch + 1, expires_at = EXCLUDED.expires_at
                     WHERE starling_leases.expires_at <= now()
                 RETURNING epoch",
                &[&self.config.population, &self.config.node, &self.ttl_ms()],
            )
            .await?;
        Ok(match row {
            Some(r) => {
                let epoch: i64 = r.get(0);
                self.epoch = Some(epoch);
                self.valid_until = Some(self.held_until(sent));
                Some(epoch)
            }
            None => None,
        })
    }

    /// Extends the term this node holds. Fails with [`LeaseError::NotLeader`] (and forgets the
    /// term) if the lease expired or was taken.
    pub async fn renew(&mut self, db: &impl GenericClient) -> Result<(), LeaseError> {
        let Some(epoch) = self.epoch else { return Err(self.not_leader()) };
        let sent = Instant::now();
        let n = db
            .execute(
                "UPDATE starling_leases SET expires_at = now() + $4::bigint * interval '1 millisecond'
                 WHERE population = $1 AND holder = $2 AND epoch = $3 AND expires_at > now()",
                &[&self.config.population, &self.config.node, &epoch, &self.ttl_ms()],
            )
            .await?;
        if n == 1 {
            self.valid_until = Some(self.held_until(sent));
            Ok(())
        } else {
            self.epoch = None;
            self.valid_until = None;
            Err(self.not_leader())
        }
    }

    /// Whether this node may act as leader now (by its own clock; see the module docs).
    pub fn is_leader(&self) -> bool {
        self.valid_until.is_some_and(|t| Instant::now() < t)
    }

    /// The epoch of the term held, while it is valid.
    pub fn epoch(&self) -> Option<i64> {
        self.epoch.filter(|_| self.is_leader())
    }

    /// Until when this node counts itself leader, if it does.
    pub fn valid_until(&self) -> Option<Instant> {
        self.valid_until.filter(|_| self.is_leader())
    }

    /// Inside a commit's transaction: locks the lease row and checks that this node still holds
    /// this term, by the database's clock. Commit only if it returns `Ok`.
    pub async fn fence(&self, tx: &impl GenericClient) -> Result<i64, LeaseError> {
        let Some(epoch) = self.epoch() else { return Err(self.not_leader()) };
        let row = tx
            .query_opt(
                "SELECT epoch FROM starling_leases
                 WHERE population = $1 AND holder = $2 AND epoch = $3 AND expires_at > now()
                 FOR UPDATE",
                &[&self.config.population, &self.config.node, &epoch],
            )
            .await?;
        row.map(|_| epoch).ok_or_else(|| self.not_leader())
    }

    /// The same check without this node's own clock: whether the database still has this
    /// node's term (for tests and diagnostics; committing code uses [`fence`](Self::fence)).
    pub async fn fence_unchecked(&self, tx: &impl GenericClient, epoch: i64) -> Result<(), LeaseError> {
        let row = tx
            .query_opt(
                "SELECT 1 FROM starling_leases
                 WHERE population = $1 AND holder = $2 AND epoch = $3 AND expires_at > now() FOR UPDATE",
                &[&self.config.population, &self.config.node, &epoch],
            )
            .await?;
        row.map(|_| ()).ok_or_else(|| self.not_leader())
    }

    fn not_leader(&self) -> LeaseError {
        LeaseError::NotLeader { population: self.config.population.clone() }
    }
}

/// Connects to `url` (a libpq-style string, e.g. `host=127.0.0.1 port=5432 user=starling
/// dbname=starling`), driving the connection on the current runtime.
pub async fn connect(url: &str) -> Result<Client, LeaseError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection ended");
        }
    });
    Ok(client)
}
