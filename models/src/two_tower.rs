//! A context-aware two-tower model.
//!
//! - **User tower**: `u = W_u · [p ; e_time ; e_weekday ; e_device] + b_u`, where `p` is the
//!   private user vector (`[dim]`) and the `e_*` are embeddings (`[context_dim]` each) of the
//!   generic, implicit context signals: time-of-day bucket (6), weekday (7), device class (3).
//! - **Item tower**: `v = q_i + W_f · f_i`, where `q_i` is the item embedding (`[dim]`) and `f_i`
//!   optional item metadata (e.g. MovieLens's 19 genre flags, `[features]`).
//! - **Score**: `u · v`.
//!
//! The federated split: [`TwoTower::user`] (the private vectors; `[1, dim]` on a device) never
//! leaves the device; everything in [`TwoTowerGlobal`] — item embeddings, the feature projection,
//! the context embeddings and the user-tower projection — is global and shared through the
//! coordinator. Its flat layout ([`crate::flat`], rows of `dim`): rows `0..items` are the item
//! embeddings (so a client's update touches only its items' rows plus the dense rows), followed by
//! the dense weights packed into rows, zero-padded.

use crate::burn_mf::index_tensor;
use crate::data::events::{Context, DEVICE_CLASSES, TIME_BUCKETS, WEEKDAYS};
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::log_sigmoid;

/// Configuration of [`TwoTower`].
#[derive(Config, Debug)]
pub struct TwoTowerConfig {
    /// Rows of the private user table (1 on a device).
    pub users: usize,
    /// Items in the catalogue.
    pub items: usize,
    /// Dimension of user and item representations.
    #[config(default = 32)]
    pub dim: usize,
    /// Number of item metadata features (0 = none).
    #[config(default = 0)]
    pub item_features: usize,
    /// Dimension of each context embedding.
    #[config(default = 4)]
    pub context_dim: usize,
    /// Standard deviation of the embeddings' initialisation.
    #[config(default = 0.1)]
    pub init_std: f64,
}

/// The global part of [`TwoTower`].
#[derive(Module, Debug)]
pub struct TwoTowerGlobal {
    /// `[items, dim]` item embeddings (first, so they occupy rows `0..items` of the flat view).
    pub item: Embedding,
    /// `[features → dim]` projection of item metadata, if the catalogue has features.
    pub features: Option<Linear>,
    /// `[6, context_dim]` time-of-day bucket embeddings.
    pub time_of_day: Embedding,
    /// `[7, context_dim]` weekday embeddings.
    pub weekday: Embedding,
    /// `[3, context_dim]` device-class embeddings. (Not named `device`: burn's `Module` derive uses
    /// that name for its own argument.)
    pub device_class: Embedding,
    /// `[dim + 3·context_dim → dim]` user-tower projection.
    pub user_proj: Linear,
}

/// The two-tower model.
#[derive(Module, Debug)]
pub struct TwoTower {
    /// `[users, dim]` private user vectors.
    pub user: Embedding,
    /// Everything shared.
    pub global: TwoTowerGlobal,
}

impl TwoTowerConfig {
    /// Builds the model on `device`. The user-tower projection starts as the identity on `p` (and
    /// zero on the context), so an untrained model ranks like plain matrix factorisation.
    pub fn init(&self, device: &Device) -> TwoTower {
        let normal = Initializer::Normal { mean: 0.0, std: self.init_std };
        let emb =
            |n: usize, d: usize| EmbeddingConfig::new(n, d).with_initializer(normal.clone()).init(device);
        let d_in = self.dim + 3 * self.context_dim;
        let mut identity = vec![0.0f32; d_in * self.dim];
        for k in 0..self.dim {
            identity[k * self.dim + k] = 1.0; // weight is [d_input, d_output], row-major
        }
        let mut user_proj = LinearConfig::new(d_in, self.dim).init(device);
        user_proj.weight = user_proj.weight.map(|w| {
            Tensor::<2>::from_data(TensorData::new(identity, [d_in, self.dim]), &w.device())
                .set_require_grad(w.is_require_grad())
        });
        TwoTower {
            user: emb(self.users, self.dim),
            global: TwoTowerGlobal {
                item: emb(self.items, self.dim),
                features: (self.item_features > 0).then(|| {
                    LinearConfig::new(self.item_features, self.dim)
                        .with_bias(false)
                        .with_initializer(Initializer::Normal { mean: 0.0, std: 0.01 })
                        .init(device)
                }),
                time_of_day: emb(TIME_BUCKETS, self.context_dim),
                weekday: emb(WEEKDAYS, self.context_dim),
                device_class: emb(DEVICE_CLASSES, self.context_dim),
                user_proj,
            },
        }
    }
}

