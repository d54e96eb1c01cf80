//! The store's schema (the checks made on an existing file, and migrations) and the reads and
//! writes of its tables: events, key-value pairs and the privacy ledger.

use super::{APPLICATION_ID, ContributionKind, LedgerEntry, SCHEMA_VERSION, Store, StoreError, StoredEvent};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::PathBuf;

impl Store {
    pub(super) fn init(conn: Connection, path: PathBuf, existed: bool) -> Result<Self, StoreError> {
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
        let mut store = Self { conn, path, kek: None };
        store.migrate(if existed { version } else { 0 })?;
        Ok(store)
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
        if from < 2 {
            // Evaluation reports go on the ledger beside updates.
            let tx = self.conn.transaction()?;
            tx.execute_batch(
                "ALTER TABLE ledger ADD COLUMN kind TEXT NOT NULL DEFAULT 'update';
                 PRAGMA user_version = 2;",
            )?;
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

    /// Keeps only the newest `cap` of the `count` stored events (the oldest by time, then by id,
    /// go first); returns how many were deleted. It walks the `at_ms` index from the oldest end,
    /// so its cost grows with the number deleted (usually one, when a device at its cap records
    /// an event), not with `cap`: the first version (`NOT IN` the newest `cap`) built a
    /// `cap`-row table on every such call, 4.4 ms per recorded event at the default 10,000.
    pub fn enforce_cap(&self, cap: u64, count: u64) -> Result<usize, StoreError> {
        let excess = count.saturating_sub(cap);
        if excess == 0 {
            return Ok(0);
        }
        Ok(self.conn.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY at_ms ASC, id ASC LIMIT ?1)",
            params![i64::try_from(excess).unwrap_or(i64::MAX)],
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
            "INSERT INTO ledger (round, at_ms, bytes_sent, clip_norm, noise_multiplier, epsilon, kind) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                e.round as i64,
                e.at_ms,
                e.bytes_sent as i64,
                e.clip_norm,
                e.noise_multiplier,
                e.epsilon,
                e.kind.as_str()
            ],
        )?;
        Ok(())
    }

    /// The whole ledger, oldest first.
    pub fn ledger(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT round, at_ms, bytes_sent, clip_norm, noise_multiplier, epsilon, kind FROM ledger ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(LedgerEntry {
                round: r.get::<_, i64>(0)? as u64,
                at_ms: r.get(1)?,
                bytes_sent: r.get::<_, i64>(2)? as u64,
                clip_norm: r.get(3)?,
                noise_multiplier: r.get(4)?,
                epsilon: r.get(5)?,
                kind: ContributionKind::parse(&r.get::<_, String>(6)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
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
                kind: ContributionKind::Evaluation,
            })
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let evs: Vec<StoredEvent<Ev>> = s.events().unwrap();
        assert_eq!(evs.iter().map(|e| e.event.item).collect::<Vec<_>>(), vec![3, 7], "oldest first");
        assert_eq!(s.get::<(bool, bool)>("consent").unwrap(), Some((true, false)));
        assert_eq!(s.get_f32s("user_vector").unwrap(), Some(vec![0.5, -1.25]));
        assert_eq!(s.ledger().unwrap().len(), 1);
        assert_eq!(s.ledger().unwrap()[0].kind, ContributionKind::Evaluation);
    }

    #[test]
    fn a_schema_1_store_opens_and_its_ledger_entries_read_as_updates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            // A store exactly as SDK schema 1 created it, with one event and one ledger entry.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&format!(
                "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL,
                     kind TEXT NOT NULL, item INTEGER NOT NULL, body TEXT NOT NULL);
                 CREATE INDEX events_at ON events(at_ms);
                 CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL);
                 CREATE TABLE ledger (id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL,
                     at_ms INTEGER NOT NULL, bytes_sent INTEGER NOT NULL, clip_norm REAL,
                     noise_multiplier REAL, epsilon REAL);
                 INSERT INTO events (at_ms, kind, item, body) VALUES (5, 'click', 3, '{{\"item\":3,\"note\":\"x\"}}');
                 INSERT INTO ledger (round, at_ms, bytes_sent, clip_norm) VALUES (9, 10, 1234, 1.0);
                 PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1;"
            ))
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let version: i32 = s.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let ledger = s.ledger().unwrap();
        assert_eq!(ledger.len(), 1);
        assert_eq!(
            (ledger[0].round, ledger[0].bytes_sent, ledger[0].kind),
            (9, 1234, ContributionKind::Update)
        );
        assert_eq!(s.events::<Ev>().unwrap()[0].event, Ev { item: 3, note: "x".into() });
        s.append_ledger(&LedgerEntry { kind: ContributionKind::Evaluation, ..ledger[0].clone() }).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        let kinds: Vec<_> = s.ledger().unwrap().iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec![ContributionKind::Update, ContributionKind::Evaluation]);
    }

    #[test]
    fn retention_purges_and_caps() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().join("sdk.db")).unwrap();
        for t in 0..10 {
            s.insert_event(t * 100, "view", t as u32, &Ev { item: t as u32, note: String::new() }).unwrap();
        }
        assert_eq!(s.purge_before(300).unwrap(), 3);
        assert_eq!(s.enforce_cap(4, s.event_count().unwrap()).unwrap(), 3);
        let left: Vec<u32> = s.events::<Ev>().unwrap().into_iter().map(|e| e.event.item).collect();
        assert_eq!(left, vec![6, 7, 8, 9]);
        assert_eq!(s.enforce_cap(4, 4).unwrap(), 0);
        // Equal times: the older id goes first.
        for item in [20, 21, 22] {
            s.insert_event(50_000, "view", item, &Ev { item, note: String::new() }).unwrap();
        }
        assert_eq!(s.enforce_cap(2, 7).unwrap(), 5);
        let left: Vec<u32> = s.events::<Ev>().unwrap().into_iter().map(|e| e.event.item).collect();
        assert_eq!(left, vec![21, 22]);
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
}
