//! Composition of discrete PLDs by FFT, and the conversion of the result to ε(δ) and δ(ε).
//!
//! The composition of independent rounds has the convolution of their PLDs as its PLD. Each
//! distinct round's PMF is placed on a ring of `N` grid points (index `k` at `k mod N`), sent
//! through a real FFT, raised pointwise to its number of rounds, and the spectra are multiplied;
//! the inverse FFT gives, at ring position `j`, the mass of every total `K ≡ j (mod N)`.
//!
//! `N` covers a window `[K_lo, K_lo + N)` chosen by Chernoff bounds computed from the PMFs
//! themselves, so that the total mass of the sum outside it is at most [`WINDOW_TAIL`] on each
//! side. Folding that mass into the window (aliasing) only adds non-negative mass at wrong points;
//! the mass it came from, which may have lain above ε, is added to δ in full. So what is reported
//! stays an upper bound of the composition of the discretised PLDs.
//!
//! Floating-point rounding in the transforms (relative errors grow with the number of rounds a
//! spectrum is raised to) leaves noise of 10⁻¹⁸–10⁻¹⁵ on every output; where the true mass is ~0
//! it shows as negative values. Their largest magnitude, times [`NOISE_SAFETY`], is added to every
//! grid point, which keeps δ from being under-counted where it is itself tiny (≲ 10⁻¹¹).

use super::discretise::Pmf;
use realfft::RealFftPlanner;
use realfft::num_complex::Complex;
use std::sync::OnceLock;

/// Chernoff bound on the mass of the composed PLD left outside the window, per side.
pub(crate) const WINDOW_TAIL: f64 = 5e-16;

/// Every composed grid point gets this many times the FFT's observed rounding noise added.
const NOISE_SAFETY: f64 = 4.0;

/// A composed PLD in one direction.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Composed {
    /// Grid step.
    pub h: f64,
    /// Grid index of `probs[0]`.
    pub k_lo: i64,
    /// Masses on consecutive grid points.
    pub probs: Vec<f64>,
    /// Mass counted as +∞: the rounds' own mass at +∞, plus the window's tail bounds.
    pub extra: f64,
    /// The largest negative value the inverse FFT produced (clamped to 0): the size of its
    /// rounding noise.
    pub noise: f64,
}

/// The PMF reduced to blocks for cheap, still valid, Chernoff bounds: runs of consecutive grid
/// points of total mass at most [`BLOCK_MASS`] (and at most [`BLOCK`] points) are merged, so the
/// bulk of the distribution keeps its exact points and only the sparse tails are coarsened.
/// Log-MGF values at the exponents `θ = ±2^{j/4}` are memoised: a ledger asks again and again.
#[derive(Clone, Debug)]
pub(crate) struct Blocks {
    /// (mass, lowest index, highest index) of each block of grid points.
    blocks: Vec<(f64, i64, i64)>,
    /// Lowest and highest index with mass.
    support: (i64, i64),
    /// Variance of the finite part, in grid units².
    var: f64,
    /// `log_mgf(±2^{j/4})` for `j` in `J_MIN..J_MAX`, positive then negative exponent.
    memo: Box<[OnceLock<f64>]>,
}

impl PartialEq for Blocks {
    fn eq(&self, other: &Self) -> bool {
        self.blocks == other.blocks
    }
}

const BLOCK: i64 = 64;
const BLOCK_MASS: f64 = 1e-15;
const J_MIN: i32 = -160;
const J_MAX: i32 = 40;

