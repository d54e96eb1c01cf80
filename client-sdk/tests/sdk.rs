//! The SDK's promises to app developers and their users: validation, fallback, consent, forget,
//! export, retention, restarts, and a full round driven sans-IO against the real round engine.

use starling_models::data::events::{Context, DeviceClass, Event, EventKind};
use starling_proto::codec::{Codec, FrameBuffer, Inbound};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::{DeviceConditions, NoiseSettings, TrainingPlan, WithdrawReason};
use starling_proto::round::{Orchestrator, OrchestratorConfig, RoundConfig, RoundEvent};
use starling_proto::session::SessionOutcome;
use starling_proto::strategy::Federated;
use starling_proto::time::{Duration, Instant};
use starling_sdk::client::SchedulerConfig;
use starling_sdk::config::{ParticipationPolicy, PrivacyMode, Retention};
use starling_sdk::device::{Device, EXPORT_SCHEMA, Export, RecordError, Source, TrainError};
use starling_sdk::participant::{Participant, StartError};
use starling_sdk::transport::memory;
use starling_sdk::{Client, ClientConfig, Clock, Consent, ModelSpec, Storage};
use std::sync::Arc;

const ITEMS: u32 = 40;
const DIM: u32 = 8;
const DAY_MS: i64 = 86_400_000;
const NOW: i64 = 1_780_000_000_000;
const ALL_IN: Consent = Consent { personalization: true, training: true };
const GOOD: DeviceConditions =
    DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 80 };

fn config(id: u64, storage: Storage) -> ClientConfig {
    let mut c = ClientConfig::new(ClientId(id), b"token".to_vec(), ModelSpec::mf(ITEMS, DIM), storage);
    c.seed = Some(id);
    c.clock = Clock::manual(NOW);
    c
}

fn ev(item: u32, at_ms: i64, kind: EventKind) -> Event {
    Event { item, at_ms, kind, context: Context::at(at_ms / 1000, DeviceClass::Phone) }
}

fn purchases(items: &[u32]) -> Vec<Event> {
    items
        .iter()
        .enumerate()
        .map(|(k, &i)| ev(i, NOW - DAY_MS + k as i64 * 1000, EventKind::Purchase))
        .collect()
}

fn global(seed: u32) -> Arc<[f32]> {
    (0..ITEMS * DIM).map(|k| (((k * 7 + seed * 13) % 17) as f32 - 8.0) / 40.0).collect()
}

fn plan() -> TrainingPlan {
    TrainingPlan {
        clip_norm: Some(1.0),
        learning_rate: 0.5,
        private_learning_rate: 0.2,
        ..TrainingPlan::default()
    }
}

#[test]
fn invalid_events_are_refused_with_their_reason() {
    let mut d = Device::open(&config(1, Storage::InMemory)).unwrap();
    let e = ev(3, NOW, EventKind::Click);
    assert!(matches!(d.record(&e, NOW), Err(RecordError::NoConsent)), "no consent, nothing stored");
    d.set_consent(ALL_IN).unwrap();
    let unknown = d.record(&ev(ITEMS, NOW, EventKind::Click), NOW).unwrap_err();
    assert!(unknown.to_string().contains("unknown item 40"), "{unknown}");
    let bad_rating = d.record(&ev(1, NOW, EventKind::Rating { stars: 9 }), NOW).unwrap_err();
    assert!(bad_rating.to_string().contains("rating"), "{bad_rating}");
    let future = d.record(&ev(1, NOW + DAY_MS, EventKind::Click), NOW).unwrap_err();
    assert!(matches!(future, RecordError::InFuture { .. }), "{future}");
    let old = d.record(&ev(1, NOW - 365 * DAY_MS, EventKind::Click), NOW).unwrap_err();
    assert!(matches!(old, RecordError::TooOld { .. }), "{old}");
    let mut bad_context = ev(1, NOW, EventKind::Click);
    bad_context.context.time_of_day = 9;
    assert!(d.record(&bad_context, NOW).unwrap_err().to_string().contains("context"));
    // A batch with one bad event stores nothing.
    let mut batch = purchases(&[1, 2, 3]);
    batch.push(ev(99, NOW, EventKind::Click));
    assert!(d.record_batch(&batch, NOW).is_err());
    assert_eq!(d.event_count(), 0);
    d.record(&e, NOW).unwrap();
    assert_eq!(d.event_count(), 1);
}

