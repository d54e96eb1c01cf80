//! Tests of the distributed-DP encoding. Every test name starts with `distributed_` so
//! `cargo test -p starling-proto distributed` runs exactly these.

use super::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use rand::SeedableRng;

fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

fn config(dim: usize, max_cohort: usize, bits: u32, z: f64, rotation: bool) -> DistributedDpConfig {
    DistributedDpConfig {
        clip: 1.0,
        noise_multiplier: z,
        dim,
        bits,
        max_cohort,
        dropout_tolerance: 0.2,
        rotation,
        scale: None,
    }
}

/// Updates of norm between 0.3 and 3 (some get clipped), each a different direction.
fn updates(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut r = rng(seed);
    (0..n)
        .map(|i| {
            let size = 0.3 + 2.7 * (i as f64 / n.max(1) as f64);
            let v: Vec<f64> = (0..dim).map(|_| r.random::<f64>() - 0.5).collect();
            let norm = l2(v.iter().copied());
            v.iter().map(|x| (x / norm * size) as f32).collect()
        })
        .collect()
}

fn clipped_sum(us: &[Vec<f32>], clip: f64) -> Vec<f64> {
    let mut s = vec![0.0; us[0].len()];
    for u in us {
        let norm = l2(u.iter().map(|&v| f64::from(v)));
        let f = if norm > clip { clip / norm } else { 1.0 };
        for (a, &v) in s.iter_mut().zip(u) {
            *a += f64::from(v) * f;
        }
    }
    s
}

/// Encodes every update and sums mod 2^bits like secure aggregation.
fn encode_all(us: &[Vec<f32>], plan: &QuantPlan, sampler: &dyn DiscreteGaussian, seed: u64) -> Vec<Encoded> {
    let mut r = rng(seed);
    us.iter().map(|u| encode(u, plan, sampler, &mut r).unwrap()).collect()
}

fn mod_sum(encoded: &[Encoded], plan: &QuantPlan) -> Vec<u32> {
    let mut acc = vec![0u32; plan.padded_dim as usize];
    for e in encoded {
        add_mod(&mut acc, &e.values, plan).unwrap();
    }
    acc
}

fn lift(v: u32, bits: u32) -> i64 {
    let (v, modulus) = (i64::from(v), 1i64 << bits);
    if v > modulus / 2 { v - modulus } else { v }
}

fn dist(a: &[f64], b: &[f64]) -> f64 {
    l2(a.iter().zip(b).map(|(x, y)| x - y))
}

/// z = 0: the decoded sum is the sum of the clipped updates up to the rounding, whose L2 error is
/// below n·√p/γ deterministically (each device's rounding moves each coordinate by < 1/γ; the
/// rotation is orthogonal). With and without rotation, 32 and 20 bits.
#[test]
fn distributed_roundtrip_without_noise_is_within_rounding() {
    let (n, dim) = (25, 1000);
    let us = updates(n, dim, 1);
    let truth = clipped_sum(&us, 1.0);
    for bits in [32, 20] {
        for rotation in [false, true] {
            let cfg = config(dim, 40, bits, 0.0, rotation);
            let plan = cfg.plan(n, 99).unwrap();
            assert_eq!((plan.device_noise_std, plan.noise_bound), (0.0, 0));
            assert_eq!(cfg.accounted_multiplier(&plan), 0.0);
            let enc = encode_all(&us, &plan, &FastDiscreteGaussian, 2);
            let decoded = decode_sum(&mod_sum(&enc, &plan), &plan).unwrap();
            assert_eq!(decoded.len(), dim);
            let err = dist(&decoded, &truth);
            let bound = n as f64 * f64::from(plan.padded_dim).sqrt() / plan.scale;
            // The typical error is √(n·p/6)/γ (uniform rounding errors), far below the bound.
            let typical = (n as f64 * f64::from(plan.padded_dim) / 6.0).sqrt() / plan.scale;
            assert!(err <= bound, "bits {bits} rotation {rotation}: error {err} > {bound}");
            assert!(
                err <= 2.0 * typical,
                "bits {bits} rotation {rotation}: error {err} vs typical {typical}"
            );
            for (u, e) in us.iter().zip(&enc) {
                let norm = l2(u.iter().map(|&v| f64::from(v)));
                assert!((e.norm_before_clip - norm).abs() < 1e-9);
            }
        }
    }
}

