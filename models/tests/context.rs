//! Context-dependent behaviour: the two-tower model learns it, matrix factorisation cannot.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use starling_models::data::events::{Context, DeviceClass, Examples, Positive};
use starling_models::data::synthetic::{Population, SyntheticConfig};
use starling_models::family::{ModelDef, Query};
use starling_models::mf::{LocalTraining, top_k};

struct Trained {
    global: Vec<f32>,
    private: Vec<Vec<f32>>,
}

struct Data {
    train: Vec<Examples>,
    held: Vec<Option<Positive>>,
}

fn data(context_effect: f32, users: u64, items: u32) -> Data {
    let pop = Population::new(SyntheticConfig {
        users,
        items,
        max_interactions: items / 4,
        context_effect,
        seed: 21,
        ..SyntheticConfig::default()
    })
    .expect("population");
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for id in 0..users {
        let (t, h) = Examples::from_events(&pop.user_events(id)).hold_out_latest();
        train.push(t);
        held.push(h);
    }
    Data { train, held }
}

fn cfg() -> LocalTraining {
    LocalTraining { epochs: 1, batch_size: 32, negatives: 1, item_lr: 0.1, user_lr: 0.1, reg: 0.01 }
}

const PASSES: usize = 20;

/// Sequential federated training: every pass, each user trains from the current global part
/// with `ModelDef::train` and its update is applied at once.
fn train(def: &ModelDef, data: &Data, passes: usize) -> Trained {
    let mut global = def.init_global(7, 0.1).expect("init");
    let mut private: Vec<Vec<f32>> =
        (0..data.train.len()).map(|u| def.init_private(1000 + u as u64, 0.1)).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let d = def.dim as usize;
    for _ in 0..passes {
        for (u, examples) in data.train.iter().enumerate() {
            let r = def.train(&global, &mut private[u], examples, &cfg(), &mut rng).expect("trains");
            for (row, vals) in r.update.iter_rows() {
                for (g, v) in global[row as usize * d..(row as usize + 1) * d].iter_mut().zip(vals) {
                    *g += v;
                }
            }
        }
    }
    Trained { global, private }
}

fn hr_at_10(def: &ModelDef, data: &Data, m: &Trained) -> f64 {
    let (mut hits, mut cases) = (0.0f64, 0u32);
    for (u, (t, h)) in data.train.iter().zip(&data.held).enumerate() {
        let Some(h) = h else { continue };
        let e = def.evaluate_case(&m.global, &m.private[u], &t.positive_items(), h, u as u64);
        hits += f64::from(e.hits_at_10);
        cases += e.cases;
    }
    hits / f64::from(cases.max(1))
}

#[test]
fn context_changes_the_ranking_and_two_tower_beats_mf_when_behaviour_depends_on_it() {
    let data = data(6.0, 300, 300);
    let tt = ModelDef::two_tower(300, 16);
    let mf = ModelDef::mf(300, 16);
    let m_tt = train(&tt, &data, PASSES);
    let m_mf = train(&mf, &data, PASSES);
    let (hr_tt, hr_mf) = (hr_at_10(&tt, &data, &m_tt), hr_at_10(&mf, &data, &m_mf));
    println!(
        "context_effect 6, 300 users x 300 items, {PASSES} passes: HR@10 two-tower {hr_tt:.3}, MF {hr_mf:.3}"
    );
    // (a) The same user's top-10 differs between two contexts.
    let history = data.train[0].positive_items();
    let top = |ctx: Context| {
        let mut scores = Vec::new();
        let query = Query { history: &history, context: Some(ctx) };
        tt.score_all(&m_tt.global, &m_tt.private[0], &query, &mut scores);
        top_k(&scores, 10, &history).into_iter().map(|x| x.0).collect::<Vec<_>>()
    };
    let morning = top(Context::at(6 * 3600, DeviceClass::Phone));
    let evening = top(Context::at(21 * 3600, DeviceClass::Desktop));
    println!("user 0's top-10 at 06:00 on a phone {morning:?}, at 21:00 on a desktop {evening:?}");
    assert_ne!(morning, evening);
    // (b) Two-tower beats MF on the held-out positive scored in its own context.
    assert!(hr_tt > hr_mf + 0.05, "two-tower {hr_tt:.3} vs MF {hr_mf:.3}");
}

#[test]
fn without_a_context_effect_two_tower_is_not_worse_than_mf() {
    let data = data(0.0, 300, 300);
    let tt = ModelDef::two_tower(300, 16);
    let mf = ModelDef::mf(300, 16);
    let (hr_tt, hr_mf) =
        (hr_at_10(&tt, &data, &train(&tt, &data, PASSES)), hr_at_10(&mf, &data, &train(&mf, &data, PASSES)));
    println!(
        "context_effect 0, 300 users x 300 items, {PASSES} passes: HR@10 two-tower {hr_tt:.3}, MF {hr_mf:.3}"
    );
    assert!(hr_tt >= hr_mf - 0.02, "two-tower {hr_tt:.3} vs MF {hr_mf:.3}");
}

#[test]
fn similar_items_are_co_consumed_items() {
    let data = data(0.0, 300, 300);
    let items = 300usize;
    // Co-consumption counts over the training positives, and how often each item is consumed.
    let mut co = vec![0u32; items * items];
    let mut n = vec![0u32; items];
    for t in &data.train {
        let p = t.positive_items();
        for &a in &p {
            n[a as usize] += 1;
        }
        for &a in &p {
            for &b in &p {
                if a != b {
                    co[a as usize * items + b as usize] += 1;
                }
            }
        }
    }
    for def in [ModelDef::mf(300, 16), ModelDef::two_tower(300, 16)] {
        let m = train(&def, &data, PASSES);
        // An item's own embedding is its nearest neighbour.
        for i in [0u32, 17, 299] {
            let v = def.item_vector(&m.global, i).expect("row");
            assert_eq!(def.nearest_items(&m.global, v, 1, &[])[0].0, i);
        }
        // For every item consumed by at least 10 users: its 10 most co-consumed items (by the
        // cosine of who consumed them, `co(i,j)/√(n_i n_j)`, so that sheer popularity does not
        // decide) vs its 10 most similar items.
        let (mut hits, mut asked) = (0usize, 0usize);
        for i in 0..items {
            if n[i] < 10 {
                continue;
            }
            let row = &co[i * items..(i + 1) * items];
            let lift = |j: u32| {
                f64::from(row[j as usize]) / (f64::from(n[i]) * f64::from(n[j as usize].max(1))).sqrt()
            };
            let mut partners: Vec<u32> = (0..items as u32).filter(|&j| j as usize != i).collect();
            partners.sort_by(|&a, &b| lift(b).total_cmp(&lift(a)).then(a.cmp(&b)));
            partners.truncate(10);
            let similar = def.similar_items(&m.global, i as u32, 10);
            assert_eq!(similar.len(), 10);
            hits += similar.iter().filter(|s| partners.contains(&s.0)).count();
            asked += 10;
        }
        let rate = hits as f64 / asked.max(1) as f64;
        let chance = 10.0 / (items - 1) as f64;
        println!(
            "{}: {:.3} of an item's 10 most similar items are among its 10 most co-consumed (chance {chance:.3}; {} items)",
            def.name(),
            rate,
            asked / 10
        );
        assert!(rate > 4.0 * chance, "{}: {rate:.3} vs chance {chance:.3}", def.name());
    }
}
