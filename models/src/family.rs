//! Model families behind one interface: what a device trains, scores and compares items with,
//! whatever the architecture.
//!
//! A [`ModelDef`] names a family ([`Family::Mf`] or [`Family::TwoTower`]), the catalogue size and
//! the embedding dimension. Everything crosses this boundary as flat `f32` slices: the **global**
//! part (shared through the coordinator, laid out on [`ModelDef::shape`]) and the **private**
//! part (the user's own state, [`ModelDef::private_len`] values, never part of an update). In
//! both families rows `0..items` of the global part are the item embeddings, so an update touches
//! the rows of the items a device trained on (plus, for the two-tower model, the dense rows of
//! the shared context and projection weights).
//!
//! | family | global (shared) | private (device only) |
//! |---|---|---|
//! | `bpr-mf` | item embeddings (and biases) | user vector |
//! | `two-tower` | item embeddings, context embeddings, user-tower projection | user vector |

use crate::data::events::{Context, Examples, Positive};
use crate::mf::{self, LocalResult, LocalTraining, MfLayout, TrainError};
use rand::{RngExt, SeedableRng};
use starling_proto::message::{EVAL_LOSS_CAP, EvalMetrics};
use starling_proto::update::{ModelShape, UpdateError};

/// A model architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Family {
    /// Matrix factorisation with BPR: score `p · q_i (+ b_i)`.
    Mf {
        /// Per-item biases.
        item_bias: bool,
    },
    /// The context-aware two-tower model ([`crate::two_tower`]).
    TwoTower {
        /// Dimension of each context embedding.
        context_dim: u32,
    },
}

/// Name of matrix factorisation, as announced at check-in.
pub const MF_NAME: &str = "bpr-mf";
/// Name of the two-tower model, as announced at check-in.
pub const TWO_TOWER_NAME: &str = "two-tower";

/// A model: family, catalogue size and embedding dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelDef {
    /// The architecture.
    pub family: Family,
    /// Items in the catalogue (ids `0..items`).
    pub items: u32,
    /// Embedding dimension (also the row length of the flat global part).
    pub dim: u32,
}

/// What a ranking is for: the user's history (personal context) and the moment's context
/// (generic context). Families that do not use a field ignore it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Query<'a> {
    /// The user's positive items, most recent last.
    pub history: &'a [u32],
    /// The context of the request; `None`: the model's average context.
    pub context: Option<Context>,
}

/// Why a family name or setting is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FamilyError {
    /// Unknown family name.
    #[error("unknown model family {0:?} (known: \"bpr-mf\", \"two-tower\")")]
    Unknown(String),
    /// No items or a zero dimension.
    #[error("a model needs items and a dimension (got {items} items of dimension {dim})")]
    Empty {
        /// Items.
        items: u32,
        /// Dimension.
        dim: u32,
    },
    /// The shape is unrepresentable.
    #[error(transparent)]
    Shape(#[from] UpdateError),
}

impl ModelDef {
    /// Matrix factorisation without biases.
    pub fn mf(items: u32, dim: u32) -> Self {
        Self { family: Family::Mf { item_bias: false }, items, dim }
    }

    /// The two-tower model with 4-dimensional context embeddings.
    pub fn two_tower(items: u32, dim: u32) -> Self {
        Self { family: Family::TwoTower { context_dim: 4 }, items, dim }
    }

    /// The model called `name` ([`MF_NAME`], [`TWO_TOWER_NAME`]); `item_bias` applies to MF.
    pub fn from_name(name: &str, items: u32, dim: u32, item_bias: bool) -> Result<Self, FamilyError> {
        let family = match name {
            MF_NAME => Family::Mf { item_bias },
            TWO_TOWER_NAME => Family::TwoTower { context_dim: 4 },
            other => return Err(FamilyError::Unknown(other.into())),
        };
        let def = Self { family, items, dim };
        if items == 0 || dim == 0 {
            return Err(FamilyError::Empty { items, dim });
        }
        def.shape()?;
        Ok(def)
    }

