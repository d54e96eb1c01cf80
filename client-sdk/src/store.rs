//! The SDK's on-device storage: one SQLite file holding the user's events, the private model
//! state, consent, the participation record and the local privacy ledger.
//!
//! - The file is marked with SQLite's `application_id` and a schema version (`user_version`).
//!   Opening a file that belongs to something else, or a corrupt one, is a typed error; such a
//!   file is never overwritten.
//! - `secure_delete` is on and the journal is a rollback journal (no WAL), so deleted rows are
//!   zeroed in the file; [`Store::forget`] also vacuums, so after it the file no longer contains
//!   any erased byte.
//! - Events are stored with their time, kind and item as columns (for retention and queries) and
//!   their full body as JSON, so the store does not depend on the event type.

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// `application_id` of Starling SDK databases ("STLG").
pub const APPLICATION_ID: i32 = 0x5354_4C47;
/// Current schema version.
pub const SCHEMA_VERSION: i32 = 1;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file exists but is not a Starling SDK database (another application's SQLite file, or
    /// not SQLite at all). It was left untouched.
    #[error("{path} is not a Starling SDK database (application_id {found:#x}); it was left untouched")]
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
    /// The file was written by a newer SDK.
    #[error("database schema version {found} is newer than this SDK's ({supported})")]
    TooNew {
        /// Version found.
        found: i32,
        /// Newest version this SDK understands.
        supported: i32,
    },
    /// A stored value could not be (de)serialised.
    #[error("stored value {what} is invalid: {detail}")]
    BadValue {
        /// Which value.
        what: String,
        /// Why.
        detail: String,
    },
    /// Any other SQLite failure (disk full, permissions, …).
    #[error("storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// One stored event row.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent<E> {
    /// Row id (insertion order).
    pub id: i64,
    /// When it happened, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The event.
    pub event: E,
}

/// One entry of the device's privacy ledger: a round this device contributed to.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct LedgerEntry {
    /// The coordinator's round id.
    pub round: u64,
    /// When the update was sent, ms since the Unix epoch.
    pub at_ms: i64,
    /// Bytes sent for this round.
    pub bytes_sent: u64,
    /// L2 clip norm applied to the update.
    pub clip_norm: Option<f64>,
    /// Local noise multiplier (local-DP mode).
    pub noise_multiplier: Option<f64>,
    /// ε this release cost under local DP, at the ledger's δ.
    pub epsilon: Option<f64>,
}

