//! Model families, context, signals, similar items, explanations and federated evaluation,
//! through the SDK's public API.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use starling_models::data::events::{Context, DeviceClass, Event, EventKind, Examples};
use starling_models::family::ModelDef;
use starling_proto::codec::{Codec, FrameBuffer, Inbound};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::{
    ClientMessage, CoordinatorMessage, DeviceConditions, ModelPayload, Task, TaskKind, TrainingPlan,
};
use starling_proto::time::Instant;
use starling_sdk::blocking::BlockingClient;
use starling_sdk::config::{ParticipationPolicy, PrivacyMode};
use starling_sdk::device::{EvalError, Reason, SimilarItemsError, SimilarSource, Source};
use starling_sdk::participant::Participant;
use starling_sdk::store::ContributionKind;
use starling_sdk::transport::memory;
use starling_sdk::{ClientConfig, Clock, Consent, Device, ModelSpec, Storage};
use std::sync::Arc;

const ITEMS: u32 = 40;
/// A catalogue large enough for federated evaluation's 99 sampled negatives.
const EVAL_ITEMS: u32 = 200;
const DIM: u32 = 8;
const NOW: i64 = 1_780_000_000_000;
const HOUR_MS: i64 = 3_600_000;
const ALL_IN: Consent = Consent { personalization: true, training: true };
const GOOD: DeviceConditions =
    DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 80 };

fn config(id: u64, model: ModelSpec, storage: Storage) -> ClientConfig {
    let mut c = ClientConfig::new(ClientId(id), b"token".to_vec(), model, storage);
    c.seed = Some(id);
    c.clock = Clock::manual(NOW);
    c.participation = ParticipationPolicy::always();
    c.default_consent = ALL_IN;
    c
}

fn def_of(spec: &ModelSpec) -> ModelDef {
    ModelDef::from_name(&spec.family, spec.items, spec.dim, spec.item_bias).unwrap()
}

fn global_for(spec: &ModelSpec, seed: u64) -> Arc<[f32]> {
    def_of(spec).init_global(seed, 0.3).unwrap().into()
}

fn ev(item: u32, at_ms: i64, kind: EventKind, context: Context) -> Event {
    Event { item, at_ms, kind, context }
}

fn purchases(items: &[u32]) -> Vec<Event> {
    items
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let at = NOW - HOUR_MS + k as i64 * 1000;
            ev(i, at, EventKind::Purchase, Context::at(at / 1000, DeviceClass::Phone))
        })
        .collect()
}

fn plan(epochs: u32, lr: f32) -> TrainingPlan {
    TrainingPlan {
        epochs,
        clip_norm: Some(10.0),
        learning_rate: lr,
        private_learning_rate: 0.2,
        ..TrainingPlan::default()
    }
}

fn items_of(r: &starling_sdk::Recommendations) -> Vec<u32> {
    r.items.iter().map(|s| s.item).collect()
}

#[test]
fn an_unknown_family_is_refused_at_open() {
    let mut spec = ModelSpec::mf(ITEMS, DIM);
    spec.family = "gpt-rec".into();
    let err = Device::open(&config(1, spec, Storage::InMemory)).unwrap_err();
    assert!(matches!(err, starling_sdk::device::OpenError::Model(_)), "{err}");
    let d = Device::open(&config(1, ModelSpec::two_tower(ITEMS, DIM), Storage::InMemory)).unwrap();
    assert_eq!(d.model_def().name(), "two-tower");
    assert_eq!(d.shape(), d.model_def().shape().unwrap());
}

/// Morning on a phone: items 0..8; evening on a desktop: items 20..28.
fn context_dependent_events() -> Vec<Event> {
    let morning = Context {
        time_of_day: 1,
        weekday: 2,
        device: DeviceClass::Phone,
        battery: None,
        network: None,
        region: None,
    };
    let evening = Context {
        time_of_day: 5,
        weekday: 2,
        device: DeviceClass::Desktop,
        battery: None,
        network: None,
        region: None,
    };
    let mut events = Vec::new();
    for k in 0..8u32 {
        events.push(ev(k, NOW - 2 * HOUR_MS + i64::from(k) * 1000, EventKind::Purchase, morning));
        events.push(ev(20 + k, NOW - HOUR_MS + i64::from(k) * 1000, EventKind::Purchase, evening));
    }
    events
}

