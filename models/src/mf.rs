//! Federated matrix factorisation with the BPR loss: the math every client runs.
//!
//! The model: a global item matrix `Q` (`n_items × dim`, shared through the coordinator) and one
//! private user vector `p` per device (never part of an update). The score of item `i` for the user
//! is `p · q_i`.
//!
//! [`local_epochs`] is the per-client training loop of `shared/docs/reference-workload.md`: BPR
//! with one (configurable) uniformly sampled negative per positive from the items the user has not
//! trained on, L2 regularisation on the rows in the batch, plain SGD on mini-batches whose gradient
//! is the sum over the batch, separate learning rates for the user vector and the item rows.
//! The regulariser is part of each example's loss (`−ln σ(x) + λ/2 (‖p‖² + ‖q_i‖² + ‖q_j‖²)`), so
//! summing over the batch regularises a row once per example it appears in (the user vector once
//! per example). This literal reading reproduces the reference figures; regularising the user
//! vector once per batch instead gave HR@10 0.58 at C = 943 (reference 0.563). It is
//! written out by hand (explicit gradients, no allocation per step, only the touched item rows
//! copied) because a client's epoch is a few hundred tiny vector operations, where a tensor
//! library's per-op overhead would dominate; `crate::burn_mf` holds the same model in burn, and a
//! test checks that both compute the same update.

use rand::RngExt;
use starling_proto::update::{ModelShape, Update, UpdateError};

/// Hyper-parameters of local training.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalTraining {
    /// Epochs over the user's positives.
    pub epochs: u32,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Negatives sampled per positive.
    pub negatives: u32,
    /// Learning rate of the item rows (global part).
    pub item_lr: f32,
    /// Learning rate of the user vector (private part).
    pub user_lr: f32,
    /// L2 regularisation on the rows in the batch.
    pub reg: f32,
}

impl Default for LocalTraining {
    /// The reference workload's settings.
    fn default() -> Self {
        Self { epochs: 1, batch_size: 32, negatives: 1, item_lr: 1.0, user_lr: 0.2, reg: 0.01 }
    }
}

/// Where matrix factorisation's global parameters sit in the flat view (the same layout
/// [`crate::flat`] gives the burn model's global part): rows `0..items` are the item embeddings
/// (`dim` values each); with biases, item `i`'s bias follows at flat index `items·dim + i`, packed
/// into extra rows of `dim` values (zero-padded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MfLayout {
    /// Items in the catalogue.
    pub items: u32,
    /// Embedding dimension.
    pub dim: u32,
    /// Whether items have a bias term.
    pub bias: bool,
}

impl MfLayout {
    /// Embeddings only.
    pub fn new(items: u32, dim: u32) -> Self {
        Self { items, dim, bias: false }
    }

    /// Embeddings and item biases.
    pub fn with_bias(items: u32, dim: u32) -> Self {
        Self { items, dim, bias: true }
    }

    /// The protocol shape of the global part.
    pub fn shape(&self) -> Result<ModelShape, UpdateError> {
        let extra = if self.bias { self.items.div_ceil(self.dim.max(1)) } else { 0 };
        ModelShape::new(self.items.saturating_add(extra), self.dim)
    }

    /// Flat index of item `i`'s bias (meaningful when `bias` is on).
    pub fn bias_index(&self, item: u32) -> usize {
        self.items as usize * self.dim as usize + item as usize
    }

    /// Score of `item` for `user` from the flat global parameters (NaN outside the model).
    pub fn score(&self, params: &[f32], user: &[f32], item: u32) -> f32 {
        if item >= self.items {
            return f32::NAN;
        }
        let d = self.dim as usize;
        let start = item as usize * d;
        let Some(q) = params.get(start..start + d) else { return f32::NAN };
        let b = if self.bias { params.get(self.bias_index(item)).copied().unwrap_or(f32::NAN) } else { 0.0 };
        dot(user, q) + b
    }
}

