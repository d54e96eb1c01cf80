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