#[test]
fn a_two_tower_device_trains_through_burn_and_ranks_with_the_context() {
    let spec = ModelSpec::two_tower(ITEMS, DIM);
    let mut cfg = config(2, spec.clone(), Storage::InMemory);
    cfg.personal_epochs = 0;
    cfg.min_personal_events = 1;
    let mut d = Device::open(&cfg).unwrap();
    d.record_batch(&context_dependent_events(), NOW).unwrap();
    let params = global_for(&spec, 7);
    d.seed_user_vector(def_of(&spec).init_private(3, 0.1)).unwrap();
    let before = d.user_vector().unwrap().to_vec();
    let trained = d.train(RoundId(1), ModelVersion(1), params.clone(), &plan(40, 0.3)).unwrap();
    // The update is over the global part only, and the private vector moved on the device.
    assert_eq!(trained.update.shape(), d.shape());
    assert!(trained.loss.is_finite());
    assert_ne!(d.user_vector().unwrap(), &before[..], "the private vector trained");
    assert_eq!(d.user_vector().unwrap().len(), def_of(&spec).private_len());
    let dense = trained.update.to_dense();
    assert!(dense.iter().any(|v| *v != 0.0), "the update is not empty");
    // The item rows of items the user never saw and that were not drawn as negatives are
    // untouched: at most the positives and the sampled negatives move.
    let changed_items = (0..ITEMS)
        .filter(|&i| dense[(i * DIM) as usize..((i + 1) * DIM) as usize].iter().any(|v| *v != 0.0))
        .count();
    assert!(changed_items >= 15, "the trained positives moved ({changed_items})");
    // The coordinator applies the update (this device alone in the round) and sends the next model
    // back: its context embeddings and projection have learnt from the device's events.
    let next: Arc<[f32]> = params.iter().zip(&dense).map(|(a, b)| a + b).collect();
    assert!(d.set_global(ModelVersion(2), next).unwrap());
    let morning = Context {
        time_of_day: 1,
        weekday: 2,
        device: DeviceClass::Phone,
        battery: None,
        network: None,
        region: None,
    };
    let evening = Context {
        time_of_day: 5,
        weekday: 2,
        device: DeviceClass::Desktop,
        battery: None,
        network: None,
        region: None,
    };
    // Everything the user bought is left out, so rank the rest fully in both contexts.
    let a = d.recommend(ITEMS as usize, Some(morning));
    let b = d.recommend(ITEMS as usize, Some(evening));
    assert_eq!((a.source, b.source), (Source::Personal, Source::Personal));
    assert_eq!(a.items.len(), (ITEMS - 16) as usize);
    let scores_a: Vec<f32> = a.items.iter().map(|s| s.score).collect();
    let mut sorted_b = b.items.clone();
    sorted_b.sort_by_key(|s| s.item);
    let mut sorted_a = a.items.clone();
    sorted_a.sort_by_key(|s| s.item);
    assert!(
        sorted_a.iter().zip(&sorted_b).any(|(x, y)| x.score != y.score),
        "the context changes the scores: {scores_a:?}"
    );
    assert_ne!(items_of(&a), items_of(&b), "two contexts, two different lists");
}

#[test]
fn matrix_factorisation_ignores_the_context() {
    let spec = ModelSpec::mf(ITEMS, DIM);
    let mut d = Device::open(&config(3, spec.clone(), Storage::InMemory)).unwrap();
    d.record_batch(&purchases(&[1, 2, 3, 4, 5]), NOW).unwrap();
    d.train(RoundId(1), ModelVersion(1), global_for(&spec, 1), &plan(2, 0.5)).unwrap();
    let a = d.recommend(
        10,
        Some(Context {
            time_of_day: 0,
            weekday: 0,
            device: DeviceClass::Tablet,
            battery: None,
            network: None,
            region: None,
        }),
    );
    let b = d.recommend(10, None);
    assert_eq!(a.source, Source::Personal);
    assert_eq!(items_of(&a), items_of(&b));
}

