//! What the SDK leaves on disk: retention applied on open and before every use, `forget()`
//! leaving no copy of the user's events in any file of the store, the privacy ledger surviving
//! `forget()`, owner-only file modes, and encryption at rest with crypto-shredding.

use starling_models::data::events::{Context, DeviceClass, Event, EventKind};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::{NoiseSettings, TrainingPlan};
use starling_sdk::config::{PrivacyMode, Retention};
use starling_sdk::device::{Device, OpenError, Source, TrainError};
use starling_sdk::store::StoreError;
use starling_sdk::{ClientConfig, Clock, Consent, ModelSpec, Storage, StorageKey};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A catalogue large enough for a distinctive item id.
const ITEMS: u32 = 70_000;
const DIM: u32 = 4;
/// The item every test event is about, and how it appears in a stored event body.
const SECRET_ITEM: u32 = 65_537;
const SECRET_JSON: &[u8] = b"\"item\":65537";
/// A distinctive dwell time, also in every stored event body.
const SECRET_DWELL: &[u8] = b"3141592653";
const SQLITE_HEADER: &[u8] = b"SQLite format 3";
const NOW: i64 = 1_780_000_000_000;
const DAY_MS: i64 = 86_400_000;
const ALL_IN: Consent = Consent { personalization: true, training: true };

fn config(storage: Storage, clock: &Clock) -> ClientConfig {
    let mut c = ClientConfig::new(ClientId(1), b"token".to_vec(), ModelSpec::mf(ITEMS, DIM), storage);
    c.seed = Some(1);
    c.clock = clock.clone();
    c
}

fn secret_events(n: usize, at_ms: i64) -> Vec<Event> {
    (0..n)
        .map(|k| Event {
            item: SECRET_ITEM,
            at_ms: at_ms + k as i64,
            kind: EventKind::View { dwell_ms: 3_141_592_653 },
            context: Context::at(at_ms / 1000, DeviceClass::Phone),
        })
        .collect()
}

fn purchases(at_ms: i64) -> Vec<Event> {
    (0..5)
        .map(|k| Event {
            item: 100 + k,
            at_ms: at_ms + i64::from(k),
            kind: EventKind::Purchase,
            context: Context::at(at_ms / 1000, DeviceClass::Phone),
        })
        .collect()
}

fn global() -> Arc<[f32]> {
    (0..ITEMS * DIM).map(|k| ((k % 13) as f32 - 6.0) / 50.0).collect()
}

fn plan() -> TrainingPlan {
    TrainingPlan { clip_norm: Some(1.0), learning_rate: 0.5, ..TrainingPlan::default() }
}

/// Every file under `dir` (recursively) with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            out.push((path, bytes));
        }
    }
    out.sort();
    out
}

/// The files under `dir` whose raw bytes contain `needle`.
fn containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|(_, b)| b.windows(needle.len()).any(|w| w == needle))
        .map(|(p, _)| p)
        .collect()
}

/// A device in `dir` holding 200 secret events, purchases, a global model and a trained vector.
fn populated(dir: &Path, key: Option<StorageKey>, clock: &Clock) -> Device {
    let mut cfg = config(Storage::Dir(dir.to_path_buf()), clock);
    cfg.storage_key = key;
    let mut d = Device::open(&cfg).unwrap();
    d.set_consent(ALL_IN).unwrap();
    d.record_batch(&secret_events(200, NOW - DAY_MS), NOW).unwrap();
    d.record_batch(&purchases(NOW - DAY_MS), NOW).unwrap();
    d.set_global(ModelVersion(1), global()).unwrap();
    d.train(RoundId(1), ModelVersion(1), global(), &plan()).unwrap();
    d
}

#[test]
fn retention_runs_when_the_store_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(NOW);
    let mut cfg = config(Storage::Dir(dir.path().to_path_buf()), &clock);
    cfg.retention = Retention { max_age: Some(Duration::from_secs(30 * 86_400)), max_events: None };
    {
        let mut d = Device::open(&cfg).unwrap();
        d.set_consent(ALL_IN).unwrap();
        d.record_batch(&secret_events(50, NOW - 20 * DAY_MS), NOW).unwrap();
        d.record_batch(&purchases(NOW - DAY_MS), NOW).unwrap();
        assert_eq!(d.event_count(), 55);
    }
    // Fifteen days later the secret events are 35 days old: opening the store deletes them.
    clock.advance(Duration::from_millis(15 * DAY_MS as u64));
    let d = Device::open(&cfg).unwrap();
    assert_eq!(d.event_count(), 5, "expired events are gone right after open");
    assert!(d.events().unwrap().iter().all(|e| e.item != SECRET_ITEM));
    assert!(containing(dir.path(), SECRET_JSON).is_empty(), "and zeroed in the file (secure_delete)");
}