/// Item metadata for the whole catalogue: `items × features` values, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemFeatures {
    /// Features per item.
    pub features: usize,
    /// The values.
    pub values: Vec<f32>,
}

/// A batch of (user, context, positive, negative) examples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// User rows.
    pub users: Vec<u32>,
    /// Context of each example.
    pub contexts: Vec<Context>,
    /// Positive items.
    pub pos: Vec<u32>,
    /// Negative items.
    pub neg: Vec<u32>,
}

impl TwoTower {
    /// User representations `[B, dim]`.
    pub fn user_repr(&self, users: &[u32], contexts: &[Context]) -> Tensor<2> {
        let device = self.global.item.weight.val().device();
        let g = &self.global;
        let p = self.user.weight.val().select(0, index_tensor(users, &device));
        let t: Vec<u32> = contexts.iter().map(|c| u32::from(c.time_of_day)).collect();
        let w: Vec<u32> = contexts.iter().map(|c| u32::from(c.weekday)).collect();
        let d: Vec<u32> = contexts.iter().map(|c| c.device.index() as u32).collect();
        let et = g.time_of_day.weight.val().select(0, index_tensor(&t, &device));
        let ew = g.weekday.weight.val().select(0, index_tensor(&w, &device));
        let ed = g.device_class.weight.val().select(0, index_tensor(&d, &device));
        g.user_proj.forward(Tensor::cat(vec![p, et, ew, ed], 1))
    }

    /// Item representations `[B, dim]`.
    pub fn item_repr(&self, items: &[u32], features: Option<&ItemFeatures>) -> Tensor<2> {
        let device = self.global.item.weight.val().device();
        let q = self.global.item.weight.val().select(0, index_tensor(items, &device));
        match (&self.global.features, features) {
            (Some(proj), Some(f)) if f.features > 0 => {
                let mut rows = Vec::with_capacity(items.len() * f.features);
                for &i in items {
                    let start = i as usize * f.features;
                    match f.values.get(start..start + f.features) {
                        Some(r) => rows.extend_from_slice(r),
                        None => rows.extend(std::iter::repeat_n(0.0, f.features)),
                    }
                }
                let x = Tensor::<2>::from_data(TensorData::new(rows, [items.len(), f.features]), &device);
                q + proj.forward(x)
            }
            _ => q,
        }
    }

    /// Mean BPR loss of a batch plus `reg/2 ·` the squared norms of the rows it uses.
    pub fn bpr_loss(&self, batch: &Batch, features: Option<&ItemFeatures>, reg: f32) -> Tensor<1> {
        let u = self.user_repr(&batch.users, &batch.contexts);
        let vi = self.item_repr(&batch.pos, features);
        let vj = self.item_repr(&batch.neg, features);
        let x: Tensor<1> = (u.clone() * (vi.clone() - vj.clone())).sum_dim(1).squeeze_dim(1);
        let n = batch.users.len().max(1) as f32;
        let norms = (u.clone() * u).sum() + (vi.clone() * vi).sum() + (vj.clone() * vj).sum();
        log_sigmoid(x).sum().neg().div_scalar(n) + norms.mul_scalar(reg / (2.0 * n))
    }

    /// Scores of every item for user row `user` in `context`: `[items]`.
    pub fn score_all(&self, user: u32, context: Context, features: Option<&ItemFeatures>) -> Vec<f32> {
        let items = self.global.item.weight.shape().dims::<2>()[0];
        let all: Vec<u32> = (0..items as u32).collect();
        let u = self.user_repr(&[user], &[context]); // [1, d]
        let v = self.item_repr(&all, features); // [items, d]
        u.matmul(v.transpose())
            .try_into_data()
            .ok()
            .and_then(|d| d.try_into_vec::<f32>().ok())
            .unwrap_or_default()
    }
}

