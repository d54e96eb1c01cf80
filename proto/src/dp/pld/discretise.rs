//! One round of the Poisson-subsampled Gaussian: its privacy profile δ(ε) in each adjacency
//! direction, and the discretisation of its privacy-loss distribution on a uniform grid.
//!
//! With sensitivity 1, noise multiplier σ and sampling rate q, let `N₀ = N(0, σ²)`,
//! `N₁ = N(1, σ²)` and `M = (1 − q)·N₀ + q·N₁` (the output with the user's data, who takes part
//! with probability q). The two directions of add/remove adjacency give two pairs of distributions
//! and two privacy-loss distributions (PLDs):
//!
//! - **remove** (the user is removed from the data set): the pair `(M, N₀)`, loss
//!   `L(x) = ln(1 − q + q·e^{(2x−1)/(2σ²)})` for `x ~ M`, bounded below by `ln(1 − q)`;
//! - **add** (the user is added): the pair `(N₀, M)`, loss `−L(x)` for `x ~ N₀`, bounded above by
//!   `−ln(1 − q)`.
//!
//! For `q = 1` both are the Gaussian mechanism's `N(μ, 2μ)` with `μ = 1/(2σ²)`.

use super::super::accountant::{log_add, log_erfc};
use super::compose::Blocks;
use std::f64::consts::{LN_2, SQRT_2};

/// How many noise standard deviations each round's grid covers on either side: the probability
/// of a noise draw beyond it, `P(N(0,1) > Z_TAIL)`, is 10⁻²⁰. What lies beyond is not dropped:
/// the upper tail goes to the mass at +∞ (counted in full in δ), the lower tail into the lowest
/// grid point.
pub(crate) const Z_TAIL: f64 = 9.262_340_089_798_408;

/// The two adjacency directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// The pair (with the user, without): `(M, N₀)`.
    Remove,
    /// The pair (without the user, with): `(N₀, M)`.
    Add,
}

/// How a PLD is discretised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Estimate {
    /// "Connect the dots" (Doroshenko, Ghazi, Kamath, Kumar & Manurangsi 2022): the discrete PLD
    /// whose privacy profile interpolates the exact one linearly in `e^ε` between grid points.
    /// A dominating pair, so every composition of it is an upper bound.
    ConnectDots,
    /// Every loss rounded down to the grid, mass below the grid dropped: a lower bound (used to
    /// bracket the upper bound in tests).
    #[cfg_attr(not(test), allow(dead_code))]
    Optimistic,
}

/// `ln P(N(0,1) > z)`.
fn ln_phic(z: f64) -> f64 {
    log_erfc(z / SQRT_2) - LN_2
}

/// `ln P(N(0,1) ≤ z)`.
pub(crate) fn ln_phi(z: f64) -> f64 {
    ln_phic(-z)
}

/// `e^a − e^b`, 0 when `b ≥ a`.
fn exp_diff(a: f64, b: f64) -> f64 {
    if b >= a || a == f64::NEG_INFINITY { 0.0 } else { -a.exp() * (b - a).exp_m1() }
}

/// The loss `L(x) = ln(1 − q + q·e^{(2x−1)/(2σ²)})` of the remove direction at output `x`.
pub(crate) fn loss_remove(q: f64, sigma: f64, x: f64) -> f64 {
    log_add((-q).ln_1p(), q.ln() + (2.0 * x - 1.0) / (2.0 * sigma * sigma))
}

/// `ln(e^ε − (1 − q))`, for `e^ε > 1 − q`, without overflow or cancellation.
fn ln_excess(eps: f64, q: f64) -> f64 {
    if eps > 0.0 { eps + (-(1.0 - q) * (-eps).exp()).ln_1p() } else { (eps.exp_m1() + q).ln() }
}

/// The output `x` at which the remove direction's loss equals `eps` (given `ln_excess(eps)`).
fn x_at(q: f64, sigma: f64, ln_ex: f64) -> f64 {
    sigma * sigma * (ln_ex - q.ln()) + 0.5
}

