//! Local training of the two-tower model through burn, over a local slice of the catalogue.

use super::{CONTEXT_FIELDS, CONTEXT_ROWS, TwoTowerLayout};
use crate::burn_mf::index_tensor;
use crate::data::events::Examples;
use crate::family::ModelDef;
use crate::mf::{LocalResult, LocalTraining, TrainError, normalised_weights, sample_negative_with_hard};
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;
use rand::RngExt;
use starling_proto::update::Update;

/// Learning rate of the projection `W` and bias `b`, relative to `cfg.item_lr`, on the batch's
/// mean loss. Every example of every user moves them, and they mix every user's `p`: at the item
/// rows' rate they made a model without any context signal clearly worse than MF (HR@10 0.25 vs
/// 0.31 in `tests/context.rs`'s setting); at a tenth they are not.
pub const PROJECTION_LR_SCALE: f32 = 0.1;

/// One training example: positive (index into the positives), negative item.
#[derive(Clone, Copy)]
struct Pair {
    pos: u32,
    neg: u32,
}

/// The leaves of one step's graph.
struct Leaves {
    user: Tensor<2>,
    items: Tensor<2>,
    tables: Tensor<2>,
    proj: Tensor<2>,
    bias: Tensor<2>,
}

fn leaf(values: &[f32], shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::<2>::from_data(TensorData::new(values.to_vec(), shape), device).require_grad()
}

fn constant(values: Vec<f32>, shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::<2>::from_data(TensorData::new(values, shape), device)
}

fn to_vec(t: Option<Tensor<2>>, len: usize) -> Result<Vec<f32>, TrainError> {
    match t {
        Some(t) => t.into_data().try_into_vec::<f32>().map_err(|_| TrainError::Diverged),
        // A leaf that did not take part in the loss has a zero gradient.
        None => Ok(vec![0.0; len]),
    }
}

fn sgd(param: &mut [f32], grad: &[f32], lr: f32) {
    for (p, g) in param.iter_mut().zip(grad) {
        *p -= lr * g;
    }
}

