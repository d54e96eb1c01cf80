//! Runs three federated rounds of the real round engine and session machines in memory, with a toy
//! "trainer" that pulls every client's rows towards a target. Shows the sans-IO calling contract
//! without any network.
//!
//! Run with: `cargo run --release -p starling-examples --example in_memory_round`

use starling_proto::harness::{Fleet, FleetConfig, FnTrainer, TrainResult};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::LocalMetrics;
use starling_proto::round::{Eligibility, Orchestrator, OrchestratorConfig, RoundConfig, RoundEvent};
use starling_proto::session::TrainRequest;
use starling_proto::strategy::Federated;
use starling_proto::time::Duration;
use starling_proto::update::{ModelShape, Update};

fn main() -> anyhow::Result<()> {
    let shape = ModelShape::new(16, 4)?;
    let config = OrchestratorConfig {
        model_family: "toy".into(),
        shape,
        round: RoundConfig {
            target_participants: 20,
            min_reports: 10,
            selection_timeout: Duration::from_secs(2),
            report_timeout: Duration::from_secs(20),
            eligibility: Eligibility::default(),
            ..RoundConfig::default()
        },
        history: 2,
        rng_seed: 42,
    };
    let orchestrator = Orchestrator::new(
        config,
        Box::new(Federated::fedavg()),
        vec![0.0; shape.len()],
        ModelVersion(0),
        RoundId(1),
    )?;

    // Each client moves its own row (id % 16) halfway towards the value 1.0.
    let trainer = move |client: ClientId, _req: &TrainRequest, params: &[f32]| {
        let row = (client.0 % 16) as u32;
        let start = row as usize * 4;
        let delta: Vec<f32> = params[start..start + 4].iter().map(|p| (1.0 - p) * 0.5).collect();
        let result = TrainResult {
            update: Update::sparse(shape, vec![row], delta).ok()?,
            weight: 1.0,
            metrics: LocalMetrics { loss: 0.0, hit_rate_at_10: None, train_ms: 5, norm_within_clip: None },
        };
        Some((result, Duration::from_millis(500 + 37 * (client.0 % 20))))
    };
    let fleet_config =
        FleetConfig { model_family: "toy".into(), dropout: 0.1, seed: 7, ..FleetConfig::default() };
    let mut fleet = Fleet::new(orchestrator, 64, FnTrainer::new(trainer), fleet_config);

    for _ in 0..3 {
        let round = fleet.run_round()?;
        for event in &round.events {
            match event {
                RoundEvent::Committed(c) => println!(
                    "{} committed {}: {} selected, {} reported, {} dropped; {} B up, {} B down, {:?} simulated",
                    c.round,
                    c.version,
                    c.stats.selected,
                    c.stats.reported,
                    c.stats.dropped,
                    round.bytes_up,
                    round.bytes_down,
                    round.duration
                ),
                RoundEvent::Failed { round: r, reason, .. } => println!("{r} failed: {reason}"),
                _ => {}
            }
        }
    }
    let (version, model) = fleet.orchestrator().model();
    let mean: f32 = model.iter().sum::<f32>() / model.len() as f32;
    println!("model {version}: mean parameter {mean:.3} (moving towards 1.0)");
    Ok(())
}
