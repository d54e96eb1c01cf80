use super::discretise::{self, Direction};
use super::*;
use crate::dp::accountant;

fn mech(q: f64, s: f64, steps: u64) -> Mechanism {
    Mechanism { q: SamplingRate::new(q).unwrap(), sigma: NoiseMultiplier::new(s).unwrap(), steps }
}

fn d(x: f64) -> Delta {
    Delta::new(x).unwrap()
}

fn composed(ms: &[Mechanism]) -> ComposedPld {
    let mut acc = PldAccountant::new();
    for m in ms {
        acc.compose(m);
    }
    acc.composed()
}

fn rdp(ms: &[Mechanism], delta: f64) -> f64 {
    let mut acc = RdpAccountant::default();
    for m in ms {
        acc.compose(m);
    }
    acc.epsilon(d(delta)).0
}

/// The exact ε(δ) of a single round: bisection on the larger of the two exact profiles.
fn exact_single_round(q: f64, s: f64, delta: f64) -> f64 {
    let profile = |e: f64| {
        discretise::delta(q, s, Direction::Remove, e).max(discretise::delta(q, s, Direction::Add, e))
    };
    if profile(0.0) <= delta {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0, 1.0);
    while profile(hi) > delta {
        lo = hi;
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if profile(mid) > delta { lo = mid } else { hi = mid }
    }
    hi
}

/// The figure that motivated the PLD accountant: a large fleet with a small sampling rate,
/// where RDP over-counts by a factor of five or more.
#[test]
fn small_sampling_rate_reference_figure() {
    let m = mech(5e-4, 1.3, 2000);
    let pld = composed(&[m]).epsilon(d(1e-7));
    let rdp = rdp(&[m], 1e-7);
    assert!((0.07..=0.11).contains(&pld), "pld {pld}");
    assert!((pld - 0.0870).abs() < 5e-4, "pld {pld}");
    assert!((rdp - 0.502).abs() < 1e-3, "rdp {rdp}");
}

/// Opacus' PRV accountant test values (`opacus/tests/prv_accountant.py`, "computed from
/// https://github.com/microsoft/prv_accountant"), ε at δ = 10⁻⁶ for (σ, q, steps). Opacus reports
/// the PRV accountant's *upper* bound, with `eps_error = 0.01`; ours is an upper bound too and
/// lands just below it (by about the 0.01 of their error budget on small ε).
const PRV_REFERENCE: [(f64, f64, u64, f64); 40] = [
    (0.8, 0.001, 100, 0.270_403_364),
    (1.5, 0.001, 100, 0.039_369_419),
    (2.0, 0.001, 100, 0.029_104_537),
    (3.0, 0.001, 100, 0.021_520_093),
    (0.8, 0.05, 100, 6.741_051_939),
    (1.5, 0.05, 100, 1.953_853_136),
    (2.0, 0.05, 100, 1.283_637_380),
    (3.0, 0.05, 100, 0.767_933_790),
    (0.8, 0.2, 100, 24.333_664_178),
    (1.5, 0.2, 100, 8.498_977_859),
    (2.0, 0.2, 100, 5.672_055_609),
    (3.0, 0.2, 100, 3.381_220_510),
    (0.8, 0.001, 1000, 0.477_771_266),
    (1.5, 0.001, 1000, 0.099_820_660),
    (2.0, 0.001, 1000, 0.071_218_783),
    (3.0, 0.001, 1000, 0.047_615_931),
    (0.8, 0.05, 1000, 19.525_842_805),
    (1.5, 0.05, 1000, 6.209_969_247),
    (2.0, 0.05, 1000, 4.172_799_867),
    (3.0, 0.05, 1000, 2.527_574_326),
    (0.8, 0.001, 20000, 1.296_009_258),
    (1.5, 0.001, 20000, 0.437_005_109),
    (2.0, 0.001, 20000, 0.305_837_940),
    (3.0, 0.001, 20000, 0.194_031_031),
    (0.8, 0.05, 20000, 140.655_209_760),
    (1.5, 0.05, 20000, 38.306_617_914),
    (2.0, 0.05, 20000, 24.421_718_570),
    (3.0, 0.05, 20000, 13.961_114_699),
    (0.8, 0.001, 50000, 2.034_514_808),
    (1.5, 0.001, 50000, 0.704_218_385),
    (2.0, 0.001, 50000, 0.491_354_910),
    (3.0, 0.001, 50000, 0.309_694_161),
    (0.8, 0.05, 50000, 291.384_325_452),
    (1.5, 0.05, 50000, 73.190_176_724),
    (2.0, 0.05, 50000, 45.236_995_861),
    (3.0, 0.05, 50000, 24.942_005_643),
    (0.8, 0.001, 100000, 2.924_622_119),
    (1.5, 0.001, 100000, 1.015_288_075),
    (2.0, 0.001, 100000, 0.706_719_901),
    (3.0, 0.001, 100000, 0.443_671_721),
];