fn rank(r: &starling_sdk::Recommendations, item: u32) -> usize {
    r.items.iter().position(|s| s.item == item).unwrap_or(usize::MAX)
}

#[test]
fn a_skipped_or_low_rated_item_ranks_lower_than_for_a_user_who_did_not_reject_it() {
    for family in [ModelSpec::mf(ITEMS, DIM), ModelSpec::two_tower(ITEMS, DIM)] {
        let params = global_for(&family, 4);
        let mut cfg = config(5, family.clone(), Storage::InMemory);
        cfg.personal_epochs = 2;
        let history = purchases(&[2, 5, 9, 11, 17]);
        let open = |extra: &[Event]| {
            let mut d = Device::open(&cfg).unwrap();
            d.record_batch(&history, NOW).unwrap();
            d.record_batch(extra, NOW).unwrap();
            d
        };
        // The plain user: find an item high on their list.
        let mut plain = open(&[]);
        plain.train(RoundId(1), ModelVersion(1), params.clone(), &plan(2, 0.2)).unwrap();
        let before = plain.recommend(ITEMS as usize, None);
        assert_eq!(before.source, Source::Personal);
        let target = before.items[0].item;
        let ctx = Context::at(NOW / 1000, DeviceClass::Phone);
        for rejection in [EventKind::Skip, EventKind::Rating { stars: 1 }, EventKind::Rating { stars: 2 }] {
            // An otherwise identical user who rejected it (before the device trained and fitted).
            let mut rejecting = open(&[ev(target, NOW - 1000, rejection, ctx)]);
            rejecting.train(RoundId(1), ModelVersion(1), params.clone(), &plan(2, 0.2)).unwrap();
            let after = rejecting.recommend(ITEMS as usize, None);
            assert!(
                rank(&after, target) > rank(&before, target),
                "{}: {rejection:?} of {target} did not lower it ({} vs {})",
                family.family,
                rank(&after, target),
                rank(&before, target)
            );
        }
    }
}

#[test]
fn similar_items_work_without_consent_or_events() {
    for spec in [ModelSpec::mf(ITEMS, DIM), ModelSpec::two_tower(ITEMS, DIM)] {
        let mut cfg = config(6, spec.clone(), Storage::InMemory);
        cfg.default_consent = Consent::default();
        let mut d = Device::open(&cfg).unwrap();
        assert_eq!(d.consent(), Consent::default());
        assert_eq!(d.event_count(), 0);
        let none = d.similar_items(3, 5).unwrap();
        assert_eq!((none.items.len(), none.source, none.model_version), (0, SimilarSource::NoModel, None));
        assert_eq!(
            d.similar_items(ITEMS, 5).unwrap_err(),
            SimilarItemsError::UnknownItem { item: ITEMS, items: ITEMS }
        );
        let params = global_for(&spec, 9);
        d.set_global(ModelVersion(3), params.clone()).unwrap();
        let sim = d.similar_items(3, 5).unwrap();
        assert_eq!((sim.source, sim.model_version, sim.item), (SimilarSource::GlobalModel, Some(3), 3));
        assert_eq!(sim.items.len(), 5);
        assert!(sim.items.iter().all(|s| s.item != 3 && s.item < ITEMS));
        assert!(sim.items.windows(2).all(|w| w[0].similarity >= w[1].similarity));
        let direct = def_of(&spec).similar_items(&params, 3, 5);
        assert_eq!(sim.items.iter().map(|s| (s.item, s.similarity)).collect::<Vec<_>>(), direct);
        assert_eq!(d.similar_items(3, 1000).unwrap().items.len(), (ITEMS - 1) as usize);
        assert_eq!(d.event_count(), 0, "nothing recorded");
    }
    // And through the blocking client, consent off.
    let (transport, _listener) = memory::network(4);
    let mut cfg = config(7, ModelSpec::mf(ITEMS, DIM), Storage::InMemory);
    cfg.default_consent = Consent::default();
    let client = BlockingClient::open(cfg, transport).unwrap();
    assert_eq!(client.similar_items(1, 3).unwrap().source, SimilarSource::NoModel);
    client
        .client()
        .with_device(|d| d.set_global(ModelVersion(1), global_for(&ModelSpec::mf(ITEMS, DIM), 2)))
        .unwrap();
    assert_eq!(client.similar_items(1, 3).unwrap().items.len(), 3);
    assert!(client.similar_items(ITEMS + 1, 3).is_err());
}

