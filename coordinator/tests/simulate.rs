//! The simulator end to end on a small synthetic population: quality improves over the untrained
//! model, and the same seed gives exactly the same run.

use starling_coordinator::sim::report::{RoundRecord, SimReport};
use starling_coordinator::sim::{self, Dataset, SimConfig};

fn small(seed: u64) -> SimConfig {
    SimConfig {
        dataset: Dataset::Synthetic { users: 300, items: 200, seed: 5 },
        clients_per_round: 50,
        rounds: 30,
        eval_every: 10,
        seed,
        ..SimConfig::default()
    }
}

fn run(c: &SimConfig) -> SimReport {
    sim::run(c, &mut |_: &RoundRecord, _: u32| {}).expect("simulation runs")
}

/// Every figure that does not depend on the wall clock.
fn deterministic_part(r: &SimReport) -> Vec<RoundRecord> {
    r.rounds.iter().map(|x| RoundRecord { round_seconds: 0.0, train_seconds: 0.0, ..x.clone() }).collect()
}

#[test]
fn quality_improves_and_the_same_seed_gives_the_same_run() {
    let a = run(&small(7));
    let initial = a.initial_hr_at_10.unwrap();
    let last = a.rounds.last().unwrap();
    assert!(a.rounds.iter().all(|r| r.committed), "every round commits");
    let final_hr = last.hr_at_10.unwrap();
    assert!(final_hr > initial + 0.1, "HR@10 {initial:.3} -> {final_hr:.3}");
    assert!(last.ndcg_at_10.unwrap() > a.initial_ndcg_at_10.unwrap());
    assert!(a.rounds.iter().all(|r| r.bytes_up > 0 && r.bytes_down > 0));

    let b = run(&small(7));
    assert_eq!(deterministic_part(&a), deterministic_part(&b));
    let c = run(&small(8));
    assert_ne!(deterministic_part(&a), deterministic_part(&c));
}

#[test]
fn bad_settings_are_errors_not_panics() {
    let mut c = small(1);
    c.rounds = 0;
    assert!(sim::run(&c, &mut |_: &RoundRecord, _: u32| {}).is_err());
    let mut c = small(1);
    c.dataset = Dataset::File("/definitely/not/here/u.data".into());
    let err = sim::run(&c, &mut |_: &RoundRecord, _: u32| {}).unwrap_err();
    assert!(err.to_string().contains("cannot read"), "{err}");
}

#[test]
fn central_dp_charges_every_round_and_stops_at_the_budget() {
    let mut c = small(3);
    c.rounds = 200;
    c.privacy = sim::PrivacyMode::Central {
        clip: 0.5,
        noise_multiplier: 0.8,
        epsilon: 6.0,
        delta: 1e-5,
        adaptive_quantile: None,
        sampler: sim::NoiseSampler::Fast,
    };
    let r = run(&c);
    let eps: Vec<f64> = r.rounds.iter().map(|x| x.epsilon.expect("epsilon reported under DP")).collect();
    assert!(eps.windows(2).all(|w| w[1] > w[0]), "epsilon grows every round: {eps:?}");
    assert!(*eps.last().unwrap() <= 6.0);
    assert!(r.rounds.len() < 200, "the budget ends the run early");
    let why = r.stopped.as_deref().expect("the run says why it stopped");
    assert!(why.contains("privacy budget"), "{why}");
    assert!(r.rounds.last().unwrap().hr_at_10.is_some(), "the last round is evaluated");
    // Same seed, same run — noise included (the fast sampler runs on the seeded RNG).
    assert_eq!(deterministic_part(&r), deterministic_part(&run(&c)));
}

#[test]
fn local_dp_noises_dense_updates_and_reports_the_worst_device_epsilon() {
    let mut c = small(4);
    c.rounds = 5;
    c.privacy = sim::PrivacyMode::Local { clip: 0.5, noise_multiplier: 2.0, delta: 1e-5 };
    let r = run(&c);
    let plain = run(&SimConfig { rounds: 5, ..small(4) });
    assert!(r.rounds.iter().all(|x| x.committed));
    let eps: Vec<f64> = r.rounds.iter().map(|x| x.epsilon.unwrap()).collect();
    assert!(eps[0] > 0.0 && eps.windows(2).all(|w| w[1] >= w[0]), "{eps:?}");
    // Dense updates: every value of the 200 x 32 item matrix goes up, not just touched rows.
    let dense_bytes = 200 * 32 * 4;
    let first = &r.rounds[0];
    assert!(first.bytes_up >= (first.participants * dense_bytes) as u64, "{} B up", first.bytes_up);
    assert!(plain.rounds[0].bytes_up < first.bytes_up);
}
