//! The coordinator's store, behind one trait ([`StoreBackend`]) with two backends:
//!
//! - [`SqliteStore`] (the default): one SQLite file (WAL journal, `synchronous = FULL`);
//! - [`PgStore`] (`[storage] postgres`): PostgreSQL, for a coordinator whose state must outlive
//!   its machine, and the ground for several nodes with a leader lease ([`Fence`]).
//!
//! [`Store`] holds either (`Box<dyn StoreBackend>`) and dereferences to the trait, so callers
//! write `store.commit_round(…)` whatever the backend. Every method is synchronous: call it from
//! a blocking context (tokio's blocking pool, a plain thread), never on an async worker thread
//! (the PostgreSQL client blocks on a runtime of its own and panics there).
//!
//! What is stored, by SQLite schema version (PostgreSQL has the same tables, each prefixed
//! `starling_`, created by its own versioned migrations: see [`postgres`](self::PgStore)):
//!
//! Schema version 1 holds the privacy ledger: one row per released round, `(round, q, σ, steps)`.
//! A row is committed — written and made durable — before the round's model is released, so after
//! a crash the ledger never holds less than what was released (it may hold a round whose model
//! was never published: ε is over-counted then, never under-counted).
//!
//! Schema version 2 (the coordinator service) adds:
//! - `checkpoints`: committed model versions (little-endian `f32` blob with a CRC-32);
//! - `rounds`: one row per started round — `started`, then `committed` / `failed`, or
//!   `abandoned` when a restart finds it unfinished;
//! - `clients` and `tokens`: the client registry and the enrollment tokens issued, with
//!   revocations.
//!
//! Schema version 3 (federated evaluation) adds:
//! - the `evaluated` state of `rounds` (an evaluation round that released its figures; the
//!   table is rebuilt to widen its check);
//! - `evaluations`: one row per released evaluation round (version evaluated, reports, cases,
//!   HR@10, NDCG@10, loss, the noise's standard deviation under DP).
//!   [`StoreBackend::record_evaluation`] writes it with the round's ledger entry and its
//!   `evaluated` state in one transaction, before the figures are released.
//!
//! Schema version 4 (operations) adds:
//! - `checkpoints.strategy_state` (+ `state_crc32`): the strategy's carried state after the
//!   round (server-optimizer moments, an adaptive clip norm), written in the commit's
//!   transaction, so that a restart continues exactly;
//! - `rounds.kind` (`train` or `evaluate`) and the round's figures (`selected`, `reported`,
//!   `dropped`, `unfinished`, `rejected`) for the dashboard's history; the schedule's counters
//!   are derived from them at start-up;
//! - `audit`: one row per control-plane action (who, when, what, the outcome);
//! - `service_state`: small operator switches that survive restarts (`paused`).
//!
//! [`StoreBackend::commit_round`] writes a round's ledger entry, its checkpoint and its
//! `committed` state in **one transaction**: after a crash either all three are there or none is,
//! and the model is only released after that transaction returned. A round is recorded `started`
//! ([`StoreBackend::begin_round`]) before any client gets its task, so a restart always knows
//! which round ids were used (ids are never reused) and which round was cut short
//! ([`StoreBackend::recover`]).
//!
//! Like the SDK's database, the SQLite file is marked with SQLite's `application_id` and a schema
//! version; a foreign, corrupt or newer file is a typed error and is never overwritten. Why
//! SQLite (and not redb): see `docs/operations.md`. A PostgreSQL database whose `starling_schema`
//! version is newer than this coordinator's is refused the same way ([`StoreError::TooNew`]).
//!
//! Checkpoint and strategy-state checksums, the model's encoding and the ledger rows' validation
//! are shared by both backends (the helpers at the end of this module).

use starling_proto::dp::{LedgerEntry, Mechanism, NoiseMultiplier, SamplingRate};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::update::ModelShape;
use std::path::{Path, PathBuf};

use crate::service::config::StorageSection;