/// The exact privacy profile `δ(ε) = sup_S P(S) − e^ε·Q(S)` of one round, in `[0, 1]`.
pub(crate) fn delta(q: f64, sigma: f64, dir: Direction, eps: f64) -> f64 {
    let d = match dir {
        Direction::Remove => {
            if q < 1.0 && eps <= (-q).ln_1p() {
                // Every loss exceeds ε.
                return (-eps.exp_m1()).clamp(0.0, 1.0);
            }
            let a = ln_excess(eps, q);
            let x = x_at(q, sigma, a);
            // q·Φc((x−1)/σ) − (e^ε − 1 + q)·Φc(x/σ)
            exp_diff(q.ln() + ln_phic((x - 1.0) / sigma), a + ln_phic(x / sigma))
        }
        Direction::Add => {
            if q < 1.0 && eps >= -(-q).ln_1p() {
                // No loss exceeds ε.
                return 0.0;
            }
            let b = ln_excess(-eps, q);
            let x = x_at(q, sigma, b);
            // Φ(x/σ) − e^ε·[(1−q)·Φ(x/σ) + q·Φ((x−1)/σ)] = e^ε·[e^b·Φ(x/σ) − q·Φ((x−1)/σ)]
            exp_diff(eps + b + ln_phi(x / sigma), eps + q.ln() + ln_phi((x - 1.0) / sigma))
        }
    };
    if d.is_nan() { 1.0 } else { d.clamp(0.0, 1.0) }
}

/// `P(L > ε)` for the loss `L` of one round (under the first distribution of the pair).
#[cfg_attr(not(test), allow(dead_code))]
fn survival(q: f64, sigma: f64, dir: Direction, eps: f64) -> f64 {
    let p = match dir {
        Direction::Remove => {
            if q < 1.0 && eps <= (-q).ln_1p() {
                return 1.0;
            }
            let x = x_at(q, sigma, ln_excess(eps, q));
            (1.0 - q) * ln_phic(x / sigma).exp() + q * ln_phic((x - 1.0) / sigma).exp()
        }
        Direction::Add => {
            if q < 1.0 && eps >= -(-q).ln_1p() {
                return 0.0;
            }
            let x = x_at(q, sigma, ln_excess(-eps, q));
            ln_phi(x / sigma).exp()
        }
    };
    if p.is_nan() { 1.0 } else { p.clamp(0.0, 1.0) }
}

/// The losses at `Z_TAIL` noise standard deviations on either side: the grid's range.
pub(crate) fn loss_range(q: f64, sigma: f64, dir: Direction) -> (f64, f64) {
    let z = Z_TAIL * sigma;
    match dir {
        Direction::Remove => (loss_remove(q, sigma, -z), loss_remove(q, sigma, 1.0 + z)),
        Direction::Add => (-loss_remove(q, sigma, z), -loss_remove(q, sigma, -z)),
    }
}

/// A variance scale of one round's loss: `q²·(e^{1/σ²} − 1)` (the χ² divergence of the pair),
/// capped by the full Gaussian's `1/σ²`. It sets the grid step.
pub(crate) fn loss_variance(q: f64, sigma: f64) -> f64 {
    let s2 = 1.0 / (sigma * sigma);
    (q * q * s2.exp_m1()).min(s2)
}

/// A discrete PLD on the grid `{k·h}`: `probs[i]` is the mass at loss `(k_lo + i)·h`, and
/// `infinity` the mass at +∞ (outputs only the first distribution of the pair can produce, or
/// the tail beyond the grid).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Pmf {
    /// Grid index of `probs[0]`.
    pub k_lo: i64,
    /// Masses on consecutive grid points.
    pub probs: Vec<f64>,
    /// Mass at +∞.
    pub infinity: f64,
    /// The summary the composition's Chernoff bounds use.
    pub blocks: Blocks,
}

impl Pmf {
    pub(crate) fn new(k_lo: i64, probs: Vec<f64>, infinity: f64) -> Self {
        let blocks = Blocks::new(k_lo, &probs);
        Self { k_lo, probs, infinity, blocks }
    }
}

/// Why a grid could not be built.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct TooManyBins(pub f64);

