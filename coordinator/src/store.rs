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
pub const SCHEMA_VERSION: i32 = 3;

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
#[derive(Clone, Debug, PartialEq, Eq)]
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
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
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
        // Later schema versions add `if from < N { … }` steps here, each in its own transaction.
        Ok(())
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i32, StoreError> {
        Ok(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Stores the initial model as version `version` (round 0) if no checkpoint exists yet;
    /// returns whether it was stored.
    pub fn init_model(
        &mut self,
        version: ModelVersion,
        shape: ModelShape,
        model: &[f32],
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        let any: i64 = tx.query_row("SELECT count(*) FROM checkpoints", [], |r| r.get(0))?;
        if any > 0 {
            return Ok(false);
        }
        insert_checkpoint(&tx, version, RoundId(0), shape, model, now_ms)?;
        tx.commit()?;
        Ok(true)
    }

    /// Records that `round` started from `base_version`; durable on return. Call before any
    /// client is sent the round's task.
    pub fn begin_round(
        &mut self,
        round: RoundId,
        base_version: ModelVersion,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let inserted = self.conn.execute(
            "INSERT OR IGNORE INTO rounds (round, base_version, state, started_ms) VALUES (?1, ?2, 'started', ?3)",
            params![to_i64(round.0)?, to_i64(base_version.0)?, now_ms],
        )?;
        if inserted == 0 {
            return Err(StoreError::RoundState {
                round: round.0,
                action: "begun",
                state: self.round_state(round)?,
            });
        }
        Ok(())
    }

    fn round_state(&self, round: RoundId) -> Result<String, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT state FROM rounds WHERE round = ?1", params![to_i64(round.0)?], |r| r.get(0))
            .optional()?
            .unwrap_or_else(|| "missing".into()))
    }

    /// Commits a round atomically: its ledger entry (if DP produced one), the new checkpoint and
    /// the `committed` state, in one fsynced transaction; then prunes checkpoints beyond the
    /// newest `keep`. The model may be released once this returns `Ok`.
    pub fn commit_round(
        &mut self,
        commit: &RoundCommit<'_>,
        now_ms: i64,
        keep: u32,
    ) -> Result<(), StoreError> {
        let RoundCommit { round, version, shape, model, ledger } = *commit;
        let tx = self.conn.transaction()?;
        let r = to_i64(round.0)?;
        let updated = tx.execute(
            "UPDATE rounds SET state = 'committed', finished_ms = ?2, result_version = ?3
             WHERE round = ?1 AND state = 'started'",
            params![r, now_ms, to_i64(version.0)?],
        )?;
        if updated == 0 {
            drop(tx);
            return Err(StoreError::RoundState {
                round: round.0,
                action: "committed",
                state: self.round_state(round)?,
            });
        }
        if let Some(entry) = ledger {
            insert_ledger(&tx, entry, now_ms)?;
        }
        insert_checkpoint(&tx, version, round, shape, model, now_ms)?;
        tx.execute(
            "DELETE FROM checkpoints WHERE version NOT IN
                 (SELECT version FROM checkpoints ORDER BY version DESC LIMIT ?1)",
            params![i64::from(keep.max(1))],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records a released evaluation round atomically: its ledger entry (under DP), its figures
    /// and its `evaluated` state, in one fsynced transaction. The figures may be released once
    /// this returns `Ok`.
    pub fn record_evaluation(
        &mut self,
        record: &EvaluationRecord,
        ledger: Option<&LedgerEntry>,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let r = to_i64(record.round)?;
        let updated = tx.execute(
            "UPDATE rounds SET state = 'evaluated', finished_ms = ?2, result_version = ?3
             WHERE round = ?1 AND state = 'started'",
            params![r, record.at, to_i64(record.version)?],
        )?;
        if updated == 0 {
            drop(tx);
            return Err(StoreError::RoundState {
                round: record.round,
                action: "evaluated",
                state: self.round_state(RoundId(record.round))?,
            });
        }
        if let Some(entry) = ledger {
            insert_ledger(&tx, entry, record.at)?;
        }
        tx.execute(
            "INSERT INTO evaluations (round, version, reports, cases, hr_at_10, ndcg_at_10, loss, noise_std, recorded_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                r,
                to_i64(record.version)?,
                to_i64(record.reports)?,
                record.cases,
                record.hr_at_10,
                record.ndcg_at_10,
                record.loss,
                record.noise_std,
                record.at
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The newest `limit` evaluation rounds, oldest first.
    pub fn evaluations(&self, limit: usize) -> Result<Vec<EvaluationRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT round, version, reports, cases, hr_at_10, ndcg_at_10, loss, noise_std, recorded_ms
             FROM (SELECT * FROM evaluations ORDER BY round DESC LIMIT ?1) ORDER BY round",
        )?;
        let rows = stmt.query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            let noise_std: Option<f64> = r.get(7)?;
            Ok(EvaluationRecord {
                round: r.get::<_, i64>(0)? as u64,
                version: r.get::<_, i64>(1)? as u64,
                reports: r.get::<_, i64>(2)? as u64,
                cases: r.get(3)?,
                hr_at_10: r.get(4)?,
                ndcg_at_10: r.get(5)?,
                loss: r.get(6)?,
                noised: noise_std.is_some(),
                noise_std,
                at: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that a started round failed (model unchanged).
    pub fn fail_round(&mut self, round: RoundId, detail: &str, now_ms: i64) -> Result<(), StoreError> {
        let updated = self.conn.execute(
            "UPDATE rounds SET state = 'failed', finished_ms = ?2, detail = ?3 WHERE round = ?1 AND state = 'started'",
            params![to_i64(round.0)?, now_ms, detail],
        )?;
        if updated == 0 {
            return Err(StoreError::RoundState {
                round: round.0,
                action: "failed",
                state: self.round_state(round)?,
            });
        }
        Ok(())
    }

    /// At start-up: marks every `started` round `abandoned`, and returns the newest committed
    /// model (checksum verified) and the next round id.
    pub fn recover(&mut self, now_ms: i64) -> Result<Recovery, StoreError> {
        let tx = self.conn.transaction()?;
        let abandoned: Vec<RoundId> = {
            let mut stmt = tx.prepare("SELECT round FROM rounds WHERE state = 'started' ORDER BY round")?;
            let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
            rows.map(|r| r.map(|v| RoundId(v as u64))).collect::<Result<_, _>>()?
        };
        tx.execute(
            "UPDATE rounds SET state = 'abandoned', finished_ms = ?1, detail = 'coordinator restarted'
             WHERE state = 'started'",
            params![now_ms],
        )?;
        let max_round: Option<i64> = tx.query_row("SELECT max(round) FROM rounds", [], |r| r.get(0))?;
        let max_ledger: Option<i64> =
            tx.query_row("SELECT max(round) FROM privacy_ledger", [], |r| r.get(0))?;
        tx.commit()?;
        let last = max_round.unwrap_or(0).max(max_ledger.unwrap_or(0)).max(0) as u64;
        Ok(Recovery { latest: self.latest_checkpoint()?, next_round: RoundId(last + 1), abandoned })
    }

    /// The newest checkpoint.
    pub fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let version: Option<i64> =
            self.conn.query_row("SELECT max(version) FROM checkpoints", [], |r| r.get(0))?;
        match version {
            None => Ok(None),
            Some(v) => self.checkpoint(ModelVersion(v as u64)),
        }
    }

    /// The checkpoint of `version`, if kept.
    pub fn checkpoint(&self, version: ModelVersion) -> Result<Option<Checkpoint>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT round, rows, row_len, model, crc32 FROM checkpoints WHERE version = ?1",
                params![to_i64(version.0)?],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )
            .optional()?;
        let Some((round, rows, row_len, blob, crc)) = row else { return Ok(None) };
        let bad = |detail: String| StoreError::BadCheckpoint { version: version.0, detail };
        if i64::from(crc32fast::hash(&blob)) != crc {
            return Err(bad("checksum mismatch".into()));
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
        Ok(Some(Checkpoint { version, round: RoundId(round as u64), shape, model }))
    }

    /// Versions of the kept checkpoints, oldest first.
    pub fn checkpoint_versions(&self) -> Result<Vec<ModelVersion>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT version FROM checkpoints ORDER BY version")?;
        let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
        Ok(rows.map(|r| r.map(|v| ModelVersion(v as u64))).collect::<Result<_, _>>()?)
    }

    /// Every recorded round, oldest first.
    pub fn rounds(&self) -> Result<Vec<RoundRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT round, base_version, state, result_version, detail FROM rounds ORDER BY round",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(RoundRecord {
                round: RoundId(r.get::<_, i64>(0)? as u64),
                base_version: ModelVersion(r.get::<_, i64>(1)? as u64),
                state: r.get(2)?,
                result_version: r.get::<_, Option<i64>>(3)?.map(|v| ModelVersion(v as u64)),
                detail: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records an issued token (and enrolls its client if new). Returns the token id to embed.
    pub fn record_token(
        &mut self,
        client: ClientId,
        expires_unix_s: u64,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let c = to_i64(client.0)?;
        tx.execute(
            "INSERT OR IGNORE INTO clients (client_id, enrolled_ms) VALUES (?1, ?2)",
            params![c, now_ms],
        )?;
        tx.execute(
            "INSERT INTO tokens (client_id, expires_s, issued_ms) VALUES (?1, ?2, ?3)",
            params![c, to_i64(expires_unix_s)?, now_ms],
        )?;
        let id = tx.last_insert_rowid() as u64;
        tx.commit()?;
        Ok(id)
    }

    /// Revokes one token.
    pub fn revoke_token(&mut self, token_id: u64, now_ms: i64) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE tokens SET revoked_ms = coalesce(revoked_ms, ?2) WHERE token_id = ?1",
            params![to_i64(token_id)?, now_ms],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownToken(token_id));
        }
        Ok(())
    }

    /// Revokes a client: every token it holds, now and later, is refused.
    pub fn revoke_client(&mut self, client: ClientId, now_ms: i64) -> Result<(), StoreError> {
        let c = to_i64(client.0)?;
        self.conn.execute(
            "INSERT INTO clients (client_id, enrolled_ms, revoked_ms) VALUES (?1, ?2, ?2)
             ON CONFLICT (client_id) DO UPDATE SET revoked_ms = coalesce(revoked_ms, ?2)",
            params![c, now_ms],
        )?;
        Ok(())
    }

    /// Revoked token ids and revoked client ids.
    pub fn revocations(&self) -> Result<(Vec<u64>, Vec<u64>), StoreError> {
        let ids = |sql: &str| -> Result<Vec<u64>, StoreError> {
            let mut stmt = self.conn.prepare(sql)?;
            let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
            Ok(rows.map(|r| r.map(|v| v as u64)).collect::<Result<_, _>>()?)
        };
        Ok((
            ids("SELECT token_id FROM tokens WHERE revoked_ms IS NOT NULL")?,
            ids("SELECT client_id FROM clients WHERE revoked_ms IS NOT NULL")?,
        ))
    }

    /// N, the enrolled population: clients not revoked that hold at least one token neither
    /// revoked nor expired at `now_unix_s`. Central DP derives its sampling rate from it.
    pub fn enrolled_population(&self, now_unix_s: u64) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM clients c WHERE c.revoked_ms IS NULL AND EXISTS (
                 SELECT 1 FROM tokens t
                 WHERE t.client_id = c.client_id AND t.revoked_ms IS NULL AND t.expires_s > ?1)",
            params![to_i64(now_unix_s)?],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    /// Every issued token, oldest first.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT token_id, client_id, expires_s, issued_ms, revoked_ms FROM tokens ORDER BY token_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(TokenRecord {
                token_id: r.get::<_, i64>(0)? as u64,
                client: ClientId(r.get::<_, i64>(1)? as u64),
                expires_unix_s: r.get::<_, i64>(2)? as u64,
                issued_ms: r.get(3)?,
                revoked_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Appends a ledger entry and returns once it is durable (committed and fsynced).
    pub fn append_ledger(&mut self, entry: &LedgerEntry, recorded_ms: i64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        insert_ledger(&tx, entry, recorded_ms)?;
        tx.commit()?;
        Ok(())
    }

    /// Every ledger entry, oldest round first, validated.
    pub fn ledger_entries(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT round, q, sigma, steps FROM privacy_ledger ORDER BY round")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?, r.get::<_, f64>(2)?, r.get::<_, i64>(3)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (round, q, sigma, steps) = row?;
            let round = round as u64;
            let bad = |detail: String| StoreError::BadRow { round, detail };
            let q = SamplingRate::new(q).map_err(|e| bad(e.to_string()))?;
            let sigma = NoiseMultiplier::new(sigma).map_err(|e| bad(e.to_string()))?;
            let steps = u64::try_from(steps).map_err(|_| bad(format!("negative step count {steps}")))?;
            out.push(LedgerEntry { round, mechanism: Mechanism { q, sigma, steps } });
        }
        Ok(out)
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
        "INSERT INTO checkpoints (version, round, rows, row_len, model, crc32, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            to_i64(version.0)?,
            to_i64(round.0)?,
            i64::from(shape.rows),
            i64::from(shape.row_len),
            blob,
            i64::from(crc32fast::hash(&blob)),
            now_ms
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(round: u64, sigma: f64) -> LedgerEntry {
        LedgerEntry {
            round,
            mechanism: Mechanism {
                q: SamplingRate::new(0.01).unwrap(),
                sigma: NoiseMultiplier::new(sigma).unwrap(),
                steps: 1,
            },
        }
    }

    #[test]
    fn ledger_survives_reopen_and_refuses_a_second_charge_for_a_round() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.db");
        {
            let mut s = Store::open(&path).unwrap();
            s.append_ledger(&entry(1, 1.1), 10).unwrap();
            s.append_ledger(&entry(2, 1.2), 20).unwrap();
            assert!(matches!(s.append_ledger(&entry(2, 9.0), 30), Err(StoreError::DuplicateRound(2))));
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.ledger_entries().unwrap(), vec![entry(1, 1.1), entry(2, 1.2)]);
    }

    #[test]
    fn foreign_corrupt_and_invalid_files_are_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, b"this is not a database, just some bytes that go on for a while......")
            .unwrap();
        let before = std::fs::read(&junk).unwrap();
        assert!(matches!(Store::open(&junk), Err(StoreError::Corrupt { .. })));
        assert_eq!(std::fs::read(&junk).unwrap(), before);

        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        let before = std::fs::read(&other).unwrap();
        assert!(matches!(Store::open(&other), Err(StoreError::Foreign { .. })));
        assert_eq!(std::fs::read(&other).unwrap(), before);

        // A row tampered into nonsense is reported, not silently skipped.
        let path = dir.path().join("c.db");
        let mut s = Store::open(&path).unwrap();
        s.append_ledger(&entry(1, 1.0), 0).unwrap();
        s.conn.execute("UPDATE privacy_ledger SET sigma = -1 WHERE round = 1", []).unwrap();
        assert!(matches!(s.ledger_entries(), Err(StoreError::BadRow { round: 1, .. })));
    }

    fn shape() -> ModelShape {
        ModelShape::new(3, 2).unwrap()
    }

    #[test]
    fn migrates_a_version_1_file_and_keeps_its_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&format!(
                "CREATE TABLE privacy_ledger (round INTEGER PRIMARY KEY, q REAL NOT NULL, sigma REAL NOT NULL,
                     steps INTEGER NOT NULL, recorded_ms INTEGER NOT NULL);
                 INSERT INTO privacy_ledger VALUES (1, 0.01, 1.1, 1, 0);
                 PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1;"
            ))
            .unwrap();
        }
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(s.ledger_entries().unwrap(), vec![entry(1, 1.1)]);
        // The ledger's round 1 is taken: the next round id is above it.
        assert_eq!(s.recover(0).unwrap().next_round, RoundId(2));
    }

    fn evaluation(round: u64, hr: f64, noise_std: Option<f64>) -> EvaluationRecord {
        EvaluationRecord {
            round,
            version: 1,
            hr_at_10: hr,
            ndcg_at_10: hr / 2.0,
            loss: 0.7,
            reports: 12,
            cases: 11.5,
            noised: noise_std.is_some(),
            noise_std,
            at: 1000 + round as i64,
        }
    }

    #[test]
    fn a_version_2_file_migrates_and_evaluations_are_recorded_with_their_charge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.db");
        {
            // A version-2 store with a committed round.
            let mut s = Store::open(&path).unwrap();
            s.conn.execute_batch("DROP TABLE evaluations; PRAGMA user_version = 2;").unwrap();
            s.begin_round(RoundId(1), ModelVersion(0), 0).unwrap();
            s.fail_round(RoundId(1), "x", 1).unwrap();
        }
        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), 3);
        assert_eq!(s.rounds().unwrap()[0].state, "failed", "rounds survive the rebuild");
        s.begin_round(RoundId(2), ModelVersion(1), 2).unwrap();
        s.record_evaluation(&evaluation(2, 0.25, Some(1.2)), Some(&entry(2, 0.6))).unwrap();
        // Only a started round can be evaluated, once; a failed write leaves nothing behind.
        let err = s.record_evaluation(&evaluation(2, 0.5, None), None).unwrap_err();
        assert!(matches!(err, StoreError::RoundState { action: "evaluated", .. }), "{err}");
        s.begin_round(RoundId(3), ModelVersion(1), 3).unwrap();
        assert!(s.record_evaluation(&evaluation(3, 0.5, Some(1.2)), Some(&entry(2, 0.6))).is_err());
        assert_eq!(s.rounds().unwrap()[2].state, "started", "the duplicate charge rolled everything back");
        s.record_evaluation(&evaluation(3, 0.5, None), None).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(
            s.evaluations(20).unwrap(),
            vec![evaluation(2, 0.25, Some(1.2)), evaluation(3, 0.5, None)]
        );
        assert_eq!(s.evaluations(1).unwrap(), vec![evaluation(3, 0.5, None)]);
        assert_eq!(s.ledger_entries().unwrap(), vec![entry(2, 0.6)]);
        let states: Vec<String> = s.rounds().unwrap().into_iter().map(|r| r.state).collect();
        assert_eq!(states, ["failed", "evaluated", "evaluated"]);
    }

    #[test]
    fn commit_is_atomic_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        {
            let mut s = Store::open(&path).unwrap();
            assert!(s.init_model(ModelVersion(0), shape(), &[0.0; 6], 1).unwrap());
            assert!(!s.init_model(ModelVersion(0), shape(), &[9.0; 6], 1).unwrap(), "only once");
            s.begin_round(RoundId(1), ModelVersion(0), 2).unwrap();
            s.commit_round(
                &RoundCommit {
                    round: RoundId(1),
                    version: ModelVersion(1),
                    shape: shape(),
                    model: &[1.0; 6],
                    ledger: Some(&entry(1, 1.0)),
                },
                3,
                8,
            )
            .unwrap();
            s.begin_round(RoundId(2), ModelVersion(1), 4).unwrap();
            // A second commit of round 1 is refused and changes nothing.
            assert!(matches!(
                s.commit_round(
                    &RoundCommit {
                        round: RoundId(1),
                        version: ModelVersion(2),
                        shape: shape(),
                        model: &[2.0; 6],
                        ledger: None
                    },
                    5,
                    8
                ),
                Err(StoreError::RoundState { round: 1, .. })
            ));
            // Round 2 wants to charge round 1's ledger row again: the whole commit rolls back.
            assert!(matches!(
                s.commit_round(
                    &RoundCommit {
                        round: RoundId(2),
                        version: ModelVersion(2),
                        shape: shape(),
                        model: &[2.0; 6],
                        ledger: Some(&entry(1, 1.0))
                    },
                    5,
                    8
                ),
                Err(StoreError::DuplicateRound(1))
            ));
            assert_eq!(s.latest_checkpoint().unwrap().unwrap().version, ModelVersion(1));
            assert_eq!(s.rounds().unwrap()[1].state, "started");
            // Nothing non-finite is ever stored.
            assert!(
                s.commit_round(
                    &RoundCommit {
                        round: RoundId(2),
                        version: ModelVersion(2),
                        shape: shape(),
                        model: &[f32::NAN; 6],
                        ledger: None
                    },
                    5,
                    8
                )
                .is_err()
            );
            assert_eq!(s.rounds().unwrap()[1].state, "started");
            // …and the process dies here, with round 2 in flight.
        }
        let mut s = Store::open(&path).unwrap();
        let r = s.recover(10).unwrap();
        assert_eq!(r.abandoned, vec![RoundId(2)]);
        assert_eq!(r.next_round, RoundId(3));
        let latest = r.latest.unwrap();
        assert_eq!((latest.version, latest.round, latest.model), (ModelVersion(1), RoundId(1), vec![1.0; 6]));
        assert_eq!(s.ledger_entries().unwrap(), vec![entry(1, 1.0)]);
        assert_eq!(s.rounds().unwrap()[1].state, "abandoned");
        assert!(s.begin_round(RoundId(2), ModelVersion(1), 11).is_err(), "round ids are never reused");
        s.begin_round(RoundId(3), ModelVersion(1), 11).unwrap();
        s.fail_round(RoundId(3), "too few reports", 12).unwrap();
        assert!(s.fail_round(RoundId(3), "again", 12).is_err());
    }

    #[test]
    fn checkpoints_are_pruned_and_checksummed() {
        let mut s = Store::open_in_memory().unwrap();
        s.init_model(ModelVersion(0), shape(), &[0.0; 6], 0).unwrap();
        for r in 1..=5u64 {
            s.begin_round(RoundId(r), ModelVersion(r - 1), 0).unwrap();
            s.commit_round(
                &RoundCommit {
                    round: RoundId(r),
                    version: ModelVersion(r),
                    shape: shape(),
                    model: &[r as f32; 6],
                    ledger: None,
                },
                0,
                3,
            )
            .unwrap();
        }
        assert_eq!(s.checkpoint_versions().unwrap(), vec![ModelVersion(3), ModelVersion(4), ModelVersion(5)]);
        s.conn.execute("UPDATE checkpoints SET model = zeroblob(24) WHERE version = 5", []).unwrap();
        assert!(matches!(s.latest_checkpoint(), Err(StoreError::BadCheckpoint { version: 5, .. })));
    }

    #[test]
    fn tokens_and_revocations() {
        let mut s = Store::open_in_memory().unwrap();
        let a = s.record_token(ClientId(7), 100, 1).unwrap();
        let b = s.record_token(ClientId(7), 200, 2).unwrap();
        let c = s.record_token(ClientId(8), 200, 2).unwrap();
        assert!(a < b && b < c);
        s.revoke_token(b, 3).unwrap();
        assert!(matches!(s.revoke_token(999, 3), Err(StoreError::UnknownToken(999))));
        s.revoke_client(ClientId(8), 4).unwrap();
        s.revoke_client(ClientId(9), 4).unwrap();
        assert_eq!(s.revocations().unwrap(), (vec![b], vec![8, 9]));
        assert_eq!(s.tokens().unwrap().len(), 3);
    }

    /// N counts clients with a live token: not revoked, not expired, client not revoked.
    #[test]
    fn enrolled_population_counts_live_clients_only() {
        let mut s = Store::open_in_memory().unwrap();
        assert_eq!(s.enrolled_population(50).unwrap(), 0);
        s.record_token(ClientId(1), 100, 1).unwrap();
        let t2 = s.record_token(ClientId(2), 100, 1).unwrap();
        s.record_token(ClientId(3), 100, 1).unwrap();
        s.record_token(ClientId(4), 60, 1).unwrap(); // expires at 60
        s.record_token(ClientId(1), 200, 2).unwrap(); // a second token: still one client
        assert_eq!(s.enrolled_population(50).unwrap(), 4);
        assert_eq!(s.enrolled_population(70).unwrap(), 3, "client 4's only token expired");
        s.revoke_token(t2, 3).unwrap();
        s.revoke_client(ClientId(3), 3).unwrap();
        assert_eq!(s.enrolled_population(70).unwrap(), 1);
        assert_eq!(s.enrolled_population(150).unwrap(), 1, "client 1 still has its later token");
    }
}
