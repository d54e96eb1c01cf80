//! Federated evaluation rounds: the current model is scored on the devices' own held-out data and
//! only the **sums** of their figures come back.
//!
//! [`Orchestrator::start_evaluation`] runs a round through the same machinery as a training round
//! (check-in, eligibility, selection — Poisson sampling under central DP —, deadlines, dropouts,
//! round ids from the same counter), but its tasks are [`TaskKind::Evaluate`] tasks carrying the
//! current model (full or patch) and never secure. Each selected device answers with one
//! [`EvalReport`]: sums over its evaluation cases (at most [`MAX_EVAL_CASES`]). The engine accepts
//! a report only from a selected device still owing one, for the current round and model version,
//! with figures that are possible ([`EvalMetrics::is_valid`]); anything else is rejected with a
//! typed [`RejectReason`] and the sums are untouched. The round closes like a training round
//! (target reached, deadline, nobody left) and emits [`RoundEvent::Evaluated`] with the
//! [`FederatedEval`]; the model and its version never change. Too few reports fail it
//! ([`FailReason::TooFewReports`]) as for training.
//!
//! # Release
//! The summed vector `(cases, hits@10, ndcg@10, loss / EVAL_LOSS_CAP)` is released exactly when
//! the strategy has no DP ([`Strategy::evaluation_release`](crate::strategy::Strategy::evaluation_release)
//! returns `None`); under central DP each coordinate gets Gaussian noise of standard deviation
//! σ·2 (one device's vector has L2 norm ≤ 2) and the release is charged like a training round.
//! The released means divide the (noised) sums by the (noised) case count, floored at 1, and are
//! clamped to their possible range (`[0, 1]` for HR@10 and NDCG@10, `[0, EVAL_LOSS_CAP]` for the
//! loss); the released case count is floored at 0.
//!
//! Federated evaluation is refused ([`StartError::EvaluationUnsupported`]) under secure
//! aggregation (the reports would have to be summed securely too) and under a local-DP plan
//! (the devices' reports carry no local noise, so the release would not be covered by the local
//! guarantee).

use super::{ConfigError, EvaluatedRound, FailReason, Phase, RoundStats, StartError};
use super::{Orchestrator, Participant, Round, RoundEvent};
use crate::ids::{ClientId, RoundId};
use crate::message::{
    CoordinatorMessage, EVAL_LOSS_CAP, EvalMetrics, EvalReport, NoiseSettings, Refusal, RejectReason,
    TaskKind,
};
use crate::strategy::{AggregateError, EvalNoise, PrivacyCharge, RoundContext};
use crate::time::Instant;
use std::collections::{BTreeMap, HashMap, HashSet};

/// The most evaluation cases one report may carry (each device holds out its latest positive).
/// The DP sensitivity of a report ([`EVAL_SENSITIVITY`](crate::strategy::EVAL_SENSITIVITY)) rests
/// on it.
pub const MAX_EVAL_CASES: u32 = 1;

/// What a federated-evaluation round released.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FederatedEval {
    /// Reports accepted (exact, also under DP: it is the round's participation count, which the
    /// host sees for training rounds too; it is not part of the DP release).
    pub reports: usize,
    /// Evaluation cases: the exact sum, or under DP the noised sum floored at 0.
    pub cases: f64,
    /// Mean HR@10 over the cases (released hits / max(1, released cases), clamped to `[0, 1]`).
    pub hr_at_10: f64,
    /// Mean NDCG@10 over the cases (clamped to `[0, 1]`).
    pub ndcg_at_10: f64,
    /// Mean per-case loss (clamped to `[0, EVAL_LOSS_CAP]`).
    pub loss: f64,
    /// Under DP: the noise standard deviation added to each of the sums of cases, hits and NDCG
    /// (σ·2; the loss sum got `σ·2·EVAL_LOSS_CAP`). `None`: the sums are exact.
    pub noise_std: Option<f64>,
}

/// An evaluation round's running sums.
pub(super) struct EvalState {
    /// `(cases, hits, ndcg, loss)` summed over accepted reports.
    sums: [f64; 4],
    noise: Option<EvalNoise>,
}