impl Blocks {
    pub(crate) fn new(k_lo: i64, probs: &[f64]) -> Self {
        let mut blocks: Vec<(f64, i64, i64)> = Vec::new();
        for (i, &m) in probs.iter().enumerate() {
            if m <= 0.0 {
                continue;
            }
            let k = k_lo + i as i64;
            match blocks.last_mut() {
                Some(b) if b.0 + m <= BLOCK_MASS && k - b.1 < BLOCK => {
                    b.0 += m;
                    b.2 = k;
                }
                _ => blocks.push((m, k, k)),
            }
        }
        let support = match (blocks.first(), blocks.last()) {
            (Some(f), Some(l)) => (f.1, l.2),
            _ => (k_lo, k_lo),
        };
        let mass: f64 = probs.iter().sum();
        let var = if mass > 0.0 {
            let mean = probs.iter().enumerate().map(|(i, x)| x * i as f64).sum::<f64>() / mass;
            probs.iter().enumerate().map(|(i, x)| x * (i as f64 - mean).powi(2)).sum::<f64>() / mass
        } else {
            0.0
        };
        let memo = (0..2 * (J_MAX - J_MIN)).map(|_| OnceLock::new()).collect();
        Self { blocks, support, var, memo }
    }

    /// An upper bound on `ln E[e^{θ·K}·1{finite}]` (K the grid index) at `θ = sign·2^{j/4}`: each
    /// block's mass is placed at its highest point for θ > 0 and at its lowest for θ < 0.
    fn log_mgf(&self, j: i32, sign: f64) -> f64 {
        let compute = || {
            let theta = sign * 2f64.powf(f64::from(j) / 4.0);
            let y = |&(_, lo, hi): &(f64, i64, i64)| theta * (if theta > 0.0 { hi } else { lo }) as f64;
            let max = self.blocks.iter().map(y).fold(f64::NEG_INFINITY, f64::max);
            if max == f64::NEG_INFINITY {
                return f64::NEG_INFINITY;
            }
            let s: f64 = self.blocks.iter().map(|b| b.0 * (y(b) - max).exp()).sum();
            max + s.ln()
        };
        if !(J_MIN..J_MAX).contains(&j) {
            return compute();
        }
        let slot = 2 * (j - J_MIN) as usize + usize::from(sign < 0.0);
        *self.memo[slot].get_or_init(compute)
    }
}

/// Why the composition could not be held in memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct TooWide(pub f64);

/// The smallest Chernoff bound `(Σ T·Λ(θ) − ln τ)/θ` (grid units) over `θ = 2^{j/4}`, for the
/// upper tail (`sign = 1`) or the lower one (`sign = −1`, negated). With Λ convex the bound is
/// unimodal in θ, so a walk by factors of 2 from `8/std` (the optimum for a Gaussian sum at
/// τ ≈ 10⁻¹⁵) finds the best power of 2, refined by factors 2^¼.
fn chernoff(parts: &[(&Pmf, u64)], std: f64, sign: f64) -> f64 {
    let ln_tail = WINDOW_TAIL.ln();
    let bound = |j: i32| {
        let total: f64 = parts
            .iter()
            .map(|(p, t)| if *t == 0 { 0.0 } else { *t as f64 * p.blocks.log_mgf(j, sign) })
            .sum();
        let b = (total - ln_tail) / 2f64.powf(f64::from(j) / 4.0);
        if b.is_nan() { f64::INFINITY } else { b }
    };
    let mut j = (4.0 * (8.0 / std).log2()).round().clamp(-400.0, 400.0) as i32;
    let mut best = bound(j);
    for step in [4, -4] {
        let mut moved = false;
        for _ in 0..40 {
            let b = bound(j + step);
            if b >= best {
                break;
            }
            (best, j, moved) = (b, j + step, true);
        }
        if moved {
            break;
        }
    }
    for dj in [-2, -1, 1, 2] {
        best = best.min(bound(j + dj));
    }
    best
}

/// The window `[lo, hi]` (grid indices) outside which the composed mass is at most the returned
/// tail bounds (below, above).
fn window(parts: &[(&Pmf, u64)]) -> (f64, f64, f64, f64) {
    // The support of the sum: trivial bounds.
    let mut support = (0.0f64, 0.0f64);
    let mut var = 0.0;
    for (p, t) in parts {
        let t = *t as f64;
        support.0 += t * p.blocks.support.0 as f64;
        support.1 += t * p.blocks.support.1 as f64;
        var += t * p.blocks.var;
    }
    // P(S ≥ k) ≤ e^{ΣTΛ(θ) − θk} for θ > 0, and P(S ≤ k) ≤ e^{ΣTΛ(−θ) + θk}.
    let std = var.sqrt().max(1.0);
    let hi = chernoff(parts, std, 1.0);
    let lo = -chernoff(parts, std, -1.0);
    let (tail_lo, lo) =
        if lo.is_finite() && lo > support.0 { (WINDOW_TAIL, lo.floor()) } else { (0.0, support.0) };
    let (tail_hi, hi) =
        if hi.is_finite() && hi < support.1 { (WINDOW_TAIL, hi.ceil()) } else { (0.0, support.1) };
    (lo, hi.max(lo), tail_lo, tail_hi)
}