/// `application_id` of Starling coordinator databases ("STLC").
pub const APPLICATION_ID: i32 = 0x5354_4C43;
/// Current schema version.
pub const SCHEMA_VERSION: i32 = 4;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file is not a Starling coordinator database. It was left untouched.
    #[error(
        "{path} is not a Starling coordinator database (application_id {found:#x}); it was left untouched"
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The application id found.
        found: i32,
    },
    /// The file is damaged. It was left untouched.
    #[error("{path} is corrupt: {detail}; it was left untouched")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What SQLite reported.
        detail: String,
    },
    /// The file was written by a newer coordinator.
    #[error("database schema version {found} is newer than this coordinator's ({supported})")]
    TooNew {
        /// Version found.
        found: i32,
        /// Newest version understood.
        supported: i32,
    },
    /// The ledger already holds an entry for this round (a round is charged exactly once).
    #[error("the privacy ledger already holds round {0}")]
    DuplicateRound(u64),
    /// A stored row is invalid (e.g. a σ that is not a number); the ledger cannot be trusted.
    #[error("ledger row for round {round} is invalid: {detail}")]
    BadRow {
        /// The round of the row.
        round: u64,
        /// What is wrong.
        detail: String,
    },
    /// A stored checkpoint is damaged (checksum or length mismatch); it is not served.
    #[error("checkpoint of version {version} is damaged: {detail}")]
    BadCheckpoint {
        /// The model version.
        version: u64,
        /// What is wrong.
        detail: String,
    },
    /// The round is not in the state the operation needs (e.g. committing a round never begun).
    #[error("round {round} cannot be {action}: it is {state}")]
    RoundState {
        /// The round.
        round: u64,
        /// What was attempted.
        action: &'static str,
        /// Its recorded state (`missing` if none).
        state: String,
    },
    /// No such token.
    #[error("no token with id {0}")]
    UnknownToken(u64),
    /// Any other SQLite failure (disk full, permissions, …).
    #[error("storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Any PostgreSQL failure (connection, query, constraint, …). Its text never holds the
    /// password.
    #[error("postgresql error: {0}")]
    Postgres(#[from] ::postgres::Error),
    /// A write was refused by the fence: this node no longer holds the population's lease (or
    /// its epoch moved on, or the lease expired by the database's clock). Nothing was written.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The backend cannot do this (e.g. fencing on SQLite).
    #[error("not supported by this store: {0}")]
    Unsupported(String),
    /// The storage settings are unusable (e.g. an unreadable password file).
    #[error("storage configuration: {0}")]
    Config(String),
}

/// A committed model version.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The model version.
    pub version: ModelVersion,
    /// The round that produced it (0 for the initial model).
    pub round: RoundId,
    /// Its shape.
    pub shape: ModelShape,
    /// The parameters.
    pub model: Vec<f32>,
    /// The strategy's carried state saved with it (encoded by
    /// `starling_proto::codec::encode_strategy_state`; checksum verified), if any: `None` for the
    /// initial model and for checkpoints written before schema 4.
    pub strategy_state: Option<Vec<u8>>,
}

/// What [`StoreBackend::commit_round`] writes.
#[derive(Clone, Copy, Debug)]
pub struct RoundCommit<'a> {
    /// The round.
    pub round: RoundId,
    /// The version it produced.
    pub version: ModelVersion,
    /// The model's shape.
    pub shape: ModelShape,
    /// The new parameters.
    pub model: &'a [f32],
    /// The round's privacy charge, if DP produced one.
    pub ledger: Option<&'a LedgerEntry>,
    /// The strategy's state after the round, encoded.
    pub strategy_state: Option<&'a [u8]>,
    /// The round's figures.
    pub figures: RoundFigures,
}

/// A round's participation figures, kept for the operator's history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RoundFigures {
    /// Clients sent the task.
    pub selected: u64,
    /// Updates (or evaluation reports) accepted.
    pub reported: u64,
    /// Selected clients that disconnected or withdrew.
    pub dropped: u64,
    /// Selected clients still training when the round closed (late).
    pub unfinished: u64,
    /// Updates rejected.
    pub rejected: u64,
}

/// What a restart finds: see [`StoreBackend::recover`].
#[derive(Clone, Debug, PartialEq)]
pub struct Recovery {
    /// The newest committed model, if any round (or the initial model) was ever stored.
    pub latest: Option<Checkpoint>,
    /// The id the next round must get (above every id ever begun).
    pub next_round: RoundId,
    /// Rounds that were begun but never finished; they are now recorded `abandoned`.
    pub abandoned: Vec<RoundId>,
}

