//! Byzantine clients in the simulator (`SimConfig::attack`): 10% of the clients send their honest
//! update scaled by 100 (and claim 100× their example count). Under the default strategy — FedAvg
//! with the coordinator re-clipping every update to the plan's norm and capping weights, as the
//! service does — HR@10 drops by at most 0.02 against the same run without attackers; without the
//! re-clipping the same attack wrecks the model, so this test fails if the clipping goes.
//!
//! The reference workload (ML-100K, C = 100, 100 rounds) needs the dataset; CI runs the
//! same fleet settings on a synthetic population (see `docs/simulation.md` for both figures).

use starling_coordinator::sim::attack::{Attack, AttackKind};
use starling_coordinator::sim::report::{RoundRecord, SimReport};
use starling_coordinator::sim::{self, ClientKind, Dataset, SimConfig};

/// The reference workload's fleet (every client always there, exactly C selected, no dropouts,
/// identical devices, unlimited network), C = 100 and 100 rounds, on 3,000 synthetic users and
/// 500 items.
fn workload(attack: Option<Attack>) -> SimConfig {
    SimConfig {
        dataset: Dataset::Synthetic { users: 3000, items: 500, seed: 1 },
        clients: ClientKind::Kernel,
        eval_every: 100,
        seed: 1,
        attack,
        ..SimConfig::reference("unused".into(), 100, 100)
    }
}

const SCALE_100: Attack = Attack { fraction: 0.1, kind: AttackKind::Scale, factor: 100.0 };

fn run(c: &SimConfig) -> SimReport {
    sim::run(c, &mut |_: &RoundRecord, _: u32| {}).expect("simulation runs")
}

fn final_hr(r: &SimReport) -> f64 {
    r.rounds.iter().rev().find_map(|x| x.hr_at_10).expect("evaluated")
}

#[test]
fn ten_percent_scaling_attackers_cost_at_most_0_02_hr_at_10_with_server_side_clipping() {
    let honest = run(&workload(None));
    let attacked = run(&workload(Some(SCALE_100)));
    let unclipped = run(&SimConfig { server_clipping: false, ..workload(Some(SCALE_100)) });
    let (h, a, u) = (final_hr(&honest), final_hr(&attacked), final_hr(&unclipped));
    println!(
        "HR@10 without attackers {h:.4}, with attackers {a:.4} (drop {:.4}); without server-side clipping {u:.4} (drop {:.4})",
        h - a,
        h - u
    );

    // The attackers took part: 10% of the clients, whose crafted updates were accepted like any other.
    let report = attacked.attack.as_ref().expect("the attack is reported");
    assert_eq!(report.attackers, 300);
    assert!(report.crafted_updates > 500, "{report:?}");
    assert!(attacked.rounds.iter().all(|r| r.committed && r.participants == 100), "nothing rejected");
    assert!(h > 0.3, "the honest run learns: {h}");

    assert!(h - a <= 0.02, "HR@10 {h:.4} -> {a:.4} with attackers under server-side clipping");
    assert!(h - u > 0.1, "without server-side clipping the attack must hurt: {h:.4} -> {u:.4}");
}

/// Attackers go through the SDK devices' path too (train on the device, then craft), and every
/// kind of crafted update is well formed: the round engine accepts all of them.
#[test]
fn sdk_devices_attack_through_the_same_path_and_every_kind_is_accepted() {
    for kind in [AttackKind::Scale, AttackKind::SignFlip, AttackKind::Random] {
        let config = SimConfig {
            dataset: Dataset::Synthetic { users: 200, items: 200, seed: 2 },
            clients: ClientKind::Sdk,
            clients_per_round: 40,
            rounds: 3,
            eval_every: 3,
            availability: None,
            dropout: 0.0,
            over_selection: 1.0,
            device_spread: 0.0,
            attack: Some(Attack { fraction: 0.25, kind, factor: 100.0 }),
            privacy: starling_coordinator::sim::PrivacyMode::Off,
            ..SimConfig::default()
        };
        let r = run(&config);
        let a = r.attack.as_ref().expect("reported");
        assert_eq!((a.attackers, a.kind.as_str()), (50, kind.name()));
        assert!(a.crafted_updates > 0, "{kind:?}: {a:?}");
        assert!(r.rounds.iter().all(|x| x.committed && x.participants == 40), "{kind:?}: {:?}", r.rounds);
        assert_eq!(r.config["attack"]["kind"], kind.name());
    }
}