fn random_history(rng: &mut ChaCha8Rng) -> Vec<Event> {
    let n = rng.random_range(0..30);
    (0..n)
        .map(|k| {
            let kind = match rng.random_range(0..8u8) {
                0 => EventKind::View { dwell_ms: rng.random_range(0..60_000) },
                1 => EventKind::Click,
                2 => EventKind::AddToCart,
                3 => EventKind::Purchase,
                4 => EventKind::Rating { stars: rng.random_range(1..=5) },
                _ => EventKind::Skip,
            };
            let context = Context {
                time_of_day: rng.random_range(0..6),
                weekday: rng.random_range(0..7),
                device: [DeviceClass::Phone, DeviceClass::Tablet, DeviceClass::Desktop]
                    [rng.random_range(0..3)],
                battery: None,
                network: None,
                region: None,
            };
            ev(rng.random_range(0..ITEMS), NOW - 10 * HOUR_MS + k * 60_000, kind, context)
        })
        .collect()
}

#[test]
fn explanations_only_ever_name_items_the_user_engaged_with_positively() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut engaged = 0;
    let mut reasons = std::collections::BTreeSet::new();
    for case in 0..36u64 {
        let spec = if case % 3 == 0 { ModelSpec::two_tower(ITEMS, DIM) } else { ModelSpec::mf(ITEMS, DIM) };
        let mut cfg = config(100 + case, spec.clone(), Storage::InMemory);
        cfg.personal_epochs = 1;
        cfg.min_personal_events = rng.random_range(0..4);
        let mut d = Device::open(&cfg).unwrap();
        let events = random_history(&mut rng);
        d.record_batch(&events, NOW).unwrap();
        let examples = Examples::from_events(&events);
        let positives = examples.positive_items();
        if rng.random_range(0..4) > 0 {
            let params = global_for(&spec, case);
            // With no positive the device refuses to train; it still holds no model then.
            if d.train(RoundId(1), ModelVersion(1), params.clone(), &plan(1, 0.3)).is_err() {
                d.set_global(ModelVersion(1), params).unwrap();
            }
        }
        let context = (rng.random_range(0..2) == 0).then(|| Context {
            time_of_day: rng.random_range(0..6),
            weekday: rng.random_range(0..7),
            device: DeviceClass::Tablet,
            battery: None,
            network: None,
            region: None,
        });
        let k = rng.random_range(0..ITEMS as usize + 3);
        let r = d.recommend(k, context);
        assert_eq!(r.items.len(), k.min(ITEMS as usize - positives.len() - examples.negatives.len()).min(k));
        for s in &r.items {
            assert!(positives.binary_search(&s.item).is_err(), "case {case}: a seen item is recommended");
            assert!(examples.negatives.binary_search(&s.item).is_err(), "case {case}: a rejected item");
            reasons.insert(format!("{:?}", std::mem::discriminant(&s.reason)));
            match s.reason {
                Reason::BecauseYouEngagedWith { item, similarity } => {
                    engaged += 1;
                    assert!(
                        positives.binary_search(&item).is_ok(),
                        "case {case}: explanation names {item}, not a positive item of {events:?}"
                    );
                    assert!((starling_sdk::device::SIMILARITY_THRESHOLD..=1.001).contains(&similarity));
                    assert_eq!(r.source, Source::Personal);
                }
                Reason::InThisContext { context: c } => {
                    assert_eq!(Some(c), context);
                    assert_eq!(r.source, Source::Personal);
                }
                Reason::NewForYou => assert_eq!(r.source, Source::Personal),
                Reason::PopularNow => assert_eq!(r.source, Source::Global),
                Reason::Catalogue => assert_eq!(r.source, Source::Catalogue),
                _ => panic!("unknown reason"),
            }
            let json = serde_json::to_string(&s.reason).unwrap();
            assert!(json.starts_with("{\"type\":\""), "{json}");
        }
    }
    assert!(engaged > 0, "the property was exercised");
    assert!(reasons.len() >= 4, "several kinds of reasons appear: {reasons:?}");
}

