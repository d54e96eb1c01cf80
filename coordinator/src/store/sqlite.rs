//! The SQLite backend ([`SqliteStore`]): one file, WAL journal, `synchronous = FULL`, marked
//! with an `application_id`; migrations by `user_version` (see the [module docs](super)).

use super::*;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

/// The SQLite backend: one file (or a database in memory). See the [module docs](super).
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    path: Option<PathBuf>,
}

impl SqliteStore {
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
}

fn insert_ledger(
    tx: &rusqlite::Transaction<'_>,
    entry: &LedgerEntry,
    recorded_ms: i64,
) -> Result<(), StoreError> {
    let (round, q, sigma, steps) = ledger_columns(entry)?;
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO privacy_ledger (round, q, sigma, steps, recorded_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![round, q, sigma, steps, recorded_ms],
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
    let blob = encode_model(version, shape, model)?;
    tx.execute(
        "INSERT INTO checkpoints (version, round, rows, row_len, model, crc32, created_ms, strategy_state, state_crc32)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            to_i64(version.0)?,
            to_i64(round.0)?,
            i64::from(shape.rows),
            i64::from(shape.row_len),
            blob,
            crc(&blob),
            now_ms,
            strategy_state,
            strategy_state.map(crc)
        ],
    )?;
    Ok(())
}

impl SqliteStore {
    fn round_state(&self, round: RoundId) -> Result<String, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT state FROM rounds WHERE round = ?1", params![to_i64(round.0)?], |r| r.get(0))
            .optional()?
            .unwrap_or_else(|| "missing".into()))
    }
}

impl StoreBackend for SqliteStore {
    fn init_model(
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
        insert_checkpoint(&tx, version, RoundId(0), shape, model, None, now_ms)?;
        tx.commit()?;
        Ok(true)
    }

