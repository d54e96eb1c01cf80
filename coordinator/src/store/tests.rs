//! The store's tests.

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
    std::fs::write(&junk, b"this is not a database, just some bytes that go on for a while......").unwrap();
    let before = std::fs::read(&junk).unwrap();
    assert!(matches!(Store::open(&junk), Err(StoreError::Corrupt { .. })));
    assert_eq!(std::fs::read(&junk).unwrap(), before);

    let other = dir.path().join("other.db");
    Connection::open(&other).unwrap().execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
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
        s.conn
            .execute_batch(
                "DROP TABLE evaluations; DROP TABLE audit; DROP TABLE service_state;
                 ALTER TABLE checkpoints DROP COLUMN strategy_state; ALTER TABLE checkpoints DROP COLUMN state_crc32;
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        s.begin_round(RoundId(1), ModelVersion(0), false, 0).unwrap();
        s.fail_round(RoundId(1), "x", &RoundFigures::default(), 1).unwrap();
    }
    let mut s = Store::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(s.rounds().unwrap()[0].state, "failed", "rounds survive the rebuild");
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
    s.record_evaluation(&evaluation(3, 0.5, None), None, &RoundFigures::default()).unwrap();
    drop(s);
    let s = Store::open(&path).unwrap();
    assert_eq!(s.evaluations(20).unwrap(), vec![evaluation(2, 0.25, Some(1.2)), evaluation(3, 0.5, None)]);
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
    let mut s = Store::open(&path).unwrap();
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
}

#[test]
fn checkpoints_are_pruned_and_checksummed() {
    let mut s = Store::open_in_memory().unwrap();
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

#[test]
fn strategy_state_figures_and_rollback_are_stored_with_their_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.db");
    let figures = RoundFigures { selected: 5, reported: 4, dropped: 1, unfinished: 0, rejected: 0 };
    {
        let mut s = Store::open(&path).unwrap();
        s.init_model(ModelVersion(0), shape(), &[0.0; 6], 0).unwrap();
        commit(&mut s, 1, 1.0, Some(b"state one"), figures);
        commit(&mut s, 2, 2.0, Some(b"state two"), figures);
        // A rollback to v1: stored again as v3, with v1's model and state.
        let c = s.install_checkpoint(ModelVersion(3), ModelVersion(1), 9, 8).unwrap();
        assert_eq!(
            (c.version, c.model.clone(), c.strategy_state.clone()),
            (ModelVersion(3), vec![1.0; 6], Some(b"state one".to_vec()))
        );
        assert!(s.install_checkpoint(ModelVersion(4), ModelVersion(77), 9, 8).is_err(), "an unknown source");
        assert!(
            s.install_checkpoint(ModelVersion(3), ModelVersion(1), 9, 8).is_err(),
            "a version is never reused"
        );
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.latest_checkpoint().unwrap().unwrap().strategy_state.as_deref(), Some(&b"state one"[..]));
    let rounds = s.recent_rounds(10).unwrap();
    assert_eq!(rounds.len(), 2);
    assert_eq!(rounds[1].figures, Some(figures));
    assert_eq!(rounds[1].kind, "train");
    assert_eq!(s.schedule_counters().unwrap(), (2, 2));
    // A damaged state is refused like a damaged model.
    s.conn.execute("UPDATE checkpoints SET strategy_state = x'00' WHERE version = 2", []).unwrap();
    assert!(matches!(s.checkpoint(ModelVersion(2)), Err(StoreError::BadCheckpoint { version: 2, .. })));
}

#[test]
fn the_schedule_counts_from_the_newest_evaluation_round() {
    let mut s = Store::open_in_memory().unwrap();
    s.init_model(ModelVersion(0), shape(), &[0.0; 6], 0).unwrap();
    commit(&mut s, 1, 1.0, None, RoundFigures::default());
    s.begin_round(RoundId(2), ModelVersion(1), true, 0).unwrap();
    s.fail_round(RoundId(2), "too few reports", &RoundFigures::default(), 1).unwrap();
    commit(&mut s, 3, 1.0, None, RoundFigures::default());
    s.begin_round(RoundId(4), ModelVersion(2), false, 0).unwrap();
    // Training rounds begun: 1, 3, 4; committed since the evaluation round 2: round 3.
    assert_eq!(s.schedule_counters().unwrap(), (3, 1));
}

#[test]
fn audit_rows_and_switches_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.db");
    {
        let mut s = Store::open(&path).unwrap();
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
    let s = Store::open(&path).unwrap();
    let rows = s.audit(10).unwrap();
    assert_eq!(rows.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(), ["pause", "rollback"]);
    assert_eq!(rows[1].outcome, "refused (409): not kept");
    assert_eq!(s.audit(1).unwrap()[0].action, "rollback", "the newest");
    assert_eq!(s.service_state("paused").unwrap().as_deref(), Some("false"));
    assert_eq!(s.service_state("other").unwrap(), None);
}
