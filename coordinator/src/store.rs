//! The coordinator's embedded store: one SQLite file (WAL journal, `synchronous = FULL`).
//!
//! Schema version 1 holds the privacy ledger: one row per released round, `(round, q, σ, steps)`.
//! A row is committed — written and fsynced — before the round's model is released, so after a
//! crash the ledger never holds less than what was released (it may hold a round whose model was
//! never published: ε is over-counted then, never under-counted).
//!
//! Like the SDK's database, the file is marked with SQLite's `application_id` and a schema
//! version; a foreign, corrupt or newer file is a typed error and is never overwritten. Why SQLite
//! (and not redb): see `docs/operations.md`.

use rusqlite::{Connection, OpenFlags, params};
use starling_proto::dp::{LedgerEntry, Mechanism, NoiseMultiplier, SamplingRate};
use std::path::{Path, PathBuf};

/// `application_id` of Starling coordinator databases ("STLC").
pub const APPLICATION_ID: i32 = 0x5354_4C43;
/// Current schema version.
pub const SCHEMA_VERSION: i32 = 1;

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
    /// Any other SQLite failure (disk full, permissions, …).
    #[error("storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
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
        // Later schema versions add `if from < N { … }` steps here, each in its own transaction.
        Ok(())
    }

    /// Appends a ledger entry and returns once it is durable (committed and fsynced).
    pub fn append_ledger(&mut self, entry: &LedgerEntry, recorded_ms: i64) -> Result<(), StoreError> {
        let m = entry.mechanism;
        let round = i64::try_from(entry.round).map_err(|_| StoreError::BadRow {
            round: entry.round,
            detail: "round id does not fit in 63 bits".into(),
        })?;
        let steps = i64::try_from(m.steps).unwrap_or(i64::MAX);
        let tx = self.conn.transaction()?;
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO privacy_ledger (round, q, sigma, steps, recorded_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![round, m.q.get(), m.sigma.get(), steps, recorded_ms],
        )?;
        if inserted == 0 {
            return Err(StoreError::DuplicateRound(entry.round));
        }
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
}