/// Trains a device's two-tower model (one private user row) on its examples for `cfg.epochs`
/// epochs of SGD (one learning rate, `cfg.item_lr`, for all parameters) and returns the trained
/// model with the row-sparse change of its global part: the item rows the client touched and the
/// dense rows (context embeddings, projections). The user vector is never part of the update.
pub fn local_train(
    model: TwoTower,
    examples: &crate::data::events::Examples,
    features: Option<&ItemFeatures>,
    cfg: &crate::mf::LocalTraining,
    rng: &mut impl rand::Rng,
) -> Result<(TwoTower, crate::mf::LocalResult), crate::mf::TrainError> {
    use burn::optim::{GradientsParams, SgdConfig};
    use rand::RngExt;
    use starling_proto::update::Update;

    let dim = model.global.item.weight.shape().dims::<2>()[1] as u32;
    let items = model.global.item.weight.shape().dims::<2>()[0] as u32;
    let shape = crate::flat::shape_of(&model.global, dim).map_err(|_| crate::mf::TrainError::Diverged)?;
    let before = crate::flat::to_flat(&model.global, dim).map_err(|_| crate::mf::TrainError::Diverged)?;
    let positives = examples.positive_items();
    if let Some(&bad) = positives.iter().find(|&&i| i >= items) {
        return Err(crate::mf::TrainError::UnknownItem(bad));
    }
    if positives.is_empty() {
        return Ok((model, crate::mf::LocalResult { update: Update::zero(shape), examples: 0, loss: 0.0 }));
    }
    let mut model = model;
    let mut optim = SgdConfig::new().init();
    let mut order: Vec<usize> = (0..examples.positives.len()).collect();
    let (mut loss_sum, mut steps) = (0.0f64, 0usize);
    for _ in 0..cfg.epochs {
        for k in (1..order.len()).rev() {
            let j = rng.random_range(0..=k);
            order.swap(k, j);
        }
        for chunk in order.chunks(cfg.batch_size.max(1)) {
            let mut batch = Batch::default();
            for &k in chunk {
                let p = examples.positives[k];
                // Skipped items are hard negatives when the user has any; otherwise uniform.
                let neg = if !examples.negatives.is_empty() && rng.random_range(0..2u8) == 0 {
                    Some(examples.negatives[rng.random_range(0..examples.negatives.len())])
                } else {
                    crate::mf::sample_negative(items, &positives, rng)
                };
                let Some(neg) = neg else { continue };
                batch.users.push(0);
                batch.contexts.push(p.context);
                batch.pos.push(p.item);
                batch.neg.push(neg);
            }
            if batch.users.is_empty() {
                continue;
            }
            let loss = model.bpr_loss(&batch, features, cfg.reg);
            loss_sum += f64::from(loss.clone().into_scalar::<f32>());
            steps += 1;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(f64::from(cfg.item_lr), model, grads);
        }
    }
    let after = crate::flat::to_flat(&model.global, dim).map_err(|_| crate::mf::TrainError::Diverged)?;
    if after.iter().any(|v| !v.is_finite()) {
        return Err(crate::mf::TrainError::Diverged);
    }
    let row_len = dim as usize;
    let mut rows = Vec::new();
    let mut values = Vec::new();
    for (r, (a, b)) in after.chunks_exact(row_len).zip(before.chunks_exact(row_len)).enumerate() {
        if a.iter().zip(b).any(|(x, y)| x.to_bits() != y.to_bits()) {
            rows.push(r as u32);
            values.extend(a.iter().zip(b).map(|(x, y)| x - y));
        }
    }
    let update = Update::sparse(shape, rows, values)?;
    let loss = if steps > 0 { (loss_sum / steps as f64) as f32 } else { 0.0 };
    Ok((model, crate::mf::LocalResult { update, examples: positives.len(), loss }))
}

