//! The SDK's on-device storage: one SQLite file holding the user's events, the private model
//! state, consent, the participation record and the local privacy ledger.
//!
//! - The file is marked with SQLite's `application_id` and a schema version (`user_version`).
//!   Opening a file that belongs to something else, or a corrupt one, is a typed error; such a
//!   file is never overwritten.
//! - The database file is created with mode 0600 before SQLite opens it (SQLite gives its
//!   rollback journal the database's mode), and an existing one is set to 0600 when opened.
//! - `secure_delete` is on and the journal is a rollback journal (no WAL; the journal file is
//!   deleted after each transaction), so deleted rows are zeroed in the database file.
//! - With a [`StorageKey`] the file is a SQLCipher database keyed with a random data key that is
//!   kept only wrapped by the host's key, in `starling.key` beside it (see [`crate::keys`]).
//! - [`Store::forget`] keeps only the privacy ledger: it writes a new database (with a new data
//!   key) holding the ledger, then overwrites, syncs and deletes every old file (database,
//!   journal, key file) and moves the new one in. An interrupted forget is finished (or, if it
//!   had not reached its commit point, rolled back) the next time the store is opened.
//! - Events are stored with their time, kind and item as columns (for retention and queries) and
//!   their full body as JSON, so the store does not depend on the event type.

use crate::keys::{DataKey, KeyError, StorageKey, private_options, write_private_file};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// `application_id` of Starling SDK databases ("STLG").
pub const APPLICATION_ID: i32 = 0x5354_4C47;
/// Current schema version.
pub const SCHEMA_VERSION: i32 = 1;
/// The first 16 bytes of every unencrypted SQLite database.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";
/// Directory a forget builds the new store in (removed if found on open: the forget never
/// reached its commit point).
const FORGET_STAGING: &str = ".starling-forget";
/// The staging directory once complete: its commit point. Found on open, the forget is finished.
const FORGET_READY: &str = ".starling-forget.ready";

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
    /// The store is encrypted and no storage key was given. It was left untouched.
    #[error("{path} is encrypted and no storage key was given; it was left untouched")]
    KeyRequired {
        /// The database file.
        path: PathBuf,
    },
    /// A storage key was given but the store is not encrypted. It was left untouched.
    #[error("{path} is not encrypted but a storage key was given; it was left untouched")]
    NotEncrypted {
        /// The database file.
        path: PathBuf,
    },
    /// The storage key does not open this store (a wrong key, or a tampered key file). It was
    /// left untouched.
    #[error("the storage key does not open {path}; it was left untouched")]
    WrongKey {
        /// The key file.
        path: PathBuf,
    },
    /// The key file is missing (while the database is encrypted) or unusable. The store was left
    /// untouched.
    #[error("key file {path}: {detail}; the store was left untouched")]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A storage key was given but this build's SQLite has no encryption (SQLCipher).
    #[error("this build of the SDK cannot encrypt its store (SQLite without SQLCipher)")]
    EncryptionUnavailable,
    /// A file operation failed (creating, securing or erasing the store's files).
    #[error("{path}: {detail}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// Any other SQLite failure (disk full, permissions, …).
    #[error("storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io { path: path.to_path_buf(), detail: e.to_string() }
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
    /// The host's key when the store is encrypted (needed to wrap a new data key on forget).
    kek: Option<Box<StorageKey>>,
}

/// The key file of the database at `db`: `starling.db` → `starling.key`.
pub fn key_path(db: &Path) -> PathBuf {
    db.with_extension("key")
}

