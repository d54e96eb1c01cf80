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
//!
//! The code is split along these lines: this file holds the store's types and errors,
//! `tables.rs` the schema (its checks and migrations) and the reads and writes of its tables,
//! and `files.rs` the file lifecycle (opening with file modes and keys, the crash-safe forget,
//! shredding).

use crate::keys::StorageKey;
use rusqlite::Connection;
use serde::Serialize;
use std::path::PathBuf;

mod files;
mod tables;

pub use files::{create_private_dir, key_path};

/// `application_id` of Starling SDK databases ("STLG").
pub const APPLICATION_ID: i32 = 0x5354_4C47;
/// Current schema version (1: events, kv, ledger; 2: the ledger's `kind` column).
pub const SCHEMA_VERSION: i32 = 2;

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

/// What a contribution was.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContributionKind {
    /// A model update (clipped; noised under local DP), or a masked input under secure
    /// aggregation.
    #[default]
    Update,
    /// Federated evaluation figures (hits, NDCG, loss of the device's held-out case).
    Evaluation,
}

impl ContributionKind {
    /// The name stored in the ledger's `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            ContributionKind::Update => "update",
            ContributionKind::Evaluation => "evaluation",
        }
    }

    /// The kind named `s` (an unknown name reads as an update, the conservative choice for the
    /// privacy report).
    pub fn parse(s: &str) -> Self {
        if s == "evaluation" { ContributionKind::Evaluation } else { ContributionKind::Update }
    }
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
    /// An update or an evaluation report (entries of schema 1 stores are updates).
    #[serde(default)]
    pub kind: ContributionKind,
}

/// The SDK's database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// The host's key when the store is encrypted (needed to wrap a new data key on forget).
    kek: Option<Box<StorageKey>>,
}