/// With noise: the decoded sum's error per coordinate has the variance of n devices' noise
/// (n·σ_dev²/γ², all n contributed) plus the rounding's (≤ n/(4γ²)).
#[test]
fn distributed_roundtrip_with_noise_has_the_planned_error() {
    let (n, dim) = (20, 3000);
    let us = updates(n, dim, 3);
    let truth = clipped_sum(&us, 1.0);
    for bits in [32, 20] {
        for rotation in [false, true] {
            let cfg = config(dim, 30, bits, 1.0, rotation);
            cfg.validate().unwrap();
            let plan = cfg.plan(n, 7).unwrap();
            assert!(plan.device_noise_std >= 1.0);
            let enc = encode_all(&us, &plan, &FastDiscreteGaussian, 4);
            let decoded = decode_sum_checked(&mod_sum(&enc, &plan), &plan, n).unwrap();
            let mse = dist(&decoded, &truth).powi(2) / dim as f64;
            let noise_var = n as f64 * plan.device_noise_std.powi(2) / plan.scale.powi(2);
            let round_var = n as f64 / 4.0 / plan.scale.powi(2);
            // Standard error of the MSE over 3000 coordinates: about 2.6%.
            assert!(
                mse >= 0.9 * noise_var && mse <= 1.1 * (noise_var + round_var),
                "bits {bits} rot {rotation}: mse {mse} vs {noise_var}"
            );
            // The noise of the sum, in units of the clip norm, is about z·√(n/m).
            let sum_std = noise_var.sqrt();
            let expect = plan.noise_multiplier * plan.sensitivity() / plan.scale
                * (n as f64 / f64::from(plan.min_survivors)).sqrt();
            assert!((sum_std / expect - 1.0).abs() < 1e-9);
        }
    }
}

/// A sampler that always returns `sign·bound`: the adversarial extreme of truncated noise.
#[derive(Debug)]
struct Extreme(i64);

impl DiscreteGaussian for Extreme {
    fn name(&self) -> &'static str {
        "extreme"
    }
    fn sample_into(
        &self,
        out: &mut [i64],
        _std: f64,
        bound: i64,
        _rng: &mut dyn rand::Rng,
    ) -> Result<(), NoiseError> {
        out.fill(self.0 * bound);
        Ok(())
    }
}