/// What one client's local training produced.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalResult {
    /// The change to the item rows the client touched (row-sparse); never the user vector.
    pub update: Update,
    /// Training examples (positives) — the FedAvg weight.
    pub examples: usize,
    /// Mean BPR loss over the steps.
    pub loss: f32,
}

/// Why local training could not run.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The item matrix length is not `shape.rows × shape.row_len`, or the user vector is not `row_len`.
    #[error("parameter shapes disagree: items {items} values, user {user} values, shape {rows}x{dim}")]
    Shape {
        /// Values in the item matrix.
        items: usize,
        /// Values in the user vector.
        user: usize,
        /// Rows of the shape.
        rows: u32,
        /// Dimension.
        dim: u32,
    },
    /// A positive item id is outside the item matrix.
    #[error("item {0} is outside the model")]
    UnknownItem(u32),
    /// A training example's context is out of range (time of day or weekday).
    #[error("an example's context is out of range")]
    BadContext,
    /// Training produced a non-finite value (diverged).
    #[error("training diverged")]
    Diverged,
    /// The update could not be built.
    #[error(transparent)]
    Update(#[from] UpdateError),
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `−ln σ(x)`, computed stably.
#[inline]
pub fn bpr_loss(x: f32) -> f32 {
    if x > 0.0 { (-x).exp().ln_1p() } else { -x + x.exp().ln_1p() }
}

/// `σ(−x)`, computed stably.
#[inline]
fn sigmoid_neg(x: f32) -> f32 {
    if x >= 0.0 {
        let e = (-x).exp();
        e / (1.0 + e)
    } else {
        1.0 / (1.0 + x.exp())
    }
}

/// Samples an item uniformly from those not in `positives` (sorted). `None` if there is none.
pub fn sample_negative(n_items: u32, positives: &[u32], rng: &mut impl rand::Rng) -> Option<u32> {
    if positives.len() >= n_items as usize {
        return None;
    }
    loop {
        let j = rng.random_range(0..n_items);
        if positives.binary_search(&j).is_err() {
            return Some(j);
        }
    }
}

/// Runs `cfg.epochs` local epochs of BPR-SGD for one user.
///
/// `items` is the flat global part (laid out as `layout`), `user` the private vector (updated in
/// place), `positives` the user's training items (sorted, deduplicated). Only the touched rows (and
/// their biases) are copied; the returned update holds their change.
pub fn local_epochs(
    layout: MfLayout,
    items: &[f32],
    user: &mut [f32],
    positives: &[u32],
    cfg: &LocalTraining,
    rng: &mut impl rand::Rng,
) -> Result<LocalResult, TrainError> {
    let shape = layout.shape()?;
    let dim = layout.dim as usize;
    let n_items = layout.items;
    if items.len() != shape.len() || user.len() != dim {
        return Err(TrainError::Shape {
            items: items.len(),
            user: user.len(),
            rows: shape.rows,
            dim: shape.row_len,
        });
    }
    if let Some(&bad) = positives.iter().find(|&&i| i >= n_items) {
        return Err(TrainError::UnknownItem(bad));
    }
    if positives.is_empty() {
        return Ok(LocalResult { update: Update::zero(shape), examples: 0, loss: 0.0 });
    }
    // Draw every (positive, negative) pair of every epoch first, so the touched rows are known.
    let negs_per = cfg.negatives.max(1) as usize;
    let mut order: Vec<u32> = positives.to_vec();
    let mut steps: Vec<Vec<(u32, u32)>> = Vec::with_capacity(cfg.epochs as usize);
    for _ in 0..cfg.epochs {
        // Fisher–Yates shuffle.
        for k in (1..order.len()).rev() {
            let j = rng.random_range(0..=k);
            order.swap(k, j);
        }
        let mut pairs = Vec::with_capacity(order.len() * negs_per);
        for &i in &order {
            for _ in 0..negs_per {
                if let Some(j) = sample_negative(n_items, positives, rng) {
                    pairs.push((i, j));
                }
            }
        }
        steps.push(pairs);
    }
    let mut rows: Vec<u32> = positives.to_vec();
    rows.extend(steps.iter().flatten().map(|&(_, j)| j));
    rows.sort_unstable();
    rows.dedup();
    let slot = |item: u32| rows.binary_search(&item).unwrap_or(0);
    let mut local: Vec<f32> = Vec::with_capacity(rows.len() * dim);
    for &r in &rows {
        let start = r as usize * dim;
        local.extend_from_slice(&items[start..start + dim]);
    }
    let mut local_bias: Vec<f32> =
        rows.iter().map(|&r| if layout.bias { items[layout.bias_index(r)] } else { 0.0 }).collect();
    let mut grad_bias = vec![0.0f32; rows.len()];
    let mut grad_rows = vec![0.0f32; rows.len() * dim];
    let mut dirty: Vec<usize> = Vec::with_capacity(2 * cfg.batch_size.max(1));
    let mut grad_user = vec![0.0f32; dim];
    let mut diff = vec![0.0f32; dim];
    let (mut loss_sum, mut n_steps) = (0.0f64, 0usize);
    let batch = cfg.batch_size.max(1);
    for pairs in &steps {
        for chunk in pairs.chunks(batch) {
            grad_user.iter_mut().for_each(|g| *g = 0.0);
            for &(i, j) in chunk {
                let (si, sj) = (slot(i), slot(j));
                let qi = &local[si * dim..(si + 1) * dim];
                let qj = &local[sj * dim..(sj + 1) * dim];
                for k in 0..dim {
                    diff[k] = qi[k] - qj[k];
                }
                let x = dot(user, &diff) + local_bias[si] - local_bias[sj];
                loss_sum += f64::from(bpr_loss(x));
                n_steps += 1;
                let g = sigmoid_neg(x); // −dL/dx
                for k in 0..dim {
                    grad_user[k] += -g * diff[k] + cfg.reg * user[k];
                }
                for (s, sign) in [(si, -1.0f32), (sj, 1.0f32)] {
                    if !dirty.contains(&s) {
                        dirty.push(s);
                    }
                    if layout.bias {
                        grad_bias[s] += sign * g + cfg.reg * local_bias[s];
                    }
                    let q = &local[s * dim..(s + 1) * dim];
                    let gr = &mut grad_rows[s * dim..(s + 1) * dim];
                    for k in 0..dim {
                        gr[k] += sign * g * user[k] + cfg.reg * q[k];
                    }
                }
            }
            for k in 0..dim {
                user[k] -= cfg.user_lr * grad_user[k];
            }
            for &s in &dirty {
                let q = &mut local[s * dim..(s + 1) * dim];
                let gr = &mut grad_rows[s * dim..(s + 1) * dim];
                for k in 0..dim {
                    q[k] -= cfg.item_lr * gr[k];
                    gr[k] = 0.0;
                }
                local_bias[s] -= cfg.item_lr * grad_bias[s];
                grad_bias[s] = 0.0;
            }
            dirty.clear();
        }
    }
    if user.iter().chain(&local).chain(&local_bias).any(|v| !v.is_finite()) {
        return Err(TrainError::Diverged);
    }
    for (k, &r) in rows.iter().enumerate() {
        let start = r as usize * dim;
        for (l, &g) in local[k * dim..(k + 1) * dim].iter_mut().zip(&items[start..start + dim]) {
            *l -= g;
        }
    }
    let update = if layout.bias {
        // The item rows, then the rows holding the touched items' biases.
        let mut bias_rows: std::collections::BTreeMap<u32, Vec<f32>> = std::collections::BTreeMap::new();
        for (k, &r) in rows.iter().enumerate() {
            let idx = layout.bias_index(r);
            bias_rows.entry((idx / dim) as u32).or_insert_with(|| vec![0.0; dim])[idx % dim] =
                local_bias[k] - items[idx];
        }
        let mut all_rows = rows;
        let mut values = local;
        for (row, vals) in bias_rows {
            all_rows.push(row);
            values.extend(vals);
        }
        Update::sparse(shape, all_rows, values)?
    } else {
        Update::sparse(shape, rows, local)?
    };
    let loss = if n_steps > 0 { (loss_sum / n_steps as f64) as f32 } else { 0.0 };
    Ok(LocalResult { update, examples: positives.len(), loss })
}

/// The weight of each positive, normalised so that their mean is 1 (exactly 1 each when all
/// weights are equal; non-finite or non-positive weights count as 1).
pub fn normalised_weights(examples: &crate::data::events::Examples) -> Vec<f32> {
    let raw: Vec<f32> = examples
        .positives
        .iter()
        .map(|p| if p.weight.is_finite() && p.weight > 0.0 { p.weight } else { 1.0 })
        .collect();
    if raw.windows(2).all(|w| w[0] == w[1]) {
        return vec![1.0; raw.len()];
    }
    let mean = raw.iter().map(|&w| f64::from(w)).sum::<f64>() / raw.len().max(1) as f64;
    raw.iter().map(|&w| (f64::from(w) / mean) as f32).collect()
}

/// Draws a negative for a user with hard negatives `hard` (items with only negative signals):
/// when there are any, one of them (uniformly) with probability `|hard| / (|hard| + |positives|)`
/// (at most ½), else a uniform negative ([`sample_negative`]); with none, exactly
/// [`sample_negative`] (no coin is drawn).
pub fn sample_negative_with_hard(
    n_items: u32,
    positives: &[u32],
    hard: &[u32],
    rng: &mut impl rand::Rng,
) -> Option<u32> {
    // A hard negative in proportion to the user's rejections among their signals (at most one
    // in two): a user with 8 skips and 40 positives draws one in six. Drawing half the negatives
    // from a handful of skipped items whatever their number starved the uniform negatives that
    // ranking depends on (under local DP the model stopped learning).
    if !hard.is_empty() {
        let share = (hard.len() as f64 / (hard.len() + positives.len()) as f64).min(0.5);
        if rng.random_bool(share) {
            return Some(hard[rng.random_range(0..hard.len())]);
        }
    }
    sample_negative(n_items, positives, rng)
}

/// [`local_epochs`] on a user's [`Examples`](crate::data::events::Examples): each positive's
/// loss (BPR term and regulariser) is scaled by its weight, normalised to mean 1
/// ([`normalised_weights`]), and a share of the sampled negatives (the user's rejections among
/// their signals, at most one half) come from `examples.negatives` (skips, low ratings) when
/// there are any ([`sample_negative_with_hard`]).
///
/// With equal weights and no negatives it computes exactly what [`local_epochs`] computes on
/// `examples.positive_items()` (same random draws, same arithmetic, bit for bit).
pub fn local_epochs_examples(
    layout: MfLayout,
    items: &[f32],
    user: &mut [f32],
    examples: &crate::data::events::Examples,
    cfg: &LocalTraining,
    rng: &mut impl rand::Rng,
) -> Result<LocalResult, TrainError> {
    let shape = layout.shape()?;
    let dim = layout.dim as usize;
    let n_items = layout.items;
    if items.len() != shape.len() || user.len() != dim {
        return Err(TrainError::Shape {
            items: items.len(),
            user: user.len(),
            rows: shape.rows,
            dim: shape.row_len,
        });
    }
    let positives = examples.positive_items();
    let hard = &examples.negatives;
    if let Some(&bad) = positives.iter().chain(hard).find(|&&i| i >= n_items) {
        return Err(TrainError::UnknownItem(bad));
    }
    if positives.is_empty() {
        return Ok(LocalResult { update: Update::zero(shape), examples: 0, loss: 0.0 });
    }
    let weights = normalised_weights(examples);
    // Draw every (positive, negative) pair of every epoch first, so the touched rows are known.
    // Positives are carried as their index in `positives`, to find their weight.
    let negs_per = cfg.negatives.max(1) as usize;
    let mut order: Vec<u32> = (0..positives.len() as u32).collect();
    let mut steps: Vec<Vec<(u32, u32)>> = Vec::with_capacity(cfg.epochs as usize);
    for _ in 0..cfg.epochs {
        for k in (1..order.len()).rev() {
            let j = rng.random_range(0..=k);
            order.swap(k, j);
        }
        let mut pairs = Vec::with_capacity(order.len() * negs_per);
        for &k in &order {
            for _ in 0..negs_per {
                if let Some(j) = sample_negative_with_hard(n_items, &positives, hard, rng) {
                    pairs.push((k, j));
                }
            }
        }
        steps.push(pairs);
    }
    let mut rows: Vec<u32> = positives.to_vec();
    rows.extend(steps.iter().flatten().map(|&(_, j)| j));
    rows.sort_unstable();
    rows.dedup();
    let slot = |item: u32| rows.binary_search(&item).unwrap_or(0);
    let mut local: Vec<f32> = Vec::with_capacity(rows.len() * dim);
    for &r in &rows {
        let start = r as usize * dim;
        local.extend_from_slice(&items[start..start + dim]);
    }
    let mut local_bias: Vec<f32> =
        rows.iter().map(|&r| if layout.bias { items[layout.bias_index(r)] } else { 0.0 }).collect();
    let mut grad_bias = vec![0.0f32; rows.len()];
    let mut grad_rows = vec![0.0f32; rows.len() * dim];
    let mut dirty: Vec<usize> = Vec::with_capacity(2 * cfg.batch_size.max(1));
    let mut grad_user = vec![0.0f32; dim];
    let mut diff = vec![0.0f32; dim];
    let (mut loss_sum, mut n_steps) = (0.0f64, 0usize);
    let batch = cfg.batch_size.max(1);
    for pairs in &steps {
        for chunk in pairs.chunks(batch) {
            grad_user.iter_mut().for_each(|g| *g = 0.0);
            for &(k, j) in chunk {
                let i = positives[k as usize];
                let w = weights[k as usize];
                let (si, sj) = (slot(i), slot(j));
                let qi = &local[si * dim..(si + 1) * dim];
                let qj = &local[sj * dim..(sj + 1) * dim];
                for k in 0..dim {
                    diff[k] = qi[k] - qj[k];
                }
                let x = dot(user, &diff) + local_bias[si] - local_bias[sj];
                loss_sum += f64::from(w * bpr_loss(x));
                n_steps += 1;
                let g = w * sigmoid_neg(x); // −dL/dx, weighted
                let wreg = w * cfg.reg;
                for k in 0..dim {
                    grad_user[k] += -g * diff[k] + wreg * user[k];
                }
                for (s, sign) in [(si, -1.0f32), (sj, 1.0f32)] {
                    if !dirty.contains(&s) {
                        dirty.push(s);
                    }
                    if layout.bias {
                        grad_bias[s] += sign * g + wreg * local_bias[s];
                    }
                    let q = &local[s * dim..(s + 1) * dim];
                    let gr = &mut grad_rows[s * dim..(s + 1) * dim];
                    for k in 0..dim {
                        gr[k] += sign * g * user[k] + wreg * q[k];
                    }
                }
            }
            for k in 0..dim {
                user[k] -= cfg.user_lr * grad_user[k];
            }
            for &s in &dirty {
                let q = &mut local[s * dim..(s + 1) * dim];
                let gr = &mut grad_rows[s * dim..(s + 1) * dim];
                for k in 0..dim {
                    q[k] -= cfg.item_lr * gr[k];
                    gr[k] = 0.0;
                }
                local_bias[s] -= cfg.item_lr * grad_bias[s];
                grad_bias[s] = 0.0;
            }
            dirty.clear();
        }
    }
    if user.iter().chain(&local).chain(&local_bias).any(|v| !v.is_finite()) {
        return Err(TrainError::Diverged);
    }
    for (k, &r) in rows.iter().enumerate() {
        let start = r as usize * dim;
        for (l, &g) in local[k * dim..(k + 1) * dim].iter_mut().zip(&items[start..start + dim]) {
            *l -= g;
        }
    }
    let update = if layout.bias {
        let mut bias_rows: std::collections::BTreeMap<u32, Vec<f32>> = std::collections::BTreeMap::new();
        for (k, &r) in rows.iter().enumerate() {
            let idx = layout.bias_index(r);
            bias_rows.entry((idx / dim) as u32).or_insert_with(|| vec![0.0; dim])[idx % dim] =
                local_bias[k] - items[idx];
        }
        let mut all_rows = rows;
        let mut values = local;
        for (row, vals) in bias_rows {
            all_rows.push(row);
            values.extend(vals);
        }
        Update::sparse(shape, all_rows, values)?
    } else {
        Update::sparse(shape, rows, local)?
    };
    let loss = if n_steps > 0 { (loss_sum / n_steps as f64) as f32 } else { 0.0 };
    Ok(LocalResult { update, examples: positives.len(), loss })
}

/// Scores of `candidates` for `user` (NaN for an item outside the model).
pub fn score_items(layout: MfLayout, params: &[f32], user: &[f32], candidates: &[u32], out: &mut Vec<f32>) {
    out.extend(candidates.iter().map(|&i| layout.score(params, user, i)));
}

/// Scores of every item for `user`.
pub fn score_all(layout: MfLayout, params: &[f32], user: &[f32], out: &mut Vec<f32>) {
    out.extend((0..layout.items).map(|i| layout.score(params, user, i)));
}

/// The `k` best-scoring items (best first) among those not in `exclude` (sorted). Ties go to the
/// smaller item id; NaN scores rank last.
pub fn top_k(scores: &[f32], k: usize, exclude: &[u32]) -> Vec<(u32, f32)> {
    let mut cand: Vec<(u32, f32)> = scores
        .iter()
        .enumerate()
        .filter(|(i, _)| exclude.binary_search(&(*i as u32)).is_err())
        .map(|(i, &s)| (i as u32, if s.is_nan() { f32::NEG_INFINITY } else { s }))
        .collect();
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if cand.len() > k && k > 0 {
        cand.select_nth_unstable_by(k - 1, cmp);
        cand.truncate(k);
    }
    cand.sort_unstable_by(cmp);
    cand.truncate(k);
    cand
}

/// Non-personal ranking for a user with no state: the `k` most popular items not in `exclude`.
pub fn popular(counts: &[u32], k: usize, exclude: &[u32]) -> Vec<(u32, f32)> {
    let scores: Vec<f32> = counts.iter().map(|&c| c as f32).collect();
    top_k(&scores, k, exclude)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn setup() -> (MfLayout, Vec<f32>, Vec<f32>) {
        let shape = MfLayout::new(50, 8);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let items: Vec<f32> =
            (0..shape.shape().unwrap().len()).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let user: Vec<f32> = (0..8).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        (shape, items, user)
    }

    #[test]
    fn update_touches_only_sampled_rows_and_never_holds_the_user_vector() {
        let (shape, items, mut user) = setup();
        let before_user = user.clone();
        let positives = vec![3, 7, 11, 20];
        let cfg = LocalTraining { epochs: 2, ..LocalTraining::default() };
        let r = local_epochs(shape, &items, &mut user, &positives, &cfg, &mut ChaCha8Rng::seed_from_u64(2))
            .unwrap();
        assert_eq!(r.examples, 4);
        let rows = r.update.rows().unwrap();
        assert!(positives.iter().all(|p| rows.contains(p)));
        assert!(rows.len() <= 4 + 8, "positives plus at most one negative per step");
        assert_eq!(r.update.values().len(), rows.len() * 8, "item rows only: no user vector");
        assert_ne!(user, before_user, "the private vector trained locally");
        assert!(r.loss > 0.0 && r.loss.is_finite());
    }

    #[test]
    fn training_lowers_the_loss_on_a_fixed_user() {
        let (shape, mut items, mut user) = setup();
        let positives = vec![1, 2, 3, 4, 5, 6];
        let cfg = LocalTraining { item_lr: 0.5, user_lr: 0.5, ..LocalTraining::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut losses = Vec::new();
        for _ in 0..30 {
            let r = local_epochs(shape, &items, &mut user, &positives, &cfg, &mut rng).unwrap();
            for (row, vals) in r.update.iter_rows() {
                let s = row as usize * 8;
                for (q, d) in items[s..s + 8].iter_mut().zip(vals) {
                    *q += d;
                }
            }
            losses.push(r.loss);
        }
        assert!(losses[29] < losses[0] * 0.5, "loss {} -> {}", losses[0], losses[29]);
    }

    #[test]
    fn matches_a_naive_transcription_of_the_reference_math() {
        // One batch, explicit loops over the batch as written in the reference workload.
        let (shape, items, user0) = setup();
        let positives = vec![4, 9];
        let cfg = LocalTraining { batch_size: 32, ..LocalTraining::default() };
        let mut user = user0.clone();
        let r = local_epochs(shape, &items, &mut user, &positives, &cfg, &mut ChaCha8Rng::seed_from_u64(9))
            .unwrap();
        // Re-draw the same pairs.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut order = positives.clone();
        for k in (1..order.len()).rev() {
            let j = rng.random_range(0..=k);
            order.swap(k, j);
        }
        let pairs: Vec<(u32, u32)> =
            order.iter().map(|&i| (i, sample_negative(50, &positives, &mut rng).unwrap())).collect();
        let q = |i: u32| &items[i as usize * 8..i as usize * 8 + 8];
        let mut gu = [0.0f32; 8];
        let mut gq = std::collections::BTreeMap::<u32, [f32; 8]>::new();
        for &(i, j) in &pairs {
            let x: f32 = (0..8).map(|k| user0[k] * (q(i)[k] - q(j)[k])).sum();
            let s = 1.0 / (1.0 + x.exp());
            for k in 0..8 {
                gu[k] += -s * (q(i)[k] - q(j)[k]) + 0.01 * user0[k];
                gq.entry(i).or_default()[k] += -s * user0[k] + 0.01 * q(i)[k];
                gq.entry(j).or_default()[k] += s * user0[k] + 0.01 * q(j)[k];
            }
        }
        for k in 0..8 {
            assert!((user[k] - (user0[k] - 0.2 * gu[k])).abs() < 1e-6);
        }
        let dense = r.update.to_dense();
        for (&row, g) in &gq {
            for k in 0..8 {
                assert!((dense[row as usize * 8 + k] + g[k]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn bad_inputs_are_typed() {
        let (shape, items, mut user) = setup();
        let cfg = LocalTraining::default();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            local_epochs(shape, &items, &mut user, &[50], &cfg, &mut rng),
            Err(TrainError::UnknownItem(50))
        );
        assert!(matches!(
            local_epochs(shape, &items[1..], &mut user, &[1], &cfg, &mut rng),
            Err(TrainError::Shape { .. })
        ));
        let r = local_epochs(shape, &items, &mut user, &[], &cfg, &mut rng).unwrap();
        assert_eq!(r.examples, 0);
    }

    #[test]
    fn top_k_excludes_seen_and_cold_start_ranks_by_popularity() {
        let scores = [0.1, 0.9, f32::NAN, 0.9, 0.5];
        assert_eq!(top_k(&scores, 3, &[]), vec![(1, 0.9), (3, 0.9), (4, 0.5)]);
        assert_eq!(top_k(&scores, 2, &[1, 3]), vec![(4, 0.5), (0, 0.1)]);
        assert_eq!(top_k(&scores, 10, &[]).len(), 5);
        let pop = popular(&[5, 0, 9, 2], 2, &[]);
        assert_eq!(pop.iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 0]);
    }

    #[test]
    fn cold_start_returns_k_items_with_zero_events() {
        // A brand-new catalogue with no interactions at all still yields k distinct items.
        let counts = vec![0u32; 50];
        let recs = popular(&counts, 10, &[]);
        assert_eq!(recs.len(), 10);
        let mut ids: Vec<u32> = recs.iter().map(|r| r.0).collect();
        ids.dedup();
        assert_eq!(ids.len(), 10);
        // Fewer items than asked for: all of them, never an error.
        assert_eq!(popular(&[3, 1], 10, &[]).len(), 2);
    }
}
