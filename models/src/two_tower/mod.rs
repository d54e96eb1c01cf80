//! The context-aware two-tower model for devices.
//!
//! - **User tower**: `u = W · [p ; h ; e_time ; e_weekday ; e_device ; e_battery ; e_network ;
//!   e_region] + b`, where `p` is the private user vector (`[dim]`), `h` the mean of the item
//!   embeddings of the user's history (personal context; `0` for an empty history) and the `e_*`
//!   are embeddings (`[context_dim]` each) of the generic context: time-of-day bucket (6), weekday
//!   (7), device class (3), battery level (4 + unknown), network type (3 + unknown) and region
//!   bucket (16 + unknown).
//! - **Item tower**: `v_i = q_i`, the item embedding.
//! - **Score**: `u · q_i`.
//!
//! The federated split: `p` ([`crate::family::ModelDef::private_len`] `= dim` values) never
//! leaves the device; everything else is global. Flat layout of the global part
//! ([`TwoTowerLayout`], rows of `dim` values): rows `0..items` are the item embeddings `q_i`
//! (the same convention as matrix factorisation), then, packed one after the other and
//! zero-padded to a whole row, the context tables (time, weekday, device, battery, network,
//! region; `context_dim` values per row, row-major), the projection `W` (`[input_dim, dim]`,
//! row-major, `u_k = Σ_r x_r W[r][k] + b_k`) and the bias `b` (`[dim]`). A device's update
//! therefore touches the rows of the items it trained on and the dense rows after them.
//!
//! `W` starts as the identity on `p` and zero on `h` and the context, so an untrained model
//! ranks exactly like matrix factorisation.
//!
//! Training ([`train_flat`], through burn's autodiff on the `Flex` backend) builds the model over
//! a **local slice**: only the item rows a round touches (the positives — which are also the
//! history — and the sampled negatives) are copied into the burn tensors, and the result is
//! scattered back as a row-sparse update. Scoring ([`score_flat`]) is plain Rust on the flat
//! slice: `u` once, then one dot product per item.

mod train;

pub use train::{PROJECTION_LR_SCALE, train_flat};

use crate::data::events::{
    BATTERY_LEVELS, Context, DEVICE_CLASSES, NETWORK_TYPES, REGIONS, TIME_BUCKETS, WEEKDAYS,
};
use crate::family::{ModelDef, Query};
use rand::SeedableRng;
use starling_proto::update::{ModelShape, UpdateError};

/// Context inputs of the user tower (time, weekday, device, battery, network, region).
pub const CONTEXT_FIELDS: usize = 6;

/// Rows of each context table, in layout order. The optional fields (battery, network, region)
/// have one extra, last row: "unknown".
pub const CONTEXT_TABLE_ROWS: [usize; CONTEXT_FIELDS] =
    [TIME_BUCKETS, WEEKDAYS, DEVICE_CLASSES, BATTERY_LEVELS + 1, NETWORK_TYPES + 1, REGIONS + 1];

/// Rows of all context tables together.
pub const CONTEXT_ROWS: usize =
    TIME_BUCKETS + WEEKDAYS + DEVICE_CLASSES + (BATTERY_LEVELS + 1) + (NETWORK_TYPES + 1) + (REGIONS + 1);

/// Where the two-tower model's global parameters sit in the flat view (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TwoTowerLayout {
    /// Items in the catalogue.
    pub items: u32,
    /// Dimension of user and item representations (the row length).
    pub dim: u32,
    /// Dimension of each context embedding.
    pub context_dim: u32,
}

impl TwoTowerLayout {
    /// The layout of a model.
    pub fn new(items: u32, dim: u32, context_dim: u32) -> Self {
        Self { items, dim, context_dim }
    }

    /// Length of the user tower's input `[p ; h ; e_*]`: `2·dim + 6·context_dim`.
    pub fn input_dim(&self) -> usize {
        2 * self.dim as usize + CONTEXT_FIELDS * self.context_dim as usize
    }

    /// Flat index of the first context table (= `items · dim`, the start of row `items`).
    pub fn context_offset(&self) -> usize {
        self.items as usize * self.dim as usize
    }

    /// Flat index of the projection `W`.
    pub fn projection_offset(&self) -> usize {
        self.context_offset() + CONTEXT_ROWS * self.context_dim as usize
    }

    /// Flat index of the bias `b`.
    pub fn bias_offset(&self) -> usize {
        self.projection_offset() + self.input_dim() * self.dim as usize
    }

    /// Parameters (without the padding of the last row).
    pub fn param_len(&self) -> usize {
        self.bias_offset() + self.dim as usize
    }

    /// The protocol shape of the global part (rows of `dim`, the last one zero-padded).
    pub fn shape(&self) -> Result<ModelShape, UpdateError> {
        let rows = self.param_len().div_ceil(self.dim.max(1) as usize);
        ModelShape::new(u32::try_from(rows).unwrap_or(u32::MAX), self.dim)
    }

    /// Rows of the context tables a context selects, as row indices into the concatenated
    /// tables (`0..CONTEXT_ROWS`), one per field; a missing or out-of-range optional field selects
    /// its table's "unknown" row. `None` if the time of day or weekday is out of range.
    pub fn context_rows(context: &Context) -> Option<[usize; CONTEXT_FIELDS]> {
        let t = usize::from(context.time_of_day);
        let w = usize::from(context.weekday);
        if t >= TIME_BUCKETS || w >= WEEKDAYS {
            return None;
        }
        let battery = context.battery.map_or(BATTERY_LEVELS, |b| b.index());
        let network = context.network.map_or(NETWORK_TYPES, |n| n.index());
        let region = context.region.map(usize::from).filter(|&r| r < REGIONS).unwrap_or(REGIONS);
        let local = [t, w, context.device.index(), battery, network, region];
        let mut out = [0; CONTEXT_FIELDS];
        let mut start = 0;
        for f in 0..CONTEXT_FIELDS {
            out[f] = start + local[f];
            start += CONTEXT_TABLE_ROWS[f];
        }
        Some(out)
    }
}