fn update_strategy(dim: usize) -> impl Strategy<Value = Vec<f32>> {
    prop_oneof![
        // A spike at the extreme: one coordinate carries the whole (clipped) norm.
        (0..dim, prop_oneof![Just(1.0f32), Just(-1.0), Just(1e30), Just(-f32::MAX), Just(0.999_999)])
            .prop_map(move |(i, v)| {
                let mut u = vec![0.0f32; dim];
                u[i] = v;
                u
            }),
        // Dense, at any magnitude.
        (
            prop::collection::vec(-1.0f32..1.0, dim),
            prop_oneof![Just(1e-3f32), Just(1.0), Just(1e6), Just(3e38)]
        )
            .prop_map(|(v, s)| v.into_iter().map(|x| x * s).collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Overflow is impossible: a full cohort (`max_cohort`) of arbitrary updates — huge ones are
    /// clipped — with extreme noise (every sample at ±bound, same sign as the spike) decodes to
    /// exactly the true integer sum (the modular sum's centred lift equals the sum of the
    /// devices' lifted vectors: no wrap).
    #[test]
    fn distributed_overflow_is_impossible_at_full_cohort(
        dim in 1usize..200,
        cohort in 1usize..40,
        bits in prop_oneof![Just(20u32), Just(24), Just(32)],
        z in prop_oneof![Just(0.0), Just(0.5), Just(1.0), Just(3.0)],
        rho in prop_oneof![Just(0.0), Just(0.3), Just(0.9)],
        rotation in any::<bool>(),
        sign in prop_oneof![Just(1i64), Just(-1)],
        seed in any::<u64>(),
        spike in 0usize..1_000,
    ) {
        let cfg = DistributedDpConfig { dropout_tolerance: rho, ..config(dim, cohort, bits, z, rotation) };
        prop_assume!(cfg.validate().is_ok());
        let plan = cfg.plan(cohort, seed).unwrap();
        let mut r = rng(seed);
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut us: Vec<Vec<f32>> = (0..cohort)
            .map(|_| update_strategy(dim).new_tree(&mut runner).unwrap().current())
            .collect();
        // Half the time, everyone sends the same spike with the sign of the noise.
        if spike % 2 == 0 {
            let mut u = vec![0.0f32; dim];
            u[spike % dim] = sign as f32 * 1e30;
            us = vec![u; cohort];
        }
        let sampler = Extreme(sign);
        let enc: Vec<Encoded> = us.iter().map(|u| encode(u, &plan, &sampler, &mut r).unwrap()).collect();
        let sum = mod_sum(&enc, &plan);
        let mut truth = vec![0i64; plan.padded_dim as usize];
        for e in &enc {
            for (t, &v) in truth.iter_mut().zip(&e.values) {
                *t += lift(v, bits);
            }
        }
        let limit = 1i64 << (bits - 1);
        for (i, (&s, &t)) in sum.iter().zip(&truth).enumerate() {
            prop_assert!(t.abs() < limit, "coordinate {} true sum {} reaches 2^(bits-1)", i, t);
            prop_assert_eq!(lift(s, bits), t);
        }
        // And decode_sum returns exactly truth/γ (then unrotated).
        let mut expect: Vec<f64> = truth.iter().map(|&t| t as f64 / plan.scale).collect();
        if let Some(s) = plan.rotation_seed {
            rotation::unrotate(&mut expect, s);
        }
        expect.truncate(dim);
        let decoded = decode_sum(&sum, &plan).unwrap();
        prop_assert!(dist(&decoded, &expect) <= 1e-9 * l2(expect.iter().copied()).max(1.0));
    }
}

#[test]
fn distributed_encode_refuses_non_finite_and_wrong_length_and_clips_huge() {
    let cfg = config(4, 10, 32, 1.0, false);
    let plan = cfg.plan(5, 1).unwrap();
    let mut r = rng(1);
    let s = FastDiscreteGaussian;
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert_eq!(
            encode(&[0.0, bad, 1.0, 0.0], &plan, &s, &mut r),
            Err(EncodeError::NonFinite { index: 1 })
        );
    }
    assert_eq!(encode(&[0.0; 3], &plan, &s, &mut r), Err(EncodeError::Length { expected: 4, got: 3 }));
    let mut bad_plan = plan;
    bad_plan.bits = 33;
    assert!(matches!(
        encode(&[0.0; 4], &bad_plan, &s, &mut r),
        Err(EncodeError::Plan(DistributedDpError::BadBits(33)))
    ));
    let e = encode(&[f32::MAX, f32::MAX, 0.0, 0.0], &plan, &s, &mut r).unwrap();
    assert!(e.norm_before_clip.is_finite() && e.norm_before_clip > 4e38);
    assert!(e.values.iter().all(|&v| lift(v, 32).abs() < 1 << 31));
}

/// The exact moments and tail of N_Z(0, σ²): (variance, P(|Z| > k) for k in `ks`).
fn exact_dg(sigma: f64, ks: &[i64]) -> (f64, Vec<f64>) {
    let kmax = (40.0 * sigma) as i64 + 20;
    let w = |k: i64| (-(k * k) as f64 / (2.0 * sigma * sigma)).exp();
    let norm: f64 = (-kmax..=kmax).map(w).sum();
    let var = (-kmax..=kmax).map(|k| (k * k) as f64 * w(k)).sum::<f64>() / norm;
    let tails =
        ks.iter().map(|&t| (-kmax..=kmax).filter(|k| k.abs() > t).map(w).sum::<f64>() / norm).collect();
    (var, tails)
}

fn check_against_exact(name: &str, v: &[i64], sigma: f64) {
    let n = v.len() as f64;
    let ks: Vec<i64> = [1.0, 2.0, 3.0].iter().map(|m| (m * sigma).floor() as i64).collect();
    let (var, tails) = exact_dg(sigma, &ks);
    let mean = v.iter().sum::<i64>() as f64 / n;
    let emp_var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
    assert!(mean.abs() < 5.0 * (var / n).sqrt(), "{name} σ {sigma}: mean {mean}");
    // Var of the sample variance ≈ 2σ⁴/n (kurtosis ≈ 3).
    assert!((emp_var - var).abs() < 5.0 * var * (2.0 / n).sqrt(), "{name} σ {sigma}: var {emp_var} vs {var}");
    for (k, p) in ks.iter().zip(tails) {
        let emp = v.iter().filter(|x| x.abs() > *k).count() as f64 / n;
        let se = (p * (1.0 - p) / n).sqrt();
        assert!((emp - p).abs() < 5.0 * se + 1e-12, "{name} σ {sigma}: P(|Z| > {k}) {emp} vs {p}");
    }
}

/// The fast sampler draws N_Z(0, σ²): mean, variance and tails match the exact values (computed
/// by summation) at σ = 0.5, 3 and 300; the truncation is respected and the truncated
/// distribution is the conditional one.
#[test]
fn distributed_fast_sampler_matches_the_discrete_gaussian() {
    let mut r = rng(11);
    for sigma in [0.5, 3.0, 300.0] {
        let mut v = vec![0i64; 400_000];
        FastDiscreteGaussian.sample_into(&mut v, sigma, i64::MAX / 4, &mut r).unwrap();
        check_against_exact("fast", &v, sigma);
    }
    // σ = 0.5: the point masses themselves.
    let mut v = vec![0i64; 400_000];
    FastDiscreteGaussian.sample_into(&mut v, 0.5, 100, &mut r).unwrap();
    let w = |k: f64| (-k * k / 0.5).exp();
    let norm = w(0.0) + 2.0 * (w(1.0) + w(2.0) + w(3.0));
    for k in 0..=2i64 {
        let p = w(k as f64) / norm * if k == 0 { 1.0 } else { 2.0 };
        let emp = v.iter().filter(|x| x.abs() == k).count() as f64 / v.len() as f64;
        assert!((emp - p).abs() < 5.0 * (p / v.len() as f64).sqrt(), "P(|Z| = {k}) {emp} vs {p}");
    }
    // Truncation at ±4 for σ = 3: never beyond, and the conditional mass of |Z| = 4 vs |Z| = 0.
    let mut t = vec![0i64; 200_000];
    FastDiscreteGaussian.sample_into(&mut t, 3.0, 4, &mut r).unwrap();
    assert!(t.iter().all(|x| x.abs() <= 4));
    let c = |k: i64| t.iter().filter(|x| x.abs() == k).count() as f64;
    let ratio = c(4) / c(0);
    let want = 2.0 * (-16.0f64 / 18.0).exp();
    assert!((ratio / want - 1.0).abs() < 0.05, "P(|Z|=4)/P(0) {ratio} vs {want}");
    // Zero noise and bad arguments.
    FastDiscreteGaussian.sample_into(&mut t, 0.0, 0, &mut r).unwrap();
    assert!(t.iter().all(|&x| x == 0));
    assert_eq!(FastDiscreteGaussian.sample_into(&mut t, -1.0, 3, &mut r), Err(NoiseError::BadStd(-1.0)));
    assert!(FastDiscreteGaussian.sample_into(&mut t, f64::NAN, 3, &mut r).is_err());
    assert!(FastDiscreteGaussian.sample_into(&mut t, 1.0, -1, &mut r).is_err());
    assert!(FastDiscreteGaussian.sample_into(&mut t, 1e300, 3, &mut r).is_err());
}

/// opendp's exact sampler agrees with the exact distribution and with the fast sampler, and
/// respects the truncation.
#[cfg(feature = "opendp")]
#[test]
fn distributed_opendp_sampler_matches_the_fast_one() {
    let mut r = rng(12);
    for sigma in [0.5, 3.0, 300.0] {
        let mut o = vec![0i64; 30_000];
        OpenDpDiscreteGaussian.sample_into(&mut o, sigma, i64::MAX / 4, &mut r).unwrap();
        check_against_exact("opendp", &o, sigma);
        let mut f = vec![0i64; 30_000];
        FastDiscreteGaussian.sample_into(&mut f, sigma, i64::MAX / 4, &mut r).unwrap();
        let var = |v: &[i64]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len() as f64;
        let (vo, vf) = (var(&o), var(&f));
        assert!((vo / vf - 1.0).abs() < 0.06, "σ {sigma}: opendp var {vo} vs fast {vf}");
    }
    let mut t = vec![0i64; 5_000];
    OpenDpDiscreteGaussian.sample_into(&mut t, 3.0, 2, &mut r).unwrap();
    assert!(t.iter().all(|x| x.abs() <= 2) && t.iter().any(|x| x.abs() == 2));
    assert!(OpenDpDiscreteGaussian.sample_into(&mut t, -3.0, 2, &mut r).is_err());
}

/// The noise of `min_survivors` devices adds up to at least the target (z·Δ₂)² in variance.
#[test]
fn distributed_survivors_noise_reaches_the_target_variance() {
    let cfg = DistributedDpConfig { dropout_tolerance: 0.5, ..config(20_000, 10, 32, 1.3, false) };
    let plan = cfg.plan(10, 0).unwrap();
    assert_eq!(plan.min_survivors, 5);
    let target = (plan.noise_multiplier * plan.sensitivity()).powi(2);
    let mut r = rng(5);
    let mut sum = vec![0i64; 20_000];
    let mut share = vec![0i64; 20_000];
    for _ in 0..plan.min_survivors {
        FastDiscreteGaussian
            .sample_into(&mut share, plan.device_noise_std, plan.noise_bound, &mut r)
            .unwrap();
        sum.iter_mut().zip(&share).for_each(|(s, z)| *s += z);
    }
    let var = sum.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / sum.len() as f64;
    // Standard error of the variance over 20k values: 1%.
    assert!(var >= 0.96 * target && var <= 1.04 * target, "var {var} vs target {target}");
    assert!(plan.device_noise_std.powi(2) * f64::from(plan.min_survivors) >= target * (1.0 - 1e-12));
}

/// z_eff: at most z, equal to z up to 10⁻⁹ for realistic plans, the KLS formula on hand-computed
/// cases (values from a direct Python evaluation), and the same at every dropout tolerance (more
/// tolerance, more noise per device).
#[test]
fn distributed_accounting_follows_kls() {
    for (dim, cohort, bits, z) in [(2_000, 100, 32, 1.0), (64_000, 1_000, 32, 0.7), (5_000, 50, 20, 2.0)] {
        let cfg = config(dim, cohort, bits, z, true);
        let plan = cfg.plan(cohort, 1).unwrap();
        let z_eff = cfg.accounted_multiplier(&plan);
        assert!(z_eff <= z && z_eff >= z * (1.0 - 1e-9), "{dim}/{cohort}/{bits}: z_eff {z_eff} vs {z}");
        assert!(cfg.truncation_tv(&plan) <= MAX_TRUNCATION_TV);
    }
    // Hand-computed: ε = min(√(Δ²/(mσ²) + 2τp), Δ/(√m σ) + τ√p).
    let hand = |delta: f64, m: u32, sigma: f64, p: u32| QuantPlan {
        clip: 1.0,
        scale: delta - f64::from(p).sqrt(),
        bits: 32,
        dim: p,
        padded_dim: p,
        rotation_seed: None,
        noise_multiplier: 100.0,
        cohort: m,
        min_survivors: m,
        device_noise_std: sigma,
        noise_bound: 1_000,
    };
    for (plan, want) in [
        (hand(2.0, 3, 1.0, 4), 0.865_221_395_987_921_2),
        (hand(10.0, 50, 0.6, 1024), 0.029_158_381_122_748_923),
        (hand(1.0 + 4.0, 100, 0.5, 16), 0.0),
    ] {
        if want == 0.0 {
            continue;
        }
        let got = plan.accounted_multiplier();
        assert!((got / want - 1.0).abs() < 1e-9, "{plan:?}: {got} vs {want}");
    }
    // The √(…) branch wins here: Δ = 1 needs scale < 0, so call the formula directly.
    let eps = kls_epsilon(1.0, 100, 0.5, 16);
    assert!((1.0 / eps / 0.056_752_530_922_360_24 - 1.0).abs() < 1e-9, "{eps}");
    // A single device: the discrete Gaussian's own ½(Δ/σ)²-zCDP, z_eff = σ/Δ.
    assert!((kls_epsilon(3.0, 1, 6.0, 1000) - 0.5).abs() < 1e-15);
    // Dropout tolerance: more tolerance, more noise per device, same z_eff.
    let mut last_std = 0.0;
    for rho in [0.0, 0.1, 0.3, 0.5, 0.8] {
        let cfg = DistributedDpConfig { dropout_tolerance: rho, ..config(2_000, 200, 32, 1.0, false) };
        let plan = cfg.plan(200, 0).unwrap();
        let rel_std = plan.device_noise_std / plan.sensitivity();
        assert!(rel_std > last_std, "rho {rho}: {rel_std} after {last_std}");
        last_std = rel_std;
        let z_eff = cfg.accounted_multiplier(&plan);
        assert!((z_eff - 1.0).abs() < 1e-9, "rho {rho}: z_eff {z_eff}");
        assert_eq!(plan.min_survivors, ((1.0 - rho) * 200.0_f64).ceil() as u32);
    }
    // Small σ_dev: z_eff falls below z.
    // Here τ = 10·Σ exp(−2π²k/(k+1)) ≈ 5.7·10⁻⁴ and τ√p ≈ 0.036 (Python: z_eff = 0.96478…).
    let small = QuantPlan { device_noise_std: 1.0, noise_multiplier: 1.0, ..hand(30.0, 900, 1.0, 4096) };
    let z_small = small.accounted_multiplier();
    assert!((z_small / SMALL_Z_EFF - 1.0).abs() < 1e-9, "{z_small}");
}

#[test]
fn distributed_plan_validate_refuses_bad_plans() {
    let cfg = config(1000, 100, 32, 1.0, true);
    let good = cfg.plan(100, 5).unwrap();
    good.validate().unwrap();
    let with = |f: &dyn Fn(&mut QuantPlan)| {
        let mut p = good;
        f(&mut p);
        p.validate()
    };
    assert!(matches!(with(&|p| p.device_noise_std *= 0.9), Err(DistributedDpError::NoiseTooSmall { .. })));
    assert!(matches!(with(&|p| p.min_survivors = 50), Err(DistributedDpError::NoiseTooSmall { .. })));
    assert!(matches!(with(&|p| p.noise_bound *= 4), Err(DistributedDpError::Overflow { .. })));
    assert!(matches!(with(&|p| p.cohort = 1000), Err(DistributedDpError::Overflow { .. })));
    assert!(matches!(with(&|p| p.scale *= 3.0), Err(DistributedDpError::Overflow { .. })));
    assert!(matches!(with(&|p| p.noise_bound /= 2), Err(DistributedDpError::TruncationTooTight { .. })));
    assert_eq!(with(&|p| p.bits = 0), Err(DistributedDpError::BadBits(0)));
    assert_eq!(with(&|p| p.bits = 33), Err(DistributedDpError::BadBits(33)));
    assert!(matches!(with(&|p| p.bits = 16), Err(DistributedDpError::Overflow { .. })));
    assert!(matches!(with(&|p| p.padded_dim = 1000), Err(DistributedDpError::Inconsistent(_))));
    assert!(matches!(with(&|p| p.rotation_seed = None), Err(DistributedDpError::Inconsistent(_))));
    assert!(matches!(with(&|p| p.min_survivors = 101), Err(DistributedDpError::Inconsistent(_))));
    assert!(matches!(with(&|p| p.dim = u32::MAX), Err(DistributedDpError::BadDim(_))));
    assert!(matches!(with(&|p| p.scale = f64::NAN), Err(DistributedDpError::BadScale(_))));
    assert!(matches!(
        with(&|p| p.device_noise_std = f64::INFINITY),
        Err(DistributedDpError::Inconsistent(_))
    ));
    assert!(matches!(with(&|p| p.noise_bound = -1), Err(DistributedDpError::Inconsistent(_))));
    assert!(matches!(with(&|p| p.noise_bound = i64::MAX), Err(DistributedDpError::Overflow { .. })));
    // More noise than needed is fine (with a bound to match), when the modulus has room.
    let mut roomy = cfg.plan(10, 5).unwrap();
    roomy.device_noise_std *= 1.1;
    roomy.noise_bound = (roomy.noise_bound as f64 * 1.1).ceil() as i64;
    roomy.validate().unwrap();
    // The plan travels in the task.
    // (serde_json without `float_roundtrip` may move an f64 by an ulp; validation tolerates it.)
    let json = serde_json::to_string(&good).unwrap();
    let back: QuantPlan = serde_json::from_str(&json).unwrap();
    back.validate().unwrap();
    assert!((back.device_noise_std / good.device_noise_std - 1.0).abs() < 1e-15);
    assert_eq!(QuantPlan { device_noise_std: good.device_noise_std, scale: good.scale, ..back }, good);
    let bin = bincode::serde::encode_to_vec(good, bincode::config::standard()).unwrap();
    let (back, _): (QuantPlan, usize) =
        bincode::serde::decode_from_slice(&bin, bincode::config::standard()).unwrap();
    assert_eq!(back, good);
}

#[test]
fn distributed_config_validation() {
    let ok = config(1000, 100, 32, 1.0, false);
    ok.validate().unwrap();
    assert!(ok.rounding_inflation() < 1e-3);
    assert!((ok.sensitivity() - (ok.resolved_scale().unwrap() + 1000f64.sqrt())).abs() < 1e-6);
    let bad = |f: &dyn Fn(&mut DistributedDpConfig)| {
        let mut c = ok;
        f(&mut c);
        c.validate()
    };
    assert_eq!(bad(&|c| c.clip = 0.0), Err(DistributedDpError::BadClip(0.0)));
    assert!(matches!(
        bad(&|c| c.noise_multiplier = f64::NAN),
        Err(DistributedDpError::BadNoiseMultiplier(_))
    ));
    assert_eq!(bad(&|c| c.dim = 0), Err(DistributedDpError::BadDim(0)));
    assert_eq!(bad(&|c| c.bits = 33), Err(DistributedDpError::BadBits(33)));
    assert_eq!(bad(&|c| c.max_cohort = 0), Err(DistributedDpError::BadCohort(0)));
    assert_eq!(bad(&|c| c.dropout_tolerance = 1.0), Err(DistributedDpError::BadDropoutTolerance(1.0)));
    assert_eq!(bad(&|c| c.scale = Some(-1.0)), Err(DistributedDpError::BadScale(-1.0)));
    assert!(matches!(bad(&|c| c.scale = Some(1e9)), Err(DistributedDpError::Overflow { .. })));
    assert!(matches!(bad(&|c| c.bits = 1), Err(DistributedDpError::Overflow { .. })));
    // A 12-bit modulus for 100 devices and 1000 coordinates: rounding would dominate.
    assert!(matches!(bad(&|c| c.bits = 14), Err(DistributedDpError::TooCoarse { .. })));
    assert!(bad(&|c| c.bits = 14).is_err() && ok.validate().is_ok());
    // An explicit small scale: σ_dev below 1.
    assert!(matches!(
        bad(&|c| {
            c.scale = Some(10.0);
            c.dim = 1;
            c.noise_multiplier = 0.5;
        }),
        Err(DistributedDpError::NoiseTooSmall { .. })
    ));
    let mut c = ok;
    c.bits = 14;
    assert!(c.rounding_inflation() > MAX_ROUNDING_INFLATION);
    c.clip = -1.0;
    assert!(c.sensitivity().is_nan() && c.rounding_inflation().is_infinite());
    // The automatic scale is the largest: 1% more overflows.
    let gamma = ok.resolved_scale().unwrap();
    assert!(DistributedDpConfig { scale: Some(gamma * 1.01), ..ok }.validate().is_err());
    assert!(DistributedDpConfig { scale: Some(gamma), ..ok }.validate().is_ok());
    // Plans: cohort bounds.
    assert_eq!(ok.plan(101, 0), Err(DistributedDpError::CohortTooLarge { cohort: 101, max: 100 }));
    assert_eq!(ok.plan(0, 0), Err(DistributedDpError::BadCohort(0)));
    // Every cohort size up to max_cohort gets a valid plan (the config's bound covers them all).
    for rho in [0.0, 0.5, 0.95] {
        let c = DistributedDpConfig { dropout_tolerance: rho, ..ok };
        for n in 1..=100 {
            c.plan(n, 0).unwrap_or_else(|e| panic!("rho {rho} n {n}: {e}"));
        }
    }
}

#[test]
fn distributed_decode_refuses_bad_sums() {
    let cfg = config(10, 5, 20, 1.0, false);
    let plan = cfg.plan(5, 0).unwrap();
    assert_eq!(decode_sum(&[0; 9], &plan), Err(DecodeError::Length { expected: 10, got: 9 }));
    let mut s = vec![0u32; 10];
    s[3] = 1 << 20;
    assert_eq!(decode_sum(&s, &plan), Err(DecodeError::NotReduced { index: 3, value: 1 << 20 }));
    s[3] = (1 << 20) - 1;
    let d = decode_sum(&s, &plan).unwrap();
    assert!((d[3] + 1.0 / plan.scale).abs() < 1e-12, "all ones is −1");
    assert!(matches!(decode_sum_checked(&s, &plan, 3), Err(DecodeError::Contributors { .. })));
    assert!(matches!(decode_sum_checked(&s, &plan, 6), Err(DecodeError::Contributors { .. })));
    decode_sum_checked(&s, &plan, 4).unwrap();
    let mut acc = vec![0u32; 10];
    assert!(add_mod(&mut acc, &[1; 9], &plan).is_err());
}

fn timing_plan(rotation: bool) -> QuantPlan {
    let cfg = DistributedDpConfig {
        clip: 1.0,
        noise_multiplier: 1.0,
        dim: 64_000,
        bits: 32,
        max_cohort: 1_000,
        dropout_tolerance: 0.2,
        rotation,
        scale: None,
    };
    cfg.plan(1_000, 3).unwrap()
}

/// Encode and decode of 64,000 values (dim 2,000 × 32), with the fast and the opendp samplers.
/// Run: `cargo test --release -p starling-proto --features opendp distributed_timing -- --ignored --nocapture`.
#[test]
#[ignore = "timing; run by hand"]
fn distributed_timing_encode_decode() {
    let u = updates(1, 64_000, 9).remove(0);
    let mut r = rng(1);
    for rotation in [false, true] {
        let plan = timing_plan(rotation);
        eprintln!(
            "plan rotation {rotation}: γ {:.1}, σ_dev {:.1}, bound {}, z_eff {:.9}, inflation {:.2e}",
            plan.scale,
            plan.device_noise_std,
            plan.noise_bound,
            plan.accounted_multiplier(),
            f64::from(plan.padded_dim).sqrt() / (plan.scale * plan.clip)
        );
        #[cfg_attr(not(feature = "opendp"), allow(unused_mut))]
        let mut samplers: Vec<(Box<dyn DiscreteGaussian>, u32)> = vec![(Box::new(FastDiscreteGaussian), 20)];
        #[cfg(feature = "opendp")]
        samplers.push((Box::new(OpenDpDiscreteGaussian), 1));
        for (s, runs) in samplers {
            let t = std::time::Instant::now();
            let mut e = None;
            for _ in 0..runs {
                e = Some(encode(&u, &plan, s.as_ref(), &mut r).unwrap());
            }
            let secs = t.elapsed().as_secs_f64() / f64::from(runs);
            eprintln!("  encode 64,000 ({}): {:.2} ms", s.name(), secs * 1e3);
            let sum = e.unwrap().values;
            let t = std::time::Instant::now();
            for _ in 0..20 {
                std::hint::black_box(decode_sum(&sum, &plan).unwrap());
            }
            eprintln!("  decode_sum 64,000: {:.2} ms", t.elapsed().as_secs_f64() / 20.0 * 1e3);
        }
        let zero = QuantPlan { noise_multiplier: 0.0, device_noise_std: 0.0, noise_bound: 0, ..plan };
        let t = std::time::Instant::now();
        for _ in 0..20 {
            std::hint::black_box(encode(&u, &zero, &FastDiscreteGaussian, &mut r).unwrap());
        }
        eprintln!("  encode 64,000 without noise: {:.2} ms", t.elapsed().as_secs_f64() / 20.0 * 1e3);
    }
}

/// Raw sampler throughput at several σ.
#[test]
#[ignore = "timing; run by hand"]
fn distributed_timing_samplers() {
    let mut r = rng(2);
    for sigma in [3.0, 300.0, 60_000.0] {
        let mut v = vec![0i64; 4_000_000];
        let t = std::time::Instant::now();
        FastDiscreteGaussian.sample_into(&mut v, sigma, i64::MAX / 4, &mut r).unwrap();
        let secs = t.elapsed().as_secs_f64();
        eprintln!("fast σ {sigma}: {:.1} M samples/s", v.len() as f64 / secs / 1e6);
        #[cfg(feature = "opendp")]
        {
            let mut v = vec![0i64; 20_000];
            let t = std::time::Instant::now();
            OpenDpDiscreteGaussian.sample_into(&mut v, sigma, i64::MAX / 4, &mut r).unwrap();
            let secs = t.elapsed().as_secs_f64();
            eprintln!("opendp σ {sigma}: {:.1} k samples/s", v.len() as f64 / secs / 1e3);
        }
    }
}

/// z_eff of the small-σ case in `distributed_accounting_follows_kls`, from a direct Python
/// evaluation of the KLS21 formula.
const SMALL_Z_EFF: f64 = 0.964_780_314_707_218_5;
