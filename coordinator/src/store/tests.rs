//! The store's tests. Each behaviour runs on SQLite and, when `STARLING_TEST_PG` is set (a
//! libpq connection string; `.ci/run` starts a throwaway server), on PostgreSQL too, each run in
//! a fresh schema of its own (dropped at the end). Without it the PostgreSQL half prints SKIPPED
//! (and fails under `CI=true`). SQLite-only tests (file corruption, `application_id`, the
//! SQLite migrations) and PostgreSQL-only tests (its migrations, fencing) follow.

use super::*;
use rusqlite::Connection;

/// The PostgreSQL server of the tests, if any.
fn pg_url() -> Option<String> {
    match std::env::var("STARLING_TEST_PG") {
        Ok(url) => Some(url),
        Err(_) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "STARLING_TEST_PG is not set under CI=true (.ci/run starts PostgreSQL)"
            );
            println!("SKIPPED (PostgreSQL half): STARLING_TEST_PG is not set");
            None
        }
    }
}

/// A fresh schema on the test server, dropped on drop.
struct PgSchema {
    url: String,
    name: String,
}

impl PgSchema {
    fn new(url: &str) -> Self {
        let name = format!("s_{}_{:x}", std::process::id(), rand::random::<u64>());
        let mut c = ::postgres::Client::connect(url, ::postgres::NoTls).expect("connect to STARLING_TEST_PG");
        c.batch_execute(&format!("CREATE SCHEMA {name}")).unwrap();
        Self { url: url.into(), name }
    }

    /// The connection string of a store in this schema.
    fn conn_str(&self) -> String {
        format!("{} options='-c search_path={}'", self.url, self.name)
    }