#[test]
fn recommendations_never_fail_and_fall_back_sensibly() {
    let mut d = Device::open(&config(2, Storage::InMemory)).unwrap();
    // Zero events, no model, no consent: still k items.
    let r = d.recommend(10, None);
    assert_eq!(r.items.len(), 10);
    assert_eq!(r.source, Source::Catalogue);
    assert_eq!(d.recommend(1000, None).items.len(), ITEMS as usize, "k is capped at the catalogue");
    // A global model but too little data: the global non-personal ranking.
    d.set_consent(ALL_IN).unwrap();
    d.set_global(ModelVersion(1), global(1)).unwrap();
    d.record(&ev(5, NOW, EventKind::Purchase), NOW).unwrap();
    let r = d.recommend(10, None);
    assert_eq!((r.items.len(), r.source), (10, Source::Global));
    assert!(r.items.iter().all(|s| s.item != 5), "items the user already has are left out");
    // Enough data and a trained user vector: personal.
    d.record_batch(&purchases(&[1, 2, 3, 4]), NOW).unwrap();
    d.train(RoundId(1), ModelVersion(1), global(1), &plan()).unwrap();
    let r = d.recommend(10, None);
    assert_eq!((r.items.len(), r.source), (10, Source::Personal));
    assert!(r.items.windows(2).all(|w| w[0].score >= w[1].score), "best first");
    // Personalization consent off: non-personal again, training consent still usable.
    d.set_consent(Consent { personalization: false, training: true }).unwrap();
    assert_eq!(d.recommend(10, None).source, Source::Global);
}

#[tokio::test(start_paused = true)]
async fn without_training_consent_the_sdk_never_opens_a_connection() {
    let (transport, _listener) = memory::network(8);
    let mut cfg = config(3, Storage::InMemory);
    cfg.participation = ParticipationPolicy::always();
    let client = Client::open(cfg, transport.clone()).unwrap();
    client.set_consent(Consent { personalization: true, training: false }).unwrap();
    client.set_conditions(GOOD);
    client.record(ev(1, NOW, EventKind::Click)).unwrap();
    assert!(matches!(client.run_round().await, Err(starling_sdk::RoundError::NoConsent)));
    let mut scheduler = client.spawn_scheduler(SchedulerConfig {
        interval: std::time::Duration::from_secs(1),
        jitter: Default::default(),
    });
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        client.set_conditions(GOOD);
    }
    assert_eq!(transport.connect_attempts(), 0, "no connection attempt without training consent");
    // Consent on: the scheduler connects (nobody answers on the other end, so it times out).
    client.set_consent(ALL_IN).unwrap();
    let report = scheduler.next_report().await.unwrap().unwrap();
    assert_eq!(report.session.outcome, SessionOutcome::TimedOut);
    assert!(transport.connect_attempts() >= 1);
    scheduler.stop().await;
}

#[test]
fn default_policy_trains_only_when_charging_unmetered_and_idle() {
    let cfg = config(4, Storage::InMemory);
    let mut d = Device::open(&cfg).unwrap();
    d.set_consent(ALL_IN).unwrap();
    let mut p = Participant::new(&cfg, 1);
    for (c, why) in [
        (DeviceConditions { charging: false, ..GOOD }, "charging"),
        (DeviceConditions { unmetered: false, ..GOOD }, "metered"),
        (DeviceConditions { idle: false, ..GOOD }, "in use"),
    ] {
        let e = p.start(Instant::from_millis(0), NOW, &d, c).unwrap_err();
        assert!(matches!(e, StartError::NotAllowed(_)) && e.to_string().contains(why), "{e}");
        assert!(p.poll_transmit().is_none(), "nothing is sent");
    }
    p.start(Instant::from_millis(0), NOW, &d, GOOD).unwrap();
    assert!(p.poll_transmit().is_some(), "a check-in");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn forget_really_erases_the_data_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(5, Storage::Dir(dir.path().to_path_buf()));
    let mut d = Device::open(&cfg).unwrap();
    d.set_consent(ALL_IN).unwrap();
    d.record_batch(&purchases(&[7, 8, 9, 10, 11]), NOW).unwrap();
    d.set_global(ModelVersion(1), global(2)).unwrap();
    d.train(RoundId(1), ModelVersion(1), global(2), &plan()).unwrap();
    let trained = d.export(NOW).unwrap();
    let user = trained.user_vector.clone().unwrap();
    let contribution = Device::record_contribution;
    let t = d.train(RoundId(2), ModelVersion(1), global(2), &plan()).unwrap();
    contribution(&mut d, RoundId(2), 1234, &t, NOW).unwrap();
    let path = dir.path().join("starling.db");
    let before = std::fs::read(&path).unwrap();
    assert!(contains(&before, b"purchase"), "events are in the file before");
    let user_bytes: Vec<u8> =
        d.export(NOW).unwrap().user_vector.unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(contains(&before, &user_bytes), "the user vector is in the file before");
    assert!(!user.is_empty());

    d.forget().unwrap();
    drop(d);
    let after = std::fs::read(&path).unwrap();
    assert!(!contains(&after, b"purchase"), "no event left in the file");
    assert!(!contains(&after, &user_bytes), "no trace of the user vector");
    assert!(!contains(&after, b"\"personalization\""), "no stored consent");
    let mut d = Device::open(&cfg).unwrap();
    assert_eq!(d.event_count(), 0);
    let report = d.privacy_report().unwrap();
    assert_eq!((report.bytes_sent, report.local_epsilon), (0, 0.0), "counters gone");
    assert_eq!((report.updates_sent, report.rounds), (1, vec![2]), "the ledger is kept");
    assert!(d.export(NOW).unwrap().user_vector.is_none());
    assert_eq!(d.consent(), Consent::default(), "consent back to the default (off)");
}