    /// The family's name, announced at check-in.
    pub fn name(&self) -> &'static str {
        match self.family {
            Family::Mf { .. } => MF_NAME,
            Family::TwoTower { .. } => TWO_TOWER_NAME,
        }
    }

    /// The MF layout (for [`Family::Mf`]).
    pub fn mf_layout(&self) -> Option<MfLayout> {
        match self.family {
            Family::Mf { item_bias } => Some(MfLayout { items: self.items, dim: self.dim, bias: item_bias }),
            Family::TwoTower { .. } => None,
        }
    }

    /// The protocol shape of the global part.
    pub fn shape(&self) -> Result<ModelShape, UpdateError> {
        match self.family {
            Family::Mf { item_bias } => {
                MfLayout { items: self.items, dim: self.dim, bias: item_bias }.shape()
            }
            Family::TwoTower { context_dim } => {
                crate::two_tower::flat_shape(self.items, self.dim, context_dim)
            }
        }
    }

    /// Values in the private part.
    pub fn private_len(&self) -> usize {
        self.dim as usize
    }

    /// An initial global part: `N(0, init_std²)` item rows (and the family's own initialisation
    /// of its dense weights), a pure function of `seed`.
    pub fn init_global(&self, seed: u64, init_std: f32) -> Result<Vec<f32>, UpdateError> {
        let shape = self.shape()?;
        match self.family {
            Family::Mf { item_bias } => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                let layout = MfLayout { items: self.items, dim: self.dim, bias: item_bias };
                let mut v = vec![0.0f32; shape.len()];
                let n = self.items as usize * self.dim as usize;
                for x in &mut v[..n] {
                    *x = normal(&mut rng) * init_std;
                }
                let _ = layout;
                Ok(v)
            }
            Family::TwoTower { context_dim } => {
                crate::two_tower::init_flat(self.items, self.dim, context_dim, seed, init_std)
            }
        }
    }

    /// An initial private part (`N(0, init_std²)` per value), a pure function of `seed`.
    pub fn init_private(&self, seed: u64, init_std: f32) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..self.private_len()).map(|_| normal(&mut rng) * init_std).collect()
    }

    /// Local training on `examples` from the global part `global`: updates `private` in place and
    /// returns the change of the global rows it touched (row-sparse; never the private part).
    ///
    /// Both families weight each positive's loss by its signal weight (normalised to mean 1) and
    /// draw half their negatives from `examples.negatives` when there are any
    /// ([`mf::local_epochs_examples`], [`crate::two_tower::train_flat`]). The MF update holds the
    /// touched item rows (and their bias rows); the two-tower update the touched item rows and
    /// every dense row (rows `items..`).
    pub fn train(
        &self,
        global: &[f32],
        private: &mut [f32],
        examples: &Examples,
        cfg: &LocalTraining,
        rng: &mut impl rand::Rng,
    ) -> Result<LocalResult, TrainError> {
        match self.family {
            Family::Mf { item_bias } => {
                let layout = MfLayout { items: self.items, dim: self.dim, bias: item_bias };
                mf::local_epochs_examples(layout, global, private, examples, cfg, rng)
            }
            Family::TwoTower { context_dim } => {
                crate::two_tower::train_flat(self, context_dim, global, private, examples, cfg, rng)
            }
        }
    }

    /// Fits only the private part to `global` (the global rows stay as they are; nothing of it is
    /// sent): what makes a newcomer's recommendations personal after its first round.
    pub fn fit_private(
        &self,
        global: &[f32],
        private: &mut [f32],
        examples: &Examples,
        cfg: &LocalTraining,
        rng: &mut impl rand::Rng,
    ) -> Result<(), TrainError> {
        let fit = LocalTraining { item_lr: 0.0, ..*cfg };
        let before = private.to_vec();
        let result = self.train(global, private, examples, &fit, rng);
        if result.is_err() || !private.iter().all(|v| v.is_finite()) {
            private.copy_from_slice(&before);
            return result.map(|_| ());
        }
        Ok(())
    }

    /// Scores of every item (`items` values; NaN for an item the parameters cannot score).
    pub fn score_all(&self, global: &[f32], private: &[f32], query: &Query<'_>, out: &mut Vec<f32>) {
        match self.family {
            Family::Mf { item_bias } => {
                let layout = MfLayout { items: self.items, dim: self.dim, bias: item_bias };
                mf::score_all(layout, global, private, out)
            }
            Family::TwoTower { context_dim } => {
                crate::two_tower::score_flat(self, context_dim, global, private, query, out)
            }
        }
    }

    /// Item `item`'s embedding (row `item` of the global part).
    pub fn item_vector<'a>(&self, global: &'a [f32], item: u32) -> Option<&'a [f32]> {
        if item >= self.items {
            return None;
        }
        let d = self.dim as usize;
        global.get(item as usize * d..(item as usize + 1) * d)
    }

    /// The `k` items whose embeddings are closest to `vector` by cosine similarity, best first
    /// (ties to the smaller id), leaving out `exclude` (sorted).
    pub fn nearest_items(
        &self,
        global: &[f32],
        vector: &[f32],
        k: usize,
        exclude: &[u32],
    ) -> Vec<(u32, f32)> {
        let nv = norm(vector);
        let scores: Vec<f32> = (0..self.items)
            .map(|i| match self.item_vector(global, i) {
                Some(q) if nv > 0.0 && norm(q) > 0.0 => dot(q, vector) / (norm(q) * nv),
                _ => f32::NAN,
            })
            .collect();
        mf::top_k(&scores, k, exclude)
    }

    /// "Similar items": the `k` items nearest to `item` (itself left out), from the global part
    /// alone. Empty for an unknown item.
    pub fn similar_items(&self, global: &[f32], item: u32, k: usize) -> Vec<(u32, f32)> {
        match self.item_vector(global, item) {
            Some(v) => self.nearest_items(global, v, k, &[item]),
            None => Vec::new(),
        }
    }

    /// The global part's non-personal ranking (see `starling_sdk::device::global_ranking`): item
    /// biases when the model has them, else each item embedding's squared norm.
    pub fn global_ranking(&self, global: &[f32]) -> Vec<f32> {
        if let Family::Mf { item_bias: true } = self.family {
            let layout = MfLayout { items: self.items, dim: self.dim, bias: true };
            return (0..self.items)
                .map(|i| global.get(layout.bias_index(i)).copied().unwrap_or(f32::NAN))
                .collect();
        }
        let d = self.dim as usize;
        global.chunks_exact(d).take(self.items as usize).map(|row| dot(row, row)).collect()
    }

    /// Federated evaluation of one held-out positive: the held-out item against
    /// [`crate::eval::NEGATIVES`] negatives drawn for `client` ([`crate::eval::device_negatives`])
    /// among the items not in `history` (the user's training positives, sorted), scored with the
    /// held-out event's context. The central scorer calls the same function, so both agree.
    pub fn evaluate_case(
        &self,
        global: &[f32],
        private: &[f32],
        history: &[u32],
        held_out: &Positive,
        client: u64,
    ) -> EvalMetrics {
        let Some(negatives) = crate::eval::device_negatives(client, self.items, history, held_out.item)
        else {
            return EvalMetrics::default();
        };
        let mut all = Vec::with_capacity(self.items as usize);
        let query = Query { history, context: Some(held_out.context) };
        self.score_all(global, private, &query, &mut all);
        let target = all.get(held_out.item as usize).copied().unwrap_or(f32::NAN);
        let mut scores = Vec::with_capacity(negatives.len() + 1);
        scores.push(target);
        scores.extend(negatives.iter().map(|&j| all.get(j as usize).copied().unwrap_or(f32::NAN)));
        let (hit, ndcg) = match crate::eval::rank_of_first(&scores) {
            Some(rank) if rank < 10 => (1.0, (1.0 / ((rank + 2) as f64).log2()) as f32),
            _ => (0.0, 0.0),
        };
        let loss = if target.is_finite() {
            let l: f64 = scores[1..]
                .iter()
                .map(|&s| if s.is_finite() { f64::from(mf::bpr_loss(target - s)) } else { 0.0 })
                .sum::<f64>()
                / negatives.len().max(1) as f64;
            (l as f32).min(EVAL_LOSS_CAP)
        } else {
            EVAL_LOSS_CAP
        };
        EvalMetrics { cases: 1, hits_at_10: hit, ndcg_at_10: ndcg, loss }
    }
}

