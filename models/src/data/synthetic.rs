//! A synthetic population with a known latent structure, generated lazily.
//!
//! Ground truth: every item has a latent vector and a popularity that follows a power law; every
//! user has a latent vector and an activity level drawn from a log-normal distribution. A user's
//! interactions are drawn without replacement with probability ∝ `exp(affinity · uᵀv + pop_i)`
//! (Gumbel top-k), with timestamps spread over the simulated period and a context (time-of-day
//! bucket, weekday, device class) per interaction.
//!
//! Only the item side (`items × dim` floats) is held in memory. A user is a pure function of
//! `(seed, user id)`: [`Population::user`] regenerates it on demand, so a population of millions
//! costs nothing until its users are asked for, and the same seed always gives the same data.

use super::Interaction;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, StandardNormal};

/// Settings of a synthetic population.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticConfig {
    /// Number of users (may be huge: users are generated on demand).
    pub users: u64,
    /// Number of items.
    pub items: u32,
    /// Dimension of the ground-truth latent space.
    pub latent_dim: usize,
    /// Strength of personal taste against popularity (0 = popularity only).
    pub affinity: f32,
    /// Power-law exponent of item popularity (weight of the item of rank r ∝ r^−exponent).
    pub popularity_exponent: f32,
    /// Median number of interactions per user.
    pub median_interactions: f32,
    /// Spread (σ of the log) of the interactions per user.
    pub activity_sigma: f32,
    /// Fewest interactions a user has.
    pub min_interactions: u32,
    /// Most interactions a user has.
    pub max_interactions: u32,
    /// Start of the simulated period, seconds since the Unix epoch.
    pub start_time: i64,
    /// Length of the simulated period in days.
    pub days: u32,
    /// Seed: the same seed gives the same population.
    pub seed: u64,
    /// Strength `S` of the context effect (0 = none: users are exactly those of a population
    /// without it). With `S ≠ 0` every (time-of-day bucket × device class) cell `c` has a latent
    /// shift `w_c` and an interaction in cell `c` picks item `i` ∝ `exp(affinity·uᵀv_i + pop_i +
    /// S·w_cᵀv_i)` among the items not chosen yet.
    pub context_effect: f32,
    /// Whether [`Population::user_events`] reports a battery level and network type per event
    /// and a region per user (random, independent of the items; drawn from their own stream, so
    /// the events are otherwise unchanged).
    pub device_state: bool,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            users: 1000,
            items: 1000,
            latent_dim: 8,
            affinity: 5.0,
            popularity_exponent: 0.8,
            median_interactions: 40.0,
            activity_sigma: 0.6,
            min_interactions: 5,
            max_interactions: 400,
            start_time: 1_767_225_600, // 2026-01-01
            days: 90,
            seed: 1,
            context_effect: 0.0,
            device_state: false,
        }
    }
}

/// Context of an interaction: the "generic, implicit" signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SyntheticContext {
    /// Hour of the day, bucketed into 0–5 (4-hour buckets).
    pub time_of_day: u8,
    /// Day of the week, 0 = Monday.
    pub weekday: u8,
    /// Device class: 0 phone, 1 tablet, 2 desktop.
    pub device: u8,
}

/// One generated user.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticUser {
    /// The user id.
    pub id: u64,
    /// Interactions in time order.
    pub interactions: Vec<Interaction>,
    /// Context of each interaction (same order).
    pub contexts: Vec<SyntheticContext>,
}

/// A population: the item side in memory, users on demand.
#[derive(Clone, Debug)]
pub struct Population {
    config: SyntheticConfig,
    item_factors: Vec<f32>,
    item_bias: Vec<f32>,
    /// `S·w_cᵀv_i` per context cell `c` (time bucket · 3 + device), `CELLS × items`; empty when
    /// `S = 0`.
    context_shift: Vec<f32>,
}

/// Context cells of the synthetic context effect: time-of-day buckets × device classes.
pub const CELLS: usize = 6 * 3;

/// Why a population could not be built.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SyntheticError {
    /// A setting is out of range; the text says which.
    #[error("invalid synthetic population setting: {0}")]
    Invalid(String),
}

