//! Adaptive clipping (Andrew et al. 2021) with real SDK devices: each device sends the indicator
//! "my update's norm before clipping was within C" with its clipped update; the coordinator
//! noises the count and moves C towards the target quantile. Before, the coordinator computed the
//! indicator itself on updates the devices had already clipped — always 1 — so C shrank by ~10%
//! every round towards zero.

use starling_coordinator::sim::report::{RoundRecord, SimReport};
use starling_coordinator::sim::{self, ClientKind, Dataset, NoiseSampler, PrivacyMode, SimConfig};

fn run(c: &SimConfig) -> SimReport {
    sim::run(c, &mut |_: &RoundRecord, _: u32| {}).expect("simulation runs")
}

#[test]
fn the_clip_norm_tracks_the_median_update_norm_of_sdk_clients_instead_of_collapsing() {
    let config = SimConfig {
        dataset: Dataset::Synthetic { users: 400, items: 200, seed: 9 },
        clients: ClientKind::Sdk,
        clients_per_round: 60,
        rounds: 45,
        eval_every: 45,
        availability: None,
        // Start far above the norms the devices produce, so C has to travel down to the median
        // and then stop there.
        privacy: PrivacyMode::Central {
            clip: 20.0,
            noise_multiplier: 0.5,
            epsilon: 1e6,
            delta: 1e-6,
            adaptive_quantile: Some(0.5),
            sampler: NoiseSampler::Fast,
        },
        seed: 3,
        ..SimConfig::default()
    };
    let r = run(&config);
    assert!(
        r.rounds.iter().all(|x| x.committed),
        "{:?}",
        r.rounds.iter().map(|x| &x.failure).collect::<Vec<_>>()
    );
    let clip: Vec<f64> = r.rounds.iter().map(|x| x.clip_norm.expect("the plan carries C")).collect();
    let within: Vec<f64> = r.rounds.iter().map(|x| x.within_clip.expect("devices send indicators")).collect();
    // At first every update is within C = 20 and C comes down.
    assert!(within[0] > 0.95, "{within:?}");
    assert!(clip[10] < clip[0] * 0.6, "{clip:?}");
    // Then it settles where about half the devices' unclipped norms are within it: the median.
    let tail = &within[within.len() - 12..];
    let mean = tail.iter().sum::<f64>() / tail.len() as f64;
    assert!((0.3..=0.7).contains(&mean), "share within C over the last rounds {mean:.2}: {within:?}");
    // And C stopped moving down: no collapse towards zero.
    let (late, last) = (clip[clip.len() - 12], *clip.last().unwrap());
    assert!(last > 0.5 * late, "C kept shrinking: {clip:?}");
}
