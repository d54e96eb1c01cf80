//! Matrix factorisation as a burn module: the model definition, its BPR loss, and centralized
//! training (the baseline every federated run is measured against).
//!
//! Shapes: `user.weight` is `[users, dim]` (on a device: `[1, dim]`, the private vector);
//! the global part [`MfGlobal`] holds `item.weight` `[items, dim]` and, optionally,
//! `bias.weight` `[items, 1]` (see [`crate::flat`]; its flat layout is [`crate::mf::MfLayout`]).
//! Scores are `user · item + bias`.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;

/// Configuration of [`MfModel`].
#[derive(Config, Debug)]
pub struct MfConfig {
    /// Rows of the user table (1 on a device).
    pub users: usize,
    /// Items in the catalogue.
    pub items: usize,
    /// Embedding dimension.
    #[config(default = 32)]
    pub dim: usize,
    /// Standard deviation of the normal initialisation.
    #[config(default = 0.1)]
    pub init_std: f64,
    /// Whether items have a learned bias (initialised to zero).
    #[config(default = false)]
    pub item_bias: bool,
}

impl MfConfig {
    /// Builds the model on `device` (use `device.seed(..)` first for reproducible initialisation).
    pub fn init(&self, device: &Device) -> MfModel {
        let init = burn::nn::Initializer::Normal { mean: 0.0, std: self.init_std };
        MfModel {
            user: EmbeddingConfig::new(self.users, self.dim).with_initializer(init.clone()).init(device),
            global: MfGlobal {
                item: EmbeddingConfig::new(self.items, self.dim).with_initializer(init).init(device),
                bias: self.item_bias.then(|| {
                    EmbeddingConfig::new(self.items, 1)
                        .with_initializer(burn::nn::Initializer::Zeros)
                        .init(device)
                }),
            },
        }
    }

    /// Where the global part sits in the flat view.
    pub fn layout(&self) -> crate::mf::MfLayout {
        crate::mf::MfLayout { items: self.items as u32, dim: self.dim as u32, bias: self.item_bias }
    }
}

/// The global (shared) part of [`MfModel`].
#[derive(Module, Debug)]
pub struct MfGlobal {
    /// `[items, dim]` item embeddings.
    pub item: Embedding,
    /// `[items, 1]` item biases, if enabled.
    pub bias: Option<Embedding>,
}

/// Matrix factorisation: a private user table and a global item table.
#[derive(Module, Debug)]
pub struct MfModel {
    /// `[users, dim]`: private, never part of an update.
    pub user: Embedding,
    /// The global part.
    pub global: MfGlobal,
}

/// A tensor of indices from a vector.
pub fn index_tensor(values: &[u32], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = values.iter().map(|&x| i64::from(x)).collect();
    let n = v.len();
    Tensor::<1, Int>::from_data(TensorData::new(v, [n]), device)
}

impl MfModel {
    /// Scores of `items[b]` for `users[b]`: `[B]`.
    pub fn score(&self, users: Tensor<1, Int>, items: Tensor<1, Int>) -> Tensor<1> {
        let pu = self.user.weight.val().select(0, users);
        let qi = self.global.item.weight.val().select(0, items.clone());
        let dot: Tensor<1> = (pu * qi).sum_dim(1).squeeze_dim(1);
        match &self.global.bias {
            Some(b) => dot + b.weight.val().select(0, items).squeeze_dim(1),
            None => dot,
        }
    }

    /// BPR loss summed over the batch, with L2 regularisation `reg/2 · (‖p‖² + ‖q_i‖² + ‖q_j‖²)`
    /// per example (the reference workload's loss; its gradient is the sum over the batch).
    pub fn bpr_loss_sum(
        &self,
        users: Tensor<1, Int>,
        pos: Tensor<1, Int>,
        neg: Tensor<1, Int>,
        reg: f32,
    ) -> Tensor<1> {
        let pu = self.user.weight.val().select(0, users);
        let qi = self.global.item.weight.val().select(0, pos.clone());
        let qj = self.global.item.weight.val().select(0, neg.clone());
        let mut x: Tensor<1> = (pu.clone() * (qi.clone() - qj.clone())).sum_dim(1).squeeze_dim(1);
        let mut norms = (pu.clone() * pu).sum() + (qi.clone() * qi).sum() + (qj.clone() * qj).sum();
        if let Some(b) = &self.global.bias {
            let bi: Tensor<1> = b.weight.val().select(0, pos).squeeze_dim(1);
            let bj: Tensor<1> = b.weight.val().select(0, neg).squeeze_dim(1);
            norms = norms + (bi.clone() * bi.clone()).sum() + (bj.clone() * bj.clone()).sum();
            x = x + bi - bj;
        }
        log_sigmoid(x).sum().neg() + norms.mul_scalar(reg / 2.0)
    }