#[test]
fn matches_the_prv_accountant_of_opacus() {
    for (sigma, q, steps, prv) in PRV_REFERENCE {
        let pld = composed(&[mech(q, sigma, steps)]).epsilon(d(1e-6));
        // Within their error budget below, and within our discretisation error (< 0.05 %) above.
        assert!(pld <= prv * 1.0005, "σ {sigma} q {q} T {steps}: pld {pld} > prv {prv}");
        assert!(pld >= prv - 0.0105 - 2e-4 * prv, "σ {sigma} q {q} T {steps}: pld {pld} << prv {prv}");
    }
}

/// Google `dp_accounting`'s PLD accountant tests (`pld_privacy_accountant_test.py`):
/// `test_poisson_subsampled_gaussian` (q = 0.2, σ = 0.5, 3 rounds: δ(1) = 0.15594 ± 10⁻³) and
/// `test_gaussian_basic` (σ = √3, 3 rounds: δ(1) = 0.126936, exact).
#[test]
fn matches_dp_accounting() {
    let c = composed(&[mech(0.2, 0.5, 1), mech(0.2, 0.5, 2)]);
    let delta = c.delta(1.0).unwrap();
    assert!((delta - 0.15594).abs() < 1e-3, "{delta}");
    assert!((c.epsilon(d(0.15594)) - 1.0).abs() < 2e-3);
    // On a grid eight times finer the bound closes in on their figure.
    let fine = composed_at(&[mech(0.2, 0.5, 3)], Estimate::ConnectDots, RESOLUTION / 8.0);
    let delta = fine.delta(1.0).unwrap();
    assert!((delta - 0.15594).abs() < 2e-5, "{delta}");
    let c = composed(&[mech(1.0, 3f64.sqrt(), 3)]);
    let delta = c.delta(1.0).unwrap();
    assert!((0.126936..0.126936 + 1e-4).contains(&delta), "{delta}");
    assert!((gaussian_delta(1.0, 1.0) - 0.126936).abs() < 1e-6);
    assert!((c.epsilon(d(0.126936)) - 1.0).abs() < 1e-3);
}

/// The RDP reference of Opacus' `accountants_test.py` (σ = 1.5, q = 0.04, 2250 steps, δ = 10⁻⁵:
/// RDP 7.3291; its CLT-based "GDP" estimate, not a bound, is 6.59–6.60): PLD sits between.
#[test]
fn sits_between_the_clt_estimate_and_rdp_on_opacus_example() {
    let m = mech(0.04, 1.5, 2250);
    let r = rdp(&[m], 1e-5);
    assert!((r - 7.3291).abs() < 1e-3, "rdp {r}");
    let pld = composed(&[m]).epsilon(d(1e-5));
    assert!(pld > 6.6 && pld < r, "pld {pld}");
}