    fn client(&self) -> ::postgres::Client {
        ::postgres::Client::connect(&self.conn_str(), ::postgres::NoTls).unwrap()
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if let Ok(mut c) = ::postgres::Client::connect(&self.url, ::postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

/// Where one run of a test keeps its store: [`Env::open`] opens it again (a restart).
enum Env {
    Sqlite { _dir: tempfile::TempDir, path: PathBuf },
    Pg(PgSchema),
}

impl Env {
    fn open(&self) -> Store {
        match self {
            Env::Sqlite { path, .. } => Store::open(path).unwrap(),
            Env::Pg(schema) => Store::connect_postgres(&schema.conn_str()).unwrap(),
        }
    }

    /// Tampers with rows behind the store's back (the SQL of each backend).
    fn tamper(&self, s: &mut Store, sqlite: &str, pg: &str) {
        s.execute_raw(match self {
            Env::Sqlite { .. } => sqlite,
            Env::Pg(_) => pg,
        })
        .unwrap();
    }
}

/// Runs `test` on SQLite, then on PostgreSQL if there is a server.
fn each(test: impl Fn(&Env)) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.db");
    test(&Env::Sqlite { _dir: dir, path });
    if let Some(url) = pg_url() {
        test(&Env::Pg(PgSchema::new(&url)));
    }
}

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

fn shape() -> ModelShape {
    ModelShape::new(3, 2).unwrap()
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

fn commit(s: &mut Store, round: u64, value: f32, state: Option<&[u8]>, figures: RoundFigures) {
    s.begin_round(RoundId(round), ModelVersion(round - 1), false, 0).unwrap();
    s.commit_round(
        &RoundCommit {
            round: RoundId(round),
            version: ModelVersion(round),
            shape: shape(),
            model: &[value; 6],
            ledger: None,
            strategy_state: state,
            figures,
        },
        round as i64,
        8,
    )
    .unwrap();
}

// ---- Both backends.

#[test]
fn ledger_survives_reopen_and_refuses_a_second_charge_for_a_round() {
    each(|env| {
        {
            let mut s = env.open();
            s.append_ledger(&entry(1, 1.1), 10).unwrap();
            s.append_ledger(&entry(2, 1.2), 20).unwrap();
            assert!(matches!(s.append_ledger(&entry(2, 9.0), 30), Err(StoreError::DuplicateRound(2))));
        }
        let mut s = env.open();
        assert_eq!(s.ledger_entries().unwrap(), vec![entry(1, 1.1), entry(2, 1.2)]);
        // A row tampered into nonsense is reported, not silently skipped.
        env.tamper(
            &mut s,
            "UPDATE privacy_ledger SET sigma = -1 WHERE round = 1",
            "UPDATE starling_ledger SET sigma = -1 WHERE round = 1",
        );
        assert!(matches!(s.ledger_entries(), Err(StoreError::BadRow { round: 1, .. })));
    });
}

/// After round 1 failed: evaluation rounds are recorded with their charge, atomically.
fn evaluations_are_recorded_with_their_charge(env: &Env, mut s: Store) {
    s.begin_round(RoundId(2), ModelVersion(1), false, 2).unwrap();
    s.record_evaluation(&evaluation(2, 0.25, Some(1.2)), Some(&entry(2, 0.6)), &RoundFigures::default())
        .unwrap();
    // Only a started round can be evaluated, once; a failed write leaves nothing behind.
    let err = s.record_evaluation(&evaluation(2, 0.5, None), None, &RoundFigures::default()).unwrap_err();
    assert!(matches!(err, StoreError::RoundState { action: "evaluated", .. }), "{err}");
    s.begin_round(RoundId(3), ModelVersion(1), false, 3).unwrap();
    assert!(
        s.record_evaluation(&evaluation(3, 0.5, Some(1.2)), Some(&entry(2, 0.6)), &RoundFigures::default())
            .is_err()
    );
    assert_eq!(s.rounds().unwrap()[2].state, "started", "the duplicate charge rolled everything back");
    assert!(s.evaluations(20).unwrap().len() == 1, "no evaluation row of round 3 either");
    s.record_evaluation(&evaluation(3, 0.5, None), None, &RoundFigures::default()).unwrap();
    drop(s);
    let s = env.open();
    assert_eq!(s.evaluations(20).unwrap(), vec![evaluation(2, 0.25, Some(1.2)), evaluation(3, 0.5, None)]);
    assert_eq!(s.evaluations(1).unwrap(), vec![evaluation(3, 0.5, None)]);
    assert_eq!(s.ledger_entries().unwrap(), vec![entry(2, 0.6)]);
    let states: Vec<String> = s.rounds().unwrap().into_iter().map(|r| r.state).collect();
    assert_eq!(states, ["failed", "evaluated", "evaluated"]);
}

#[test]
fn evaluations_are_recorded_with_their_charge_on_both_backends() {
    each(|env| {
        let mut s = env.open();
        s.begin_round(RoundId(1), ModelVersion(0), false, 0).unwrap();
        s.fail_round(RoundId(1), "x", &RoundFigures::default(), 1).unwrap();
        evaluations_are_recorded_with_their_charge(env, s);
    });
}
#[test]
fn commit_is_atomic_and_survives_reopen() {
    each(|env| {
        {
            let mut s = env.open();
            assert!(s.init_model(ModelVersion(0), shape(), &[0.0; 6], 1).unwrap());
            assert!(!s.init_model(ModelVersion(0), shape(), &[9.0; 6], 1).unwrap(), "only once");
            s.begin_round(RoundId(1), ModelVersion(0), false, 2).unwrap();
            s.commit_round(
                &RoundCommit {
                    round: RoundId(1),
                    version: ModelVersion(1),
                    shape: shape(),
                    model: &[1.0; 6],
                    ledger: Some(&entry(1, 1.0)),
                    strategy_state: None,
                    figures: RoundFigures::default(),
                },
                3,
                8,
            )
            .unwrap();
            s.begin_round(RoundId(2), ModelVersion(1), false, 4).unwrap();
            // A second commit of round 1 is refused and changes nothing.
            assert!(matches!(
                s.commit_round(
                    &RoundCommit {
                        round: RoundId(1),
                        version: ModelVersion(2),
                        shape: shape(),
                        model: &[2.0; 6],
                        ledger: None,
                        strategy_state: None,
                        figures: RoundFigures::default(),
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
                        ledger: Some(&entry(1, 1.0)),
                        strategy_state: None,
                        figures: RoundFigures::default(),
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
                        ledger: None,
                        strategy_state: None,
                        figures: RoundFigures::default(),
                    },
                    5,
                    8
                )
                .is_err()
            );
            assert_eq!(s.rounds().unwrap()[1].state, "started");
            // …and the process dies here, with round 2 in flight.
        }
        let mut s = env.open();
        let r = s.recover(10).unwrap();
        assert_eq!(r.abandoned, vec![RoundId(2)]);
        assert_eq!(r.next_round, RoundId(3));
        let latest = r.latest.unwrap();
        assert_eq!((latest.version, latest.round, latest.model), (ModelVersion(1), RoundId(1), vec![1.0; 6]));
        assert_eq!(s.ledger_entries().unwrap(), vec![entry(1, 1.0)]);
        assert_eq!(s.rounds().unwrap()[1].state, "abandoned");
        assert!(s.begin_round(RoundId(2), ModelVersion(1), false, 11).is_err(), "round ids are never reused");
        s.begin_round(RoundId(3), ModelVersion(1), false, 11).unwrap();
        s.fail_round(RoundId(3), "too few reports", &RoundFigures::default(), 12).unwrap();
        assert!(s.fail_round(RoundId(3), "again", &RoundFigures::default(), 12).is_err());
    });
}

#[test]
fn checkpoints_are_pruned_and_checksummed() {
    each(|env| {
        let mut s = env.open();
        s.init_model(ModelVersion(0), shape(), &[0.0; 6], 0).unwrap();
        for r in 1..=5u64 {
            s.begin_round(RoundId(r), ModelVersion(r - 1), false, 0).unwrap();
            s.commit_round(
                &RoundCommit {
                    round: RoundId(r),
                    version: ModelVersion(r),
                    shape: shape(),
                    model: &[r as f32; 6],
                    ledger: None,
                    strategy_state: None,
                    figures: RoundFigures::default(),
                },
                0,
                3,
            )
            .unwrap();
        }
        assert_eq!(s.checkpoint_versions().unwrap(), vec![ModelVersion(3), ModelVersion(4), ModelVersion(5)]);
        env.tamper(
            &mut s,
            "UPDATE checkpoints SET model = zeroblob(24) WHERE version = 5",
            "UPDATE starling_checkpoints SET model = decode(repeat('00', 24), 'hex') WHERE version = 5",
        );
        assert!(matches!(s.latest_checkpoint(), Err(StoreError::BadCheckpoint { version: 5, .. })));
    });
}

#[test]
fn tokens_and_revocations() {
    each(|env| {
        let mut s = env.open();
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
    });
}

/// N counts clients with a live token: not revoked, not expired, client not revoked.
#[test]
fn enrolled_population_counts_live_clients_only() {
    each(|env| {
        let mut s = env.open();
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
    });
}

#[test]
fn strategy_state_figures_and_rollback_are_stored_with_their_checksums() {
    each(|env| {
        let figures = RoundFigures { selected: 5, reported: 4, dropped: 1, unfinished: 0, rejected: 0 };
        {
            let mut s = env.open();
            s.init_model(ModelVersion(0), shape(), &[0.0; 6], 0).unwrap();
            commit(&mut s, 1, 1.0, Some(b"state one"), figures);
            commit(&mut s, 2, 2.0, Some(b"state two"), figures);
            // A rollback to v1: stored again as v3, with v1's model and state.
            let c = s.install_checkpoint(ModelVersion(3), ModelVersion(1), 9, 8).unwrap();
            assert_eq!(
                (c.version, c.model.clone(), c.strategy_state.clone()),
                (ModelVersion(3), vec![1.0; 6], Some(b"state one".to_vec()))
            );
            assert!(
                s.install_checkpoint(ModelVersion(4), ModelVersion(77), 9, 8).is_err(),
                "an unknown source"
            );
            assert!(
                s.install_checkpoint(ModelVersion(3), ModelVersion(1), 9, 8).is_err(),
                "a version is never reused"
            );
        }
        let mut s = env.open();
        assert_eq!(
            s.latest_checkpoint().unwrap().unwrap().strategy_state.as_deref(),
            Some(&b"state one"[..])
        );
        let rounds = s.recent_rounds(10).unwrap();
        assert_eq!(rounds.len(), 2);
        assert_eq!(rounds[1].figures, Some(figures));
        assert_eq!(rounds[1].kind, "train");
        assert_eq!(s.schedule_counters().unwrap(), (2, 2));
        // A damaged state is refused like a damaged model.
        env.tamper(
            &mut s,
            "UPDATE checkpoints SET strategy_state = x'00' WHERE version = 2",
            "UPDATE starling_checkpoints SET strategy_state = '\\x00'::bytea WHERE version = 2",
        );
        assert!(matches!(s.checkpoint(ModelVersion(2)), Err(StoreError::BadCheckpoint { version: 2, .. })));
    });
}

#[test]
fn the_schedule_counts_from_the_newest_evaluation_round() {
    each(|env| {
        let mut s = env.open();
        s.init_model(ModelVersion(0), shape(), &[0.0; 6], 0).unwrap();
        commit(&mut s, 1, 1.0, None, RoundFigures::default());
        s.begin_round(RoundId(2), ModelVersion(1), true, 0).unwrap();
        s.fail_round(RoundId(2), "too few reports", &RoundFigures::default(), 1).unwrap();
        commit(&mut s, 3, 1.0, None, RoundFigures::default());
        s.begin_round(RoundId(4), ModelVersion(2), false, 0).unwrap();
        // Training rounds begun: 1, 3, 4; committed since the evaluation round 2: round 3.
        assert_eq!(s.schedule_counters().unwrap(), (3, 1));
    });
}

#[test]
fn audit_rows_and_switches_survive_reopen() {
    each(|env| {
        {
            let mut s = env.open();
            assert_eq!(s.record_audit(5, "admin-token from 127.0.0.1:9", "pause", "{}", "ok").unwrap(), 1);
            s.record_audit(
                6,
                "admin-token from 127.0.0.1:9",
                "rollback",
                "{\"version\":9}",
                "refused (409): not kept",
            )
            .unwrap();
            s.set_service_state("paused", "true").unwrap();
            s.set_service_state("paused", "false").unwrap();
        }
        let s = env.open();
        let rows = s.audit(10).unwrap();
        assert_eq!(rows.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(), ["pause", "rollback"]);
        assert_eq!(rows[1].outcome, "refused (409): not kept");
        assert_eq!(s.audit(1).unwrap()[0].action, "rollback", "the newest");
        assert_eq!(s.service_state("paused").unwrap().as_deref(), Some("false"));
        assert_eq!(s.service_state("other").unwrap(), None);
    });
}

// ---- SQLite only.

#[test]
fn foreign_and_corrupt_files_are_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, b"this is not a database, just some bytes that go on for a while......").unwrap();
    let before = std::fs::read(&junk).unwrap();
    assert!(matches!(Store::open(&junk), Err(StoreError::Corrupt { .. })));
    assert_eq!(std::fs::read(&junk).unwrap(), before);

    let other = dir.path().join("other.db");
    Connection::open(&other).unwrap().execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
    let before = std::fs::read(&other).unwrap();
    assert!(matches!(Store::open(&other), Err(StoreError::Foreign { .. })));
    assert_eq!(std::fs::read(&other).unwrap(), before);
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

#[test]
fn a_version_2_file_migrates_and_evaluations_are_recorded_with_their_charge() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.db");
    {
        // A version-2 store with a failed round.
        let mut s = Store::open(&path).unwrap();
        s.execute_raw(
            "DROP TABLE evaluations; DROP TABLE audit; DROP TABLE service_state;
             ALTER TABLE checkpoints DROP COLUMN strategy_state; ALTER TABLE checkpoints DROP COLUMN state_crc32;
             PRAGMA user_version = 2;",
        )
        .unwrap();
        s.begin_round(RoundId(1), ModelVersion(0), false, 0).unwrap();
        s.fail_round(RoundId(1), "x", &RoundFigures::default(), 1).unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(s.rounds().unwrap()[0].state, "failed", "rounds survive the rebuild");
    let env = Env::Sqlite { _dir: dir, path };
    evaluations_are_recorded_with_their_charge(&env, s);
}

#[test]
fn sqlite_refuses_a_fence() {
    let mut s = Store::open_in_memory().unwrap();
    let fence = Fence { population: "p".into(), holder: "a".into(), epoch: 1 };
    let err = s.set_fence(Some(fence)).unwrap_err();
    assert!(matches!(err, StoreError::Unsupported(_)) && err.to_string().contains("PostgreSQL"), "{err}");
    s.set_fence(None).unwrap();
    assert!(s.describe().contains(":memory:"));
}

// ---- PostgreSQL only.

#[test]
fn pg_migrations_are_concurrent_and_idempotent() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let conn = schema.conn_str();
    // Two nodes start at once on a fresh schema: both succeed, each step applied once.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let opened: Vec<_> = (0..2)
        .map(|_| {
            let (conn, barrier) = (conn.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                Store::connect_postgres(&conn).map(|s| s.schema_version().unwrap())
            })
        })
        .collect();
    for t in opened {
        assert_eq!(t.join().unwrap().unwrap(), PG_SCHEMA_VERSION);
    }
    // Opening again changes nothing.
    let mut s = Store::connect_postgres(&conn).unwrap();
    s.append_ledger(&entry(1, 1.0), 0).unwrap();
    drop(s);
    let s = Store::connect_postgres(&conn).unwrap();
    assert_eq!(s.schema_version().unwrap(), PG_SCHEMA_VERSION);
    assert_eq!(s.ledger_entries().unwrap(), vec![entry(1, 1.0)]);
    let rows: i64 = schema.client().query_one("SELECT count(*) FROM starling_schema", &[]).unwrap().get(0);
    assert_eq!(rows, 1);
}

#[test]
fn pg_a_newer_schema_is_refused_and_left_untouched() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let mut c = schema.client();
    c.batch_execute(
        "CREATE TABLE starling_schema (version INTEGER NOT NULL); INSERT INTO starling_schema VALUES (99);",
    )
    .unwrap();
    let err = Store::connect_postgres(&schema.conn_str()).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 99, supported: PG_SCHEMA_VERSION }), "{err}");
    let version: i32 = c.query_one("SELECT version FROM starling_schema", &[]).unwrap().get(0);
    assert_eq!(version, 99);
    let created: bool = c.query_one("SELECT to_regclass('starling_ledger') IS NOT NULL", &[]).unwrap().get(0);
    assert!(!created, "no table was created");
}