/// A round as recorded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RoundRecord {
    /// The round.
    pub round: RoundId,
    /// The model version it trained from.
    pub base_version: ModelVersion,
    /// `started`, `committed`, `failed` or `abandoned`.
    pub state: String,
    /// The version it produced, if committed.
    pub result_version: Option<ModelVersion>,
    /// Why it failed, if it did.
    pub detail: Option<String>,
    /// `train` or `evaluate`.
    pub kind: String,
    /// When it started (Unix ms).
    pub started_ms: i64,
    /// When it ended (Unix ms), if it did.
    pub finished_ms: Option<i64>,
    /// Its figures, once it ended (none for rounds recorded before schema 4 or abandoned).
    pub figures: Option<RoundFigures>,
}

/// A released federated-evaluation round as recorded (also what `/status` shows).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EvaluationRecord {
    /// The round.
    pub round: u64,
    /// The model version evaluated.
    pub version: u64,
    /// Mean HR@10.
    pub hr_at_10: f64,
    /// Mean NDCG@10.
    pub ndcg_at_10: f64,
    /// Mean per-case loss.
    pub loss: f64,
    /// Reports accepted.
    pub reports: u64,
    /// Evaluation cases (noised under DP).
    pub cases: f64,
    /// Whether the figures were released with DP noise.
    pub noised: bool,
    /// The noise's standard deviation on the sums, under DP.
    pub noise_std: Option<f64>,
    /// When it was recorded (Unix ms).
    pub at: i64,
}

/// An issued enrollment token as recorded (the token itself is not stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// Token id.
    pub token_id: u64,
    /// The client.
    pub client: ClientId,
    /// Expiry, Unix seconds.
    pub expires_unix_s: u64,
    /// When it was issued (Unix ms).
    pub issued_ms: i64,
    /// When it was revoked (Unix ms), if it was.
    pub revoked_ms: Option<i64>,
}

/// One control-plane action as recorded.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuditRecord {
    /// Sequence number.
    pub id: u64,
    /// When (Unix ms).
    pub at_ms: i64,
    /// Who: the credential's name and the peer address.
    pub actor: String,
    /// What: `pause`, `resume`, `start_round`, `export`, `rollback`, `reload`, `drain`.
    pub action: String,
    /// Its parameters (JSON).
    pub detail: String,
    /// `ok` or `refused: …`.
    pub outcome: String,
}

/// A leader's fencing token: the lease row (`starling_leases`, see [`crate::cluster::lease`])
/// this node must still hold for its writes to be accepted.
///
/// Once set on a [`PgStore`] ([`StoreBackend::set_fence`]), every write that changes rounds,
/// checkpoints, the ledger or evaluations first locks that row (`SELECT … FOR UPDATE`, same
/// population, holder and epoch, `expires_at > now()` by the database's clock) inside its own
/// transaction, and fails with [`StoreError::Fenced`] — writing nothing — if there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The population whose lease is held.
    pub population: String,
    /// This node's name (the lease's `holder`).
    pub holder: String,
    /// The epoch of the term held.
    pub epoch: i64,
}

/// Everything the coordinator stores, whatever the backend. Object safe: [`Store`] holds a
/// `Box<dyn StoreBackend>`.
///
/// Every method blocks (disk or network I/O): call them from a blocking context (tokio's
/// blocking pool, a plain thread), never on an async worker thread.
pub trait StoreBackend: Send {
    /// At start-up: marks every `started` round `abandoned`, and returns the newest committed
    /// model (checksum verified) and the next round id (above every id ever begun or charged).
    fn recover(&mut self, now_ms: i64) -> Result<Recovery, StoreError>;