/// The PLD of one round on the grid of step `h`, with at most `max_bins` grid points.
pub(crate) fn discretise(
    q: f64,
    sigma: f64,
    dir: Direction,
    h: f64,
    estimate: Estimate,
    max_bins: usize,
) -> Result<Pmf, TooManyBins> {
    let (lo, hi) = loss_range(q, sigma, dir);
    let (k_lo, k_hi) = ((lo / h).floor(), (hi / h).ceil());
    let bins = k_hi - k_lo + 1.0;
    if !(bins.is_finite() && bins <= max_bins as f64 && k_lo.abs() < 1e15 && k_hi.abs() < 1e15) {
        return Err(TooManyBins(bins));
    }
    let (k_lo, k_hi) = (k_lo as i64, (k_hi as i64).max(k_lo as i64 + 1));
    let n = (k_hi - k_lo) as usize;
    let eps = |i: usize| (k_lo + i as i64) as f64 * h;
    match estimate {
        Estimate::ConnectDots => {
            let mut d: Vec<f64> = (0..=n).map(|i| delta(q, sigma, dir, eps(i))).collect();
            // δ is non-increasing; repair rounding noise upwards (which only adds privacy loss).
            for i in (0..n).rev() {
                d[i] = d[i].max(d[i + 1]);
            }
            let (em1, eh) = (h.exp_m1(), h.exp());
            let mut probs = Vec::with_capacity(n + 1);
            // The chord from (α = 0, δ = 1) to (α₀, δ₀) continues the profile below the grid.
            probs.push((d[1] - d[0]) / em1 + (1.0 - d[0]));
            for i in 1..=n {
                let next = if i == n { d[n] } else { d[i + 1] };
                // Slope change of the interpolation at α_i = e^{ε_i}, times α_i.
                probs.push(((next - d[i]) - eh * (d[i] - d[i - 1])) / em1);
            }
            for p in &mut probs {
                *p = if p.is_finite() { p.max(0.0) } else { 0.0 };
            }
            Ok(Pmf::new(k_lo, probs, d[n]))
        }
        Estimate::Optimistic => {
            let s: Vec<f64> = (0..=n).map(|i| survival(q, sigma, dir, eps(i))).collect();
            let mut probs: Vec<f64> = s.windows(2).map(|w| (w[0] - w[1]).max(0.0)).collect();
            // Everything above the grid's top point is placed on it; below the grid is dropped.
            probs.push(s[n]);
            Ok(Pmf::new(k_lo, probs, 0.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_tail_is_ten_to_the_minus_twenty() {
        assert!((ln_phic(Z_TAIL) - 1e-20f64.ln()).abs() < 1e-5, "{}", ln_phic(Z_TAIL));
    }

    #[test]
    fn full_participation_profile_is_the_gaussian_one_in_both_directions() {
        for sigma in [0.3, 1.0, 4.0] {
            for eps in [-1.0f64, 0.0, 0.5, 3.0] {
                let g = super::super::gaussian_delta(1.0 / sigma, eps.max(0.0));
                for dir in [Direction::Remove, Direction::Add] {
                    let d = delta(1.0, sigma, dir, eps);
                    if eps >= 0.0 {
                        assert!((d - g).abs() <= 1e-12 + 1e-9 * g, "σ {sigma} ε {eps} {dir:?}: {d} vs {g}");
                    }
                    assert!((0.0..=1.0).contains(&d));
                }
            }
        }
    }

    #[test]
    fn subsampled_profiles_have_their_known_limits() {
        let (q, s) = (0.01f64, 1.0);
        // Remove: every loss is above ln(1 − q), so δ = 1 − e^ε below it.
        let low = (-q).ln_1p() - 0.1;
        assert!((delta(q, s, Direction::Remove, low) - (-low.exp_m1())).abs() < 1e-15);
        // Add: no loss exceeds −ln(1 − q).
        assert_eq!(delta(q, s, Direction::Add, -(-q).ln_1p()), 0.0);
        // Non-increasing in ε in both directions.
        for dir in [Direction::Remove, Direction::Add] {
            let mut last = 1.0;
            for i in -50..200 {
                let d = delta(q, s, dir, f64::from(i) * 1e-3);
                assert!(d <= last + 1e-15, "{dir:?} at {i}");
                last = d;
            }
        }
    }

    #[test]
    fn connect_the_dots_is_a_distribution_that_dominates_the_profile() {
        for (q, s) in [(0.01, 1.0), (0.3, 0.7), (1.0, 2.0)] {
            for dir in [Direction::Remove, Direction::Add] {
                let h = 1e-3;
                let p = discretise(q, s, dir, h, Estimate::ConnectDots, 1 << 22).unwrap();
                let total: f64 = p.probs.iter().sum::<f64>() + p.infinity;
                assert!((total - 1.0).abs() < 1e-8, "q {q} {dir:?}: {total}");
                // Its profile at points between the grid is at least the exact one.
                for eps in [0.0105, 0.1234, 0.5007] {
                    let discrete: f64 = p.infinity
                        + p.probs
                            .iter()
                            .enumerate()
                            .map(|(i, &m)| {
                                let l = (p.k_lo + i as i64) as f64 * h;
                                if l > eps { m * -(eps - l).exp_m1() } else { 0.0 }
                            })
                            .sum::<f64>();
                    let exact = delta(q, s, dir, eps);
                    assert!(discrete >= exact - 1e-12, "q {q} {dir:?} ε {eps}: {discrete} < {exact}");
                    assert!(discrete <= exact + 1e-5, "q {q} {dir:?} ε {eps}: {discrete} vs {exact}");
                }
            }
        }
    }
}