impl Store {
    /// Opens (or creates) the unencrypted database at `path`, checking that it is ours and
    /// migrating it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_key(path, None)
    }

    /// Opens (or creates) the database at `path`, encrypted with a data key wrapped by `key` in
    /// [`key_path`]`(path)` when `key` is given. A store is opened only with the key (or absence of
    /// one) it was created with; a wrong key is [`StoreError::WrongKey`], and in every refusal
    /// the files are left untouched. A forget interrupted by a crash is completed first.
    pub fn open_with_key(path: impl AsRef<Path>, key: Option<&StorageKey>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        recover_forget(&path)?;
        let existed = std::fs::metadata(&path).map(|m| m.len() > 0).unwrap_or(false);
        let key_file = key_path(&path);
        let key_file_exists = key_file.exists();
        let data_key = match key {
            None if key_file_exists => return Err(StoreError::KeyRequired { path }),
            None => None,
            Some(kek) => {
                if existed && has_sqlite_header(&path)? {
                    return Err(StoreError::NotEncrypted { path });
                }
                Some(if key_file_exists {
                    let bytes = std::fs::read(&key_file).map_err(io_error(&key_file))?;
                    DataKey::unwrap(&bytes, kek).map_err(|e| match e {
                        KeyError::WrongKey => StoreError::WrongKey { path: key_file.clone() },
                        other => StoreError::KeyFile { path: key_file.clone(), detail: other.to_string() },
                    })?
                } else if existed {
                    return Err(StoreError::KeyFile {
                        path: key_file,
                        detail: "missing, and the database is not a plain SQLite file".into(),
                    });
                } else {
                    let dek = DataKey::generate()
                        .map_err(|e| StoreError::KeyFile { path: key_file.clone(), detail: e.to_string() })?;
                    let wrapped = dek
                        .wrap(kek)
                        .map_err(|e| StoreError::KeyFile { path: key_file.clone(), detail: e.to_string() })?;
                    write_private_file(&key_file, &wrapped).map_err(io_error(&key_file))?;
                    sync_parent(&key_file)?;
                    dek
                })
            }
        };
        if !existed {
            // Created 0600 before SQLite opens it; SQLite gives its journal the same mode.
            private_options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_error(&path))?;
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        if let Some(dek) = &data_key {
            conn.execute_batch(&dek.pragma())?;
            let cipher: Option<String> =
                conn.query_row("PRAGMA cipher_version", [], |r| r.get(0)).optional()?;
            if cipher.is_none() {
                return Err(StoreError::EncryptionUnavailable);
            }
        }
        drop(data_key);
        let mut store = Self::init(conn, path, existed)?;
        store.kek = key.map(|k| Box::new(k.clone()));
        // Ours: make sure only the owner can read it (an older SDK created it 0644).
        for f in [store.path.clone(), sidecar(&store.path, "-journal")] {
            set_private(&f)?;
        }
        Ok(store)
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
        let mut store = Self { conn, path, kek: None };
        store.migrate(if existed { version } else { 0 })?;
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the store is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.kek.is_some()
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

    /// Erases every event and every stored value, keeping only the privacy ledger (so that a
    /// forget cannot be used to spend the device's privacy budget again).
    ///
    /// In memory, the rows are deleted. On disk, nothing of the old database is kept: a new
    /// database (encrypted with a new data key, if the store is encrypted) is written with the
    /// ledger, then every old file — database, journal, key file — is overwritten with zeros,
    /// synced and deleted, and the new files take their place. Once this returns `Ok`, none of the
    /// erased bytes and no copy of the old data key remains in any file of the store's directory.
    pub fn forget(&mut self) -> Result<(), StoreError> {
        let kek = self.kek.clone();
        self.forget_into(kek)
    }

    /// [`forget`](Self::forget), with the new database's data key wrapped by `key` instead of the
    /// current one: the host rotates its storage key (after which the old key, and with it every
    /// remnant of the old key file, can be deleted from its keystore). An unencrypted store
    /// becomes encrypted. The next open must use `key`. In memory, the same as `forget`.
    pub fn forget_with_key(&mut self, key: &StorageKey) -> Result<(), StoreError> {
        if self.path == Path::new(":memory:") {
            return self.forget();
        }
        self.forget_into(Some(Box::new(key.clone())))
    }

    fn forget_into(&mut self, kek: Option<Box<StorageKey>>) -> Result<(), StoreError> {
        if self.path == Path::new(":memory:") {
            let tx = self.conn.transaction()?;
            tx.execute_batch("DELETE FROM events; DELETE FROM kv;")?;
            tx.commit()?;
            self.conn.execute_batch("VACUUM;")?;
            return Ok(());
        }
        let ledger = self.ledger()?;
        let dir = parent(&self.path);
        let staging = dir.join(FORGET_STAGING);
        let ready = dir.join(FORGET_READY);
        remove_shredded(&staging)?;
        create_private_dir(&staging)?;
        let name = self.path.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("starling.db"));
        {
            let mut fresh = Store::open_with_key(staging.join(&name), kek.as_deref())?;
            let tx = fresh.conn.transaction()?;
            for e in &ledger {
                tx.execute(
                    "INSERT INTO ledger (round, at_ms, bytes_sent, clip_norm, noise_multiplier, epsilon) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![e.round as i64, e.at_ms, e.bytes_sent as i64, e.clip_norm, e.noise_multiplier, e.epsilon],
                )?;
            }
            tx.commit()?;
            let conn = std::mem::replace(&mut fresh.conn, Connection::open_in_memory()?);
            conn.close().map_err(|(_, e)| e)?;
        }
        let staged_db = staging.join(&name);
        std::fs::File::open(&staged_db).and_then(|f| f.sync_all()).map_err(io_error(&staged_db))?;
        sync_dir(&staging)?;
        // The commit point: from here on an interrupted forget is finished on the next open.
        std::fs::rename(&staging, &ready).map_err(io_error(&ready))?;
        sync_dir(&dir)?;
        let old = std::mem::replace(&mut self.conn, Connection::open_in_memory()?);
        old.close().map_err(|(_, e)| e)?;
        finish_forget(&self.path)?;
        *self = Store::open_with_key(&self.path, kek.as_deref())?;
        Ok(())
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `db` with `suffix` appended to its file name (`starling.db` → `starling.db-journal`).
fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn has_sqlite_header(path: &Path) -> Result<bool, StoreError> {
    let mut header = [0u8; 16];
    let mut f = std::fs::File::open(path).map_err(io_error(path))?;
    match f.read_exact(&mut header) {
        Ok(()) => Ok(&header == SQLITE_HEADER),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Sets an existing file to mode 0600 (Unix); a missing file is fine.
fn set_private(path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(path) {
            Ok(m) if m.permissions().mode() & 0o777 != 0o600 => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io_error(path))?;
            }
            _ => {}
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Creates `dir` (and missing parents) readable by the owner only (mode 0700 on Unix). An
/// existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(io_error(dir))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn sync_parent(file: &Path) -> Result<(), StoreError> {
    sync_dir(&parent(file))
}

/// Overwrites `path` with zeros, syncs it and deletes it. A missing file is fine.
fn shred(path: &Path) -> Result<(), StoreError> {
    let mut f = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(path)(e)),
    };
    let len = f.metadata().map_err(io_error(path))?.len();
    let zeros = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n]).map_err(io_error(path))?;
        left -= n as u64;
    }
    f.sync_all().map_err(io_error(path))?;
    drop(f);
    std::fs::remove_file(path).map_err(io_error(path))
}