    /// Stores the initial model as version `version` (round 0) if no checkpoint exists yet;
    /// returns whether it was stored.
    fn init_model(
        &mut self,
        version: ModelVersion,
        shape: ModelShape,
        model: &[f32],
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Records that `round` started from `base_version`; durable on return. Call before any
    /// client is sent the round's task. A round id already used is refused
    /// ([`StoreError::RoundState`]).
    fn begin_round(
        &mut self,
        round: RoundId,
        base_version: ModelVersion,
        evaluation: bool,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// Commits a round atomically: its ledger entry (if DP produced one), the new checkpoint and
    /// the `committed` state, in one durable transaction; then prunes checkpoints beyond the
    /// newest `keep`. The model may be released once this returns `Ok`.
    fn commit_round(&mut self, commit: &RoundCommit<'_>, now_ms: i64, keep: u32) -> Result<(), StoreError>;

    /// Records a released evaluation round atomically: its ledger entry (under DP), its figures
    /// and its `evaluated` state, in one durable transaction. The figures may be released once
    /// this returns `Ok`.
    fn record_evaluation(
        &mut self,
        record: &EvaluationRecord,
        ledger: Option<&LedgerEntry>,
        figures: &RoundFigures,
    ) -> Result<(), StoreError>;

    /// The newest `limit` evaluation rounds, oldest first.
    fn evaluations(&self, limit: usize) -> Result<Vec<EvaluationRecord>, StoreError>;

    /// Records that a started round failed (model unchanged).
    fn fail_round(
        &mut self,
        round: RoundId,
        detail: &str,
        figures: &RoundFigures,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// The newest checkpoint.
    fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError>;

    /// The checkpoint of `version`, if kept (checksums verified).
    fn checkpoint(&self, version: ModelVersion) -> Result<Option<Checkpoint>, StoreError>;

    /// Versions of the kept checkpoints, oldest first.
    fn checkpoint_versions(&self) -> Result<Vec<ModelVersion>, StoreError>;

    /// Every recorded round, oldest first.
    fn rounds(&self) -> Result<Vec<RoundRecord>, StoreError> {
        self.recent_rounds(usize::MAX)
    }

    /// The newest `limit` recorded rounds, oldest first.
    fn recent_rounds(&self, limit: usize) -> Result<Vec<RoundRecord>, StoreError>;

    /// What the round schedule had done before a restart: training rounds ever begun, and
    /// training rounds committed since the newest evaluation round (begun) — the counters the
    /// schedule's `max_rounds` and `evaluate_every` continue from.
    fn schedule_counters(&self) -> Result<(u64, u64), StoreError>;

    /// An operator's rollback: stores checkpoint `source` again as `version` (its model and
    /// strategy state, checksums verified), in one transaction, pruning beyond the newest
    /// `keep`. Returns the new checkpoint; the ledger is untouched (what was spent stays spent).
    /// A version already stored is never reused (an error).
    fn install_checkpoint(
        &mut self,
        version: ModelVersion,
        source: ModelVersion,
        now_ms: i64,
        keep: u32,
    ) -> Result<Checkpoint, StoreError>;

    /// Records an issued token (and enrolls its client if new). Returns the token id to embed.
    fn record_token(&mut self, client: ClientId, expires_unix_s: u64, now_ms: i64)
    -> Result<u64, StoreError>;

    /// Revokes one token.
    fn revoke_token(&mut self, token_id: u64, now_ms: i64) -> Result<(), StoreError>;

    /// Revokes a client: every token it holds, now and later, is refused.
    fn revoke_client(&mut self, client: ClientId, now_ms: i64) -> Result<(), StoreError>;

    /// Revoked token ids and revoked client ids.
    fn revocations(&self) -> Result<(Vec<u64>, Vec<u64>), StoreError>;

    /// N, the enrolled population: clients not revoked that hold at least one token neither
    /// revoked nor expired at `now_unix_s`. Central DP derives its sampling rate from it.
    fn enrolled_population(&self, now_unix_s: u64) -> Result<u64, StoreError>;

    /// Every issued token, oldest first.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Appends a ledger entry and returns once it is durable. A round already charged is
    /// [`StoreError::DuplicateRound`].
    fn append_ledger(&mut self, entry: &LedgerEntry, recorded_ms: i64) -> Result<(), StoreError>;

    /// Every ledger entry, oldest round first, validated.
    fn ledger_entries(&self) -> Result<Vec<LedgerEntry>, StoreError>;

    /// Appends an audit row (durable on return); returns its id.
    fn record_audit(
        &mut self,
        at_ms: i64,
        actor: &str,
        action: &str,
        detail: &str,
        outcome: &str,
    ) -> Result<u64, StoreError>;

    /// The newest `limit` audit rows, oldest first.
    fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;

    /// Sets an operator switch (durable on return).
    fn set_service_state(&mut self, key: &str, value: &str) -> Result<(), StoreError>;

    /// An operator switch, if set.
    fn service_state(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// The schema version of the open database (SQLite: `user_version`, up to
    /// [`SCHEMA_VERSION`]; PostgreSQL: `starling_schema`, up to [`PG_SCHEMA_VERSION`]).
    fn schema_version(&self) -> Result<i32, StoreError>;

    /// The file this store lives in (`None` in memory and on PostgreSQL).
    fn path(&self) -> Option<&Path> {
        None
    }

    /// Where the store lives, for logs and errors: the file's path, or
    /// `postgresql user@host:port/dbname` (never a password).
    fn describe(&self) -> String;

    /// Sets (or clears) the fence checked by every write to rounds, checkpoints, the ledger and
    /// evaluations (see [`Fence`]). Only [`PgStore`] supports a fence; SQLite refuses
    /// `Some(_)` with [`StoreError::Unsupported`].
    fn set_fence(&mut self, fence: Option<Fence>) -> Result<(), StoreError>;

    /// Runs raw SQL (tests tamper with rows through it).
    #[cfg(test)]
    fn execute_raw(&mut self, sql: &str) -> Result<(), StoreError>;
}

/// The coordinator's database: a [`StoreBackend`] chosen at open time, used through
/// `Deref`/`DerefMut` (`store.commit_round(…)`).
pub struct Store {
    backend: Box<dyn StoreBackend>,
}

impl Store {
    /// Opens (or creates) the SQLite database at `path`, checking that it is ours and migrating
    /// it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Ok(Self::from_backend(SqliteStore::open(path)?))
    }

    /// A SQLite database in memory (simulations and tests): same schema, nothing on disk.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Ok(Self::from_backend(SqliteStore::open_in_memory()?))
    }

    /// Connects to PostgreSQL (`conn_str`: a libpq-style `key=value` string) and migrates its
    /// schema. Blocks: call it from a blocking context, not on an async worker thread.
    pub fn connect_postgres(conn_str: &str) -> Result<Self, StoreError> {
        Ok(Self::from_backend(PgStore::connect(conn_str, None)?))
    }

    /// The store `[storage]` describes: PostgreSQL if `postgres` is set (the password read from
    /// `postgres_password_file`, if set), else the SQLite file at `path` (its directory created
    /// if missing). Blocks: call it from a blocking context.
    pub fn open_config(storage: &StorageSection) -> Result<Self, StoreError> {
        match &storage.postgres {
            Some(conn_str) => {
                let password = match &storage.postgres_password_file {
                    Some(file) => Some(
                        std::fs::read_to_string(file)
                            .map_err(|e| {
                                StoreError::Config(format!(
                                    "reading the password file {}: {e}",
                                    file.display()
                                ))
                            })?
                            .trim()
                            .to_string(),
                    ),
                    None => None,
                };
                Ok(Self::from_backend(PgStore::connect(conn_str, password.as_deref())?))
            }
            None => {
                if let Some(dir) = storage.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| StoreError::Config(format!("creating {}: {e}", dir.display())))?;
                }
                Self::open(&storage.path)
            }
        }
    }

    /// Wraps a backend.
    pub fn from_backend(backend: impl StoreBackend + 'static) -> Self {
        Self { backend: Box::new(backend) }
    }
}

impl std::ops::Deref for Store {
    type Target = dyn StoreBackend;
    fn deref(&self) -> &Self::Target {
        &*self.backend
    }
}

impl std::ops::DerefMut for Store {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut *self.backend
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("backend", &self.backend.describe()).finish()
    }
}