#[test]
fn pg_describe_never_shows_the_password() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    // The test server trusts every connection: the password is sent nowhere it matters.
    let s = Store::connect_postgres(&format!("{} password=hunter2", schema.conn_str())).unwrap();
    let shown = s.describe();
    assert!(shown.starts_with("postgresql ") && !shown.contains("hunter2"), "{shown}");
    assert!(!format!("{s:?}").contains("hunter2"));
}

fn round_commit<'a>(round: u64, model: &'a [f32], ledger: Option<&'a LedgerEntry>) -> RoundCommit<'a> {
    RoundCommit {
        round: RoundId(round),
        version: ModelVersion(round),
        shape: shape(),
        model,
        ledger,
        strategy_state: None,
        figures: RoundFigures::default(),
    }
}

#[test]
fn pg_fenced_writes_need_the_lease_and_write_nothing_without_it() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let mut s = Store::connect_postgres(&schema.conn_str()).unwrap();
    let mut c = schema.client();
    c.batch_execute(
        "INSERT INTO starling_leases (population, holder, epoch, expires_at)
         VALUES ('pop', 'node-a', 2, now() + interval '1 hour')",
    )
    .unwrap();
    let fence = |epoch| Some(Fence { population: "pop".into(), holder: "node-a".into(), epoch });
    s.init_model(ModelVersion(0), shape(), &[0.0; 6], 0).unwrap();

    // The lease held: writes go through.
    s.set_fence(fence(2)).unwrap();
    s.begin_round(RoundId(1), ModelVersion(0), false, 1).unwrap();
    s.commit_round(&round_commit(1, &[1.0; 6], Some(&entry(1, 1.0))), 2, 8).unwrap();

    // A stale epoch (another node took over since): refused, nothing written.
    s.set_fence(fence(1)).unwrap();
    let err = s.begin_round(RoundId(2), ModelVersion(1), false, 3).unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    assert_eq!(s.rounds().unwrap().len(), 1, "round 2 was not recorded");
    assert!(matches!(s.append_ledger(&entry(5, 1.0), 3), Err(StoreError::Fenced(_))));
    assert!(matches!(s.recover(3), Err(StoreError::Fenced(_))));
    assert!(matches!(
        s.install_checkpoint(ModelVersion(9), ModelVersion(1), 3, 8),
        Err(StoreError::Fenced(_))
    ));

    // The right epoch again, then the lease expires (by the database's clock) mid-round.
    s.set_fence(fence(2)).unwrap();
    s.begin_round(RoundId(2), ModelVersion(1), false, 3).unwrap();
    c.batch_execute(
        "UPDATE starling_leases SET expires_at = now() - interval '1 second' WHERE population = 'pop'",
    )
    .unwrap();
    let err = s.commit_round(&round_commit(2, &[2.0; 6], Some(&entry(2, 1.0))), 4, 8).unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    assert!(matches!(s.begin_round(RoundId(3), ModelVersion(1), false, 5), Err(StoreError::Fenced(_))));
    assert!(matches!(s.fail_round(RoundId(2), "x", &RoundFigures::default(), 5), Err(StoreError::Fenced(_))));
    assert_eq!(s.ledger_entries().unwrap(), vec![entry(1, 1.0)], "the ledger is unchanged");
    assert_eq!(s.latest_checkpoint().unwrap().unwrap().version, ModelVersion(1));
    assert_eq!(s.checkpoint_versions().unwrap(), vec![ModelVersion(0), ModelVersion(1)]);
    assert_eq!(s.rounds().unwrap()[1].state, "started");

    // Unfenced (a single node), the same store writes again.
    s.set_fence(None).unwrap();
    s.commit_round(&round_commit(2, &[2.0; 6], Some(&entry(2, 1.0))), 6, 8).unwrap();
    assert_eq!(s.ledger_entries().unwrap(), vec![entry(1, 1.0), entry(2, 1.0)]);
    // Reads and token writes are not fenced.
    s.set_fence(fence(1)).unwrap();
    s.record_token(ClientId(1), 100, 0).unwrap();
    assert_eq!(s.latest_checkpoint().unwrap().unwrap().version, ModelVersion(2));
}