/// The smallest even `n ≥ len` whose only prime factors are 2, 3 and 5.
fn fast_len(len: usize) -> usize {
    let len = len.max(2);
    let mut best = len.next_power_of_two();
    let mut p5 = 1usize;
    while p5 < best {
        let mut p35 = p5;
        while p35 < best {
            let mut n = p35 * 2;
            while n < len {
                n *= 2;
            }
            best = best.min(n);
            p35 *= 3;
        }
        p5 *= 5;
    }
    best
}

/// `z^t` for a complex `z` and an integer power, in polar form.
fn pow(z: Complex<f64>, t: u64) -> Complex<f64> {
    let r = z.norm();
    if t == 0 {
        return Complex::new(1.0, 0.0);
    }
    let ln = r.ln() * t as f64;
    if r == 0.0 || ln < -745.0 {
        return Complex::new(0.0, 0.0);
    }
    let theta = (z.arg() * t as f64).rem_euclid(std::f64::consts::TAU);
    Complex::from_polar(ln.exp(), theta)
}

/// Composes `parts` (each PMF with its number of rounds), on a ring of at most `max_bins`.
pub(crate) fn compose(parts: &[(&Pmf, u64)], h: f64, max_bins: usize) -> Result<Composed, TooWide> {
    let (lo, hi, tail_lo, tail_hi) = window(parts);
    let width = hi - lo + 1.0;
    if !(width.is_finite() && width <= max_bins as f64 && lo.abs() < 1e15 && hi.abs() < 1e15) {
        return Err(TooWide(width));
    }
    let n = fast_len(width as usize);
    let k_lo = lo as i64;
    let ring = |k: i64| k.rem_euclid(n as i64) as usize;
    let mut planner = RealFftPlanner::<f64>::new();
    let forward = planner.plan_fft_forward(n);
    let inverse = planner.plan_fft_inverse(n);
    let mut spectrum = vec![Complex::new(1.0, 0.0); n / 2 + 1];
    let mut buf = vec![0.0; n];
    let mut out = forward.make_output_vec();
    let mut scratch = forward.make_scratch_vec();
    // ln of the probability that every round's loss is finite.
    let mut ln_finite = 0.0;
    for (p, t) in parts {
        if *t == 0 {
            continue;
        }
        ln_finite += *t as f64 * (-p.infinity).ln_1p();
        buf.iter_mut().for_each(|x| *x = 0.0);
        for (i, &x) in p.probs.iter().enumerate() {
            buf[ring(p.k_lo + i as i64)] += x;
        }
        if forward.process_with_scratch(&mut buf, &mut out, &mut scratch).is_err() {
            return Err(TooWide(width));
        }
        for (s, z) in spectrum.iter_mut().zip(&out) {
            *s *= pow(*z, *t);
        }
    }
    // A real signal's spectrum is real at 0 and at N/2.
    spectrum[0].im = 0.0;
    spectrum[n / 2].im = 0.0;
    let mut scratch = inverse.make_scratch_vec();
    if inverse.process_with_scratch(&mut spectrum, &mut buf, &mut scratch).is_err() {
        return Err(TooWide(width));
    }
    let norm = 1.0 / n as f64;
    let mut noise = 0.0f64;
    let probs: Vec<f64> = (0..n)
        .map(|i| {
            let x = buf[ring(k_lo + i as i64)] * norm;
            // Rounding noise of the FFT leaves tiny negative values where the mass is ~0.
            noise = noise.max(-x);
            if x.is_finite() { x.max(0.0) } else { 0.0 }
        })
        .collect();
    // Rounding errors are spread over every output; the negative ones show their size. Each grid
    // point is credited NOISE_SAFETY times that much, so δ over-counts rather than under-counts.
    let allowance = NOISE_SAFETY * noise;
    let probs = probs.into_iter().map(|p| p + allowance).collect();
    let extra = (-ln_finite.exp_m1() + tail_lo + tail_hi).min(1.0);
    Ok(Composed { h, k_lo, probs, extra, noise })
}