impl Orchestrator {
    /// Sets how many reports an evaluation round aims for (`None`: the training target,
    /// `target_participants`). Under Poisson sampling (central DP) the sample is drawn at the
    /// training rounds' rate whatever this says. Refuses `Some(0)`.
    pub fn set_evaluation_target(&mut self, target: Option<usize>) -> Result<(), ConfigError> {
        if target == Some(0) {
            return Err(ConfigError::NoTarget);
        }
        self.evaluation_target = target;
        Ok(())
    }

    /// What the running round asks of its devices, if a round is running.
    pub fn current_kind(&self) -> Option<TaskKind> {
        self.round.as_ref().map(|r| r.kind)
    }

    /// Starts a federated-evaluation round (see the module docs of `round::evaluation`): the
    /// strategy admits it first ([`Strategy::evaluation_release`](crate::strategy::Strategy::evaluation_release),
    /// the privacy-budget check under DP); a refusal leaves everything unchanged and — unlike a
    /// training round's — does **not** halt the engine: only this evaluation is refused, and
    /// training rounds go on as long as their own admission allows. Refused under secure
    /// aggregation and under a local-DP plan ([`StartError::EvaluationUnsupported`]).
    pub fn start_evaluation(&mut self, now: Instant) -> Result<RoundId, StartError> {
        if let Some(r) = &self.round {
            return Err(StartError::Busy(r.id));
        }
        if self.cluster_nodes.is_some() {
            return Err(StartError::EvaluationUnsupported("across several coordinator nodes (yet)"));
        }
        match &self.halted {
            Some(Refusal::ShuttingDown) => return Err(StartError::ShutDown),
            Some(reason) => return Err(StartError::Halted(reason.clone())),
            None => {}
        }
        let cfg = &self.config.round;
        if cfg.secure.is_some() {
            return Err(StartError::EvaluationUnsupported("under secure aggregation"));
        }
        if matches!(cfg.plan.noise, NoiseSettings::Local { .. }) {
            return Err(StartError::EvaluationUnsupported("under local differential privacy"));
        }
        let id = self.next_round;
        let target = self.evaluation_target.unwrap_or(cfg.target_participants);
        let ctx = RoundContext {
            round: id,
            model_version: self.version,
            shape: self.config.shape,
            target_participants: target,
            selected: 0,
            population: self.population,
            secure: false,
            quant: None,
        };
        let noise = self.strategy.evaluation_release(&ctx)?;
        let plan = cfg.plan.clone();
        let min_reports = cfg.min_reports.min(target);
        let selection_timeout = cfg.selection_timeout;
        // From here on the last commit's model may be shipped: it can no longer be reverted.
        self.replaced = None;
        self.next_round = id.next();
        self.round = Some(Round {
            id,
            phase: Phase::Selecting,
            ctx,
            plan,
            started: now,
            deadline: now + selection_timeout,
            candidates: Vec::new(),
            checked_in: HashSet::new(),
            participants: HashMap::new(),
            aggregator: None,
            patches: BTreeMap::new(),
            stats: RoundStats::default(),
            loss_sum: 0.0,
            loss_weight: 0.0,
            hit_sum: 0.0,
            hit_count: 0,
            secure: None,
            kind: TaskKind::Evaluate,
            target,
            min_reports,
            eval: Some(Box::new(EvalState { sums: [0.0; 4], noise })),
            share: super::shard::Share::Alone,
            shares_failed: 0,
        });
        self.events.push_back(RoundEvent::Started {
            round: id,
            version: self.version,
            kind: TaskKind::Evaluate,
        });
        Ok(id)
    }