/// The flat shape of the global part of a device's two-tower model (`items` items, dimension
/// `dim`, `context_dim`-dimensional context embeddings, no item features).
pub fn flat_shape(
    items: u32,
    dim: u32,
    context_dim: u32,
) -> Result<starling_proto::update::ModelShape, starling_proto::update::UpdateError> {
    let d = dim as usize;
    let c = context_dim as usize;
    let d_in = d + 3 * c;
    let n = items as usize * d
        + (crate::data::events::TIME_BUCKETS
            + crate::data::events::WEEKDAYS
            + crate::data::events::DEVICE_CLASSES)
            * c
        + d_in * d
        + d;
    let rows = n.div_ceil(d.max(1));
    starling_proto::update::ModelShape::new(u32::try_from(rows).unwrap_or(u32::MAX), dim)
}

fn config(items: u32, dim: u32, context_dim: u32) -> TwoTowerConfig {
    TwoTowerConfig::new(1, items as usize).with_dim(dim as usize).with_context_dim(context_dim as usize)
}

/// An initial flat global part, a pure function of `seed`.
pub fn init_flat(
    items: u32,
    dim: u32,
    context_dim: u32,
    seed: u64,
    init_std: f32,
) -> Result<Vec<f32>, starling_proto::update::UpdateError> {
    let device = Device::flex();
    device.seed(seed);
    let model = config(items, dim, context_dim).with_init_std(f64::from(init_std)).init(&device);
    crate::flat::to_flat(&model.global, dim).map_err(|e| match e {
        crate::flat::FlatError::Shape(s) => s,
        _ => starling_proto::update::UpdateError::EmptyShape,
    })
}

fn load(
    def: &crate::family::ModelDef,
    context_dim: u32,
    global: &[f32],
    private: &[f32],
    device: &Device,
) -> Result<TwoTower, crate::mf::TrainError> {
    let shape_err = |_| crate::mf::TrainError::Shape {
        items: global.len(),
        user: private.len(),
        rows: def.items,
        dim: def.dim,
    };
    if private.len() != def.dim as usize {
        return Err(shape_err(()));
    }
    let mut model = config(def.items, def.dim, context_dim).init(device);
    model.global = crate::flat::load_flat(model.global, def.dim, global).map_err(|_| shape_err(()))?;
    let user = Tensor::<2>::from_data(TensorData::new(private.to_vec(), [1, def.dim as usize]), device);
    model.user.weight = model.user.weight.map(|w| user.set_require_grad(w.is_require_grad()));
    Ok(model)
}

/// [`crate::family::ModelDef::train`] for the two-tower model (through burn, `Autodiff<Flex>`).
pub fn train_flat(
    def: &crate::family::ModelDef,
    context_dim: u32,
    global: &[f32],
    private: &mut [f32],
    examples: &crate::data::events::Examples,
    cfg: &crate::mf::LocalTraining,
    rng: &mut impl rand::Rng,
) -> Result<crate::mf::LocalResult, crate::mf::TrainError> {
    let device = Device::flex().autodiff();
    let model = load(def, context_dim, global, private, &device)?;
    let (model, result) = local_train(model, examples, None, cfg, rng)?;
    let user = model
        .user
        .weight
        .val()
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|_| crate::mf::TrainError::Diverged)?;
    if user.len() != private.len() || !user.iter().all(|v| v.is_finite()) {
        return Err(crate::mf::TrainError::Diverged);
    }
    private.copy_from_slice(&user);
    Ok(result)
}

/// [`crate::family::ModelDef::score_all`] for the two-tower model.
pub fn score_flat(
    def: &crate::family::ModelDef,
    context_dim: u32,
    global: &[f32],
    private: &[f32],
    query: &crate::family::Query<'_>,
    out: &mut Vec<f32>,
) {
    let device = Device::flex();
    let Ok(model) = load(def, context_dim, global, private, &device) else {
        out.extend(std::iter::repeat_n(f32::NAN, def.items as usize));
        return;
    };
    let context = query.context.unwrap_or(Context::at(12 * 3600, crate::data::events::DeviceClass::Phone));
    out.extend(model.score_all(0, context, None));
}