// ---- Helpers shared by both backends: ids, the model's encoding, checksums, row validation.

fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::BadRow { round: v, detail: "id does not fit in 63 bits".into() })
}

/// A CRC-32 as stored (a non-negative integer column).
fn crc(bytes: &[u8]) -> i64 {
    i64::from(crc32fast::hash(bytes))
}

/// The stored form of a model: validated (length, finite values), little-endian `f32`s.
fn encode_model(version: ModelVersion, shape: ModelShape, model: &[f32]) -> Result<Vec<u8>, StoreError> {
    if model.len() != shape.len() || model.iter().any(|v| !v.is_finite()) {
        return Err(StoreError::BadCheckpoint {
            version: version.0,
            detail: "refusing to store a model of the wrong length or with non-finite values".into(),
        });
    }
    let mut blob = Vec::with_capacity(model.len() * 4);
    for v in model {
        blob.extend_from_slice(&v.to_le_bytes());
    }
    Ok(blob)
}

/// A checkpoint row as read from either backend, before its checks.
struct CheckpointRow {
    round: i64,
    rows: i64,
    row_len: i64,
    model: Vec<u8>,
    crc32: i64,
    strategy_state: Option<Vec<u8>>,
    state_crc32: Option<i64>,
}

/// Verifies a checkpoint row (checksums, shape, length, finite values) and decodes it.
fn decode_checkpoint(version: ModelVersion, row: CheckpointRow) -> Result<Checkpoint, StoreError> {
    let CheckpointRow { round, rows, row_len, model: blob, crc32, strategy_state: state, state_crc32 } = row;
    let bad = |detail: String| StoreError::BadCheckpoint { version: version.0, detail };
    if crc(&blob) != crc32 {
        return Err(bad("checksum mismatch".into()));
    }
    match (&state, state_crc32) {
        (None, _) => {}
        (Some(s), Some(c)) if crc(s) == c => {}
        (Some(_), _) => return Err(bad("strategy state checksum mismatch".into())),
    }
    let shape = ModelShape::new(
        u32::try_from(rows).map_err(|_| bad(format!("rows {rows}")))?,
        u32::try_from(row_len).map_err(|_| bad(format!("row_len {row_len}")))?,
    )
    .map_err(|e| bad(e.to_string()))?;
    if blob.len() != shape.len() * 4 {
        return Err(bad(format!("{} bytes for {} values", blob.len(), shape.len())));
    }
    let model: Vec<f32> =
        blob.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if model.iter().any(|v| !v.is_finite()) {
        return Err(bad("non-finite value".into()));
    }
    Ok(Checkpoint { version, round: RoundId(round as u64), shape, model, strategy_state: state })
}