    fn begin_round(
        &mut self,
        round: RoundId,
        base_version: ModelVersion,
        evaluation: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let kind = if evaluation { "evaluate" } else { "train" };
        let inserted = self.conn.execute(
            "INSERT OR IGNORE INTO rounds (round, base_version, state, started_ms, kind) VALUES (?1, ?2, 'started', ?3, ?4)",
            params![to_i64(round.0)?, to_i64(base_version.0)?, now_ms, kind],
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

    fn commit_round(&mut self, commit: &RoundCommit<'_>, now_ms: i64, keep: u32) -> Result<(), StoreError> {
        let RoundCommit { round, version, shape, model, ledger, strategy_state, figures } = *commit;
        let tx = self.conn.transaction()?;
        let r = to_i64(round.0)?;
        let updated = tx.execute(
            "UPDATE rounds SET state = 'committed', finished_ms = ?2, result_version = ?3
             WHERE round = ?1 AND state = 'started'",
            params![r, now_ms, to_i64(version.0)?],
        )?;
        set_figures(&tx, r, &figures)?;
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
        insert_checkpoint(&tx, version, round, shape, model, strategy_state, now_ms)?;
        tx.execute(
            "DELETE FROM checkpoints WHERE version NOT IN
                 (SELECT version FROM checkpoints ORDER BY version DESC LIMIT ?1)",
            params![i64::from(keep.max(1))],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn record_evaluation(
        &mut self,
        record: &EvaluationRecord,
        ledger: Option<&LedgerEntry>,
        figures: &RoundFigures,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let r = to_i64(record.round)?;
        let updated = tx.execute(
            "UPDATE rounds SET state = 'evaluated', finished_ms = ?2, result_version = ?3
             WHERE round = ?1 AND state = 'started'",
            params![r, record.at, to_i64(record.version)?],
        )?;
        set_figures(&tx, r, figures)?;
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

    fn evaluations(&self, limit: usize) -> Result<Vec<EvaluationRecord>, StoreError> {
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

    fn fail_round(
        &mut self,
        round: RoundId,
        detail: &str,
        figures: &RoundFigures,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let updated = self.conn.execute(
            "UPDATE rounds SET state = 'failed', finished_ms = ?2, detail = ?3, selected = ?4, reported = ?5,
                 dropped = ?6, unfinished = ?7, rejected = ?8
             WHERE round = ?1 AND state = 'started'",
            params![
                to_i64(round.0)?,
                now_ms,
                detail,
                to_i64(figures.selected)?,
                to_i64(figures.reported)?,
                to_i64(figures.dropped)?,
                to_i64(figures.unfinished)?,
                to_i64(figures.rejected)?
            ],
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

    fn recover(&mut self, now_ms: i64) -> Result<Recovery, StoreError> {
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
        Ok(Recovery {
            latest: self.latest_checkpoint()?,
            next_round: next_round(max_round, max_ledger),
            abandoned,
        })
    }

    fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let version: Option<i64> =
            self.conn.query_row("SELECT max(version) FROM checkpoints", [], |r| r.get(0))?;
        match version {
            None => Ok(None),
            Some(v) => self.checkpoint(ModelVersion(v as u64)),
        }
    }

    fn checkpoint(&self, version: ModelVersion) -> Result<Option<Checkpoint>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT round, rows, row_len, model, crc32, strategy_state, state_crc32 FROM checkpoints WHERE version = ?1",
                params![to_i64(version.0)?],
                |r| {
                    Ok(CheckpointRow {
                        round: r.get(0)?,
                        rows: r.get(1)?,
                        row_len: r.get(2)?,
                        model: r.get(3)?,
                        crc32: r.get(4)?,
                        strategy_state: r.get(5)?,
                        state_crc32: r.get(6)?,
                    })
                },
            )
            .optional()?;
        row.map(|row| decode_checkpoint(version, row)).transpose()
    }

    fn checkpoint_versions(&self) -> Result<Vec<ModelVersion>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT version FROM checkpoints ORDER BY version")?;
        let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
        Ok(rows.map(|r| r.map(|v| ModelVersion(v as u64))).collect::<Result<_, _>>()?)
    }

    fn recent_rounds(&self, limit: usize) -> Result<Vec<RoundRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT round, base_version, state, result_version, detail, kind, started_ms, finished_ms,
                    selected, reported, dropped, unfinished, rejected
             FROM (SELECT * FROM rounds ORDER BY round DESC LIMIT ?1) ORDER BY round",
        )?;
        let rows = stmt.query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            let figures = figures_from([r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?, r.get(12)?]);
            Ok(RoundRecord {
                round: RoundId(r.get::<_, i64>(0)? as u64),
                base_version: ModelVersion(r.get::<_, i64>(1)? as u64),
                state: r.get(2)?,
                result_version: r.get::<_, Option<i64>>(3)?.map(|v| ModelVersion(v as u64)),
                detail: r.get(4)?,
                kind: r.get(5)?,
                started_ms: r.get(6)?,
                finished_ms: r.get(7)?,
                figures,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn schedule_counters(&self) -> Result<(u64, u64), StoreError> {
        let begun: i64 =
            self.conn.query_row("SELECT count(*) FROM rounds WHERE kind = 'train'", [], |r| r.get(0))?;
        let since: i64 = self.conn.query_row(
            "SELECT count(*) FROM rounds WHERE kind = 'train' AND state = 'committed'
               AND round > coalesce((SELECT max(round) FROM rounds WHERE kind = 'evaluate'), 0)",
            [],
            |r| r.get(0),
        )?;
        Ok((begun as u64, since as u64))
    }

    fn install_checkpoint(
        &mut self,
        version: ModelVersion,
        source: ModelVersion,
        now_ms: i64,
        keep: u32,
    ) -> Result<Checkpoint, StoreError> {
        let Some(c) = self.checkpoint(source)? else {
            return Err(StoreError::BadCheckpoint { version: source.0, detail: "not kept".into() });
        };
        let tx = self.conn.transaction()?;
        insert_checkpoint(&tx, version, c.round, c.shape, &c.model, c.strategy_state.as_deref(), now_ms)?;
        tx.execute(
            "DELETE FROM checkpoints WHERE version NOT IN
                 (SELECT version FROM checkpoints ORDER BY version DESC LIMIT ?1)",
            params![i64::from(keep.max(1))],
        )?;
        tx.commit()?;
        Ok(Checkpoint { version, ..c })
    }

    fn record_token(
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

    fn revoke_token(&mut self, token_id: u64, now_ms: i64) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE tokens SET revoked_ms = coalesce(revoked_ms, ?2) WHERE token_id = ?1",
            params![to_i64(token_id)?, now_ms],
        )?;
        if n == 0 {
            return Err(StoreError::UnknownToken(token_id));
        }
        Ok(())
    }

    fn revoke_client(&mut self, client: ClientId, now_ms: i64) -> Result<(), StoreError> {
        let c = to_i64(client.0)?;
        self.conn.execute(
            "INSERT INTO clients (client_id, enrolled_ms, revoked_ms) VALUES (?1, ?2, ?2)
             ON CONFLICT (client_id) DO UPDATE SET revoked_ms = coalesce(revoked_ms, ?2)",
            params![c, now_ms],
        )?;
        Ok(())
    }

    fn revocations(&self) -> Result<(Vec<u64>, Vec<u64>), StoreError> {
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

    fn enrolled_population(&self, now_unix_s: u64) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM clients c WHERE c.revoked_ms IS NULL AND EXISTS (
                 SELECT 1 FROM tokens t
                 WHERE t.client_id = c.client_id AND t.revoked_ms IS NULL AND t.expires_s > ?1)",
            params![to_i64(now_unix_s)?],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
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

    fn append_ledger(&mut self, entry: &LedgerEntry, recorded_ms: i64) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        insert_ledger(&tx, entry, recorded_ms)?;
        tx.commit()?;
        Ok(())
    }

    fn ledger_entries(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut stmt =
            self.conn.prepare("SELECT round, q, sigma, steps FROM privacy_ledger ORDER BY round")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?, r.get::<_, f64>(2)?, r.get::<_, i64>(3)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (round, q, sigma, steps) = row?;
            out.push(ledger_entry(round, q, sigma, steps)?);
        }
        Ok(out)
    }

    fn record_audit(
        &mut self,
        at_ms: i64,
        actor: &str,
        action: &str,
        detail: &str,
        outcome: &str,
    ) -> Result<u64, StoreError> {
        self.conn.execute(
            "INSERT INTO audit (at_ms, actor, action, detail, outcome) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![at_ms, actor, action, detail, outcome],
        )?;
        Ok(self.conn.last_insert_rowid() as u64)
    }

    fn audit(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, at_ms, actor, action, detail, outcome
             FROM (SELECT * FROM audit ORDER BY id DESC LIMIT ?1) ORDER BY id",
        )?;
        let rows = stmt.query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            Ok(AuditRecord {
                id: r.get::<_, i64>(0)? as u64,
                at_ms: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                detail: r.get(4)?,
                outcome: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_service_state(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO service_state (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    fn service_state(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM service_state WHERE key = ?1", params![key], |r| r.get(0))
            .optional()?)
    }

    fn schema_version(&self) -> Result<i32, StoreError> {
        Ok(self.conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn describe(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => ":memory:".into(),
        }
    }

    fn set_fence(&mut self, fence: Option<Fence>) -> Result<(), StoreError> {
        match fence {
            None => Ok(()),
            Some(_) => Err(StoreError::Unsupported(
                "fencing needs the PostgreSQL store ([storage] postgres); SQLite has a single writer node"
                    .into(),
            )),
        }
    }

    #[cfg(test)]
    fn execute_raw(&mut self, sql: &str) -> Result<(), StoreError> {
        Ok(self.conn.execute_batch(sql)?)
    }
}

fn set_figures(tx: &rusqlite::Transaction<'_>, round: i64, f: &RoundFigures) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE rounds SET selected = ?2, reported = ?3, dropped = ?4, unfinished = ?5, rejected = ?6 WHERE round = ?1",
        rusqlite::params_from_iter(std::iter::once(round).chain(figure_columns(f)?)),
    )?;
    Ok(())
}