/// The established DP-SGD example (q = 0.01, σ = 1.1, 1000 steps, δ = 10⁻⁵): RDP 1.712.
#[test]
fn abadi_mnist_example() {
    let m = mech(0.01, 1.1, 1000);
    let pld = composed(&[m]).epsilon(d(1e-5));
    assert!((pld - 1.5156).abs() < 2e-3, "pld {pld}");
    assert!(pld < rdp(&[m], 1e-5));
}

/// Full participation is the Gaussian mechanism, whose ε(δ) is known exactly (Balle & Wang
/// 2018): the accountant is never below it and within 1 % above.
#[test]
fn full_participation_is_the_exact_gaussian_from_above() {
    for sigma in [0.5, 1.0, 2.0, 5.0, 20.0] {
        for t in [1u64, 10, 100, 1000] {
            let c = composed(&[mech(1.0, sigma, t)]);
            for delta in [1e-3, 1e-5, 1e-8] {
                let exact = gaussian_epsilon((t as f64).sqrt() / sigma, d(delta));
                let pld = c.epsilon(d(delta));
                assert!(pld >= exact * (1.0 - 1e-9) - 1e-12, "σ {sigma} T {t} δ {delta}: {pld} < {exact}");
                assert!(pld <= exact * 1.01 + 1e-4, "σ {sigma} T {t} δ {delta}: {pld} vs {exact}");
            }
        }
    }
    // Heterogeneous Gaussians compose to μ = √(Σ Tᵢ/σᵢ²) (prv_accountant's
    // `test_gaussian_mechanism_analytic_heterogeneous`: σ = 10 and 5, 50 rounds each, ε = 4).
    let c = composed(&[mech(1.0, 10.0, 50), mech(1.0, 5.0, 50)]);
    let mu = (50.0 / 100.0 + 50.0 / 25.0f64).sqrt();
    let (pld, exact) = (c.delta(4.0).unwrap(), gaussian_delta(mu, 4.0));
    assert!(pld >= exact && pld <= exact * 1.02, "{pld} vs {exact}");
}

/// Where δ is tiny the FFT's rounding noise is as large as the mass that matters; the
/// allowance for it keeps the bound above the exact Gaussian there too.
#[test]
fn rounding_noise_does_not_let_tiny_deltas_slip_under() {
    for (sigma, t) in [(1.0, 1000u64), (5.0, 100), (0.7, 20_000)] {
        let c = composed(&[mech(1.0, sigma, t)]);
        let mu = (t as f64).sqrt() / sigma;
        for target in [1e-9, 1e-11, 1e-13] {
            let e = gaussian_epsilon(mu, d(target));
            let pld = c.delta(e).unwrap();
            assert!(pld >= target, "σ {sigma} T {t}: δ({e}) = {pld} < {target}");
        }
    }
}