/// A ledger row's columns, validated.
fn ledger_entry(round: i64, q: f64, sigma: f64, steps: i64) -> Result<LedgerEntry, StoreError> {
    let round = round as u64;
    let bad = |detail: String| StoreError::BadRow { round, detail };
    let q = SamplingRate::new(q).map_err(|e| bad(e.to_string()))?;
    let sigma = NoiseMultiplier::new(sigma).map_err(|e| bad(e.to_string()))?;
    let steps = u64::try_from(steps).map_err(|_| bad(format!("negative step count {steps}")))?;
    Ok(LedgerEntry { round, mechanism: Mechanism { q, sigma, steps } })
}

/// A ledger entry's columns: `(round, q, σ, steps)`.
fn ledger_columns(entry: &LedgerEntry) -> Result<(i64, f64, f64, i64), StoreError> {
    let m = entry.mechanism;
    Ok((to_i64(entry.round)?, m.q.get(), m.sigma.get(), i64::try_from(m.steps).unwrap_or(i64::MAX)))
}

/// A round's figures as columns (`selected`, `reported`, `dropped`, `unfinished`, `rejected`).
fn figure_columns(f: &RoundFigures) -> Result<[i64; 5], StoreError> {
    Ok([
        to_i64(f.selected)?,
        to_i64(f.reported)?,
        to_i64(f.dropped)?,
        to_i64(f.unfinished)?,
        to_i64(f.rejected)?,
    ])
}

/// A round's figures from their columns (all set, or none recorded).
fn figures_from(columns: [Option<i64>; 5]) -> Option<RoundFigures> {
    match columns.map(|c| c.map(|v| v as u64)) {
        [Some(selected), Some(reported), Some(dropped), Some(unfinished), Some(rejected)] => {
            Some(RoundFigures { selected, reported, dropped, unfinished, rejected })
        }
        _ => None,
    }
}

/// The next round id: above every round ever begun and every round ever charged.
fn next_round(max_round: Option<i64>, max_ledger: Option<i64>) -> RoundId {
    RoundId(max_round.unwrap_or(0).max(max_ledger.unwrap_or(0)).max(0) as u64 + 1)
}

pub mod postgres;
pub mod sqlite;

pub use self::postgres::{PG_SCHEMA_VERSION, PgStore};
pub use sqlite::SqliteStore;

#[cfg(test)]
mod tests;