    /// Scores of every item for user row `user`: `[items]`.
    pub fn score_all(&self, user: u32) -> Vec<f32> {
        let device = self.global.item.weight.val().device();
        let pu = self.user.weight.val().select(0, index_tensor(&[user], &device)); // [1, d]
        let mut scores = pu.matmul(self.global.item.weight.val().transpose()); // [1, items]
        if let Some(b) = &self.global.bias {
            scores = scores + b.weight.val().transpose();
        }
        scores.into_data().try_into_vec::<f32>().unwrap_or_default()
    }

    /// Where the global part sits in the flat view.
    pub fn layout(&self) -> crate::mf::MfLayout {
        let [items, dim] = self.global.item.weight.shape().dims::<2>();
        crate::mf::MfLayout { items: items as u32, dim: dim as u32, bias: self.global.bias.is_some() }
    }
}

/// Settings of centralized training.
#[derive(Clone, Debug, PartialEq)]
pub struct CentralTraining {
    /// Epochs over all training pairs.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// L2 regularisation per example.
    pub reg: f32,
    /// Seed of initialisation, shuffling and negative sampling.
    pub seed: u64,
    /// Learn item biases too.
    pub item_bias: bool,
}

impl Default for CentralTraining {
    fn default() -> Self {
        Self { epochs: 60, batch_size: 1024, lr: 2e-3, reg: 5e-4, seed: 42, item_bias: false }
    }
}

/// Per-epoch progress of centralized training.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochReport {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean BPR loss (without the regulariser) over the epoch.
    pub loss: f32,
    /// Quality on the evaluation set after the epoch.
    pub metrics: crate::eval::Metrics,
}

/// The user table (`[U·d]`) and the flat global part (laid out as [`MfModel::layout`]).
pub fn tables(model: &MfModel) -> (Vec<f32>, Vec<f32>) {
    let users = model.user.weight.val().into_data().try_into_vec::<f32>().unwrap_or_default();
    let global = crate::flat::to_flat(&model.global, model.layout().dim).unwrap_or_default();
    (users, global)
}

/// Evaluates `model` with the reference protocol.
pub fn evaluate(model: &MfModel, eval: &crate::eval::EvalSet) -> crate::eval::Metrics {
    let layout = model.layout();
    let dim = layout.dim as usize;
    let (users, global) = tables(model);
    eval.evaluate(|u, cand, out| {
        let start = u as usize * dim;
        crate::mf::score_items(layout, &global, &users[start..start + dim], cand, out)
    })
}

/// Trains matrix factorisation on every training pair in one process (Adam on mini-batches of the
/// mean BPR loss, one uniformly sampled negative per positive), calling `on_epoch` after each epoch.
pub fn train_central(
    split: &crate::data::LeaveOneOut,
    eval: &crate::eval::EvalSet,
    dim: usize,
    cfg: &CentralTraining,
    mut on_epoch: impl FnMut(&EpochReport),
) -> MfModel {
    use burn::optim::{AdamConfig, GradientsParams};
    use rand::{RngExt, SeedableRng};

    let base = Device::flex();
    let device = base.clone().autodiff();
    device.seed(cfg.seed);
    let mut model = MfConfig::new(split.n_users as usize, split.n_items as usize)
        .with_dim(dim)
        .with_item_bias(cfg.item_bias)
        .init(&device);
    let mut optim = AdamConfig::new().init();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut pairs: Vec<(u32, u32)> = split
        .train
        .iter()
        .enumerate()
        .flat_map(|(u, items)| items.iter().map(move |&i| (u as u32, i)))
        .collect();
    let batch = cfg.batch_size.max(1);
    for epoch in 1..=cfg.epochs {
        for k in (1..pairs.len()).rev() {
            let j = rng.random_range(0..=k);
            pairs.swap(k, j);
        }
        let (mut loss_sum, mut n) = (0.0f64, 0usize);
        for chunk in pairs.chunks(batch) {
            let mut us = Vec::with_capacity(chunk.len());
            let mut ps = Vec::with_capacity(chunk.len());
            let mut ns = Vec::with_capacity(chunk.len());
            for &(u, i) in chunk {
                let Some(j) = crate::mf::sample_negative(split.n_items, &split.train[u as usize], &mut rng)
                else {
                    continue;
                };
                us.push(u);
                ps.push(i);
                ns.push(j);
            }
            if us.is_empty() {
                continue;
            }
            let b = us.len();
            let loss = model
                .bpr_loss_sum(
                    index_tensor(&us, &device),
                    index_tensor(&ps, &device),
                    index_tensor(&ns, &device),
                    cfg.reg,
                )
                .div_scalar(b as f32);
            loss_sum += f64::from(loss.clone().into_scalar::<f32>()) * b as f64;
            n += b;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(cfg.lr, model, grads);
        }
        let report =
            EpochReport { epoch, loss: (loss_sum / n.max(1) as f64) as f32, metrics: evaluate(&model, eval) };
        on_epoch(&report);
    }
    model
}
