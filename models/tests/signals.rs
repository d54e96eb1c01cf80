//! Signals in training (weights, hard negatives), the richer context on the wire, and the
//! context-dependent synthetic population.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use starling_models::data::events::{
    BatteryLevel, Context, DeviceClass, Event, EventKind, Examples, NetworkType,
};
use starling_models::data::synthetic::{Population, SyntheticConfig};
use starling_models::family::{ModelDef, Query};
use starling_models::mf::{LocalTraining, MfLayout, local_epochs, local_epochs_examples};

fn events(kind: EventKind, items: &[u32]) -> Vec<Event> {
    items
        .iter()
        .enumerate()
        .map(|(k, &item)| Event {
            item,
            at_ms: k as i64,
            kind,
            context: Context::at(k as i64 * 5000, DeviceClass::Phone),
        })
        .collect()
}

#[test]
fn mf_on_examples_equals_local_epochs_with_equal_weights_and_no_negatives() {
    let positives = [2u32, 5, 9, 11, 30, 31, 47];
    for bias in [false, true] {
        let layout = MfLayout { items: 50, dim: 8, bias };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let items: Vec<f32> =
            (0..layout.shape().unwrap().len()).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let user0: Vec<f32> = (0..8).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        for kind in [EventKind::Click, EventKind::Purchase] {
            let x = Examples::from_events(&events(kind, &positives));
            let cfg = LocalTraining { epochs: 3, batch_size: 4, negatives: 2, ..LocalTraining::default() };
            let (mut u1, mut u2) = (user0.clone(), user0.clone());
            let (mut r1, mut r2) = (ChaCha8Rng::seed_from_u64(9), ChaCha8Rng::seed_from_u64(9));
            let a = local_epochs(layout, &items, &mut u1, &positives, &cfg, &mut r1).unwrap();
            let b = local_epochs_examples(layout, &items, &mut u2, &x, &cfg, &mut r2).unwrap();
            assert_eq!(a, b, "same update, loss and count");
            assert_eq!(
                u1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                u2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(r1.random::<u64>(), r2.random::<u64>(), "same draws");
            // Through ModelDef too.
            let def = ModelDef {
                family: starling_models::family::Family::Mf { item_bias: bias },
                items: 50,
                dim: 8,
            };
            let mut u3 = user0.clone();
            let c = def.train(&items, &mut u3, &x, &cfg, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
            assert_eq!(a, c);
        }
    }
}

#[test]
fn a_skip_ranks_the_skipped_item_lower() {
    for def in [ModelDef::mf(80, 8), ModelDef::two_tower(80, 8)] {
        let global = def.init_global(3, 0.1).unwrap();
        let private0 = def.init_private(4, 0.1);
        let positives = [1u32, 4, 9, 16, 25, 36, 49];
        let base = events(EventKind::Click, &positives);
        let history: Vec<u32> = positives.to_vec();
        // X: the best-ranked item the user has not engaged with, before training.
        let mut scores = Vec::new();
        def.score_all(&global, &private0, &Query { history: &history, context: None }, &mut scores);
        let x = starling_models::mf::top_k(&scores, 1, &history)[0].0;
        let mut skipped = base.clone();
        skipped.push(Event {
            item: x,
            at_ms: 99,
            kind: EventKind::Skip,
            context: Context::at(0, DeviceClass::Phone),
        });
        let cfg = LocalTraining {
            epochs: 10,
            batch_size: 8,
            item_lr: 0.2,
            user_lr: 0.2,
            ..LocalTraining::default()
        };
        let rank = |evs: &[Event]| {
            let (mut g, mut p) = (global.clone(), private0.clone());
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let d = def.dim as usize;
            for _ in 0..5 {
                let r = def.train(&g, &mut p, &Examples::from_events(evs), &cfg, &mut rng).unwrap();
                for (row, vals) in r.update.iter_rows() {
                    for (a, v) in g[row as usize * d..(row as usize + 1) * d].iter_mut().zip(vals) {
                        *a += v;
                    }
                }
            }
            let mut s = Vec::new();
            def.score_all(&g, &p, &Query { history: &history, context: None }, &mut s);
            s.iter().filter(|&&v| v > s[x as usize]).count()
        };
        let (without, with) = (rank(&base), rank(&skipped));
        println!("{}: item {x} ranked {without} without the skip, {with} with it", def.name());
        assert!(with > without, "{}: {with} vs {without}", def.name());
    }
}

#[test]
fn contexts_stored_by_older_sdks_still_deserialize() {
    let old = r#"{"item":4,"at_ms":7,"kind":{"type":"purchase"},"context":{"time_of_day":2,"weekday":5,"device":"tablet"}}"#;
    let e: Event = serde_json::from_str(old).unwrap();
    assert_eq!((e.context.battery, e.context.network, e.context.region), (None, None, None));
    assert_eq!(serde_json::to_string(&e).unwrap(), old, "unknown fields are not written");
    let rich = e.context.with_battery(BatteryLevel::Low).with_network(NetworkType::Offline).with_region(15);
    let back: Context = serde_json::from_str(&serde_json::to_string(&rich).unwrap()).unwrap();
    assert_eq!(back, rich);
    assert!(rich.is_valid() && !rich.with_region(16).is_valid());
}

fn fingerprint(pop: &Population, users: u64) -> String {
    let mut h = Sha256::new();
    for id in 0..users {
        let u = pop.user(id);
        for (x, c) in u.interactions.iter().zip(&u.contexts) {
            h.update(x.item.to_le_bytes());
            h.update(x.timestamp.to_le_bytes());
            h.update(x.rating.to_bits().to_le_bytes());
            h.update([c.time_of_day, c.weekday, c.device]);
        }
        h.update(serde_json::to_vec(&pop.user_events(id)).unwrap());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn synthetic_context_effect_zero_is_the_old_population_and_a_positive_one_is_lazy_and_fast() {
    let cfg = SyntheticConfig { users: 1000, items: 500, seed: 9, ..SyntheticConfig::default() };
    let pop = Population::new(SyntheticConfig { context_effect: 0.0, ..cfg.clone() }).unwrap();
    // Pinned from the S = 0 path, which is the generator as it was before the context effect
    // (that code path is unchanged; with `device_state` off the events carry no new fields).
    assert_eq!(fingerprint(&pop, 50), PINNED);
    let ctx =
        Population::new(SyntheticConfig { context_effect: 6.0, device_state: true, ..cfg.clone() }).unwrap();
    let again = Population::new(SyntheticConfig { context_effect: 6.0, device_state: true, ..cfg }).unwrap();
    assert_eq!(ctx.user(123), again.user(123));
    assert_ne!(ctx.user(123), pop.user(123));
    let u = ctx.user(77);
    assert_eq!(u.interactions.len(), ctx.interaction_count(77));
    let mut items: Vec<u32> = u.interactions.iter().map(|x| x.item).collect();
    items.sort_unstable();
    items.dedup();
    assert_eq!(items.len(), u.interactions.len(), "without replacement");
    let ev = ctx.user_events(77);
    assert!(
        ev.iter()
            .all(|e| e.validate(500).is_ok() && e.context.battery.is_some() && e.context.region.is_some())
    );
    // The time of a 40-interaction user over 1,682 items (printed, not asserted).
    let big = Population::new(SyntheticConfig {
        users: 10_000,
        items: 1682,
        median_interactions: 40.0,
        activity_sigma: 0.0,
        context_effect: 6.0,
        ..SyntheticConfig::default()
    })
    .unwrap();
    let t = std::time::Instant::now();
    let n: usize = (0..200).map(|id| big.user(id).interactions.len()).sum();
    println!(
        "context_effect 6: {:?} per user ({} interactions each, 1,682 items)",
        t.elapsed() / 200,
        n / 200
    );
}

const PINNED: &str = "603579727bbfb37dc2aeab9d71939541f48108493c8018a0c9779c3d1c2a9233";