impl Composed {
    /// δ at `eps`: `extra + Σ_K p_K·(1 − e^{ε − K·h})⁺`, capped at 1.
    pub(crate) fn delta(&self, eps: f64) -> f64 {
        let mut d = self.extra;
        for (i, &p) in self.probs.iter().enumerate().rev() {
            let loss = (self.k_lo + i as i64) as f64 * self.h;
            if loss <= eps {
                break;
            }
            d += p * -(eps - loss).exp_m1();
        }
        d.min(1.0)
    }

    /// The smallest ε ≥ 0 with δ(ε) ≤ `delta` (∞ if the mass at +∞ alone exceeds it).
    pub(crate) fn epsilon(&self, delta: f64) -> f64 {
        if self.extra >= delta {
            return f64::INFINITY;
        }
        // Walking down from the top: on [(K−1)h, Kh), δ(ε) = extra + A − e^{ε−(K−1)h}·B, where
        // A = Σ_{K'≥K} p and B = Σ_{K'≥K} p·e^{−(K'−K+1)h}.
        let (mut a, mut b) = (0.0, 0.0);
        let decay = (-self.h).exp();
        for (i, &p) in self.probs.iter().enumerate().rev() {
            let k = self.k_lo + i as i64;
            a += p;
            b = (b + p) * decay;
            let base = (k - 1) as f64 * self.h;
            let at_base = self.extra + a - b;
            if at_base >= delta {
                // The root lies in [base, base + h].
                let t = (self.extra + a - delta) / b;
                return (base + t.ln()).clamp(base, base + self.h).max(0.0);
            }
            if base <= 0.0 {
                return 0.0;
            }
        }
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_lengths_are_even_and_5_smooth() {
        for len in [1usize, 2, 3, 7, 100, 1000, 4097, 123_457] {
            let n = fast_len(len);
            assert!(n >= len && n.is_multiple_of(2), "{len} -> {n}");
            let mut m = n;
            for f in [2, 3, 5] {
                while m.is_multiple_of(f) {
                    m /= f;
                }
            }
            assert_eq!(m, 1, "{len} -> {n}");
            assert!(n <= len.next_power_of_two().max(2));
        }
        assert_eq!(fast_len(1000), 1000);
    }

    #[test]
    fn composing_by_fft_is_convolution() {
        // Two rounds of a three-point PMF with mass at +∞.
        let p = Pmf::new(-1, vec![0.2, 0.5, 0.25], 0.05);
        let c = compose(&[(&p, 2)], 0.1, 1 << 20).unwrap();
        let want = [(-2, 0.04), (-1, 0.2), (0, 0.35), (1, 0.25), (2, 0.0625)];
        for (k, w) in want {
            let got = c.probs[(k - c.k_lo) as usize];
            assert!((got - w).abs() < 1e-12, "K = {k}: {got} vs {w}");
        }
        assert!((c.extra - (1.0 - 0.95f64.powi(2))).abs() < 1e-12);
        let total: f64 = c.probs.iter().sum();
        assert!((total - 0.9025).abs() < 1e-12);
    }

    #[test]
    fn epsilon_inverts_delta() {
        let p = Pmf::new(-3, vec![0.1, 0.2, 0.3, 0.2, 0.1, 0.06, 0.04], 0.0);
        let c = compose(&[(&p, 7)], 0.05, 1 << 20).unwrap();
        for d in [1e-6, 1e-3, 0.05, 0.2] {
            let e = c.epsilon(d);
            assert!((c.delta(e) - d).abs() < 1e-12 * d.max(1e-3) || e == 0.0, "{d}: {e}");
        }
    }
}
