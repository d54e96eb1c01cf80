//! The coordinator's embedded store: one SQLite file (WAL journal, `synchronous = FULL`).
//!
//! Schema version 1 holds the privacy ledger: one row per released round, `(round, q, σ, steps)`.
//! A row is committed — written and fsynced — before the round's model is released, so after a
//! crash the ledger never holds less than what was released (it may hold a round whose model was
//! never published: ε is over-counted then, never under-counted).
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
//!   HR@10, NDCG@10, loss, the noise's standard deviation under DP). [`Store::record_evaluation`]
//!   writes it with the round's ledger entry and its `evaluated` state in one transaction, before
//!   the figures are released.
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
//! [`Store::commit_round`] writes a round's ledger entry, its checkpoint and its `committed`
//! state in **one transaction**: after a crash either all three are there or none is, and the
//! model is only released after that transaction returned. A round is recorded `started`
//! ([`Store::begin_round`]) before any client gets its task, so a restart always knows which round
//! ids were used (ids are never reused) and which round was cut short ([`Store::recover`]).
//!
//! Like the SDK's database, the file is marked with SQLite's `application_id` and a schema
//! version; a foreign, corrupt or newer file is a typed error and is never overwritten. Why SQLite
//! (and not redb): see `docs/operations.md`.

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use starling_proto::dp::{LedgerEntry, Mechanism, NoiseMultiplier, SamplingRate};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::update::ModelShape;
use std::path::{Path, PathBuf};

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

/// What [`Store::commit_round`] writes.
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

/// What a restart finds: see [`Store::recover`].
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

/// The coordinator's database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: Option<PathBuf>,
}