/// Over a grid of settings: the exact-from-below bracket (losses rounded down) ≤ PLD ≤ RDP, and
/// for one round PLD ≥ the exact ε of that round.
#[test]
fn never_below_a_lower_bound_never_above_rdp() {
    for q in [1e-3, 0.02, 0.3, 1.0] {
        for sigma in [0.8, 1.5, 4.0] {
            for t in [1u64, 30, 1000] {
                let m = mech(q, sigma, t);
                let upper = composed(&[m]);
                let lower = composed_at(&[m], Estimate::Optimistic, RESOLUTION);
                for delta in [1e-5, 1e-9] {
                    let (e, lo, r) = (upper.epsilon(d(delta)), lower.epsilon(d(delta)), rdp(&[m], delta));
                    let at = format!("q {q} σ {sigma} T {t} δ {delta}: pld {e} lower {lo} rdp {r}");
                    assert!(e.is_finite() && lo <= e && e <= r, "{at}");
                    if t == 1 {
                        let exact = exact_single_round(q, sigma, delta);
                        assert!(e >= exact - 1e-9 && e <= exact * 1.01 + 1e-3, "{at}, exact {exact}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_finer_grid_changes_little() {
    for m in [mech(5e-4, 1.3, 2000), mech(0.05, 0.8, 1000), mech(1.0, 2.0, 50)] {
        let coarse = composed(&[m]).epsilon(d(1e-6));
        let fine = composed_at(&[m], Estimate::ConnectDots, RESOLUTION / 4.0).epsilon(d(1e-6));
        assert!((coarse - fine).abs() <= 1e-3 * fine + 1e-6, "{m:?}: {coarse} vs {fine}");
    }
}

#[test]
fn heterogeneous_composition_is_commutative_and_splits_like_counts() {
    let (a, b) = (mech(0.01, 1.0, 300), mech(0.05, 2.0, 100));
    let ab = composed(&[a, b]);
    let ba = composed(&[b, a]);
    for delta in [1e-5, 1e-8] {
        let (x, y) = (ab.epsilon(d(delta)), ba.epsilon(d(delta)));
        assert!((x - y).abs() <= 1e-6 * x, "{x} vs {y}");
        // Each part alone costs less than both; both cost less than RDP says.
        let alone = composed(&[a]).epsilon(d(delta)).max(composed(&[b]).epsilon(d(delta)));
        assert!(alone < x && x < rdp(&[a, b], delta), "{alone} {x}");
    }
    // [A×n, A×m] is A×(n+m): recorded apart, merged by the accountant...
    let split = composed(&[mech(0.01, 1.0, 120), mech(0.01, 1.0, 180)]);
    assert_eq!(split, composed(&[a]));
    // ...and, composed as two groups by FFT, the same up to rounding (and its allowance).
    let groups = [mech(0.01, 1.0, 120), mech(0.01, 1.0, 180)];
    let two = ComposedPld { outcome: evaluate(&groups, &[], Estimate::ConnectDots, RESOLUTION) };
    let one = composed(&[a]);
    for delta in [1e-5, 1e-8] {
        let (x, y) = (two.epsilon(d(delta)), one.epsilon(d(delta)));
        assert!((x - y).abs() <= 1e-6 * y, "{x} vs {y}");
    }
}

#[test]
fn more_rounds_less_noise_more_sampling_never_cost_less() {
    let eps = |q: f64, s: f64, t: u64| composed(&[mech(q, s, t)]).epsilon(d(1e-6));
    let mut last = 0.0;
    for t in [1u64, 2, 10, 100, 1000, 10_000] {
        let e = eps(0.01, 1.0, t);
        assert!(e > last, "T {t}: {e} after {last}");
        last = e;
    }
    assert!(eps(0.01, 0.8, 100) > eps(0.01, 1.2, 100));
    assert!(eps(0.02, 1.0, 100) > eps(0.01, 1.0, 100));
    // δ(ε) is non-increasing and ε(δ) inverts it.
    let c = composed(&[mech(0.02, 1.0, 500)]);
    let mut prev = 1.0;
    for e in [0.0, 0.1, 0.5, 1.0, 2.0, 5.0] {
        let delta = c.delta(e).unwrap();
        assert!(delta <= prev, "ε {e}");
        prev = delta;
        if delta > 1e-12 && e > 0.0 {
            assert!((c.epsilon(d(delta)) - e).abs() < 1e-6, "ε {e} δ {delta}");
        }
    }
}

#[test]
fn degenerate_inputs_saturate_instead_of_failing() {
    // Nothing recorded, or zero steps: nothing spent.
    assert_eq!(composed(&[]).epsilon(d(1e-5)), 0.0);
    assert_eq!(composed(&[mech(0.1, 1.0, 0)]).epsilon(d(1e-5)), 0.0);
    assert_eq!(composed(&[]).delta(0.0), Ok(0.0));
    // No noise: no privacy.
    let open = composed(&[mech(0.1, 1.0, 10), mech(0.1, 0.0, 1)]);
    assert_eq!(open.epsilon(d(1e-5)), f64::INFINITY);
    assert_eq!(open.delta(100.0), Ok(1.0));
    // Bad ε is a typed error.
    assert_eq!(open.delta(-1.0), Err(PldError::Epsilon(-1.0)));
    assert!(matches!(open.delta(f64::NAN), Err(PldError::Epsilon(_))));
    // Extremes give finite or infinite ε, never NaN, and stay at or below RDP.
    for (q, s, t) in [
        (1e-12, 1.0, 1000u64),
        (1.0, 1e-3, 10),
        (0.5, 1e6, 1000),
        (0.01, 1.0, u64::MAX),
        (1.0, 0.05, 1 << 40),
        (0.3, 0.2, 3),
    ] {
        let m = mech(q, s, t);
        let c = composed(&[m]);
        let e = c.epsilon(d(1e-5));
        assert!(!e.is_nan() && e >= 0.0, "{m:?}: {e}");
        assert!(e <= rdp(&[m], 1e-5) * (1.0 + 1e-9), "{m:?}: {e}");
        let delta = c.delta(1.0).unwrap();
        assert!((0.0..=1.0).contains(&delta), "{m:?}: {delta}");
    }
    // Ten million rounds do not fit the grid: the RDP bound stands in.
    let huge = composed(&[mech(0.01, 1.0, u64::MAX)]);
    assert!(huge.is_rdp_fallback() && huge.grid_step().is_none());
}

#[test]
fn many_distinct_mechanisms_are_merged_pessimistically() {
    let ms: Vec<Mechanism> = (0..40).map(|i| mech(0.01, 1.0 + 0.01 * f64::from(i), 20)).collect();
    let all = composed(&ms).epsilon(d(1e-6));
    // The first 32 alone cost less; RDP of all costs more.
    let some = composed(&ms[..32]).epsilon(d(1e-6));
    assert!(some < all && all < rdp(&ms, 1e-6), "{some} {all}");
    // Merging rounds σ down and q up: at most the cost of every round at the smallest σ.
    let worst = composed(&[mech(0.01, 1.0, 800)]).epsilon(d(1e-6));
    assert!(all <= worst, "{all} {worst}");
}

#[test]
fn calibration_finds_the_smallest_sigma_within_target() {
    let (q, delta) = (SamplingRate::new(0.01).unwrap(), d(1e-5));
    let target = Epsilon::new(2.0).unwrap();
    let pld = calibrate_sigma(q, 1000, delta, target).unwrap();
    let rdp = accountant::calibrate_sigma(q, 1000, delta, target).unwrap();
    assert!(pld < rdp, "pld σ {pld} rdp σ {rdp}");
    let eps = |s: f64| epsilon(q, NoiseMultiplier::new(s).unwrap(), 1000, delta);
    assert!(eps(pld) <= 2.0 && eps(pld * 0.999) > 2.0, "{pld}: {}", eps(pld));
    assert_eq!(
        calibrate_sigma(q, 1000, delta, Epsilon::new(1e-9).unwrap()),
        Err(CalibrationError::Unreachable(1e-9))
    );
}

#[test]
fn the_accountant_caches_rounds_and_answers_like_a_fresh_one() {
    let mut acc = PldAccountant::new();
    let m = mech(0.02, 1.1, 1);
    for _ in 0..50 {
        acc.compose(&m);
    }
    assert_eq!(acc.mechanisms(), &[mech(0.02, 1.1, 50)]);
    let fresh = composed(&[mech(0.02, 1.1, 50)]);
    assert_eq!(acc.composed(), fresh);
    assert_eq!(acc.composed_with(&m), composed(&[mech(0.02, 1.1, 51)]));
    assert_eq!(acc.epsilon_with(&m, d(1e-5)), composed(&[mech(0.02, 1.1, 51)]).epsilon(d(1e-5)));
    assert!(acc.delta(1.0).unwrap() > 0.0);
}

/// Timings for the docs (not asserted): `cargo test --release --workspace --lib -- --ignored
/// pld_timings --nocapture`.
#[test]
#[ignore = "timings for the docs, not a check"]
fn pld_timings() {
    let time = |label: &str, f: &dyn Fn() -> f64| {
        let start = std::time::Instant::now();
        let runs = 10;
        let mut e = 0.0;
        for _ in 0..runs {
            e = f();
        }
        println!("{label}: ε {e:.4}, {:?} per evaluation", start.elapsed() / runs);
    };
    let m = mech(5e-4, 1.3, 2000);
    time("q 5e-4 σ 1.3 T 2000 δ 1e-7, from scratch", &|| epsilon(m.q, m.sigma, 2000, d(1e-7)));
    let mut acc = PldAccountant::new();
    for _ in 0..2000 {
        acc.compose(&mech(5e-4, 1.3, 1));
    }
    time("ledger of 2000 rounds, one more projected", &|| acc.epsilon_with(&mech(5e-4, 1.3, 1), d(1e-7)));
    let ten: Vec<Mechanism> =
        (0..10).map(|i| mech(0.001 * f64::from(i + 1), 0.9 + 0.1 * f64::from(i), 200)).collect();
    time("10 distinct mechanisms x 200 rounds", &|| composed(&ten).epsilon(d(1e-6)));
    let mut acc = PldAccountant::new();
    for m in &ten {
        acc.compose(m);
    }
    time("same, cached in an accountant", &|| acc.epsilon(d(1e-6)));
    time("RDP, q 5e-4 σ 1.3 T 2000", &|| accountant::epsilon(m.q, m.sigma, 2000, d(1e-7)).0);
    for t in [100_000u64, 1_000_000, 10_000_000, 100_000_000] {
        let m = mech(0.01, 1.0, t);
        let start = std::time::Instant::now();
        let c = composed(&[m]);
        let e = c.epsilon(d(1e-6));
        println!(
            "q 0.01 σ 1 T {t}: ε {e:.4} (RDP {:.4}), h {:?}, window {:?}, RDP fallback {}, {:?}",
            rdp(&[m], 1e-6),
            c.grid_step(),
            c.window_len(),
            c.is_rdp_fallback(),
            start.elapsed()
        );
    }
    for (sigma, t) in [(1.0, 1000u64), (5.0, 100), (0.7, 20_000)] {
        let c = composed(&[mech(1.0, sigma, t)]);
        let mu = (t as f64).sqrt() / sigma;
        for target in [1e-9, 1e-11, 1e-13] {
            let e = gaussian_epsilon(mu, d(target));
            println!(
                "q 1 σ {sigma} T {t}: at the exact ε {e:.4} for δ {target:e}, PLD δ {:.4e} (window {:?}, noise {:?})",
                c.delta(e).unwrap(),
                c.window_len(),
                c.noise()
            );
        }
    }
    for m in
        [mech(5e-4, 1.3, 2000), mech(0.01, 1.1, 1000), mech(0.001, 0.8, 100_000), mech(0.05, 0.8, 50_000)]
    {
        let c = composed(&[m]);
        println!("{m:?}: noise {:?}, window {:?}", c.noise(), c.window_len());
    }
    let budget = crate::dp::Budget { epsilon: Epsilon::new(8.0).unwrap(), delta: d(1e-5) };
    let entries = (1..=500).map(|round| crate::dp::LedgerEntry { round, mechanism: mech(0.01, 1.1, 1) });
    let ledger = crate::dp::PrivacyLedger::replay(budget, entries);
    let (q, s) = (SamplingRate::new(0.01).unwrap(), NoiseMultiplier::new(1.1).unwrap());
    time("rounds_left on a ledger of 500 rounds, ε budget 8", &|| ledger.rounds_left(q, s) as f64);
    time("calibrate σ (PLD), q 0.01 T 1000 ε 2", &|| {
        calibrate_sigma(SamplingRate::new(0.01).unwrap(), 1000, d(1e-5), Epsilon::new(2.0).unwrap()).unwrap()
    });
}