fn normal(rng: &mut impl rand::Rng) -> f32 {
    rand_distr::Distribution::<f32>::sample(&rand_distr::StandardNormal, rng)
}

#[allow(dead_code)]
fn uniform(rng: &mut impl rand::Rng) -> f32 {
    rng.random::<f32>()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::events::{DeviceClass, Event, EventKind};

    fn examples() -> Examples {
        let events: Vec<Event> = [3u32, 6, 9, 12, 15]
            .iter()
            .enumerate()
            .map(|(k, &item)| Event {
                item,
                at_ms: k as i64 * 1000,
                kind: EventKind::Click,
                context: Context::at(k as i64 * 3600, DeviceClass::Phone),
            })
            .collect();
        Examples::from_events(&events)
    }

    #[test]
    fn every_family_trains_scores_and_keeps_its_private_part_out_of_the_update() {
        for def in [ModelDef::mf(200, 8), ModelDef::two_tower(200, 8)] {
            let global = def.init_global(1, 0.1).unwrap();
            assert_eq!(global.len(), def.shape().unwrap().len(), "{}", def.name());
            let mut private = def.init_private(2, 0.1);
            let before = private.clone();
            let (train, held) = examples().hold_out_latest();
            assert_eq!(held.map(|p| p.item), Some(15));
            let cfg = LocalTraining::default();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            let r = def.train(&global, &mut private, &train, &cfg, &mut rng).unwrap();
            assert_ne!(private, before, "{}", def.name());
            assert_eq!(r.update.shape(), def.shape().unwrap());
            let mut scores = Vec::new();
            def.score_all(&global, &private, &Query::default(), &mut scores);
            assert_eq!(scores.len(), 200);
            assert!(scores.iter().all(|s| s.is_finite()));
            let m = def.evaluate_case(&global, &private, &train.positive_items(), &held.unwrap(), 7);
            assert!(m.is_valid() && m.cases == 1, "{m:?}");
            let sim = def.similar_items(&global, 3, 5);
            assert_eq!(sim.len(), 5);
            assert!(sim.iter().all(|s| s.0 != 3));
            assert_eq!(def.nearest_items(&global, def.item_vector(&global, 3).unwrap(), 1, &[])[0].0, 3);
        }
    }
}