#[test]
fn export_is_complete_and_parses_back() {
    let mut cfg = config(6, Storage::InMemory);
    cfg.privacy.mode = PrivacyMode::Local { min_noise_multiplier: 0.5 };
    let mut d = Device::open(&cfg).unwrap();
    d.set_consent(ALL_IN).unwrap();
    let mut events = purchases(&[1, 2, 3]);
    events.push(ev(4, NOW - 5_000, EventKind::View { dwell_ms: 42_000 }));
    events.push(ev(5, NOW - 4_000, EventKind::Rating { stars: 2 }));
    events.push(ev(6, NOW - 3_000, EventKind::Skip));
    d.record_batch(&events, NOW).unwrap();
    let local = TrainingPlan { noise: NoiseSettings::Local { multiplier: 2.0 }, ..plan() };
    let t = d.train(RoundId(9), ModelVersion(3), global(3), &local).unwrap();
    assert!(t.release.is_some());
    let eps = d.record_contribution(RoundId(9), 999, &t, NOW).unwrap();
    assert!(eps > 0.0);

    let json = serde_json::to_string_pretty(&d.export(NOW).unwrap()).unwrap();
    let back: Export = serde_json::from_str(&json).unwrap();
    assert_eq!(back.schema, EXPORT_SCHEMA);
    assert_eq!(back.client_id, 6);
    assert_eq!(back.consent, ALL_IN);
    assert_eq!(back.events.iter().map(|e| e.event).collect::<Vec<_>>(), events, "every event, in order");
    assert_eq!(back.user_vector.as_ref().map(Vec::len), Some(DIM as usize));
    assert_eq!(back.global_model_version, Some(3));
    assert_eq!(back.contributions.len(), 1);
    assert_eq!(back.contributions[0].round, 9);
    assert_eq!(back.contributions[0].noise_multiplier, Some(2.0));
    assert_eq!(back.privacy.local_epsilon, eps);
    assert_eq!(back.privacy.rounds, vec![9]);
    // The JSON names things plainly.
    for key in
        ["\"events\"", "\"type\": \"view\"", "\"dwell_ms\": 42000", "\"user_vector\"", "\"contributions\""]
    {
        assert!(json.contains(key), "{key} missing from the export");
    }
}

#[test]
fn retention_purges_old_events_and_caps_the_count() {
    let mut cfg = config(7, Storage::InMemory);
    cfg.retention =
        Retention { max_age: Some(std::time::Duration::from_secs(30 * 86_400)), max_events: Some(5) };
    let mut d = Device::open(&cfg).unwrap();
    d.set_consent(ALL_IN).unwrap();
    d.record(&ev(1, NOW - 20 * DAY_MS, EventKind::Click), NOW).unwrap();
    d.record(&ev(2, NOW - DAY_MS, EventKind::Click), NOW).unwrap();
    // Eleven days later the first event is 31 days old.
    assert_eq!(d.enforce_retention(NOW + 11 * DAY_MS).unwrap(), 1);
    assert_eq!(d.events().unwrap().iter().map(|e| e.item).collect::<Vec<_>>(), vec![2]);
    let later: Vec<Event> = (0..7).map(|k| ev(10 + k, NOW + k as i64, EventKind::Click)).collect();
    d.record_batch(&later, NOW + DAY_MS).unwrap();
    let kept: Vec<u32> = d.events().unwrap().iter().map(|e| e.item).collect();
    assert_eq!(kept, vec![12, 13, 14, 15, 16], "the newest five are kept");
    assert_eq!(d.event_count(), 5);
}