#[test]
fn the_privacy_report_and_export_name_what_explanations_use() {
    let mut d = Device::open(&config(8, ModelSpec::mf(ITEMS, DIM), Storage::InMemory)).unwrap();
    let report = d.privacy_report().unwrap();
    assert_eq!(report.explanation_inputs.len(), starling_sdk::device::EXPLANATION_INPUTS.len());
    assert!(report.explanation_inputs.iter().any(|s| s.contains("positive events")));
    let export = d.export(NOW).unwrap();
    assert_eq!(export.schema, "starling.sdk.export/2");
    let json = serde_json::to_value(&export).unwrap();
    assert!(json["privacy"]["explanation_inputs"].is_array());
    assert_eq!(json["privacy"]["evaluations_sent"], 0);
}

/// Everything observable about a device, bit for bit: the export's JSON, the private vector's
/// bits, the global model's version and bits, the event count.
type Snapshot = (String, Vec<u32>, Option<(u64, Vec<u32>)>, u64);

fn snapshot(d: &mut Device) -> Snapshot {
    let export = serde_json::to_string(&d.export(NOW).unwrap()).unwrap();
    let user = d.user_vector().map(|u| u.iter().map(|v| v.to_bits()).collect()).unwrap_or_default();
    let global = d.global().map(|g| (g.version.0, g.params.iter().map(|v| v.to_bits()).collect()));
    (export, user, global, d.event_count())
}

