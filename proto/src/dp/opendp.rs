//! opendp's discrete Gaussian as a [`GaussianSampler`] (cargo feature `opendp`).
//!
//! [`OpenDpGaussian`] wraps `opendp::measurements::make_gaussian`: the noise is an integer drawn
//! from the discrete Gaussian (Canonne, Kamath & Steinke 2020) and scaled by the grid 2ᵏ, so no
//! floating-point sampling is involved and the floating-point attack on textbook samplers
//! (Mironov 2012) does not apply. opendp draws its randomness from its own entropy source
//! (`opendp::traits::samplers::fill_bytes`: OpenSSL's `RAND_priv_bytes` when opendp is built with
//! its `use-openssl` feature, rand 0.7's `thread_rng` otherwise), never from the caller's RNG, so
//! nothing drawn with it can be replayed from a seed.
//!
//! Where it runs: on devices for local DP (the SDK's default, on the grid [`grid_exponent`] picks;
//! see [`crate::dp::local`]), and on the coordinator for central DP when configured. Its speed
//! is measured in `docs/privacy.md` ("Noise samplers").
//!
//! On a grid (`k = Some(k)`) the input is first rounded to multiples of 2ᵏ; opendp's privacy map
//! adds the worst-case rounding, `(2ᵏ − 2⁻¹⁰⁷⁴)·√len` in L2, to the sensitivity, and
//! [`GaussianSampler::sensitivity_inflation`] reports that factor so the caller can account it.

use super::noise::{GaussianSampler, NoiseError, check_std};
use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;

/// opendp's discrete Gaussian mechanism as a noise sampler. See the module docs.
///
/// `k = None` samples exactly at the finest granularity (2⁻¹⁰⁷⁴); `Some(k)` rounds the input to
/// multiples of 2ᵏ first, which is about ten times faster and adds the rounding to the
/// sensitivity (see [`GaussianSampler::sensitivity_inflation`]; at `k = -20` on a million values
/// it is a factor of about 1.0003 for a sensitivity of 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenDpGaussian {
    /// Noise granularity 2ᵏ (`None` = exact).
    pub k: Option<i32>,
}

/// The finest grid [`grid_exponent`] picks (a finer one is no more private, only slower).
pub const FINEST_GRID: i32 = -64;
/// The coarsest grid [`grid_exponent`] picks.
pub const COARSEST_GRID: i32 = 0;

/// The coarsest grid exponent `k` whose rounding inflates an L2 `sensitivity` over `len` values
/// by at most the fraction `max_extra` (opendp adds `2ᵏ·√len` to the sensitivity), clamped to
/// [`FINEST_GRID`]`..=`[`COARSEST_GRID`]. With a non-positive `sensitivity` or `max_extra` it
/// returns [`FINEST_GRID`].
pub fn grid_exponent(sensitivity: f64, len: usize, max_extra: f64) -> i32 {
    let room = max_extra * sensitivity / (len.max(1) as f64).sqrt();
    if !(room.is_finite() && room > 0.0) {
        return if room == f64::INFINITY { COARSEST_GRID } else { FINEST_GRID };
    }
    (room.log2().floor() as i64).clamp(i64::from(FINEST_GRID), i64::from(COARSEST_GRID)) as i32
}

impl OpenDpGaussian {
    /// The exact sampler.
    pub fn exact() -> Self {
        Self { k: None }
    }

    /// The sampler on a 2ᵏ grid.
    pub fn with_granularity(k: i32) -> Self {
        Self { k: Some(k) }
    }

    fn domain(&self, len: usize) -> VectorDomain<AtomDomain<f64>> {
        let d = VectorDomain::new(AtomDomain::<f64>::new_non_nan());
        if self.k.is_some() { d.with_size(len) } else { d }
    }
}

