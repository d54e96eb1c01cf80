//! The store's file lifecycle: opening (file modes, SQLCipher keying with a wrapped data key),
//! the crash-safe forget that replaces every file of the store, and shredding old files.

use super::{Store, StoreError};
use crate::keys::{DataKey, KeyError, StorageKey, private_options, write_private_file};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The first 16 bytes of every unencrypted SQLite database.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";
/// Directory a forget builds the new store in (removed if found on open: the forget never
/// reached its commit point).
const FORGET_STAGING: &str = ".starling-forget";
/// The staging directory once complete: its commit point. Found on open, the forget is finished.
const FORGET_READY: &str = ".starling-forget.ready";

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io { path: path.to_path_buf(), detail: e.to_string() }
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

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the store is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.kek.is_some()
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
    use crate::store::LedgerEntry;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Ev {
        item: u32,
        note: String,
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
            kind: crate::store::ContributionKind::Update,
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