/// The SDK's database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the database at `path`, checking that it is ours and migrating it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let existed = path.exists() && std::fs::metadata(&path).map(|m| m.len() > 0).unwrap_or(false);
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Self::init(conn, path, existed)
    }

    /// A database that lives in memory only (nothing survives the process).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory()?;
        // Small pages: an in-memory store is mostly a few tiny tables, and simulations hold
        // thousands of them.
        conn.execute_batch("PRAGMA page_size = 1024;")?;
        Self::init(conn, PathBuf::from(":memory:"), false)
    }

    fn init(conn: Connection, path: PathBuf, existed: bool) -> Result<Self, StoreError> {
        let corrupt = |e: rusqlite::Error| StoreError::Corrupt { path: path.clone(), detail: e.to_string() };
        // Reading the header fails on a file that is not SQLite at all.
        let app_id: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(corrupt)?;
        let version: i32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(corrupt)?;
        if existed {
            if app_id != APPLICATION_ID {
                return Err(StoreError::Foreign { path, found: app_id });
            }
            let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(corrupt)?;
            if check != "ok" {
                return Err(StoreError::Corrupt { path, detail: check });
            }
            if version > SCHEMA_VERSION {
                return Err(StoreError::TooNew { found: version, supported: SCHEMA_VERSION });
            }
        }
        // synchronous = NORMAL: a power cut may lose the last few events, never corrupt the file.
        conn.execute_batch(
            "PRAGMA secure_delete = ON; PRAGMA journal_mode = DELETE; PRAGMA synchronous = NORMAL;
             PRAGMA foreign_keys = ON;",
        )?;
        let mut store = Self { conn, path };
        store.migrate(if existed { version } else { 0 })?;
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn migrate(&mut self, from: i32) -> Result<(), StoreError> {
        if from < 1 {
            let tx = self.conn.transaction()?;
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS events (
                     id    INTEGER PRIMARY KEY AUTOINCREMENT,
                     at_ms INTEGER NOT NULL,
                     kind  TEXT    NOT NULL,
                     item  INTEGER NOT NULL,
                     body  TEXT    NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS events_at ON events(at_ms);
                 CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
                 CREATE TABLE IF NOT EXISTS ledger (
                     id               INTEGER PRIMARY KEY AUTOINCREMENT,
                     round            INTEGER NOT NULL,
                     at_ms            INTEGER NOT NULL,
                     bytes_sent       INTEGER NOT NULL,
                     clip_norm        REAL,
                     noise_multiplier REAL,
                     epsilon          REAL
                 );",
            )?;
            tx.execute_batch(&format!("PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1;"))?;
            tx.commit()?;
        }
        // Later schema versions add `if from < N { … }` steps here, each in its own transaction.
        Ok(())
    }

    /// Appends an event (`kind` and `item` are stored as columns, the whole event as JSON).
    pub fn insert_event<E: Serialize>(
        &self,
        at_ms: i64,
        kind: &str,
        item: u32,
        event: &E,
    ) -> Result<i64, StoreError> {
        let body = serde_json::to_string(event)
            .map_err(|e| StoreError::BadValue { what: "event".into(), detail: e.to_string() })?;
        self.conn
            .prepare_cached("INSERT INTO events (at_ms, kind, item, body) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![at_ms, kind, item, body])?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Appends several events in one transaction (much faster than one by one): each item is
    /// `(at_ms, kind, item, event)`. Returns the new row ids.
    pub fn insert_events<'a, E: Serialize + 'a>(
        &mut self,
        events: impl IntoIterator<Item = (i64, &'a str, u32, &'a E)>,
    ) -> Result<Vec<i64>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut ids = Vec::new();
        {
            let mut stmt =
                tx.prepare_cached("INSERT INTO events (at_ms, kind, item, body) VALUES (?1, ?2, ?3, ?4)")?;
            for (at_ms, kind, item, event) in events {
                let body = serde_json::to_string(event)
                    .map_err(|e| StoreError::BadValue { what: "event".into(), detail: e.to_string() })?;
                stmt.execute(params![at_ms, kind, item, body])?;
                ids.push(tx.last_insert_rowid());
            }
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Every stored event, oldest first.
    pub fn events<E: DeserializeOwned>(&self) -> Result<Vec<StoredEvent<E>>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT id, at_ms, body FROM events ORDER BY at_ms, id")?;
        let rows =
            stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at_ms, body) = row?;
            let event = serde_json::from_str(&body)
                .map_err(|e| StoreError::BadValue { what: format!("event {id}"), detail: e.to_string() })?;
            out.push(StoredEvent { id, at_ms, event });
        }
        Ok(out)
    }

    /// The oldest stored event's time, if any.
    pub fn oldest_event_ms(&self) -> Result<Option<i64>, StoreError> {
        Ok(self.conn.query_row("SELECT MIN(at_ms) FROM events", [], |r| r.get(0))?)
    }

    /// Number of stored events.
    pub fn event_count(&self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Deletes events older than `cutoff_ms`; returns how many.
    pub fn purge_before(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        Ok(self.conn.execute("DELETE FROM events WHERE at_ms < ?1", params![cutoff_ms])?)
    }

    /// Keeps only the newest `cap` events; returns how many were deleted.
    pub fn enforce_cap(&self, cap: u64) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM events WHERE id NOT IN (SELECT id FROM events ORDER BY at_ms DESC, id DESC LIMIT ?1)",
            params![cap as i64],
        )?)
    }

    /// Stores a value under `key` (JSON).
    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| StoreError::BadValue { what: key.into(), detail: e.to_string() })?;
        self.conn.execute(
            "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, bytes],
        )?;
        Ok(())
    }

    /// Reads the value under `key`, if any.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT value FROM kv WHERE key = ?1", params![key], |r| r.get(0))
            .optional()?;
        bytes
            .map(|b| serde_json::from_slice(&b))
            .transpose()
            .map_err(|e| StoreError::BadValue { what: key.into(), detail: e.to_string() })
    }

    /// Stores a vector of `f32` under `key`, as raw little-endian bytes.
    pub fn put_f32s(&self, key: &str, values: &[f32]) -> Result<(), StoreError> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.conn.execute(
            "INSERT INTO kv (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, bytes],
        )?;
        Ok(())
    }

    /// Reads a vector of `f32` stored with [`put_f32s`](Self::put_f32s).
    pub fn get_f32s(&self, key: &str) -> Result<Option<Vec<f32>>, StoreError> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT value FROM kv WHERE key = ?1", params![key], |r| r.get(0))
            .optional()?;
        match bytes {
            None => Ok(None),
            Some(b) if b.len() % 4 != 0 => Err(StoreError::BadValue {
                what: key.into(),
                detail: format!("{} bytes is not a whole f32 array", b.len()),
            }),
            Some(b) => {
                Ok(Some(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
            }
        }
    }

    /// Deletes the value under `key`.
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.conn.execute("DELETE FROM kv WHERE key = ?1", params![key])?;
        Ok(())
    }

    /// Appends a ledger entry.
    pub fn append_ledger(&self, e: &LedgerEntry) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO ledger (round, at_ms, bytes_sent, clip_norm, noise_multiplier, epsilon) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![e.round as i64, e.at_ms, e.bytes_sent as i64, e.clip_norm, e.noise_multiplier, e.epsilon],
        )?;
        Ok(())
    }

    /// The whole ledger, oldest first.
    pub fn ledger(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT round, at_ms, bytes_sent, clip_norm, noise_multiplier, epsilon FROM ledger ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(LedgerEntry {
                round: r.get::<_, i64>(0)? as u64,
                at_ms: r.get(1)?,
                bytes_sent: r.get::<_, i64>(2)? as u64,
                clip_norm: r.get(3)?,
                noise_multiplier: r.get(4)?,
                epsilon: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Erases every event, every stored value and the ledger, then rewrites the file so none of
    /// the erased bytes remain in it.
    pub fn forget(&mut self) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute_batch(
            "DELETE FROM events; DELETE FROM kv; DELETE FROM ledger; DELETE FROM sqlite_sequence;",
        )?;
        tx.commit()?;
        self.conn.execute_batch("VACUUM;")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Ev {
        item: u32,
        note: String,
    }

    #[test]
    fn events_values_and_ledger_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sdk.db");
        {
            let s = Store::open(&path).unwrap();
            s.insert_event(2000, "view", 7, &Ev { item: 7, note: "b".into() }).unwrap();
            s.insert_event(1000, "click", 3, &Ev { item: 3, note: "a".into() }).unwrap();
            s.put("consent", &(true, false)).unwrap();
            s.put_f32s("user_vector", &[0.5, -1.25]).unwrap();
            s.append_ledger(&LedgerEntry {
                round: 4,
                at_ms: 3000,
                bytes_sent: 99,
                clip_norm: Some(1.0),
                noise_multiplier: None,
                epsilon: None,
            })
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let evs: Vec<StoredEvent<Ev>> = s.events().unwrap();
        assert_eq!(evs.iter().map(|e| e.event.item).collect::<Vec<_>>(), vec![3, 7], "oldest first");
        assert_eq!(s.get::<(bool, bool)>("consent").unwrap(), Some((true, false)));
        assert_eq!(s.get_f32s("user_vector").unwrap(), Some(vec![0.5, -1.25]));
        assert_eq!(s.ledger().unwrap().len(), 1);
    }

    #[test]
    fn retention_purges_and_caps() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().join("sdk.db")).unwrap();
        for t in 0..10 {
            s.insert_event(t * 100, "view", t as u32, &Ev { item: t as u32, note: String::new() }).unwrap();
        }
        assert_eq!(s.purge_before(300).unwrap(), 3);
        assert_eq!(s.enforce_cap(4).unwrap(), 3);
        let left: Vec<u32> = s.events::<Ev>().unwrap().into_iter().map(|e| e.event.item).collect();
        assert_eq!(left, vec![6, 7, 8, 9]);
    }

    #[test]
    fn foreign_and_corrupt_files_are_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let foreign = dir.path().join("other.db");
        {
            let c = Connection::open(&foreign).unwrap();
            c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
        }
        let before = std::fs::read(&foreign).unwrap();
        assert!(matches!(Store::open(&foreign), Err(StoreError::Foreign { found: 0, .. })));
        assert_eq!(std::fs::read(&foreign).unwrap(), before);

        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, b"this is not a database at all, just some text that is long enough")
            .unwrap();
        let before = std::fs::read(&garbage).unwrap();
        assert!(matches!(Store::open(&garbage), Err(StoreError::Corrupt { .. })));
        assert_eq!(std::fs::read(&garbage).unwrap(), before);
    }

    #[test]
    fn forget_leaves_no_trace_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sdk.db");
        let mut s = Store::open(&path).unwrap();
        let marker = "ZQXJ-secret-event-marker";
        for i in 0..200 {
            s.insert_event(i, "purchase", 1, &Ev { item: 1, note: format!("{marker}-{i}") }).unwrap();
        }
        s.put("user_note", &"ZQXJ-private-user-state").unwrap();
        s.put_f32s("user_vector", &[1234.5678; 32]).unwrap();
        let needle = 1234.5678f32.to_le_bytes();
        let contains = |hay: &[u8], n: &[u8]| hay.windows(n.len()).any(|w| w == n);
        let bytes = std::fs::read(&path).unwrap();
        assert!(contains(&bytes, marker.as_bytes()) && contains(&bytes, &needle));
        s.forget().unwrap();
        drop(s);
        let bytes = std::fs::read(&path).unwrap();
        assert!(!contains(&bytes, b"ZQXJ"), "erased text is gone from the file");
        assert!(!contains(&bytes, &needle), "erased user vector is gone from the file");
        let s = Store::open(&path).unwrap();
        assert_eq!(s.event_count().unwrap(), 0);
    }
}