impl Store {
    /// Opens (or creates) the database at `path`, checking that it is ours and migrating it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let existed = std::fs::metadata(&path).map(|m| m.len() > 0).unwrap_or(false);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Self::init(conn, Some(path), existed)
    }

    /// A database in memory (simulations and tests): same schema, nothing on disk.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?, None, false)
    }

    fn init(conn: Connection, path: Option<PathBuf>, existed: bool) -> Result<Self, StoreError> {
        let shown = path.clone().unwrap_or_else(|| PathBuf::from(":memory:"));
        let corrupt = |e: rusqlite::Error| StoreError::Corrupt { path: shown.clone(), detail: e.to_string() };
        // Reading the header fails on a file that is not SQLite at all.
        let app_id: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(corrupt)?;
        let version: i32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(corrupt)?;
        if existed {
            if app_id != APPLICATION_ID {
                return Err(StoreError::Foreign { path: shown, found: app_id });
            }
            let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(corrupt)?;
            if check != "ok" {
                return Err(StoreError::Corrupt { path: shown, detail: check });
            }
            if version > SCHEMA_VERSION {
                return Err(StoreError::TooNew { found: version, supported: SCHEMA_VERSION });
            }
        }
        // WAL with synchronous = FULL: every commit is fsynced before it returns.
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        // Several connections write (the round hook, the control plane, `starling token`): wait
        // for a lock instead of failing at once.
        conn.execute_batch(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
        )?;
        let mut store = Self { conn, path };
        store.migrate(if existed { version } else { 0 })?;
        Ok(store)
    }

    /// The file this store lives in (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn migrate(&mut self, from: i32) -> Result<(), StoreError> {
        if from < 1 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS privacy_ledger (
                     round       INTEGER PRIMARY KEY,
                     q           REAL    NOT NULL,
                     sigma       REAL    NOT NULL,
                     steps       INTEGER NOT NULL,
                     recorded_ms INTEGER NOT NULL
                 );",
            )?;
            tx.execute_batch(&format!("PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1;"))?;
            tx.commit()?;
        }
        if from < 2 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(
                "CREATE TABLE checkpoints (
                     version    INTEGER PRIMARY KEY,
                     round      INTEGER NOT NULL,
                     rows       INTEGER NOT NULL,
                     row_len    INTEGER NOT NULL,
                     model      BLOB    NOT NULL,
                     crc32      INTEGER NOT NULL,
                     created_ms INTEGER NOT NULL
                 );
                 CREATE TABLE rounds (
                     round          INTEGER PRIMARY KEY,
                     base_version   INTEGER NOT NULL,
                     state          TEXT    NOT NULL
                                    CHECK (state IN ('started', 'committed', 'failed', 'abandoned')),
                     started_ms     INTEGER NOT NULL,
                     finished_ms    INTEGER,
                     result_version INTEGER,
                     detail         TEXT
                 );
                 CREATE TABLE clients (
                     client_id   INTEGER PRIMARY KEY,
                     enrolled_ms INTEGER NOT NULL,
                     revoked_ms  INTEGER
                 );
                 CREATE TABLE tokens (
                     token_id   INTEGER PRIMARY KEY,
                     client_id  INTEGER NOT NULL REFERENCES clients (client_id),
                     expires_s  INTEGER NOT NULL,
                     issued_ms  INTEGER NOT NULL,
                     revoked_ms INTEGER
                 );
                 CREATE INDEX tokens_by_client ON tokens (client_id);
                 PRAGMA user_version = 2;",
            )?;
            tx.commit()?;
        }
        if from < 3 {
            let tx = self.conn.transaction()?;
            // SQLite cannot alter a CHECK: the rounds table is rebuilt with the wider one.
            tx.execute_batch(
                "CREATE TABLE rounds_v3 (
                     round          INTEGER PRIMARY KEY,
                     base_version   INTEGER NOT NULL,
                     state          TEXT    NOT NULL
                                    CHECK (state IN ('started', 'committed', 'failed', 'abandoned', 'evaluated')),
                     started_ms     INTEGER NOT NULL,
                     finished_ms    INTEGER,
                     result_version INTEGER,
                     detail         TEXT
                 );
                 INSERT INTO rounds_v3 SELECT round, base_version, state, started_ms, finished_ms, result_version, detail FROM rounds;
                 DROP TABLE rounds;
                 ALTER TABLE rounds_v3 RENAME TO rounds;
                 CREATE TABLE evaluations (
                     round       INTEGER PRIMARY KEY,
                     version     INTEGER NOT NULL,
                     reports     INTEGER NOT NULL,
                     cases       REAL    NOT NULL,
                     hr_at_10    REAL    NOT NULL,
                     ndcg_at_10  REAL    NOT NULL,
                     loss        REAL    NOT NULL,
                     noise_std   REAL,
                     recorded_ms INTEGER NOT NULL
                 );
                 PRAGMA user_version = 3;",
            )?;
            tx.commit()?;
        }
        if from < 4 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(
                "ALTER TABLE checkpoints ADD COLUMN strategy_state BLOB;
                 ALTER TABLE checkpoints ADD COLUMN state_crc32 INTEGER;
                 ALTER TABLE rounds ADD COLUMN kind TEXT NOT NULL DEFAULT 'train'
                     CHECK (kind IN ('train', 'evaluate'));
                 UPDATE rounds SET kind = 'evaluate' WHERE state = 'evaluated';
                 ALTER TABLE rounds ADD COLUMN selected INTEGER;
                 ALTER TABLE rounds ADD COLUMN reported INTEGER;
                 ALTER TABLE rounds ADD COLUMN dropped INTEGER;
                 ALTER TABLE rounds ADD COLUMN unfinished INTEGER;
                 ALTER TABLE rounds ADD COLUMN rejected INTEGER;
                 CREATE TABLE audit (
                     id      INTEGER PRIMARY KEY AUTOINCREMENT,
                     at_ms   INTEGER NOT NULL,
                     actor   TEXT    NOT NULL,
                     action  TEXT    NOT NULL,
                     detail  TEXT    NOT NULL,
                     outcome TEXT    NOT NULL
                 );
                 CREATE TABLE service_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 PRAGMA user_version = 4;",
            )?;
            tx.commit()?;
        }
        // Later schema versions add `if from < N { … }` steps here, each in its own transaction.
        Ok(())
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i32, StoreError> {
        Ok(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }
}

fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::BadRow { round: v, detail: "id does not fit in 63 bits".into() })
}

fn insert_ledger(
    tx: &rusqlite::Transaction<'_>,
    entry: &LedgerEntry,
    recorded_ms: i64,
) -> Result<(), StoreError> {
    let m = entry.mechanism;
    let round = to_i64(entry.round)?;
    let steps = i64::try_from(m.steps).unwrap_or(i64::MAX);
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO privacy_ledger (round, q, sigma, steps, recorded_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![round, m.q.get(), m.sigma.get(), steps, recorded_ms],
    )?;
    if inserted == 0 {
        return Err(StoreError::DuplicateRound(entry.round));
    }
    Ok(())
}

fn insert_checkpoint(
    tx: &rusqlite::Transaction<'_>,
    version: ModelVersion,
    round: RoundId,
    shape: ModelShape,
    model: &[f32],
    strategy_state: Option<&[u8]>,
    now_ms: i64,
) -> Result<(), StoreError> {
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
    tx.execute(
        "INSERT INTO checkpoints (version, round, rows, row_len, model, crc32, created_ms, strategy_state, state_crc32)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            to_i64(version.0)?,
            to_i64(round.0)?,
            i64::from(shape.rows),
            i64::from(shape.row_len),
            blob,
            i64::from(crc32fast::hash(&blob)),
            now_ms,
            strategy_state,
            strategy_state.map(|s| i64::from(crc32fast::hash(s)))
        ],
    )?;
    Ok(())
}

mod operations;
mod rounds;
mod tokens;

pub use operations::AuditRecord;

#[cfg(test)]
mod tests;
