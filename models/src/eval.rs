//! The evaluation protocol of `shared/docs/reference-workload.md`, exactly:
//! leave-one-out test items, 99 sampled negatives per user from one SplitMix64 stream seeded 42,
//! HR@10 and NDCG@10 over all users with a test item; plus full-ranking HR@10 (the test item
//! against every item the user has not trained on) for synthetic data.

use crate::data::LeaveOneOut;
use std::fmt::Write as _;

/// Number of sampled negatives per user.
pub const NEGATIVES: usize = 99;
/// Seed of the negative-sampling stream.
pub const EVAL_SEED: u64 = 42;

/// The SplitMix64 generator, as specified (all arithmetic wrapping on `u64`).
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator with the given seed.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// One user's evaluation case.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalCase {
    /// The user.
    pub user: u32,
    /// The held-out item.
    pub test_item: u32,
    /// Number of training items.
    pub n_train: usize,
    /// The 99 sampled negatives, in draw order.
    pub negatives: Vec<u32>,
}

/// The evaluation set: one case per user that has a test item, users ascending.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalSet {
    /// The cases.
    pub cases: Vec<EvalCase>,
}

/// Why an evaluation set could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// A user has interacted with so many items that 99 negatives cannot be drawn.
    #[error("user {user} leaves only {available} items to sample {NEGATIVES} negatives from")]
    TooFewItems {
        /// The user.
        user: u32,
        /// Items the user never interacted with.
        available: usize,
    },
}

impl EvalSet {
    /// Draws the negatives for every user with a test item, exactly as the reference workload says.
    pub fn build(split: &LeaveOneOut) -> Result<Self, EvalError> {
        let mut rng = SplitMix64::new(EVAL_SEED);
        let n_items = u64::from(split.n_items);
        let mut cases = Vec::new();
        for (user, (train, test)) in split.train.iter().zip(&split.test).enumerate() {
            let Some(test_item) = *test else { continue };
            let user = user as u32;
            let seen = |i: u32| i == test_item || train.binary_search(&i).is_ok();
            let available =
                split.n_items as usize - train.len() - usize::from(train.binary_search(&test_item).is_err());
            if available < NEGATIVES {
                return Err(EvalError::TooFewItems { user, available });
            }
            let mut negatives = Vec::with_capacity(NEGATIVES);
            while negatives.len() < NEGATIVES {
                let j = (rng.next() % n_items) as u32;
                if !seen(j) && !negatives.contains(&j) {
                    negatives.push(j);
                }
            }
            cases.push(EvalCase { user, test_item, n_train: train.len(), negatives });
        }
        Ok(Self { cases })
    }

    /// The export format (1-based ids): `user\ttest_item\tn_train\t` then the negatives separated
    /// by single spaces, one line per user.
    pub fn export(&self) -> String {
        let mut out = String::with_capacity(self.cases.len() * 600);
        for c in &self.cases {
            let _ = write!(out, "{}\t{}\t{}\t", c.user + 1, c.test_item + 1, c.n_train);
            for (k, n) in c.negatives.iter().enumerate() {
                if k > 0 {
                    out.push(' ');
                }
                let _ = write!(out, "{}", n + 1);
            }
            out.push('\n');
        }
        out
    }

    /// HR@10 and NDCG@10 with `score(user, items, out)` filling one score per item.
    ///
    /// `rank` = number of negatives scoring strictly higher than the test item; a NaN test score
    /// counts as a miss.
    pub fn evaluate(&self, mut score: impl FnMut(u32, &[u32], &mut Vec<f32>)) -> Metrics {
        let mut items = Vec::with_capacity(NEGATIVES + 1);
        let mut scores = Vec::with_capacity(NEGATIVES + 1);
        let (mut hits, mut ndcg) = (0.0f64, 0.0f64);
        for c in &self.cases {
            items.clear();
            items.push(c.test_item);
            items.extend_from_slice(&c.negatives);
            scores.clear();
            score(c.user, &items, &mut scores);
            if let Some(rank) = rank_of_first(&scores)
                && rank < 10
            {
                hits += 1.0;
                ndcg += 1.0 / ((rank + 2) as f64).log2();
            }
        }
        let n = self.cases.len().max(1) as f64;
        Metrics { hr_at_10: hits / n, ndcg_at_10: ndcg / n, users: self.cases.len() }
    }
}