fn mix(seed: u64, a: u64) -> u64 {
    // SplitMix64 finaliser over (seed, a): decorrelated per-user streams.
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Population {
    /// Builds the item side of a population.
    pub fn new(config: SyntheticConfig) -> Result<Self, SyntheticError> {
        let bad = |s: &str| Err(SyntheticError::Invalid(s.into()));
        if config.items < 2 || config.users == 0 || config.latent_dim == 0 {
            return bad("need at least 2 items, 1 user and a latent dimension");
        }
        if config.min_interactions < 2 || config.max_interactions < config.min_interactions {
            return bad("need 2 <= min_interactions <= max_interactions");
        }
        if config.max_interactions >= config.items {
            return bad("max_interactions must be below the number of items");
        }
        if !(config.median_interactions > 0.0 && config.activity_sigma >= 0.0 && config.affinity.is_finite())
        {
            return bad("median_interactions must be positive, activity_sigma non-negative");
        }
        if config.days == 0 {
            return bad("days must be at least 1");
        }
        if !config.context_effect.is_finite() {
            return bad("context_effect must be finite");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(mix(config.seed, u64::MAX));
        let d = config.latent_dim;
        let scale = 1.0 / (d as f32).sqrt();
        let item_factors: Vec<f32> =
            (0..config.items as usize * d).map(|_| rng.sample::<f32, _>(StandardNormal) * scale).collect();
        // Popularity ranks are a random permutation, so popularity is independent of item id.
        let mut ranks: Vec<u32> = (0..config.items).collect();
        for k in (1..ranks.len()).rev() {
            let j = rng.random_range(0..=k);
            ranks.swap(k, j);
        }
        let item_bias = ranks.iter().map(|&r| -config.popularity_exponent * ((r + 1) as f32).ln()).collect();
        let context_shift = if config.context_effect != 0.0 {
            // Its own stream, so the rest of the population does not depend on S. A cell's shift is
            // the sum of a time-of-day shift and a device shift (scaled like a user's taste vector).
            let mut rng = ChaCha8Rng::seed_from_u64(mix(config.seed, u64::MAX - 1));
            let time: Vec<f32> = (0..6 * d).map(|_| rng.sample::<f32, _>(StandardNormal) * scale).collect();
            let device: Vec<f32> = (0..3 * d).map(|_| rng.sample::<f32, _>(StandardNormal) * scale).collect();
            let mut shift = Vec::with_capacity(CELLS * config.items as usize);
            for cell in 0..CELLS {
                let (t, dev) = (cell / 3, cell % 3);
                let w: Vec<f32> = (0..d)
                    .map(|k| (time[t * d + k] + device[dev * d + k]) * std::f32::consts::FRAC_1_SQRT_2)
                    .collect();
                shift.extend(
                    item_factors
                        .chunks_exact(d)
                        .map(|v| config.context_effect * v.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>()),
                );
            }
            shift
        } else {
            Vec::new()
        };
        Ok(Self { config, item_factors, item_bias, context_shift })
    }

    /// The settings.
    pub fn config(&self) -> &SyntheticConfig {
        &self.config
    }

    /// Number of users.
    pub fn users(&self) -> u64 {
        self.config.users
    }

    /// Number of items.
    pub fn items(&self) -> u32 {
        self.config.items
    }

    /// The start of user `id`'s generation: its stream, its taste vector and its number of
    /// interactions.
    fn head(&self, id: u64) -> (ChaCha8Rng, Vec<f32>, usize) {
        let c = &self.config;
        let d = c.latent_dim;
        let mut rng = ChaCha8Rng::seed_from_u64(mix(c.seed, id));
        let scale = 1.0 / (d as f32).sqrt();
        let u: Vec<f32> = (0..d).map(|_| rng.sample::<f32, _>(StandardNormal) * scale).collect();
        let activity = LogNormal::new(f64::from(c.median_interactions).ln(), f64::from(c.activity_sigma))
            .map(|ln| ln.sample(&mut rng))
            .unwrap_or(f64::from(c.median_interactions));
        let n = (activity.round() as u32).clamp(c.min_interactions, c.max_interactions) as usize;
        (rng, u, n)
    }

    /// How many interactions user `id` has (`user(id).interactions.len()`, without generating
    /// them: a few dozen operations instead of one per item).
    pub fn interaction_count(&self, id: u64) -> usize {
        self.head(id).2
    }

    /// Generates user `id` (a pure function of the seed and the id).
    pub fn user(&self, id: u64) -> SyntheticUser {
        if !self.context_shift.is_empty() {
            return self.user_in_context(id);
        }
        let c = &self.config;
        let d = c.latent_dim;
        let (mut rng, u, n) = self.head(id);
        // Gumbel top-n: sampling n items without replacement ∝ exp(logit).
        let mut keyed: Vec<(f32, u32)> = self
            .item_factors
            .chunks_exact(d)
            .zip(&self.item_bias)
            .enumerate()
            .map(|(i, (v, &b))| {
                let logit = c.affinity * v.iter().zip(&u).map(|(a, b)| a * b).sum::<f32>() + b;
                let uniform: f32 = rng.random_range(f32::MIN_POSITIVE..1.0);
                (logit - (-uniform.ln()).ln(), i as u32)
            })
            .collect();
        keyed.select_nth_unstable_by(n - 1, |a, b| b.0.total_cmp(&a.0));
        keyed.truncate(n);
        keyed.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let period = i64::from(c.days) * 86_400;
        let mut times: Vec<i64> = (0..n).map(|_| c.start_time + rng.random_range(0..period)).collect();
        times.sort_unstable();
        let device = rng.random_range(0..3u8);
        let mut interactions = Vec::with_capacity(n);
        let mut contexts = Vec::with_capacity(n);
        for ((_, item), t) in keyed.into_iter().zip(times) {
            let rating = 1.0 + rng.random_range(0..5u8) as f32;
            interactions.push(Interaction { user: id as u32, item, rating, timestamp: t });
            let secs = t.rem_euclid(86_400);
            // 1970-01-01 was a Thursday (weekday 3 with Monday = 0).
            let weekday = ((t.div_euclid(86_400) + 3).rem_euclid(7)) as u8;
            let dev = if rng.random_range(0..10u8) < 8 { device } else { rng.random_range(0..3u8) };
            contexts.push(SyntheticContext { time_of_day: (secs / 14_400) as u8, weekday, device: dev });
        }
        SyntheticUser { id, interactions, contexts }
    }

    /// [`Population::user`] with a context effect: the contexts are drawn first (time from the
    /// timestamp, device as without the effect), then each interaction's item ∝ `exp(base_i +
    /// shift_{c,i})` among the items not chosen yet — by rejection from the cell's distribution
    /// (exact; its cumulative table is built once per cell the user visits), falling back to a
    /// table without the chosen items after many rejections.
    fn user_in_context(&self, id: u64) -> SyntheticUser {
        let c = &self.config;
        let d = c.latent_dim;
        let items = c.items as usize;
        let (mut rng, u, n) = self.head(id);
        let base: Vec<f32> = self
            .item_factors
            .chunks_exact(d)
            .zip(&self.item_bias)
            .map(|(v, &b)| c.affinity * v.iter().zip(&u).map(|(a, b)| a * b).sum::<f32>() + b)
            .collect();
        let period = i64::from(c.days) * 86_400;
        let mut times: Vec<i64> = (0..n).map(|_| c.start_time + rng.random_range(0..period)).collect();
        times.sort_unstable();
        let device = rng.random_range(0..3u8);
        let mut chosen = vec![false; items];
        let mut tables: Vec<Option<Vec<f64>>> = vec![None; CELLS];
        let cumulative = |cell: usize, chosen: Option<&[bool]>| -> Vec<f64> {
            let shift = &self.context_shift[cell * items..(cell + 1) * items];
            let max = base.iter().zip(shift).map(|(a, b)| a + b).fold(f32::NEG_INFINITY, f32::max);
            let mut acc = 0.0f64;
            (0..items)
                .map(|i| {
                    if !chosen.is_some_and(|ch| ch[i]) {
                        acc += f64::from(base[i] + shift[i] - max).exp();
                    }
                    acc
                })
                .collect()
        };
        let draw = |cdf: &[f64], rng: &mut ChaCha8Rng| -> usize {
            let total = cdf.last().copied().unwrap_or(0.0);
            let x = rng.random_range(0.0..1.0f64) * total;
            cdf.partition_point(|&v| v <= x).min(cdf.len() - 1)
        };
        let mut interactions = Vec::with_capacity(n);
        let mut contexts = Vec::with_capacity(n);
        for t in times {
            let rating = 1.0 + rng.random_range(0..5u8) as f32;
            let secs = t.rem_euclid(86_400);
            let weekday = ((t.div_euclid(86_400) + 3).rem_euclid(7)) as u8;
            let dev = if rng.random_range(0..10u8) < 8 { device } else { rng.random_range(0..3u8) };
            let time_of_day = (secs / 14_400) as u8;
            let cell = usize::from(time_of_day) * 3 + usize::from(dev);
            let cdf = tables[cell].get_or_insert_with(|| cumulative(cell, None));
            let mut item = None;
            for _ in 0..64 {
                let i = draw(cdf, &mut rng);
                if !chosen[i] {
                    item = Some(i);
                    break;
                }
            }
            let item = match item {
                Some(i) => i,
                None => draw(&cumulative(cell, Some(&chosen)), &mut rng),
            };
            chosen[item] = true;
            interactions.push(Interaction { user: id as u32, item: item as u32, rating, timestamp: t });
            contexts.push(SyntheticContext { time_of_day, weekday, device: dev });
        }
        SyntheticUser { id, interactions, contexts }
    }

    /// User `id`'s behaviour as app events: each interaction becomes a long view (50%), a click
    /// (25%), an add-to-cart (15%) or a purchase (10%) in its context, and one in five interactions
    /// is accompanied by a skip of an item the user never engaged with. Deterministic per seed.
    pub fn user_events(&self, id: u64) -> Vec<crate::data::events::Event> {
        use crate::data::events::{BatteryLevel, Context, DeviceClass, Event, EventKind, NetworkType};
        let user = self.user(id);
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.config.seed ^ 0xE7E7, id));
        let mut seen: Vec<u32> = user.interactions.iter().map(|x| x.item).collect();
        seen.sort_unstable();
        let mut events = Vec::with_capacity(user.interactions.len() * 6 / 5);
        // Device state from its own stream, so the rest of the events does not depend on it.
        let mut state_rng = ChaCha8Rng::seed_from_u64(mix(self.config.seed ^ 0xBA77, id));
        let region = state_rng.random_range(0..crate::data::events::REGIONS as u8);
        for (x, c) in user.interactions.iter().zip(&user.contexts) {
            let device = match c.device {
                0 => DeviceClass::Phone,
                1 => DeviceClass::Tablet,
                _ => DeviceClass::Desktop,
            };
            let mut context = Context::at(0, device);
            context.time_of_day = c.time_of_day;
            context.weekday = c.weekday;
            if self.config.device_state {
                let battery = BatteryLevel::from_index(state_rng.random_range(0..4usize));
                let network = NetworkType::from_index(state_rng.random_range(0..3usize));
                context = context.with_battery(battery).with_network(network).with_region(region);
            }
            let roll = rng.random_range(0..100u8);
            let kind = match roll {
                0..50 => EventKind::View { dwell_ms: rng.random_range(30_000..300_000) },
                50..75 => EventKind::Click,
                75..90 => EventKind::AddToCart,
                _ => EventKind::Purchase,
            };
            let at_ms = x.timestamp * 1000;
            events.push(Event { item: x.item, at_ms, kind, context });
            if rng.random_range(0..5u8) == 0 {
                let skipped = rng.random_range(0..self.config.items);
                if seen.binary_search(&skipped).is_err() {
                    events.push(Event { item: skipped, at_ms: at_ms + 1, kind: EventKind::Skip, context });
                }
            }
        }
        events
    }

    /// Every interaction of users `0..users` (for populations small enough to hold).
    pub fn interactions(&self, users: u64) -> Vec<Interaction> {
        (0..users.min(self.config.users)).flat_map(|u| self.user(u).interactions).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_per_seed_and_lazy_for_huge_populations() {
        let cfg = SyntheticConfig { users: 1_000_000, items: 500, seed: 9, ..SyntheticConfig::default() };
        let a = Population::new(cfg.clone()).unwrap();
        let b = Population::new(cfg.clone()).unwrap();
        assert_eq!(a.user(999_999), b.user(999_999));
        assert_eq!(a.user(17), b.user(17));
        assert_eq!(a.interaction_count(17), a.user(17).interactions.len());
        assert_ne!(a.user(17), a.user(18));
        let c = Population::new(SyntheticConfig { seed: 10, ..cfg }).unwrap();
        assert_ne!(a.user(17), c.user(17));
        let u = a.user(123_456);
        assert!(u.interactions.len() >= 5);
        let mut items: Vec<u32> = u.interactions.iter().map(|x| x.item).collect();
        items.sort_unstable();
        items.dedup();
        assert_eq!(items.len(), u.interactions.len(), "no repeated items");
        assert!(u.interactions.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        assert!(u.contexts.iter().all(|c| c.time_of_day < 6 && c.weekday < 7 && c.device < 3));
        let events = a.user_events(123_456);
        assert_eq!(events, b.user_events(123_456));
        let x = crate::data::events::Examples::from_events(&events);
        assert_eq!(x.positive_items(), items, "every interaction is a positive");
        assert!(events.iter().all(|e| e.validate(500).is_ok()));
    }

    #[test]
    fn popularity_is_skewed_and_invalid_settings_are_refused() {
        let p = Population::new(SyntheticConfig {
            users: 400,
            items: 300,
            max_interactions: 100,
            ..SyntheticConfig::default()
        })
        .unwrap();
        let mut counts = vec![0u32; 300];
        for x in p.interactions(400) {
            counts[x.item as usize] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top: u32 = counts[..30].iter().sum();
        let bottom: u32 = counts[270..].iter().sum();
        assert!(top > 4 * bottom.max(1), "top decile {top} vs bottom decile {bottom}");
        assert!(Population::new(SyntheticConfig { items: 1, ..SyntheticConfig::default() }).is_err());
        assert!(
            Population::new(SyntheticConfig { max_interactions: 5000, ..SyntheticConfig::default() })
                .is_err()
        );
    }
}