#[test]
fn a_device_at_its_cap_keeps_exactly_the_newest_events_with_a_true_count() {
    let mut cfg = config(7, Storage::InMemory);
    cfg.retention = Retention { max_age: None, max_events: Some(20) };
    let mut d = Device::open(&cfg).unwrap();
    d.set_consent(ALL_IN).unwrap();
    // Singles and batches, some at equal times and some out of order: the oldest by time (then
    // by insertion) go first, and the count the report gives is the table's.
    let mut all = Vec::new();
    for k in 0..90u32 {
        let at = NOW - 1_000 + i64::from(k / 3) * 10 - if k % 7 == 0 { 500 } else { 0 };
        all.push(ev(k % 40, at, EventKind::Click));
    }
    for chunk in all.chunks(9) {
        if chunk[0].item % 2 == 0 {
            d.record_batch(chunk, NOW).unwrap();
        } else {
            for e in chunk {
                d.record(e, NOW).unwrap();
            }
        }
    }
    let mut expected: Vec<(i64, usize)> = all.iter().enumerate().map(|(i, e)| (e.at_ms, i)).collect();
    expected.sort();
    let newest: Vec<(i64, u32)> =
        expected[expected.len() - 20..].iter().map(|&(at, i)| (at, all[i].item)).collect();
    let kept: Vec<(i64, u32)> = d.events().unwrap().iter().map(|e| (e.at_ms, e.item)).collect();
    assert_eq!(kept, newest);
    assert_eq!(d.event_count(), 20);
    assert_eq!(d.privacy_report().unwrap().events_stored, 20);
    assert_eq!(d.export(NOW).unwrap().events.len(), 20);
}

#[test]
fn a_restart_restores_events_model_user_vector_consent_and_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(8, Storage::Dir(dir.path().to_path_buf()));
    cfg.privacy.mode = PrivacyMode::Local { min_noise_multiplier: 1.0 };
    let (export, recs) = {
        let mut d = Device::open(&cfg).unwrap();
        d.set_consent(ALL_IN).unwrap();
        d.record_batch(&purchases(&[3, 4, 5, 6, 7]), NOW).unwrap();
        let local = TrainingPlan { noise: NoiseSettings::Local { multiplier: 3.0 }, ..plan() };
        let t = d.train(RoundId(1), ModelVersion(4), global(4), &local).unwrap();
        d.record_contribution(RoundId(1), 500, &t, NOW).unwrap();
        d.count_session(600, 7000, true).unwrap();
        (d.export(NOW).unwrap(), d.recommend(10, None))
    };
    let mut d = Device::open(&cfg).unwrap();
    assert_eq!(d.export(NOW).unwrap(), export, "the same state after a restart");
    assert_eq!(d.recommend(10, None), recs, "and the same recommendations");
    assert_eq!(recs.source, Source::Personal);
    assert!(d.local_epsilon() > 0.0);
    let report = d.privacy_report().unwrap();
    assert_eq!((report.bytes_sent, report.bytes_received, report.rounds_accepted), (600, 7000, 1));
}

#[test]
fn a_corrupt_or_foreign_file_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("starling.db");
    std::fs::write(&path, b"this is not a database, it is a shopping list").unwrap();
    let err = Device::open(&config(9, Storage::Dir(dir.path().to_path_buf()))).unwrap_err();
    assert!(err.to_string().contains("left untouched"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"this is not a database, it is a shopping list");
}