impl GaussianSampler for OpenDpGaussian {
    fn name(&self) -> &'static str {
        if self.k.is_some() { "opendp-grid" } else { "opendp-exact" }
    }

    fn add_noise(&self, values: &mut [f64], std: f64, _rng: &mut dyn rand::Rng) -> Result<(), NoiseError> {
        check_std(std)?;
        if std == 0.0 {
            return Ok(());
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(NoiseError::NonFinite);
        }
        let fail = |e: opendp::error::Error| NoiseError::Sampler(e.to_string());
        let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            self.domain(values.len()),
            L2Distance::<f64>::default(),
            std,
            self.k,
        )
        .map_err(fail)?;
        let noised = m.invoke(&values.to_vec()).map_err(fail)?;
        if noised.len() != values.len() {
            return Err(NoiseError::Sampler(format!(
                "opendp returned {} values for {}",
                noised.len(),
                values.len()
            )));
        }
        values.copy_from_slice(&noised);
        Ok(())
    }

    fn sensitivity_inflation(&self, std: f64, sensitivity: f64, len: usize) -> f64 {
        if self.k.is_none() || std <= 0.0 || sensitivity <= 0.0 {
            return 1.0;
        }
        // opendp's privacy map includes the rounding: rho = (d')² / (2 std²) with d' ≥ d.
        let rho = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            self.domain(len.max(1)),
            L2Distance::<f64>::default(),
            std,
            self.k,
        )
        .and_then(|m| m.map(&sensitivity));
        match rho {
            Ok(rho) if rho > 0.0 => ((2.0 * rho).sqrt() * std / sensitivity).max(1.0),
            // If opendp cannot say, account for no privacy rather than too much.
            _ => f64::INFINITY,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dp::{Delta, FastGaussian, NoiseMultiplier, SamplingRate, epsilon};
    use opendp::combinators::{make_composition, make_zCDP_to_approxDP};
    use rand::SeedableRng;

    fn moments(v: &[f64]) -> (f64, f64, f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let sd = var.sqrt();
        let beyond = |k: f64| v.iter().filter(|x| (*x - mean).abs() > k * sd).count() as f64 / n;
        (mean, sd, beyond(2.0), beyond(3.0))
    }

    /// The fast sampler and opendp's exact one draw the same distribution: mean, standard deviation
    /// and the mass beyond 2σ and 3σ agree with each other and with N(0, σ²)
    /// (P(|Z| > 2) = 0.0455, P(|Z| > 3) = 0.0027).
    #[test]
    fn fast_sampler_matches_opendp_distribution() {
        let n = 40_000;
        let std = 3.0;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut fast = vec![0.0; n];
        FastGaussian.add_noise(&mut fast, std, &mut rng).unwrap();
        let mut exact = vec![0.0; n];
        OpenDpGaussian::exact().add_noise(&mut exact, std, &mut rng).unwrap();
        let mut grid = vec![0.0; n];
        OpenDpGaussian::with_granularity(-20).add_noise(&mut grid, std, &mut rng).unwrap();
        for (name, v) in [("fast", &fast), ("opendp", &exact), ("opendp k=-20", &grid)] {
            let (mean, sd, p2, p3) = moments(v);
            // Standard errors at n = 40k: mean 0.015, sd 0.011, p2 0.001, p3 0.00026.
            assert!(mean.abs() < 0.06, "{name}: mean {mean}");
            assert!((sd - std).abs() < 0.05, "{name}: sd {sd}");
            assert!((p2 - 0.0455).abs() < 0.005, "{name}: P(>2sd) {p2}");
            assert!((p3 - 0.0027).abs() < 0.0015, "{name}: P(>3sd) {p3}");
        }
        let (_, sd_f, p2_f, _) = moments(&fast);
        let (_, sd_o, p2_o, _) = moments(&exact);
        assert!((sd_f - sd_o).abs() < 0.06 && (p2_f - p2_o).abs() < 0.006);
    }

    #[test]
    fn opendp_sampler_refuses_what_it_cannot_noise_and_accounts_its_grid() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let s = OpenDpGaussian::exact();
        assert_eq!(s.add_noise(&mut [1.0, f64::NAN], 1.0, &mut rng), Err(NoiseError::NonFinite));
        assert!(matches!(s.add_noise(&mut [1.0], -2.0, &mut rng), Err(NoiseError::BadStd(_))));
        assert_eq!(s.sensitivity_inflation(1.0, 1.0, 1000), 1.0);
        let grid = OpenDpGaussian::with_granularity(-20);
        let f = grid.sensitivity_inflation(1.0, 1.0, 1_000_000);
        assert!(f > 1.0 && f < 1.01, "{f}");
        // The inflation is (d + 2ᵏ√n) / d, whatever the noise's scale.
        let expected = 1.0 + 2f64.powi(-20) * 1000.0;
        for std in [0.1, 1.0, 40.0] {
            let f = grid.sensitivity_inflation(std, 1.0, 1_000_000);
            assert!((f - expected).abs() < 1e-9, "std {std}: {f} vs {expected}");
        }
    }

    /// The grid's output is on the grid, and its noise is drawn from opendp's own entropy: the
    /// same call twice (same caller RNG state) gives different values.
    #[test]
    fn grid_noise_is_on_the_grid_and_ignores_the_callers_rng() {
        let k = -12;
        let grid = OpenDpGaussian::with_granularity(k);
        let draw = || {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            let mut v = vec![0.123_456_789_f64; 2_000];
            grid.add_noise(&mut v, 0.5, &mut rng).unwrap();
            v
        };
        let (a, b) = (draw(), draw());
        assert_ne!(a, b, "no seed reproduces opendp's noise");
        let scale = 2f64.powi(-k);
        assert!(a.iter().chain(&b).all(|v| (v * scale).fract() == 0.0), "multiples of 2^{k}");
    }

    #[test]
    fn the_grid_exponent_keeps_the_inflation_within_the_allowance() {
        for (sensitivity, len) in [(1.0, 100_000), (0.1, 1_000_000), (10.0, 30), (2e-9, 5)] {
            for max_extra in [1e-2, 1e-3] {
                let k = grid_exponent(sensitivity, len, max_extra);
                let f = OpenDpGaussian::with_granularity(k).sensitivity_inflation(1.0, sensitivity, len);
                assert!(f <= 1.0 + max_extra, "{sensitivity} x {len}: k {k}, inflation {f}");
                // The next coarser grid would exceed it (unless clamped).
                if k < COARSEST_GRID {
                    let coarser = OpenDpGaussian::with_granularity(k + 1);
                    let g = coarser.sensitivity_inflation(1.0, sensitivity, len);
                    assert!(g > 1.0 + max_extra, "{sensitivity} x {len}: k {k} is not the coarsest");
                }
            }
        }
        assert_eq!(grid_exponent(1.0, 100_000, 1e-3), -19);
        assert_eq!(grid_exponent(0.0, 10, 1e-3), FINEST_GRID);
        assert_eq!(grid_exponent(1e300, 1, 1e-3), COARSEST_GRID);
    }

    /// Speed of the grid sampler on a device's release (`privatize`: clip, widen to f64, noise,
    /// narrow to f32) at several grids, and what each grid costs in sensitivity. Not a check:
    /// run it with `cargo test --release --workspace --lib -- --ignored --nocapture
    /// measure_grid_sampler_speed`; `docs/privacy.md` quotes its output.
    #[test]
    #[ignore = "a measurement (about a minute), not a check"]
    fn measure_grid_sampler_speed() {
        use crate::dp::local::{MAX_GRID_INFLATION, local_sensitivity, privatize};
        use crate::dp::{ClipNorm, NoiseMultiplier};
        use crate::update::{ModelShape, Update};
        let (clip, sigma) = (ClipNorm::new(0.5).unwrap(), NoiseMultiplier::new(1.0).unwrap());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for n in [30_000usize, 100_000] {
            let shape = ModelShape::new((n / 4) as u32, 4).unwrap();
            let u = Update::dense(shape, (0..n).map(|i| ((i % 17) as f32 - 8.0) / 100.0).collect()).unwrap();
            let auto = grid_exponent(local_sensitivity(0.5), n, MAX_GRID_INFLATION - 1.0);
            for k in [-20, -15, -10, auto] {
                let s = OpenDpGaussian::with_granularity(k);
                let inflation = s.sensitivity_inflation(1.0, local_sensitivity(0.5), n);
                let runs = 3;
                let started = std::time::Instant::now();
                for _ in 0..runs {
                    privatize(&u, clip, sigma, &s, &mut rng).unwrap();
                }
                let secs = started.elapsed().as_secs_f64() / f64::from(runs);
                eprintln!(
                    "n {n:>6}  k {k:>3}{}  {:>7.1} ms/release  {:>6.0} k values/s  sensitivity x {inflation:.5}",
                    if k == auto { " (auto)" } else { "       " },
                    secs * 1e3,
                    n as f64 / secs / 1e3,
                );
            }
            let started = std::time::Instant::now();
            privatize(&u, clip, sigma, &crate::dp::FastGaussian, &mut rng).unwrap();
            let secs = started.elapsed().as_secs_f64();
            eprintln!("n {n:>6}  fast (seeded)  {:>7.2} ms/release", secs * 1e3);
        }
    }

    /// For full participation the accountant's ε equals opendp's: the Gaussian mechanism composed
    /// T times in zCDP (ρ adds up) and converted to (ε, δ).
    #[test]
    fn zcdp_accounting_matches_opendp() {
        let dom = VectorDomain::new(AtomDomain::<f64>::new_non_nan());
        for (sigma, rounds) in [(5.0, 100u64), (1.0, 10), (10.0, 1000)] {
            let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                dom.clone(),
                L2Distance::default(),
                sigma,
                None,
            )
            .unwrap();
            let composed = make_composition(vec![m; rounds as usize]).unwrap();
            let profile = make_zCDP_to_approxDP(composed).unwrap().map(&1.0).unwrap();
            let reference = profile.epsilon(1e-5).unwrap();
            let (ours, _) = epsilon(
                SamplingRate::new(1.0).unwrap(),
                NoiseMultiplier::new(sigma).unwrap(),
                rounds,
                Delta::new(1e-5).unwrap(),
            );
            assert!(
                (ours - reference).abs() / reference < 1e-3,
                "sigma {sigma} x {rounds}: {ours} vs opendp {reference}"
            );
        }
    }
}
