//! The simulator end to end on a small synthetic population: quality improves over the untrained
//! model, and the same seed gives exactly the same run (the whole device and network model
//! included: bandwidths, compute speeds, dropouts, daily availability windows).

use starling_coordinator::sim::report::{RoundRecord, SimReport};
use starling_coordinator::sim::{self, Dataset, SimConfig};

fn small(seed: u64) -> SimConfig {
    SimConfig {
        dataset: Dataset::Synthetic { users: 300, items: 200, seed: 5 },
        clients_per_round: 50,
        rounds: 30,
        eval_every: 10,
        seed,
        privacy: sim::PrivacyMode::Off,
        ..SimConfig::default()
    }
}

fn run(c: &SimConfig) -> SimReport {
    sim::run(c, &mut |_: &RoundRecord, _: u32| {}).expect("simulation runs")
}

/// Every figure that does not depend on the wall clock.
fn deterministic_part(r: &SimReport) -> Vec<RoundRecord> {
    r.rounds
        .iter()
        .map(|x| RoundRecord { round_seconds: 0.0, train_seconds: 0.0, cpu: Default::default(), ..x.clone() })
        .collect()
}

#[test]
fn quality_improves_and_the_same_seed_gives_the_same_run() {
    let a = run(&small(7));
    let initial = a.initial_hr_at_10.unwrap();
    let last = a.rounds.last().unwrap();
    assert!(a.rounds.iter().all(|r| r.committed), "every round commits");
    let final_hr = last.hr_at_10.unwrap();
    // Default fleet model: 8-hour availability windows, so in 30 rounds (5 simulated hours) only
    // part of the population ever trains; every user is evaluated.
    assert!(final_hr > initial + 0.05, "HR@10 {initial:.3} -> {final_hr:.3}");
    assert!(a.rounds.iter().all(|r| r.check_ins < 300), "windows keep part of the fleet away");
    assert!(last.ndcg_at_10.unwrap() > a.initial_ndcg_at_10.unwrap());
    assert!(a.rounds.iter().all(|r| r.bytes_up > 0 && r.bytes_down > 0));

    let b = run(&small(7));
    assert_eq!(deterministic_part(&a), deterministic_part(&b));
    let c = run(&small(8));
    assert_ne!(deterministic_part(&a), deterministic_part(&c));
}