    /// One device's evaluation report.
    pub(super) fn handle_evaluation(&mut self, now: Instant, client: ClientId, e: EvalReport) {
        let round = e.round;
        let Some(r) = &mut self.round else {
            return self.reject(round, client, RejectReason::Late);
        };
        if round != r.id {
            let reason = if round < r.id { RejectReason::Late } else { RejectReason::WrongRound };
            return self.reject(round, client, reason);
        }
        if r.kind != TaskKind::Evaluate {
            let reason = "this is a training round: send an update, not an evaluation report";
            return self.reject(round, client, RejectReason::Refused(reason.into()));
        }
        match r.participants.get(&client) {
            None => return self.reject(round, client, RejectReason::NotSelected),
            Some(Participant::Reported | Participant::Rejected) => {
                return self.reject(round, client, RejectReason::Duplicate);
            }
            Some(Participant::Dropped) => return self.reject(round, client, RejectReason::Late),
            Some(Participant::Training) => {}
        }
        if r.phase != Phase::Collecting {
            return self.reject(round, client, RejectReason::Late);
        }
        let m = e.metrics;
        let reason = if e.base_version != self.version {
            Some(RejectReason::StaleVersion { expected: self.version, got: e.base_version })
        } else if !m.is_valid() || m.cases > MAX_EVAL_CASES {
            Some(RejectReason::Malformed(format!(
                "impossible evaluation figures (at most {MAX_EVAL_CASES} case, each with hits and NDCG in [0, 1] and loss in [0, {EVAL_LOSS_CAP}])"
            )))
        } else {
            None
        };
        if let Some(reason) = reason {
            r.participants.insert(client, Participant::Rejected);
            self.reject(round, client, reason);
            return self.maybe_close(now);
        }
        if let Some(state) = &mut r.eval {
            add(&mut state.sums, &m);
        }
        r.participants.insert(client, Participant::Reported);
        r.stats.reported += 1;
        self.events.push_back(RoundEvent::UpdateAccepted { round, client });
        self.send(client, CoordinatorMessage::Receipt { round });
        self.maybe_close(now);
    }

    /// Releases an evaluation round that has enough reports (called by `finish_round`).
    pub(super) fn finish_evaluation(&mut self, now: Instant) {
        let Some(mut r) = self.round.take() else { return };
        let state = r.eval.take().map_or(EvalState { sums: [0.0; 4], noise: None }, |s| *s);
        let released = release(state.sums, r.stats.reported, state.noise.as_ref(), &mut self.rng);
        r.stats.duration = now.saturating_duration_since(r.started);
        match released {
            Err(e) => {
                self.last_phase = Phase::Failed;
                let reason = FailReason::Aggregation(AggregateError::Noise(e));
                self.events.push_back(RoundEvent::Failed { round: r.id, reason, stats: r.stats });
            }
            Ok(metrics) => {
                let privacy: Option<PrivacyCharge> = state.noise.map(|n| n.charge);
                if let Some(charge) = &privacy {
                    self.strategy.record_evaluation(&r.ctx, charge);
                }
                // The model is untouched: the phase reads as the last round's success.
                self.last_phase = Phase::Committed;
                self.events.push_back(RoundEvent::Evaluated(Box::new(EvaluatedRound {
                    round: r.id,
                    version: self.version,
                    metrics,
                    privacy,
                    stats: r.stats,
                })));
            }
        }
    }
}

fn add(sums: &mut [f64; 4], m: &EvalMetrics) {
    sums[0] += f64::from(m.cases);
    sums[1] += f64::from(m.hits_at_10);
    sums[2] += f64::from(m.ndcg_at_10);
    sums[3] += f64::from(m.loss);
}

/// The released figures of `sums` over `reports` reports: exact, or noised by `noise`.
fn release(
    sums: [f64; 4],
    reports: usize,
    noise: Option<&EvalNoise>,
    rng: &mut dyn rand::Rng,
) -> Result<FederatedEval, String> {
    let cap = f64::from(EVAL_LOSS_CAP);
    // Every coordinate of one device's vector is in [0, 1]: the loss is scaled by its cap.
    let mut v = [sums[0], sums[1], sums[2], sums[3] / cap];
    if let Some(n) = noise {
        n.sampler.add_noise(&mut v, n.std, rng).map_err(|e| e.to_string())?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err("the noised evaluation sums are not finite".into());
        }
    }
    let cases = v[0].max(0.0);
    let denominator = cases.max(1.0);
    Ok(FederatedEval {
        reports,
        cases,
        hr_at_10: (v[1] / denominator).clamp(0.0, 1.0),
        ndcg_at_10: (v[2] / denominator).clamp(0.0, 1.0),
        loss: (v[3] * cap / denominator).clamp(0.0, cap),
        noise_std: noise.map(|n| n.std),
    })
}