#[test]
fn retention_runs_before_recommending_exporting_and_training() {
    let clock = Clock::manual(NOW);
    let mut cfg = config(Storage::InMemory, &clock);
    cfg.retention = Retention { max_age: Some(Duration::from_secs(30 * 86_400)), max_events: None };
    let device = || {
        let mut d = Device::open(&cfg).unwrap();
        d.set_consent(ALL_IN).unwrap();
        d.record_batch(&purchases(NOW - DAY_MS), NOW).unwrap();
        d.train(RoundId(1), ModelVersion(1), global(), &plan()).unwrap();
        assert_eq!(d.recommend(5, None).source, Source::Personal);
        d
    };
    let later = || clock.set_ms(NOW + 40 * DAY_MS);

    clock.set_ms(NOW);
    let mut d = device();
    later();
    let recs = d.recommend(5, None);
    assert_eq!(d.event_count(), 0, "recommend applied retention");
    assert_ne!(recs.source, Source::Personal, "the expired events no longer personalize");

    clock.set_ms(NOW);
    let mut d = device();
    later();
    let export = d.export(NOW + 40 * DAY_MS).unwrap();
    assert!(export.events.is_empty(), "export shows no expired event: {:?}", export.events);
    assert_eq!(export.privacy.events_stored, 0);

    clock.set_ms(NOW);
    let mut d = device();
    later();
    let r = d.train(RoundId(2), ModelVersion(1), global(), &plan());
    assert!(matches!(r, Err(TrainError::NoData)), "training sees no expired event: {r:?}");
}

#[test]
fn forget_leaves_no_copy_of_the_events_in_any_file_of_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(NOW);
    let mut d = populated(dir.path(), None, &clock);
    // Retention and a consent change leave deleted rows behind in a naive store.
    d.enforce_retention(NOW).unwrap();
    assert!(!containing(dir.path(), SECRET_JSON).is_empty(), "the scan sees the events before");
    assert!(!containing(dir.path(), SECRET_DWELL).is_empty());
    d.forget().unwrap();
    assert!(containing(dir.path(), SECRET_JSON).is_empty(), "{:?}", containing(dir.path(), SECRET_JSON));
    assert!(containing(dir.path(), SECRET_DWELL).is_empty());
    assert!(containing(dir.path(), b"purchase").is_empty(), "no event kind either");
    drop(d);
    assert!(containing(dir.path(), SECRET_JSON).is_empty(), "nor after closing");
    let names: Vec<_> =
        files(dir.path()).into_iter().map(|(p, _)| p.file_name().unwrap().to_owned()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("starling.db")], "no journal, no staging left");
    let d = Device::open(&config(Storage::Dir(dir.path().to_path_buf()), &clock)).unwrap();
    assert_eq!(d.event_count(), 0);
    assert!(d.user_vector().is_none() && d.model_version().is_none());
}