#[test]
fn an_evaluation_changes_nothing_on_the_device() {
    let dir = tempfile::tempdir().unwrap();
    for (k, spec) in
        [ModelSpec::mf(EVAL_ITEMS, DIM), ModelSpec::two_tower(EVAL_ITEMS, DIM)].into_iter().enumerate()
    {
        let path = dir.path().join(format!("d{k}"));
        let mut cfg = config(9, spec.clone(), Storage::Dir(path));
        cfg.personal_epochs = 1;
        let mut d = Device::open(&cfg).unwrap();
        d.record_batch(&purchases(&[1, 4, 7, 10, 13, 16]), NOW).unwrap();
        d.record(&ev(20, NOW - 10, EventKind::Skip, Context::at(NOW / 1000, DeviceClass::Phone)), NOW)
            .unwrap();
        d.train(RoundId(1), ModelVersion(1), global_for(&spec, 1), &plan(1, 0.3)).unwrap();
        let before = snapshot(&mut d);
        let newer = global_for(&spec, 2);
        let m = d.evaluate(RoundId(2), ModelVersion(2), &newer).unwrap();
        assert_eq!(m.cases, 1);
        assert!(m.is_valid(), "{m:?}");
        assert_eq!(d.evaluate(RoundId(2), ModelVersion(2), &newer).unwrap(), m, "deterministic");
        assert_eq!(snapshot(&mut d), before, "{}: evaluation changed the device", spec.family);
        // And a reopened device holds what it held before.
        drop(d);
        let mut d = Device::open(&cfg).unwrap();
        assert_eq!(snapshot(&mut d), before);
        // Refusals.
        assert!(matches!(d.evaluate(RoundId(3), ModelVersion(2), &newer[1..]), Err(EvalError::Shape { .. })));
        d.set_consent(Consent { personalization: true, training: false }).unwrap();
        assert!(matches!(d.evaluate(RoundId(3), ModelVersion(2), &newer), Err(EvalError::NoConsent)));
    }
    // Without a private vector yet, a temporary one is used and thrown away.
    let spec = ModelSpec::mf(EVAL_ITEMS, DIM);
    let mut d = Device::open(&config(10, spec.clone(), Storage::InMemory)).unwrap();
    d.record_batch(&purchases(&[1, 4, 7]), NOW).unwrap();
    let before = snapshot(&mut d);
    assert_eq!(d.evaluate(RoundId(1), ModelVersion(1), &global_for(&spec, 1)).unwrap().cases, 1);
    assert_eq!(snapshot(&mut d), before);
    assert!(d.user_vector().is_none());
    // Hold-out off: no case. Local DP: refused.
    let mut cfg = config(11, spec.clone(), Storage::InMemory);
    cfg.evaluation_holdout = false;
    let mut d = Device::open(&cfg).unwrap();
    d.record_batch(&purchases(&[1, 4, 7]), NOW).unwrap();
    assert_eq!(d.evaluate(RoundId(1), ModelVersion(1), &global_for(&spec, 1)).unwrap().cases, 0);
    cfg.evaluation_holdout = true;
    cfg.privacy.mode = PrivacyMode::Local { min_noise_multiplier: 1.0 };
    let mut d = Device::open(&cfg).unwrap();
    d.record_batch(&purchases(&[1, 4, 7]), NOW).unwrap();
    assert!(matches!(
        d.evaluate(RoundId(1), ModelVersion(1), &global_for(&spec, 1)),
        Err(EvalError::Protection(_))
    ));
    // One positive: nothing to hold out.
    let mut d = Device::open(&config(12, spec.clone(), Storage::InMemory)).unwrap();
    d.record_batch(&purchases(&[1]), NOW).unwrap();
    assert_eq!(d.evaluate(RoundId(1), ModelVersion(1), &global_for(&spec, 1)).unwrap().cases, 0);
}

#[test]
fn training_leaves_the_latest_positive_out_unless_told_otherwise() {
    let spec = ModelSpec::mf(EVAL_ITEMS, DIM);
    for (holdout, weight) in [(true, 3.0 * 4.0), (false, 3.0 * 5.0)] {
        let mut cfg = config(13, spec.clone(), Storage::InMemory);
        cfg.evaluation_holdout = holdout;
        let mut d = Device::open(&cfg).unwrap();
        d.record_batch(&purchases(&[1, 2, 3, 4, 5]), NOW).unwrap();
        let t = d.train(RoundId(1), ModelVersion(1), global_for(&spec, 1), &plan(1, 0.3)).unwrap();
        assert_eq!(t.weight, weight, "hold-out {holdout}");
    }
}

fn decode_client(codec: Codec, frame: &[u8]) -> ClientMessage {
    let mut buf = FrameBuffer::new(codec);
    buf.push(frame);
    match buf.next_client() {
        Ok(Some(Inbound::Message { message, .. })) => message,
        other => panic!("not a client message: {other:?}"),
    }
}

