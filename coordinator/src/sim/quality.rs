//! How a run measures recommendation quality.
//!
//! - **Federated evaluation** (SDK clients, central DP or none, no secure aggregation): every
//!   `eval_every` rounds the coordinator runs an evaluation round; each selected device scores
//!   its own held-out latest positive against 99 negatives drawn for it
//!   ([`starling_models::eval::device_negatives`]) and reports sums (hits, NDCG, loss). These
//!   client-reported figures are the run's quality figure.
//! - **The central scorer** computes the same protocol for the evaluation users with the devices'
//!   private vectors (read from the simulated devices, which only a simulator can do): over the
//!   devices that reported it is the cross-check of the federated figure (equal with DP off), over
//!   every evaluation user it is the figure of runs without federated evaluation.
//! - Runs of the bare kernel (the reference workload) keep the reference protocol
//!   ([`starling_models::eval::EvalSet`]: one SplitMix64 stream of negatives over all users).

use super::trainer::ClientData;
use starling_models::data::events::{Examples, Positive};
use starling_models::eval::{Metrics, device_negatives, rank_of_first};
use starling_models::family::{ModelDef, Query};
use std::collections::HashSet;

/// One evaluation user as its device sees itself: the training positives and the held-out one.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceCase {
    /// The user (= client id).
    pub user: u32,
    /// Training positives, sorted.
    pub train: Vec<u32>,
    /// The held-out latest positive.
    pub held: Positive,
}

/// The cases of `users` (those with a held-out positive), built from the events their devices
/// record, in parallel on `threads` threads.
pub fn device_cases(data: &ClientData, users: &[u32], threads: usize) -> Vec<DeviceCase> {
    let chunk = users.len().div_ceil(threads.max(1)).max(1);
    let mut out = Vec::with_capacity(users.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = users
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .filter_map(|&user| {
                            let examples = Examples::from_events(&data.events(u64::from(user)));
                            let (train, held) = examples.hold_out_latest();
                            Some(DeviceCase { user, train: train.positive_items(), held: held? })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            out.extend(h.join().unwrap_or_default());
        }
    });
    out
}

/// Sums of the device protocol over some cases.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sums {
    /// Cases scored.
    pub cases: usize,
    /// Hits at 10.
    pub hits: f64,
    /// NDCG at 10.
    pub ndcg: f64,
    /// Loss (capped per case).
    pub loss: f64,
}

impl Sums {
    /// HR@10 and NDCG@10.
    pub fn metrics(&self) -> Metrics {
        let n = self.cases.max(1) as f64;
        Metrics { hr_at_10: self.hits / n, ndcg_at_10: self.ndcg / n, users: self.cases }
    }
}

/// The central scorer: `def` with `global` and each user's private vector (`private(user)`), over
/// `cases` (only the users in `only`, if given) — [`ModelDef::evaluate_case`], the function every
/// device runs, summed in the order of `cases`.
pub fn central(
    def: &ModelDef,
    global: &[f32],
    cases: &[DeviceCase],
    only: Option<&HashSet<u32>>,
    private: impl Fn(u32) -> Vec<f32>,
) -> Sums {
    let mut s = Sums::default();
    for c in cases.iter().filter(|c| only.is_none_or(|o| o.contains(&c.user))) {
        let m = def.evaluate_case(global, &private(c.user), &c.train, &c.held, u64::from(c.user));
        if m.cases == 0 {
            continue;
        }
        s.cases += m.cases as usize;
        s.hits += f64::from(m.hits_at_10);
        s.ndcg += f64::from(m.ndcg_at_10);
        s.loss += f64::from(m.loss);
    }
    s
}

/// The device protocol with any scorer (`scores(case, out)` fills one score per item): the
/// popularity baseline.
pub fn with_scores(
    n_items: u32,
    cases: &[DeviceCase],
    mut scores: impl FnMut(&DeviceCase, &mut Vec<f32>),
) -> Metrics {
    let mut all = Vec::with_capacity(n_items as usize);
    let mut s = Sums::default();
    for c in cases {
        let Some(negatives) = device_negatives(u64::from(c.user), n_items, &c.train, c.held.item) else {
            continue;
        };
        all.clear();
        scores(c, &mut all);
        let at = |i: u32| all.get(i as usize).copied().unwrap_or(f32::NAN);
        let mut v = Vec::with_capacity(negatives.len() + 1);
        v.push(at(c.held.item));
        v.extend(negatives.iter().map(|&j| at(j)));
        s.cases += 1;
        if let Some(rank) = rank_of_first(&v)
            && rank < 10
        {
            s.hits += 1.0;
            s.ndcg += 1.0 / ((rank + 2) as f64).log2();
        }
    }
    s.metrics()
}

/// Full-ranking HR@10 over `cases`: the held-out item against every item the user did not train
/// on, scored in the held-out event's context.
pub fn full_ranking(
    def: &ModelDef,
    global: &[f32],
    cases: &[DeviceCase],
    private: impl Fn(u32) -> Vec<f32>,
) -> f64 {
    let mut scores = Vec::with_capacity(def.items as usize);
    let (mut hits, mut n) = (0usize, 0usize);
    for c in cases {
        n += 1;
        scores.clear();
        let query = Query { history: &c.train, context: Some(c.held.context) };
        def.score_all(global, &private(c.user), &query, &mut scores);
        let Some(&target) = scores.get(c.held.item as usize).filter(|t| !t.is_nan()) else { continue };
        let higher = scores
            .iter()
            .enumerate()
            .filter(|&(i, &s)| {
                s > target && i as u32 != c.held.item && c.train.binary_search(&(i as u32)).is_err()
            })
            .count();
        hits += usize::from(higher < 10);
    }
    hits as f64 / n.max(1) as f64
}