#[test]
fn the_device_refuses_tasks_weaker_than_its_privacy_mode_or_beyond_its_budget() {
    let mut cfg = config(10, Storage::InMemory);
    cfg.privacy.mode = PrivacyMode::Local { min_noise_multiplier: 1.0 };
    cfg.privacy.max_epsilon = Some(3.0);
    let mut d = Device::open(&cfg).unwrap();
    d.set_consent(ALL_IN).unwrap();
    d.record_batch(&purchases(&[1, 2, 3]), NOW).unwrap();
    let central = plan();
    assert!(matches!(
        d.train(RoundId(1), ModelVersion(1), global(1), &central),
        Err(TrainError::Protection(_))
    ));
    let weak = TrainingPlan { noise: NoiseSettings::Local { multiplier: 0.3 }, ..plan() };
    assert!(matches!(d.train(RoundId(1), ModelVersion(1), global(1), &weak), Err(TrainError::Protection(_))));
    let unclipped = TrainingPlan { clip_norm: None, ..plan() };
    assert!(matches!(
        d.train(RoundId(1), ModelVersion(1), global(1), &unclipped),
        Err(TrainError::Protection(_))
    ));
    let ok = TrainingPlan { noise: NoiseSettings::Local { multiplier: 2.0 }, ..plan() };
    let mut round = 1;
    loop {
        match d.train(RoundId(round), ModelVersion(1), global(1), &ok) {
            Ok(t) => {
                d.record_contribution(RoundId(round), 100, &t, NOW).unwrap();
                round += 1;
            }
            Err(TrainError::Budget(_)) => break,
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(round < 1000);
    }
    assert!(d.local_epsilon() <= 3.0 && round > 1, "spent {} in {} rounds", d.local_epsilon(), round - 1);
}

/// Pumps frames between one orchestrator and a set of participants until nothing moves; time
/// advances to the next timer when idle.
fn pump(
    engine: &mut Orchestrator,
    clients: &mut [(Participant, Device)],
    mut now: Instant,
    until: Instant,
) -> Instant {
    let codec = Codec::default();
    let mut buffers: Vec<FrameBuffer> = clients.iter().map(|_| FrameBuffer::new(codec)).collect();
    loop {
        let mut moved = false;
        for (k, (p, _)) in clients.iter_mut().enumerate() {
            while let Some(frame) = p.poll_transmit() {
                moved = true;
                buffers[k].push(&frame);
                while let Ok(Some(Inbound::Message { message, .. })) = buffers[k].next_client() {
                    engine.handle_message(now, ClientId(k as u64 + 1), message);
                }
            }
        }
        while let Some(t) = engine.poll_transmit() {
            moved = true;
            let (p, d) = &mut clients[t.to.0 as usize - 1];
            let frame = codec.encode_coordinator(&t.message).unwrap();
            p.handle_bytes(now, &frame, d);
        }
        if !moved {
            match engine.poll_timeout() {
                Some(t) if t <= until => {
                    now = t;
                    engine.handle_timeout(now);
                }
                _ => return now,
            }
        }
    }
}

/// The real round engine over the test model (FedAvg, global model `global(5)` as version 1).
fn engine(shape: &ModelSpec, round: RoundConfig) -> Orchestrator {
    let ocfg = OrchestratorConfig {
        model_family: shape.family.clone(),
        shape: starling_proto::update::ModelShape::new(ITEMS, DIM).unwrap(),
        round,
        history: 2,
        rng_seed: 1,
    };
    Orchestrator::new(ocfg, Box::new(Federated::fedavg()), global(5).to_vec(), ModelVersion(1), RoundId(1))
        .unwrap()
}

#[test]
fn a_round_driven_sans_io_against_the_real_engine() {
    let shape = ModelSpec::mf(ITEMS, DIM);
    let round = RoundConfig {
        target_participants: 4,
        min_reports: 3,
        selection_timeout: Duration::from_secs(5),
        report_timeout: Duration::from_secs(30),
        plan: plan(),
        ..RoundConfig::default()
    };
    let mut engine = engine(&shape, round);
    let mut clients: Vec<(Participant, Device)> = (1..=5)
        .map(|id| {
            let cfg = config(id, Storage::InMemory);
            let mut d = Device::open(&cfg).unwrap();
            // Client 5 consents to personalization only: it never checks in.
            d.set_consent(if id == 5 { Consent { personalization: true, training: false } } else { ALL_IN })
                .unwrap();
            // Client 4 has no data: it withdraws with a reason.
            if id != 4 {
                d.record_batch(&purchases(&[id as u32, id as u32 + 10, id as u32 + 20]), NOW).unwrap();
            }
            (Participant::new(&cfg, id), d)
        })
        .collect();
    let t0 = Instant::from_millis(0);
    engine.start_round(t0).unwrap();
    for (p, d) in clients.iter_mut() {
        let r = p.start(t0, NOW, d, GOOD);
        if d.client() == ClientId(5) {
            assert_eq!(r, Err(StartError::NoConsent));
        } else {
            r.unwrap();
        }
    }
    pump(&mut engine, &mut clients, t0, Instant::from_millis(120_000));
    let mut committed = None;
    while let Some(e) = engine.poll_event() {
        if let RoundEvent::Committed(c) = e {
            committed = Some(c);
        }
    }
    let committed = committed.expect("the round committed");
    assert_eq!(committed.stats.reported, 3);
    assert_eq!(committed.stats.dropped, 1, "the client without data withdrew");
    assert_ne!(&committed.model[..], &global(5)[..], "the global model changed");
    for (p, d) in clients.iter_mut().take(4) {
        let report = p.poll_report().expect("every session ends with a report");
        let r = d.privacy_report().unwrap();
        if d.client() == ClientId(4) {
            assert_eq!(report.outcome, SessionOutcome::Withdrawn { reason: WithdrawReason::NoData });
            assert!(report.task_error.unwrap().contains("no training data"));
            assert_eq!(r.updates_sent, 0);
        } else {
            assert_eq!(report.outcome, SessionOutcome::Accepted { round: RoundId(1) });
            assert!(report.sent_update && report.bytes_sent > 0 && report.bytes_received > 0);
            assert_eq!((r.updates_sent, r.rounds_accepted, r.rounds.clone()), (1, 1, vec![1]));
            assert_eq!(r.bytes_sent, report.bytes_sent);
            assert_eq!(
                d.model_version(),
                Some(ModelVersion(1)),
                "the device keeps the model it trained from"
            );
        }
    }
}

/// The same sans-IO round under secure aggregation: the real `Participant`s take part in SecAgg+,
/// only masked vectors leave them, the round commits the mean of their clipped updates, and each
/// device's own record shows the contribution it made (the masked frame).
#[test]
fn a_secure_round_driven_sans_io_against_the_real_engine() {
    use starling_proto::round::SecureAggregation;
    let shape = ModelSpec::mf(ITEMS, DIM);
    let round = RoundConfig {
        target_participants: 4,
        min_reports: 3,
        selection_timeout: Duration::from_secs(5),
        report_timeout: Duration::from_secs(30),
        plan: TrainingPlan { encoding: starling_proto::encoding::EncodingKind::Dense, ..plan() },
        secure: Some(SecureAggregation {
            neighbours: 4,
            threshold: 3,
            max_cohort: 16,
            phase_timeout: Duration::from_secs(10),
            ..SecureAggregation::default()
        }),
        ..RoundConfig::default()
    };
    let mut engine = engine(&shape, round);
    let mut clients: Vec<(Participant, Device)> = (1..=4)
        .map(|id| {
            let cfg = config(id, Storage::InMemory);
            let mut d = Device::open(&cfg).unwrap();
            d.set_consent(ALL_IN).unwrap();
            d.record_batch(&purchases(&[id as u32, id as u32 + 10, id as u32 + 20]), NOW).unwrap();
            (Participant::new(&cfg, id), d)
        })
        .collect();
    let t0 = Instant::from_millis(0);
    engine.start_round(t0).unwrap();
    for (p, d) in clients.iter_mut() {
        p.start(t0, NOW, d, GOOD).unwrap();
    }
    pump(&mut engine, &mut clients, t0, Instant::from_millis(120_000));
    let mut committed = None;
    while let Some(e) = engine.poll_event() {
        if let RoundEvent::Committed(c) = e {
            committed = Some(c);
        }
    }
    let committed = committed.expect("the secure round committed");
    assert_eq!(committed.stats.reported, 4);
    assert!(committed.stats.secagg.is_some());
    assert_ne!(&committed.model[..], &global(5)[..], "the global model changed");
    for (p, d) in clients.iter_mut() {
        let report = p.poll_report().expect("every session ends with a report");
        assert_eq!(report.outcome, SessionOutcome::Accepted { round: RoundId(1) });
        assert!(report.sent_update, "{report:?}");
        let r = d.privacy_report().unwrap();
        assert_eq!((r.updates_sent, r.rounds_accepted), (1, 1), "the masked input is on the record");
        assert!(r.bytes_sent >= u64::from(ITEMS * DIM) * 4, "a dense masked vector left: {} B", r.bytes_sent);
    }
}