/// The flat shape of the global part of the two-tower model (`items` items, dimension `dim`,
/// `context_dim`-dimensional context embeddings). Equals the length of what [`init_flat`] makes.
pub fn flat_shape(items: u32, dim: u32, context_dim: u32) -> Result<ModelShape, UpdateError> {
    TwoTowerLayout::new(items, dim, context_dim).shape()
}

/// An initial flat global part, a pure function of `seed`: item rows and context tables
/// `N(0, init_std²)`, `W` the identity on `p` (zero elsewhere), `b = 0`, padding 0.
pub fn init_flat(
    items: u32,
    dim: u32,
    context_dim: u32,
    seed: u64,
    init_std: f32,
) -> Result<Vec<f32>, UpdateError> {
    let layout = TwoTowerLayout::new(items, dim, context_dim);
    let shape = layout.shape()?;
    let mut v = vec![0.0f32; shape.len()];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let std = if init_std.is_finite() { init_std } else { 0.0 };
    for x in &mut v[..layout.projection_offset()] {
        let z: f32 = rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng);
        *x = z * std;
    }
    let d = dim as usize;
    let w = layout.projection_offset();
    for k in 0..d {
        v[w + k * d + k] = 1.0;
    }
    Ok(v)
}

/// Writes the user representation `u` (`dim` values) for `private` and `query` into `u`, using
/// `h` (`dim` values) as scratch. History items outside the catalogue are ignored; an
/// out-of-range context field counts as unknown (time, weekday: the tables' mean row). The
/// slices must have the layout's lengths (checked by the callers).
pub fn user_vector(
    layout: &TwoTowerLayout,
    global: &[f32],
    private: &[f32],
    query: &Query<'_>,
    u: &mut [f32],
    h: &mut [f32],
) {
    let d = layout.dim as usize;
    let c = layout.context_dim as usize;
    let w = &global[layout.projection_offset()..layout.bias_offset()];
    u.copy_from_slice(&global[layout.bias_offset()..layout.bias_offset() + d]);
    let add_row = |u: &mut [f32], x: f32, r: usize| {
        if x != 0.0 {
            for (uk, &wk) in u.iter_mut().zip(&w[r * d..(r + 1) * d]) {
                *uk += x * wk;
            }
        }
    };
    for (r, &x) in private.iter().enumerate() {
        add_row(u, x, r);
    }
    h.iter_mut().for_each(|x| *x = 0.0);
    let mut n = 0usize;
    for &j in query.history {
        if j < layout.items {
            let q = &global[j as usize * d..(j as usize + 1) * d];
            for (hk, &qk) in h.iter_mut().zip(q) {
                *hk += qk;
            }
            n += 1;
        }
    }
    if n > 0 {
        let inv = 1.0 / n as f32;
        for (r, &x) in h.iter().enumerate() {
            add_row(u, x * inv, d + r);
        }
    }
    let tables = &global[layout.context_offset()..layout.projection_offset()];
    let rows = query.context.as_ref().and_then(TwoTowerLayout::context_rows);
    let mut start = 0;
    for f in 0..CONTEXT_FIELDS {
        let n_rows = CONTEXT_TABLE_ROWS[f];
        for k in 0..c {
            let e = match (rows, f) {
                (Some(rows), _) => tables[rows[f] * c + k],
                // No context: the mean row of the always-known fields, "unknown" for the others.
                (None, 0..3) => {
                    (start..start + n_rows).map(|r| tables[r * c + k]).sum::<f32>() / n_rows as f32
                }
                (None, _) => tables[(start + n_rows - 1) * c + k],
            };
            add_row(u, e, 2 * d + f * c + k);
        }
        start += n_rows;
    }
}

/// [`ModelDef::score_all`] for the two-tower model: appends `items` scores to `out` (all NaN if
/// `global` or `private` has the wrong length; NaN parameters give NaN scores). Allocates
/// nothing beyond `out`.
pub fn score_flat(
    def: &ModelDef,
    context_dim: u32,
    global: &[f32],
    private: &[f32],
    query: &Query<'_>,
    out: &mut Vec<f32>,
) {
    let layout = TwoTowerLayout::new(def.items, def.dim, context_dim);
    let items = def.items as usize;
    let d = def.dim as usize;
    let ok = layout.shape().is_ok_and(|s| s.len() == global.len()) && private.len() == d;
    if !ok {
        out.extend(std::iter::repeat_n(f32::NAN, items));
        return;
    }
    // `u` and the scratch `h` live in `out`'s tail until the scores are written.
    let base = out.len();
    out.resize(base + items + 2 * d, 0.0);
    let (scores, tail) = out[base..].split_at_mut(items);
    let (u, h) = tail.split_at_mut(d);
    user_vector(&layout, global, private, query, u, h);
    for (s, q) in scores.iter_mut().zip(global.chunks_exact(d)) {
        *s = q.iter().zip(&*u).map(|(a, b)| a * b).sum();
    }
    out.truncate(base + items);
}