/// The acceptance test: 50 clients, 3 rounds.
#[test]
fn fifty_clients_three_rounds_beat_the_untrained_model_and_repeat_exactly() {
    let config = |seed| SimConfig {
        dataset: Dataset::Synthetic { users: 50, items: 1000, seed: 1 },
        // Real SDK devices (the default), and row-aware FedAvg: three rounds of plain FedAvg over
        // 50 clients move the item rows too little to beat the untrained model reliably (measured
        // over seeds 1-3: HR@10 up in 2 of 3 with FedAvg, 3 of 3 with row-aware averaging).
        clients: sim::ClientKind::Sdk,
        strategy: sim::StrategyKind::FedAvgRowAware,
        clients_per_round: 50,
        rounds: 3,
        epochs: 5,
        eval_every: 1,
        // Always reachable (a 50-client fleet with 8-hour windows could not fill a round), but
        // heterogeneous speeds, bandwidths and 5% dropouts as by default.
        availability: None,
        seed,
        privacy: sim::PrivacyMode::Off,
        ..SimConfig::default()
    };
    let a = run(&config(1));
    assert!(a.rounds.iter().all(|r| r.committed && r.participants > 25), "{:?}", a.rounds);
    let (hr0, ndcg0) = (a.initial_hr_at_10.unwrap(), a.initial_ndcg_at_10.unwrap());
    let last = a.rounds.last().unwrap();
    let (hr, ndcg) = (last.hr_at_10.unwrap(), last.ndcg_at_10.unwrap());
    assert!(hr > hr0 && ndcg > ndcg0, "HR@10 {hr0:.3} -> {hr:.3}, NDCG@10 {ndcg0:.3} -> {ndcg:.3}");
    let b = run(&config(1));
    assert_eq!(deterministic_part(&a), deterministic_part(&b));
    assert_eq!(a.initial_hr_at_10, b.initial_hr_at_10);
    assert_ne!(deterministic_part(&a), deterministic_part(&run(&config(2))));
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
    let mut c = small(1);
    c.check_in_probability = 2.0;
    let err = sim::run(&c, &mut |_: &RoundRecord, _: u32| {}).unwrap_err();
    assert!(err.to_string().contains("check_in_probability"), "{err}");
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
    // ε is the ledger's PLD figure; RDP's, reported beside it, is larger every round.
    for x in &r.rounds {
        let (pld, rdp) = (x.epsilon.unwrap(), x.epsilon_rdp.expect("RDP epsilon reported beside it"));
        assert!(pld < rdp, "round {}: pld {pld} rdp {rdp}", x.round);
    }
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

#[test]
fn quic_transport_runs_the_real_service_and_sdk_clients_over_loopback() {
    let config = SimConfig {
        dataset: Dataset::Synthetic { users: 60, items: 300, seed: 3 },
        clients_per_round: 20,
        rounds: 3,
        eval_every: 3,
        transport: sim::TransportKind::Quic,
        seed: 3,
        // A fixed 20 reports per round (central DP samples each device with probability q).
        privacy: sim::PrivacyMode::Off,
        ..SimConfig::default()
    };
    let report = run(&config);
    assert_eq!(report.stopped, None);
    assert_eq!(report.rounds.len(), 3);
    for r in &report.rounds {
        assert!(r.committed, "{r:?}");
        // Real time on a loaded machine: a client may miss the 3 s selection window, so a round
        // can select fewer than the pool; every selected client reports, up to the target.
        assert!(r.selected >= 15, "{r:?}");
        assert_eq!(r.participants, r.selected.min(20), "{r:?}");
        assert!(r.bytes_up > 0 && r.bytes_down > r.bytes_up, "{r:?}");
    }
    let last = report.rounds.last().unwrap();
    assert!(last.hr_at_10.is_some() && last.ndcg_at_10.is_some());
    assert_eq!(report.config["transport"], "quic");
    // `starling serve` ran a federated evaluation round after round 3, answered by the SDK
    // clients over QUIC from their own held-out data: its figures are the run's quality figure.
    let f = last.federated.as_ref().expect("an evaluation round after round 3");
    assert!(f.completed && f.reports > 0, "{f:?}");
    assert_eq!(last.hr_at_10, f.hr_at_10);
    assert_eq!(report.quality_source, "federated");
}

/// Under local DP the coordinator bounds updates by what an honest noised update stays under
/// (`dp::local::honest_norm_bound`), not by the clip norm: at a small noise multiplier the model
/// still learns. (Written first: on the code before, which re-clipped every noised update to C,
/// this run ended at HR@10 0.103, below the untrained model's 0.123.)
#[test]
fn local_dp_at_small_noise_still_learns() {
    // 60 rounds: since the devices record their users' real events (issue 15), 30 rounds on this
    // seed left the gain within the evaluation noise (HR@10 0.123 -> 0.117).
    let mut c = SimConfig { rounds: 60, ..small(7) };
    c.privacy = sim::PrivacyMode::Local { clip: 0.5, noise_multiplier: 0.05, delta: 1e-5 };
    let r = run(&c);
    assert!(r.rounds.iter().all(|x| x.committed));
    let initial = r.initial_hr_at_10.unwrap();
    let last = r.rounds.last().unwrap();
    let final_hr = last.hr_at_10.unwrap();
    assert!(final_hr > initial + 0.01, "HR@10 {initial:.3} -> {final_hr:.3}");
    // No data-dependent metadata reaches the coordinator: no loss to average.
    assert!(r.rounds.iter().all(|x| x.loss.is_none()), "{:?}", last.loss);
}

/// Federated evaluation: the devices' own figures are the run's quality figure, and with DP off
/// they equal the central scorer's over the same devices exactly (the same protocol on the same
/// vectors). Evaluation rounds never change the model: the training rounds' records are those of
/// the same run without them.
#[test]
fn federated_evaluation_equals_the_central_scorer_with_dp_off() {
    let config = SimConfig { rounds: 12, eval_every: 4, ..small(11) };
    let report = run(&config);
    assert_eq!(report.quality_source, "federated");
    let evaluated: Vec<_> =
        report.rounds.iter().filter_map(|r| r.federated.as_ref().map(|f| (r, f))).collect();
    assert_eq!(evaluated.len(), 3, "rounds 4, 8 and 12");
    for (r, f) in &evaluated {
        assert!(f.completed, "{f:?}");
        assert!(f.reports >= 20, "{f:?}");
        assert_eq!(f.noise_std, None);
        let (hr, central) = (f.hr_at_10.unwrap(), f.central_hr_at_10.unwrap());
        assert!((hr - central).abs() < 1e-9, "round {}: devices {hr} vs central {central}", r.round);
        assert!((f.ndcg_at_10.unwrap() - f.central_ndcg_at_10.unwrap()).abs() < 1e-6);
        assert_eq!(r.hr_at_10, f.hr_at_10, "the client-reported figure is the quality figure");
        assert!(f.bytes_up > 0 && f.bytes_down > 0);
    }
    let last = evaluated.last().unwrap().1;
    assert!(last.hr_at_10.unwrap() > report.initial_hr_at_10.unwrap(), "{last:?}");
}

/// The two-tower model trains on the devices through burn in a whole simulated run and beats the
/// untrained model, by the devices' own figures.
#[test]
fn a_two_tower_fleet_learns_with_context_dependent_tastes() {
    let config = SimConfig {
        model: sim::ModelKind::TwoTower,
        context_effect: 2.0,
        rounds: 12,
        eval_every: 6,
        ..small(12)
    };
    let report = run(&config);
    assert!(
        report.rounds.iter().all(|r| r.committed),
        "{:?}",
        report.rounds.iter().map(|r| &r.failure).collect::<Vec<_>>()
    );
    let last = report.rounds.last().unwrap();
    let f = last.federated.as_ref().unwrap();
    assert!(f.completed);
    assert!(
        last.hr_at_10.unwrap() > report.initial_hr_at_10.unwrap() + 0.03,
        "{last:?} vs {:?}",
        report.initial_hr_at_10
    );
    assert_eq!(report.config["model"], "two-tower");
}