#[test]
fn the_privacy_ledger_survives_forget() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::manual(NOW);
    let mut cfg = config(Storage::Dir(dir.path().to_path_buf()), &clock);
    cfg.privacy.mode = PrivacyMode::Local { min_noise_multiplier: 1.0 };
    cfg.privacy.max_epsilon = Some(3.0);
    let local = TrainingPlan { noise: NoiseSettings::Local { multiplier: 2.0 }, ..plan() };
    let (spent, rounds) = {
        let mut d = Device::open(&cfg).unwrap();
        d.set_consent(ALL_IN).unwrap();
        d.record_batch(&purchases(NOW - DAY_MS), NOW).unwrap();
        let mut round = 1;
        loop {
            match d.train(RoundId(round), ModelVersion(1), global(), &local) {
                Ok(t) => d.record_contribution(RoundId(round), 100, &t, NOW).unwrap(),
                Err(TrainError::Budget(_)) => break,
                Err(e) => panic!("{e}"),
            };
            round += 1;
        }
        let spent = d.local_epsilon();
        assert!(spent > 0.0 && round > 1);
        d.forget().unwrap();
        assert_eq!(d.local_epsilon(), spent, "forget does not reset the device's epsilon");
        assert_eq!(d.privacy_report().unwrap().updates_sent, round - 1);
        (spent, round - 1)
    };
    let mut d = Device::open(&cfg).unwrap();
    assert_eq!(d.local_epsilon(), spent, "nor does a restart after it");
    let export = d.export(NOW).unwrap();
    assert_eq!(export.contributions.len() as u64, rounds, "every contribution is still listed");
    assert!(export.events.is_empty() && export.user_vector.is_none());
    d.set_consent(ALL_IN).unwrap();
    d.record_batch(&purchases(NOW - DAY_MS), NOW).unwrap();
    let r = d.train(RoundId(99), ModelVersion(1), global(), &local);
    assert!(matches!(r, Err(TrainError::Budget(_))), "the cap still applies: {r:?}");
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
#[test]
fn store_files_are_private_to_the_app() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("app").join("starling");
    let clock = Clock::manual(NOW);
    for key in [None, Some(StorageKey::new([9; 32]))] {
        let _ = std::fs::remove_dir_all(root.path().join("app"));
        let mut d = populated(&dir, key.clone(), &clock);
        assert_eq!(mode(&dir), 0o700, "the directory the SDK creates is the owner's only");
        for (path, _) in files(&dir) {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
        d.forget().unwrap();
        d.set_consent(ALL_IN).unwrap();
        d.record_batch(&purchases(NOW - DAY_MS), NOW).unwrap();
        let names: Vec<_> = files(&dir).into_iter().map(|(p, _)| p).collect();
        assert_eq!(names.len(), 1 + usize::from(key.is_some()), "{names:?}");
        for path in names {
            assert_eq!(mode(&path), 0o600, "after forget: {}", path.display());
        }
    }
    // A database an older SDK created 0644 is made private when opened.
    let legacy = root.path().join("legacy");
    drop(Device::open(&config(Storage::Dir(legacy.clone()), &clock)).unwrap());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(legacy.join("starling.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(Device::open(&config(Storage::Dir(legacy.clone()), &clock)).unwrap());
    assert_eq!(mode(&legacy.join("starling.db")), 0o600);
}

#[test]
fn with_a_key_no_event_or_item_is_readable_in_any_file() {
    let clock = Clock::manual(NOW);
    let scan = |key: Option<StorageKey>| {
        let dir = tempfile::tempdir().unwrap();
        let d = populated(dir.path(), key, &clock);
        let open = (
            containing(dir.path(), SECRET_JSON),
            containing(dir.path(), SECRET_DWELL),
            containing(dir.path(), SQLITE_HEADER),
        );
        drop(d);
        let closed = (
            containing(dir.path(), SECRET_JSON),
            containing(dir.path(), SECRET_DWELL),
            containing(dir.path(), SQLITE_HEADER),
        );
        (open, closed, dir)
    };
    // Without a key the scan finds the events and SQLite's header: it would catch a plain file.
    let (open, closed, _dir) = scan(None);
    for found in [open, closed] {
        assert!(!found.0.is_empty() && !found.1.is_empty() && !found.2.is_empty(), "{found:?}");
    }
    let (open, closed, dir) = scan(Some(StorageKey::new([42; 32])));
    for found in [open, closed] {
        assert!(found.0.is_empty() && found.1.is_empty() && found.2.is_empty(), "{found:?}");
    }
    let names: Vec<_> =
        files(dir.path()).into_iter().map(|(p, _)| p.file_name().unwrap().to_owned()).collect();
    assert_eq!(names, vec!["starling.db", "starling.key"]);
    // And the data is all there with the key.
    let mut cfg = config(Storage::Dir(dir.path().to_path_buf()), &clock);
    cfg.storage_key = Some(StorageKey::new([42; 32]));
    let d = Device::open(&cfg).unwrap();
    assert_eq!(d.event_count(), 205);
    assert_eq!(d.model_version(), Some(ModelVersion(1)));
    assert!(d.user_vector().is_some());
}

#[test]
fn a_wrong_key_or_a_missing_one_is_refused_and_the_files_are_left_untouched() {
    let clock = Clock::manual(NOW);
    let dir = tempfile::tempdir().unwrap();
    drop(populated(dir.path(), Some(StorageKey::new([42; 32])), &clock));
    let before = files(dir.path());
    let mut cfg = config(Storage::Dir(dir.path().to_path_buf()), &clock);

    cfg.storage_key = Some(StorageKey::new([43; 32]));
    let err = Device::open(&cfg).unwrap_err();
    assert!(matches!(err, OpenError::Store(StoreError::WrongKey { .. })), "{err}");
    assert!(err.to_string().contains("left untouched"), "{err}");
    assert_eq!(files(dir.path()), before);

    cfg.storage_key = None;
    let err = Device::open(&cfg).unwrap_err();
    assert!(matches!(err, OpenError::Store(StoreError::KeyRequired { .. })), "{err}");
    assert_eq!(files(dir.path()), before);

    cfg.storage_key = Some(StorageKey::new([42; 32]));
    let d = Device::open(&cfg).unwrap();
    assert_eq!(d.event_count(), 205, "intact with the right key");
    drop(d);

    // An unencrypted store opened with a key.
    let plain = tempfile::tempdir().unwrap();
    drop(populated(plain.path(), None, &clock));
    let before = files(plain.path());
    let mut cfg = config(Storage::Dir(plain.path().to_path_buf()), &clock);
    cfg.storage_key = Some(StorageKey::new([42; 32]));
    let err = Device::open(&cfg).unwrap_err();
    assert!(matches!(err, OpenError::Store(StoreError::NotEncrypted { .. })), "{err}");
    assert_eq!(files(plain.path()), before);
}

#[test]
fn forget_shreds_the_data_key_so_an_old_copy_of_the_database_is_unreadable() {
    let clock = Clock::manual(NOW);
    let key = StorageKey::new([42; 32]);
    let dir = tempfile::tempdir().unwrap();
    let mut d = populated(dir.path(), Some(key.clone()), &clock);
    let trained = d_trained(&mut d);
    d.record_contribution(RoundId(1), 321, &trained, NOW).unwrap();
    // What a thief (or a flash remnant) might hold: the database and the key file before forget.
    let old_db = std::fs::read(dir.path().join("starling.db")).unwrap();
    let old_key = std::fs::read(dir.path().join("starling.key")).unwrap();
    d.forget().unwrap();
    let new_key = std::fs::read(dir.path().join("starling.key")).unwrap();
    assert_ne!(new_key, old_key, "a new data key");
    assert!(containing(dir.path(), &old_key).is_empty(), "the old key file's bytes are gone");
    assert!(containing(dir.path(), &old_key[20..]).is_empty(), "including its wrapped key");
    assert_eq!(d.privacy_report().unwrap().updates_sent, 1, "the ledger was carried over");
    drop(d);

    // The old database with the current key material (and the host's key): unreadable.
    let thief = tempfile::tempdir().unwrap();
    std::fs::write(thief.path().join("starling.db"), &old_db).unwrap();
    std::fs::write(thief.path().join("starling.key"), &new_key).unwrap();
    let mut cfg = config(Storage::Dir(thief.path().to_path_buf()), &clock);
    cfg.storage_key = Some(key.clone());
    let err = Device::open(&cfg).unwrap_err();
    assert!(matches!(err, OpenError::Store(StoreError::Corrupt { .. })), "{err}");
    assert!(!old_db.windows(SECRET_JSON.len()).any(|w| w == SECRET_JSON), "and it was never plaintext");

    // The forgotten store itself opens with the host's key, empty but for the ledger.
    let mut cfg = config(Storage::Dir(dir.path().to_path_buf()), &clock);
    cfg.storage_key = Some(key);
    let d = Device::open(&cfg).unwrap();
    assert_eq!(d.event_count(), 0);
    assert_eq!(d.privacy_report().unwrap().rounds, vec![1]);
}

#[test]
fn forget_with_a_new_key_rotates_the_host_key_and_can_encrypt_a_plain_store() {
    let clock = Clock::manual(NOW);
    let (old, new) = (StorageKey::new([42; 32]), StorageKey::new([77; 32]));
    let dir = tempfile::tempdir().unwrap();
    let mut d = populated(dir.path(), Some(old.clone()), &clock);
    let trained = d_trained(&mut d);
    d.record_contribution(RoundId(1), 321, &trained, NOW).unwrap();
    d.forget_with_key(&new).unwrap();
    drop(d);
    let mut cfg = config(Storage::Dir(dir.path().to_path_buf()), &clock);
    cfg.storage_key = Some(old);
    assert!(matches!(Device::open(&cfg), Err(OpenError::Store(StoreError::WrongKey { .. }))));
    cfg.storage_key = Some(new.clone());
    let d = Device::open(&cfg).unwrap();
    assert_eq!(
        (d.event_count(), d.privacy_report().unwrap().updates_sent),
        (0, 1),
        "empty but for the ledger"
    );
    drop(d);

    // A plain store forgotten with a key comes back encrypted.
    let plain = tempfile::tempdir().unwrap();
    let mut d = populated(plain.path(), None, &clock);
    d.forget_with_key(&new).unwrap();
    d.set_consent(ALL_IN).unwrap();
    d.record_batch(&secret_events(10, NOW - DAY_MS), NOW).unwrap();
    drop(d);
    assert!(
        containing(plain.path(), SQLITE_HEADER).is_empty()
            && containing(plain.path(), SECRET_JSON).is_empty()
    );
    let mut cfg = config(Storage::Dir(plain.path().to_path_buf()), &clock);
    cfg.storage_key = Some(new);
    assert_eq!(Device::open(&cfg).unwrap().event_count(), 10);
}

fn d_trained(d: &mut Device) -> starling_sdk::device::Trained {
    d.train(RoundId(1), ModelVersion(1), global(), &plan()).unwrap()
}
