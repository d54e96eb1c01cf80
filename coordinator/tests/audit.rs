//! The empirical privacy audit (`SimConfig::audit`, `starling simulate --audit-canaries K`):
//! canary clients whose updates are random unit directions at the clip norm, and the ε estimated
//! from the cosines of the final model's change with them (see `sim::audit`).
//!
//! - Without DP the canaries stand out: the estimate is large, so the audit can fail.
//! - Under central DP (σ = 1, enough rounds for a non-trivial ledger) the estimate stays at or
//!   below the accountant's ε.
//!
//! A small synthetic population (400 users, 200 items, dimension 4: d = 800 global parameters)
//! and the bare kernel clients keep each run to seconds.

use starling_coordinator::sim::audit::{
    AuditConfig, AuditReport, Gaussian, epsilon_two_gaussians, gaussian_mechanism_epsilon,
};
use starling_coordinator::sim::report::{RoundRecord, SimReport};
use starling_coordinator::sim::{
    self, ClientKind, Dataset, NoiseSampler, PrivacyMode, SimConfig, TransportKind,
};

const CANARIES: usize = 50;
const DELTA: f64 = 1e-5;

fn workload(privacy: PrivacyMode, rounds: u32) -> SimConfig {
    SimConfig {
        dataset: Dataset::Synthetic { users: 400, items: 200, seed: 1 },
        clients: ClientKind::Kernel,
        dim: 4,
        eval_every: rounds,
        seed: 1,
        privacy,
        audit: Some(AuditConfig { canaries: CANARIES, delta: DELTA }),
        ..SimConfig::reference("unused".into(), 40, rounds)
    }
}

fn central(rounds: u32) -> SimConfig {
    workload(
        PrivacyMode::Central {
            clip: 0.5,
            noise_multiplier: 1.0,
            epsilon: 1000.0,
            delta: DELTA,
            adaptive_quantile: None,
            sampler: NoiseSampler::Fast,
        },
        rounds,
    )
}

fn run(c: &SimConfig) -> SimReport {
    sim::run(c, &mut |_: &RoundRecord, _: u32| {}).expect("simulation runs")
}

fn audit(r: &SimReport) -> &AuditReport {
    let a = r.audit.as_ref().expect("the audit is reported");
    println!("{}", a.summary());
    a
}

/// The held-out directions behave as the null says: mean about 0, spread about 1/√d.
fn check_null(a: &AuditReport) {
    assert_eq!((a.canaries, a.dimension, a.delta), (CANARIES, 800, DELTA));
    let null = 1.0 / (a.dimension as f64).sqrt();
    assert!(a.held_out_cosine_mean.abs() < 4.0 * null / (CANARIES as f64).sqrt(), "{a:?}");
    assert!((a.held_out_cosine_std / null - 1.0).abs() < 0.3, "{a:?}");
}

#[test]
fn without_dp_the_canaries_stand_out_and_the_estimate_is_large() {
    let r = run(&workload(PrivacyMode::Off, 30));
    let a = audit(&r);
    check_null(a);
    assert_eq!(a.accountant_epsilon, None, "no ledger without DP");
    let json = serde_json::to_value(&r).expect("JSON");
    assert!(json["audit"]["accountant_epsilon"].is_null(), "null without DP");
    // The canaries took part like any client (q = 40 / 450 over 30 rounds: about 2.7 each).
    assert!(a.canary_updates > CANARIES, "{a:?}");
    assert!(r.rounds.iter().all(|x| x.committed), "every round committed");
    // They are not evaluated and not in the mean loss: the loss stays finite and the evaluation
    // covers the 400 users only (HR@10 is a fraction of them).
    assert!(r.rounds.iter().all(|x| x.loss.is_some_and(f64::is_finite)));
    // Measured (seed 1): inserted cosines 0.113 ± 0.087 against 0.034 for held-out ones, μ = 3.6,
    // ε ≈ 21.
    assert!(a.mu > 2.5, "{a:?}");
    assert!(a.empirical_epsilon > 5.0, "{a:?}");
}

#[test]
fn under_central_dp_the_estimate_stays_at_or_below_the_accountant() {
    let r = run(&central(100));
    assert!(r.stopped.is_none(), "{:?}", r.stopped);
    let a = audit(&r);
    check_null(a);
    let accountant = a.accountant_epsilon.expect("central DP has a ledger");
    assert_eq!(Some(accountant), r.rounds.last().and_then(|x| x.epsilon), "the ledger's ε");
    assert!(accountant > 1.0, "a non-trivial accountant ε: {accountant}");
    assert!(a.canary_updates > CANARIES, "{a:?}");
    // Measured (seed 1): μ = 0.45, ε ≈ 1.75 against the accountant's 7.03.
    assert!(a.empirical_epsilon <= accountant, "{a:?}");

    // results.json's `audit` object and report.html's section carry both figures.
    let dir = tempfile::tempdir().expect("temporary directory");
    r.write(dir.path()).expect("reports written");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("results.json")).expect("results.json"))
            .expect("JSON");
    let j = &json["audit"];
    for key in [
        "canaries",
        "delta",
        "empirical_epsilon",
        "accountant_epsilon",
        "inserted_cosine_mean",
        "inserted_cosine_std",
        "held_out_cosine_mean",
        "held_out_cosine_std",
        "dimension",
    ] {
        assert!(j[key].is_number(), "{key} in {j}");
    }
    assert_eq!(j["accountant_epsilon"].as_f64(), Some(accountant));
    assert_eq!(json["config"]["audit"]["canaries"], CANARIES);
    let html = std::fs::read_to_string(dir.path().join("report.html")).expect("report.html");
    assert!(html.contains("<h2>Privacy audit</h2>"));
    assert!(
        html.contains(&format!("{accountant:.4}")) && html.contains(&format!("{:.4}", a.empirical_epsilon))
    );
}