#[test]
fn a_participant_answers_an_evaluation_task_with_the_figures_of_its_held_out_case() {
    for spec in [ModelSpec::mf(EVAL_ITEMS, DIM), ModelSpec::two_tower(EVAL_ITEMS, DIM)] {
        let cfg = config(14, spec.clone(), Storage::InMemory);
        let mut d = Device::open(&cfg).unwrap();
        d.record_batch(&purchases(&[3, 6, 9, 12, 15]), NOW).unwrap();
        d.train(RoundId(1), ModelVersion(1), global_for(&spec, 1), &plan(1, 0.3)).unwrap();
        let before = snapshot(&mut d);
        let params = global_for(&spec, 5);
        let codec = Codec::default();
        let mut p = Participant::new(&cfg, 1);
        let now = Instant::from_millis(0);
        p.start(now, NOW, &d, GOOD).unwrap();
        let check_in = p.poll_transmit().unwrap();
        assert!(matches!(decode_client(codec, &check_in), ClientMessage::CheckIn(_)));
        let task = Task {
            round: RoundId(2),
            model_version: ModelVersion(2),
            model: ModelPayload::Full { shape: d.shape(), values: params.clone() },
            plan: plan(1, 0.3),
            report_within_ms: 600_000,
            secure: None,
            kind: TaskKind::Evaluate,
        };
        let frame = codec.encode_coordinator(&CoordinatorMessage::Task(task)).unwrap();
        p.handle_bytes(now, &frame, &mut d);
        let sent = p.poll_transmit().expect("an evaluation report");
        assert!(p.poll_transmit().is_none());
        let ClientMessage::Evaluation(report) = decode_client(codec, &sent) else {
            panic!("expected an evaluation report");
        };
        assert_eq!((report.round, report.base_version), (RoundId(2), ModelVersion(2)));
        // The figures are ModelDef::evaluate_case's, computed directly.
        let (train, held) = Examples::from_events(&d.events().unwrap()).hold_out_latest();
        let held = held.unwrap();
        assert_eq!(held.item, 15, "the latest positive is held out");
        let expected = def_of(&spec).evaluate_case(
            &params,
            d.user_vector().unwrap(),
            &train.positive_items(),
            &held,
            14,
        );
        assert_eq!(report.metrics, expected);
        assert_eq!(report.metrics.cases, 1);
        // The coordinator acknowledges; the session ends.
        let receipt = codec.encode_coordinator(&CoordinatorMessage::Receipt { round: RoundId(2) }).unwrap();
        p.handle_bytes(now, &receipt, &mut d);
        let session = p.poll_report().expect("the session ended");
        assert!(session.sent_update && session.task_error.is_none(), "{session:?}");
        // On the device's record: one evaluation of the frame's size, no update, no epsilon.
        let privacy = d.privacy_report().unwrap();
        assert_eq!((privacy.updates_sent, privacy.evaluations_sent), (0, 1));
        assert_eq!(privacy.evaluation_rounds, vec![2]);
        assert_eq!(privacy.local_epsilon, 0.0);
        let export = d.export(NOW).unwrap();
        let entry = export.contributions.last().unwrap();
        assert_eq!(
            (entry.kind, entry.bytes_sent, entry.epsilon),
            (ContributionKind::Evaluation, sent.len() as u64, None)
        );
        // The model, the private vector and the events are as they were.
        let (_, user, global, events) = snapshot(&mut d);
        assert_eq!((user, global, events), (before.1, before.2, before.3));
    }
}

#[test]
fn a_local_dp_device_withdraws_from_an_evaluation_task() {
    let spec = ModelSpec::mf(ITEMS, DIM);
    let mut cfg = config(15, spec.clone(), Storage::InMemory);
    cfg.privacy.mode = PrivacyMode::Local { min_noise_multiplier: 1.0 };
    let mut d = Device::open(&cfg).unwrap();
    d.record_batch(&purchases(&[3, 6, 9]), NOW).unwrap();
    let codec = Codec::default();
    let mut p = Participant::new(&cfg, 1);
    let now = Instant::from_millis(0);
    p.start(now, NOW, &d, GOOD).unwrap();
    p.poll_transmit().unwrap();
    let task = Task {
        round: RoundId(2),
        model_version: ModelVersion(2),
        model: ModelPayload::Full { shape: d.shape(), values: global_for(&spec, 5) },
        plan: plan(1, 0.3),
        report_within_ms: 600_000,
        secure: None,
        kind: TaskKind::Evaluate,
    };
    p.handle_bytes(now, &codec.encode_coordinator(&CoordinatorMessage::Task(task)).unwrap(), &mut d);
    let msg = decode_client(codec, &p.poll_transmit().unwrap());
    assert!(
        matches!(
            msg,
            ClientMessage::Withdraw { reason: starling_proto::message::WithdrawReason::PrivacyRefused, .. }
        ),
        "{msg:?}"
    );
    assert_eq!(d.privacy_report().unwrap().evaluations_sent, 0);
}