/// [`ModelDef::train`] for the two-tower model.
///
/// `cfg.epochs` epochs over the user's positives in shuffled order, `cfg.negatives` negatives per
/// positive (half from `examples.negatives` when there are any), mini-batches of
/// `cfg.batch_size`. Loss per example: `w · (−ln σ(u·(q_i − q_j)) + reg/2 (‖p‖² + ‖q_i‖² +
/// ‖q_j‖²))` with `w` the positive's normalised weight, `u` the user tower in the positive's
/// context with the history mean `h` leaving the positive out. Gradients come from burn's
/// autodiff (`Autodiff<Flex>`); the step is plain SGD on the batch's summed loss for `p`
/// (`cfg.user_lr`), the item rows and the context-table rows (`cfg.item_lr`: like an item row,
/// a context row moves with the examples that use it), and on the batch's mean loss for `W` and
/// `b` (`cfg.item_lr ·` [`PROJECTION_LR_SCALE`](super::PROJECTION_LR_SCALE)), which every example moves.
///
/// Only the touched item rows (positives and sampled negatives) are copied into the model; the
/// update holds their change and the change of the dense rows, never `p`. `item_lr = 0` leaves
/// the global part unchanged ([`ModelDef::fit_private`]).
pub fn train_flat(
    def: &ModelDef,
    context_dim: u32,
    global: &[f32],
    private: &mut [f32],
    examples: &Examples,
    cfg: &LocalTraining,
    rng: &mut impl rand::Rng,
) -> Result<LocalResult, TrainError> {
    let layout = TwoTowerLayout::new(def.items, def.dim, context_dim);
    let shape = layout.shape()?;
    let d = def.dim as usize;
    let c = context_dim as usize;
    if global.len() != shape.len() || private.len() != d || d == 0 {
        return Err(TrainError::Shape {
            items: global.len(),
            user: private.len(),
            rows: shape.rows,
            dim: def.dim,
        });
    }
    let positives = examples.positive_items();
    let hard = &examples.negatives;
    if let Some(&bad) = positives.iter().chain(hard).find(|&&i| i >= def.items) {
        return Err(TrainError::UnknownItem(bad));
    }
    if positives.is_empty() {
        return Ok(LocalResult { update: Update::zero(shape), examples: 0, loss: 0.0 });
    }
    let mut ctx_rows = Vec::with_capacity(positives.len());
    for p in &examples.positives {
        ctx_rows.push(TwoTowerLayout::context_rows(&p.context).ok_or(TrainError::BadContext)?);
    }
    let weights = normalised_weights(examples);

    // Every (positive, negative) pair of every epoch first, so the touched rows are known.
    let negs_per = cfg.negatives.max(1) as usize;
    let mut order: Vec<u32> = (0..positives.len() as u32).collect();
    let mut epochs: Vec<Vec<Pair>> = Vec::with_capacity(cfg.epochs as usize);
    for _ in 0..cfg.epochs {
        for k in (1..order.len()).rev() {
            let j = rng.random_range(0..=k);
            order.swap(k, j);
        }
        let mut pairs = Vec::with_capacity(order.len() * negs_per);
        for &k in &order {
            for _ in 0..negs_per {
                if let Some(j) = sample_negative_with_hard(def.items, &positives, hard, rng) {
                    pairs.push(Pair { pos: k, neg: j });
                }
            }
        }
        epochs.push(pairs);
    }

    // The local slice: touched item rows (sorted ids), then the dense block.
    let mut rows: Vec<u32> = positives.clone();
    rows.extend(epochs.iter().flatten().map(|p| p.neg));
    rows.sort_unstable();
    rows.dedup();
    let slot = |item: u32| rows.binary_search(&item).unwrap_or(0) as u32;
    let mut local: Vec<f32> = Vec::with_capacity(rows.len() * d);
    for &r in &rows {
        local.extend_from_slice(&global[r as usize * d..(r as usize + 1) * d]);
    }
    let dense_start = layout.context_offset();
    let before_dense = &global[dense_start..];
    let mut dense = before_dense.to_vec();
    let (t_off, w_off, b_off) =
        (0, layout.projection_offset() - dense_start, layout.bias_offset() - dense_start);
    let input = layout.input_dim();
    let n_tables = CONTEXT_ROWS * c;
    let n_proj = input * d;

    let device = Device::flex().autodiff();
    let hist_slots: Vec<u32> = positives.iter().map(|&i| slot(i)).collect();
    let hist = index_tensor(&hist_slots, &device);
    let n_hist = positives.len();
    let inv_hist = if n_hist > 1 { 1.0 / (n_hist - 1) as f32 } else { 0.0 };

    let (mut loss_sum, mut n_examples) = (0.0f64, 0usize);
    let batch = cfg.batch_size.max(1);
    for pairs in &epochs {
        for chunk in pairs.chunks(batch) {
            let b = chunk.len();
            let leaves = Leaves {
                user: leaf(private, [1, d], &device),
                items: leaf(&local, [rows.len(), d], &device),
                tables: leaf(&dense[t_off..t_off + n_tables], [CONTEXT_ROWS, c], &device),
                proj: leaf(&dense[w_off..w_off + n_proj], [input, d], &device),
                bias: leaf(&dense[b_off..b_off + d], [1, d], &device),
            };
            let pos: Vec<u32> = chunk.iter().map(|p| slot(positives[p.pos as usize])).collect();
            let neg: Vec<u32> = chunk.iter().map(|p| slot(p.neg)).collect();
            let w: Vec<f32> = chunk.iter().map(|p| weights[p.pos as usize]).collect();
            let zeros = index_tensor(&vec![0u32; b], &device);
            let q_pos = leaves.items.clone().select(0, index_tensor(&pos, &device));
            let q_neg = leaves.items.clone().select(0, index_tensor(&neg, &device));
            let p = leaves.user.clone().select(0, zeros.clone());
            // History mean leaving the positive out: (Σ_history q − q_i) / (n − 1).
            let sum = leaves.items.clone().select(0, hist.clone()).sum_dim(0).select(0, zeros.clone());
            let h = (sum - q_pos.clone()).mul_scalar(inv_hist);
            let mut inputs = vec![p.clone(), h];
            inputs.extend((0..CONTEXT_FIELDS).map(|f| {
                let idx: Vec<u32> = chunk.iter().map(|x| ctx_rows[x.pos as usize][f] as u32).collect();
                leaves.tables.clone().select(0, index_tensor(&idx, &device))
            }));
            let x = Tensor::cat(inputs, 1);
            let u = x.matmul(leaves.proj.clone()) + leaves.bias.clone().select(0, zeros);
            let margin: Tensor<1> = (u * (q_pos.clone() - q_neg.clone())).sum_dim(1).squeeze_dim(1);
            let wt = constant(w.clone(), [b, 1], &device).squeeze_dim::<1>(1);
            let norms: Tensor<1> = ((p.clone() * p) + (q_pos.clone() * q_pos) + (q_neg.clone() * q_neg))
                .sum_dim(1)
                .squeeze_dim(1);
            let per_example = log_sigmoid(margin).neg() + norms.mul_scalar(cfg.reg / 2.0);
            let loss = (per_example * wt).sum();
            let value = loss.clone().into_scalar::<f32>();
            loss_sum += f64::from(value);
            n_examples += b;
            let grads = loss.backward();
            let g_user = to_vec(leaves.user.grad(&grads), d)?;
            let g_items = to_vec(leaves.items.grad(&grads), local.len())?;
            let g_tables = to_vec(leaves.tables.grad(&grads), n_tables)?;
            let g_proj = to_vec(leaves.proj.grad(&grads), n_proj)?;
            let g_bias = to_vec(leaves.bias.grad(&grads), d)?;
            let dense_lr = cfg.item_lr * PROJECTION_LR_SCALE / b as f32;
            sgd(private, &g_user, cfg.user_lr);
            sgd(&mut local, &g_items, cfg.item_lr);
            sgd(&mut dense[t_off..t_off + n_tables], &g_tables, cfg.item_lr);
            sgd(&mut dense[w_off..w_off + n_proj], &g_proj, dense_lr);
            sgd(&mut dense[b_off..b_off + d], &g_bias, dense_lr);
        }
    }
    if private.iter().chain(&local).chain(&dense).any(|v| !v.is_finite()) {
        return Err(TrainError::Diverged);
    }

    // Scatter back: the touched item rows, then every dense row (from row `items` on).
    let n_rows = rows.len() + (shape.rows - def.items) as usize;
    let mut all_rows: Vec<u32> = Vec::with_capacity(n_rows);
    let mut values: Vec<f32> = Vec::with_capacity(n_rows * d);
    for (k, &r) in rows.iter().enumerate() {
        all_rows.push(r);
        let before = &global[r as usize * d..(r as usize + 1) * d];
        values.extend(local[k * d..(k + 1) * d].iter().zip(before).map(|(a, b)| a - b));
    }
    all_rows.extend(def.items..shape.rows);
    values.extend(dense.iter().zip(before_dense).map(|(a, b)| a - b));
    let update = Update::sparse(shape, all_rows, values)?;
    let loss = if n_examples > 0 { (loss_sum / n_examples as f64) as f32 } else { 0.0 };
    Ok(LocalResult { update, examples: positives.len(), loss })
}