#[test]
fn the_audit_is_refused_where_it_cannot_run() {
    let refused = |c: SimConfig, needle: &str| {
        let e = sim::run(&c, &mut |_: &RoundRecord, _: u32| {}).expect_err("refused").to_string();
        assert!(e.contains(needle), "{e}");
    };
    let one = SimConfig { audit: Some(AuditConfig { canaries: 1, delta: DELTA }), ..central(3) };
    refused(one, "at least 2 canaries");
    let quic = SimConfig { transport: TransportKind::Quic, ..central(3) };
    refused(quic, "--transport in-process");
    let local = workload(PrivacyMode::Local { clip: 0.5, noise_multiplier: 1.0, delta: DELTA }, 3);
    refused(local, "--dp local");
    let other_delta = SimConfig { audit: Some(AuditConfig { canaries: 10, delta: 1e-6 }), ..central(3) };
    refused(other_delta, "the ledger's delta");
}

// The ε of two Gaussians.

#[test]
fn gaussian_mechanism_epsilon_has_the_known_values_and_grows_with_mu() {
    // Reference values from Balle and Wang's formula evaluated independently in Python
    // (math.erfc, bisection to 1e-15): μ = 1 → 4.377178, μ = 2 → 9.997256, μ = 0.5 → 1.993091
    // at δ = 1e-5; μ = 1 → 4.886554 at δ = 1e-6.
    for (mu, delta, want) in
        [(1.0, 1e-5, 4.377_178), (2.0, 1e-5, 9.997_256), (0.5, 1e-5, 1.993_091), (1.0, 1e-6, 4.886_554)]
    {
        let got = gaussian_mechanism_epsilon(mu, delta);
        assert!((got - want).abs() < 1e-5, "mu {mu} delta {delta}: {got} vs {want}");
    }
    let mut last = 0.0;
    for k in 1..=100 {
        let e = gaussian_mechanism_epsilon(0.1 * f64::from(k), 1e-5);
        assert!(e > last, "not increasing at mu = {}: {e} after {last}", 0.1 * f64::from(k));
        last = e;
    }
    assert_eq!(gaussian_mechanism_epsilon(0.0, 1e-5), 0.0);
    assert_eq!(gaussian_mechanism_epsilon(-1.0, 1e-5), 0.0);
    // Very far apart stays finite (log-space tails).
    let far = gaussian_mechanism_epsilon(100.0, 1e-5);
    assert!(far.is_finite() && far > 5000.0, "{far}");
}

#[test]
fn two_gaussians_with_equal_variances_are_the_gaussian_mechanism() {
    for mu in [0.3, 1.0, 2.5, 7.0] {
        for s in [1.0, 0.01] {
            let a = Gaussian { mean: 0.2 * s, std: s };
            let b = Gaussian { mean: (0.2 + mu) * s, std: s };
            let want = gaussian_mechanism_epsilon(mu, 1e-5);
            for got in [epsilon_two_gaussians(a, b, 1e-5), epsilon_two_gaussians(b, a, 1e-5)] {
                assert!((got - want).abs() < 1e-6 * want.max(1.0), "mu {mu} s {s}: {got} vs {want}");
            }
        }
    }
    let same = Gaussian { mean: 0.0, std: 1.0 };
    assert_eq!(epsilon_two_gaussians(same, same, 1e-5), 0.0);
}

#[test]
fn two_gaussians_with_unequal_variances_match_numerical_integration() {
    // N(0, 1) against N(0.5, 1.5²): δ(ε) = max over both directions of ∫ (p − e^ε q)₊,
    // integrated numerically in Python (trapezoid, step 1e-4 on [−60, 60]) and inverted by
    // bisection: ε = 13.540217 at δ = 1e-5. N(0, 1) against N(0, 1.14²) (step 2e-4 on
    // [−40, 40]): ε = 2.3624.
    let (a, b) = (Gaussian { mean: 0.0, std: 1.0 }, Gaussian { mean: 0.5, std: 1.5 });
    let got = epsilon_two_gaussians(a, b, 1e-5);
    assert!((got - 13.540_217).abs() < 1e-4, "{got}");
    assert_eq!(got, epsilon_two_gaussians(b, a, 1e-5));
    // A difference in spread alone is distinguishable; a nearly equal one costs about nothing
    // more than the mean shift.
    let wider = Gaussian { mean: 0.0, std: 1.14 };
    let spread = epsilon_two_gaussians(a, wider, 1e-5);
    assert!((spread - 2.3624).abs() < 1e-3, "{spread}");
    let shift = Gaussian { mean: 1.0, std: 1.0 };
    let shift_wider = Gaussian { mean: 1.0, std: 1.0 + 1e-9 };
    let (e0, e1) = (epsilon_two_gaussians(a, shift, 1e-5), epsilon_two_gaussians(a, shift_wider, 1e-5));
    assert!((e0 - e1).abs() < 1e-5, "{e0} {e1}");
}