/// Shreds every file in `dir`, then removes it. A missing directory is fine.
fn remove_shredded(dir: &Path) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_error(dir))?;
        shred(&entry.path())?;
    }
    std::fs::remove_dir(dir).map_err(io_error(dir))
}

/// Completes a forget of the database at `db` whose new store is staged (committed) in
/// [`FORGET_READY`]: shreds the old files and moves the new ones in. Idempotent, so a crash at
/// any point of it is finished by running it again.
fn finish_forget(db: &Path) -> Result<(), StoreError> {
    let dir = parent(db);
    let ready = dir.join(FORGET_READY);
    for suffix in ["-journal", "-wal", "-shm"] {
        shred(&sidecar(db, suffix))?;
    }
    let key = key_path(db);
    // A staged file still in the staging directory means the old one beside it has not been
    // replaced yet; one already moved in (by an interrupted run) is left alone.
    for file in [key.as_path(), db] {
        let staged = ready.join(file.file_name().unwrap_or_default());
        if staged.exists() {
            shred(file)?;
            std::fs::rename(&staged, file).map_err(io_error(file))?;
        }
    }
    remove_shredded(&ready)?;
    sync_dir(&dir)
}

/// On open: finishes a forget that passed its commit point, or discards one that did not.
fn recover_forget(db: &Path) -> Result<(), StoreError> {
    let dir = parent(db);
    if dir.join(FORGET_READY).exists() {
        finish_forget(db)?;
    }
    remove_shredded(&dir.join(FORGET_STAGING))
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

    #[cfg(unix)]
    #[test]
    fn the_database_and_its_journal_are_created_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sdk.db");
        let s = Store::open(&path).unwrap();
        s.conn.execute_batch("BEGIN; INSERT INTO kv (key, value) VALUES ('k', x'00');").unwrap();
        let journal = sidecar(&path, "-journal");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert!(journal.exists(), "a write transaction has a journal");
        assert_eq!(mode(&journal), 0o600);
        assert_eq!(mode(&path), 0o600);
        s.conn.execute_batch("COMMIT;").unwrap();
        assert!(!journal.exists(), "deleted after the transaction");
    }

    #[test]
    fn an_interrupted_forget_is_finished_or_discarded_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("starling.db");
        let entry = |round| LedgerEntry {
            round,
            at_ms: 1,
            bytes_sent: 10,
            clip_norm: Some(1.0),
            noise_multiplier: None,
            epsilon: None,
        };
        {
            let s = Store::open(&path).unwrap();
            s.insert_event(5, "view", 1, &Ev { item: 1, note: "ZQXJ-marker".into() }).unwrap();
            s.append_ledger(&entry(7)).unwrap();
        }
        // A forget that crashed before its commit point did not happen.
        let staging = dir.path().join(FORGET_STAGING);
        create_private_dir(&staging).unwrap();
        drop(Store::open(staging.join("starling.db")).unwrap());
        let s = Store::open(&path).unwrap();
        assert_eq!(s.event_count().unwrap(), 1);
        assert!(!staging.exists(), "the incomplete staging is removed");
        drop(s);
        // One that crashed after it is finished.
        let ready = dir.path().join(FORGET_READY);
        create_private_dir(&ready).unwrap();
        Store::open(ready.join("starling.db")).unwrap().append_ledger(&entry(7)).unwrap();
        let s = Store::open(&path).unwrap();
        assert_eq!(s.event_count().unwrap(), 0);
        assert_eq!(s.ledger().unwrap(), vec![entry(7)]);
        assert!(!ready.exists());
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(4).any(|w| w == b"ZQXJ"));
    }
}