/// A device's evaluation negatives (federated evaluation): [`NEGATIVES`] distinct items drawn
/// uniformly from `0..items` leaving out `history` (sorted) and `test`, from a SplitMix64 stream
/// seeded by [`EVAL_SEED`] and the client's id, so a device draws the same negatives in every
/// evaluation round and the central scorer can draw them too. `None` when fewer than
/// [`NEGATIVES`] items are left.
pub fn device_negatives(client: u64, items: u32, history: &[u32], test: u32) -> Option<Vec<u32>> {
    let seen = |i: u32| i == test || history.binary_search(&i).is_ok();
    let taken = history.len() + usize::from(history.binary_search(&test).is_err() && test < items);
    if (items as usize).saturating_sub(taken) < NEGATIVES {
        return None;
    }
    let mut rng = SplitMix64::new(EVAL_SEED ^ client.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut negatives = Vec::with_capacity(NEGATIVES);
    while negatives.len() < NEGATIVES {
        let j = (rng.next() % u64::from(items)) as u32;
        if !seen(j) && !negatives.contains(&j) {
            negatives.push(j);
        }
    }
    Some(negatives)
}

/// Rank of `scores[0]` among `scores[1..]` (how many score strictly higher); `None` if it is NaN.
pub fn rank_of_first(scores: &[f32]) -> Option<usize> {
    let (&target, rest) = scores.split_first()?;
    if target.is_nan() {
        return None;
    }
    Some(rest.iter().filter(|&&s| s > target).count())
}

/// Ranking quality.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    /// Hit rate at 10.
    pub hr_at_10: f64,
    /// Normalised discounted cumulative gain at 10.
    pub ndcg_at_10: f64,
    /// Users evaluated.
    pub users: usize,
}

/// Full-ranking HR@10: the test item ranked against every item the user did not train on.
/// `score_all(user, out)` fills one score per item.
pub fn full_ranking_hr_at_10(split: &LeaveOneOut, mut score_all: impl FnMut(u32, &mut Vec<f32>)) -> f64 {
    let mut scores = Vec::with_capacity(split.n_items as usize);
    let (mut hits, mut users) = (0usize, 0usize);
    for (user, (train, test)) in split.train.iter().zip(&split.test).enumerate() {
        let Some(t) = *test else { continue };
        users += 1;
        scores.clear();
        score_all(user as u32, &mut scores);
        let Some(&target) = scores.get(t as usize) else { continue };
        if target.is_nan() {
            continue;
        }
        let higher = scores
            .iter()
            .enumerate()
            .filter(|&(i, &s)| s > target && i as u32 != t && train.binary_search(&(i as u32)).is_err())
            .count();
        if higher < 10 {
            hits += 1;
        }
    }
    hits as f64 / users.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_published_sequence() {
        // Reference values for seed 0 (Vigna's splitmix64.c).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn rank_counts_strictly_higher_and_nan_misses() {
        assert_eq!(rank_of_first(&[0.5, 0.9, 0.5, 0.1]), Some(1));
        assert_eq!(rank_of_first(&[f32::NAN, 0.1]), None);
        assert_eq!(rank_of_first(&[0.5, f32::NAN]), Some(0));
    }

    #[test]
    fn perfect_and_hopeless_scorers() {
        let split = LeaveOneOut {
            n_users: 2,
            n_items: 200,
            train: vec![vec![1, 2], vec![3]],
            test: vec![Some(5), Some(7)],
        };
        let set = EvalSet::build(&split).unwrap();
        assert_eq!(set.cases.len(), 2);
        for c in &set.cases {
            assert_eq!(c.negatives.len(), 99);
            assert!(!c.negatives.contains(&c.test_item));
        }
        let m = set.evaluate(|user, items, out| {
            let t = split.test[user as usize].unwrap();
            out.extend(items.iter().map(|&i| if i == t { 1.0 } else { 0.0 }));
        });
        assert_eq!((m.hr_at_10, m.ndcg_at_10), (1.0, 1.0));
        let m = set.evaluate(|_, items, out| out.extend(items.iter().map(|_| f32::NAN)));
        assert_eq!(m.hr_at_10, 0.0);
        let full = full_ranking_hr_at_10(&split, |user, out| {
            let t = split.test[user as usize].unwrap();
            out.extend((0..200).map(|i| if i == t { 2.0 } else { 1.0 }));
        });
        assert_eq!(full, 1.0);
    }
}
