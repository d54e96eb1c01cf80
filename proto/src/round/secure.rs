//! Secure-aggregation rounds: the round engine's side of SecAgg+ with distributed DP.
//!
//! When [`RoundConfig::secure`](super::RoundConfig::secure) is set, a round's collection phase
//! runs the [`SecAggServer`] machine instead of accepting individual updates:
//!
//! ```text
//! close of selection ──Task(+SecureTask)──▶ AdvertiseKeys ──▶ ShareKeys ──▶ MaskedInput ──▶ Unmask ──▶ sum
//!                                            phase_timeout     phase_timeout  report_timeout   phase_timeout
//! ```
//!
//! Each phase closes at its deadline or as soon as no live client owes a message. The coordinator
//! learns only the modular sum of the surviving devices' encoded updates; it decodes the sum
//! ([`decode_sum_checked`]) and hands it to the strategy's aggregator as one sum
//! ([`Aggregator::accept_sum`](crate::strategy::Aggregator::accept_sum)). A round whose survivors
//! fall below the threshold (or the noise floor of distributed DP) aborts: nothing is unmasked,
//! nothing is released and nothing is charged.

use super::{FailReason, Orchestrator, Participant, Phase, RoundEvent};
use crate::dp::distributed::{DistributedDpConfig, QuantPlan, decode_sum_checked};
use crate::ids::ClientId;
use crate::message::{
    AbortReason, CoordinatorMessage, NoiseSettings, RejectReason, SecureTask, TrainingPlan,
};
use crate::secagg::{SecAggClientMessage, SecAggParams, SecAggPhase, SecAggServer};
use crate::time::{Duration, Instant};
use crate::update::ModelShape;
use rand::Rng;

/// Settings of secure aggregation (SecAgg+ with distributed DP), applied to every round.
#[derive(Clone, Debug, PartialEq)]
pub struct SecureAggregation {
    /// k: each device exchanges keys and shares with `k` neighbours (even; the complete graph when
    /// the cohort has at most k + 1 devices).
    pub neighbours: u32,
    /// t: shares needed to reconstruct a device's secrets, for a full neighbourhood of `k`; must
    /// exceed k/2 (devices refuse less, see [`SecAggPolicy`](crate::secagg::SecAggPolicy)).
    pub threshold: u32,
    /// b: arithmetic is mod 2^b (1..=32).
    pub bits: u32,
    /// ρ: the fraction of a round's cohort that may drop out while the sum still carries the full
    /// distributed-DP noise; a round with fewer survivors than `⌈(1−ρ)·n⌉` aborts.
    pub dropout_tolerance: f64,
    /// The largest cohort a round may have; the modulus is sized so that this many updates can
    /// never overflow it. A round that samples more devices fails before sending tasks.
    pub max_cohort: usize,
    /// Randomised Hadamard rotation before quantisation.
    pub rotation: bool,
    /// Deadline of each protocol phase other than the masked input (which has the round's
    /// report timeout: devices train meanwhile).
    pub phase_timeout: Duration,
    /// The L2 clip norm used when the strategy sets none (secure aggregation needs one to bound
    /// every device's contribution to the modular sum).
    pub clip_norm: f32,
}

impl Default for SecureAggregation {
    fn default() -> Self {
        Self {
            neighbours: 32,
            threshold: 17,
            bits: 32,
            dropout_tolerance: 0.3,
            max_cohort: 10_000,
            rotation: false,
            phase_timeout: Duration::from_secs(30),
            clip_norm: 1.0,
        }
    }
}

impl SecureAggregation {
    /// The encoding settings for a plan with this clip norm and noise.
    pub fn encoding(&self, shape: ModelShape, plan: &TrainingPlan) -> DistributedDpConfig {
        let noise_multiplier = match plan.noise {
            NoiseSettings::Distributed { multiplier } => f64::from(multiplier),
            _ => 0.0,
        };
        DistributedDpConfig {
            clip: f64::from(plan.clip_norm.unwrap_or(self.clip_norm)),
            noise_multiplier,
            dim: shape.len(),
            bits: self.bits,
            max_cohort: self.max_cohort,
            dropout_tolerance: self.dropout_tolerance,
            rotation: self.rotation,
            scale: None,
        }
    }

    /// The protocol parameters for vectors of `len` values.
    pub fn params(&self, len: u32) -> SecAggParams {
        SecAggParams { neighbours: self.neighbours, threshold: self.threshold, bits: self.bits, len }
    }

    /// Checks the settings for a model of `shape` (with the clip norm and no noise; the noise a
    /// strategy asks for is checked again when each round starts).
    pub fn validate(&self, shape: ModelShape) -> Result<(), String> {
        if !(self.dropout_tolerance.is_finite() && (0.0..1.0).contains(&self.dropout_tolerance)) {
            return Err(format!("dropout_tolerance must be in [0, 1), got {}", self.dropout_tolerance));
        }
        if self.max_cohort < 2 {
            return Err("max_cohort must be at least 2".into());
        }
        let plan = TrainingPlan { clip_norm: Some(self.clip_norm), ..TrainingPlan::default() };
        let enc = self.encoding(shape, &plan);
        enc.validate().map_err(|e| e.to_string())?;
        let padded = enc.plan(2, 0).map_err(|e| e.to_string())?.padded_dim;
        self.params(padded).validate().map_err(|e| e.to_string())
    }
}

/// The secure part of a running round.
pub(super) struct SecureRound {
    pub(super) server: SecAggServer,
    pub(super) task: SecureTask,
    pub(super) report_deadline: Instant,
}

impl Orchestrator {
    /// Sets a collecting round up for secure aggregation over `chosen`; `Err` fails the round.
    pub(super) fn start_secure(
        &mut self,
        now: Instant,
        chosen: &[ClientId],
    ) -> Result<SecureTask, FailReason> {
        let settings = self.config.round.secure.clone().expect("secure rounds have settings");
        let shape = self.config.shape;
        let fail = |m: String| FailReason::SecureAggregation(m);
        let Some(r) = &mut self.round else { return Err(fail("no round".into())) };
        if chosen.len() < 2 {
            return Err(fail(format!(
                "{} device(s) selected: secure aggregation needs at least 2",
                chosen.len()
            )));
        }
        if chosen.len() > settings.max_cohort {
            return Err(fail(format!(
                "{} devices selected, more than secure_aggregation.max_cohort = {}",
                chosen.len(),
                settings.max_cohort
            )));
        }
        let encoding = settings.encoding(shape, &r.plan);
        let quant = encoding.plan(chosen.len(), self.rng.next_u64()).map_err(|e| fail(e.to_string()))?;
        let params = settings.params(quant.padded_dim);
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let min_survivors = (quant.min_survivors as usize).max(2);
        let server = SecAggServer::new(r.id, self.version, params, chosen.to_vec(), min_survivors, seed)
            .map_err(|e| fail(e.to_string()))?;
        let task = SecureTask { params, quant };
        r.ctx.quant = Some(quant);
        r.deadline = now + settings.phase_timeout;
        r.secure = Some(Box::new(SecureRound {
            server,
            task: task.clone(),
            report_deadline: now + self.config.round.report_timeout,
        }));
        Ok(task)
    }

    /// A secure-aggregation message from `client`.
    pub(super) fn handle_secagg(&mut self, now: Instant, client: ClientId, msg: SecAggClientMessage) {
        let round = msg.round();
        let Some(r) = &mut self.round else {
            return self.reject(round, client, RejectReason::Late);
        };
        if round != r.id {
            let reason = if round < r.id { RejectReason::Late } else { RejectReason::WrongRound };
            return self.reject(round, client, reason);
        }
        let Some(secure) = r.secure.as_mut().filter(|_| r.phase == Phase::Collecting) else {
            return self.reject(
                round,
                client,
                RejectReason::SecAgg("no secure-aggregation phase of this round is running".into()),
            );
        };
        match r.participants.get(&client) {
            None => return self.reject(round, client, RejectReason::NotSelected),
            Some(Participant::Rejected | Participant::Dropped) => {
                return self.reject(round, client, RejectReason::Late);
            }
            Some(_) => {}
        }
        if let Err(e) = secure.server.handle_message(client, msg) {
            // The client is out of the remaining phases; the server treats it as dropped.
            secure.server.handle_dropout(client);
            r.participants.insert(client, Participant::Rejected);
            self.reject(round, client, RejectReason::SecAgg(e.to_string()));
        }
        self.maybe_close_secure(now);
    }

    /// A selected client of a secure round disconnected or withdrew.
    pub(super) fn secure_dropout(&mut self, client: ClientId) {
        if let Some(r) = &mut self.round
            && let Some(s) = &mut r.secure
        {
            s.server.handle_dropout(client);
        }
    }

    /// Closes the current protocol phase early when no live client owes a message.
    pub(super) fn maybe_close_secure(&mut self, now: Instant) {
        let Some(r) = &self.round else { return };
        let Some(s) = &r.secure else { return };
        if r.phase == Phase::Collecting && s.server.waiting_for() == 0 {
            self.close_secure_phase(now);
        }
    }

    /// Ends the current protocol phase (deadline, or nobody left to wait for).
    pub(super) fn close_secure_phase(&mut self, now: Instant) {
        let phase_timeout = self.config.round.secure.as_ref().map_or(Duration::ZERO, |s| s.phase_timeout);
        let Some(r) = &mut self.round else { return };
        let round = r.id;
        let Some(s) = &mut r.secure else { return };
        if let Err(abort) = s.server.close_phase() {
            r.stats.secagg = Some(Box::new(s.server.stats()));
            let mut live: Vec<ClientId> = r
                .participants
                .iter()
                .filter(|(_, p)| matches!(p, Participant::Training))
                .map(|(c, _)| *c)
                .collect();
            live.sort_unstable();
            for c in live {
                self.send(
                    c,
                    CoordinatorMessage::Abort { round, reason: AbortReason::SecureAggregationFailed },
                );
            }
            return self.fail(now, FailReason::SecureAggregation(abort.to_string()));
        }
        let mut out = Vec::new();
        while let Some((to, msg)) = s.server.poll_transmit() {
            out.push((to, msg));
        }
        r.deadline = match s.server.phase() {
            SecAggPhase::MaskedInput => s.report_deadline.max(now + phase_timeout),
            _ => now + phase_timeout,
        };
        let done = s.server.phase() == SecAggPhase::Done;
        for (to, msg) in out {
            self.send(to, CoordinatorMessage::SecAgg(msg));
        }
        if done {
            return self.finish_secure(now);
        }
        // Everyone may already have answered (e.g. nobody is left to ask).
        self.maybe_close_secure(now);
    }

    /// The sum is known: decode it, feed it to the aggregator and finish the round.
    fn finish_secure(&mut self, now: Instant) {
        let Some(r) = &mut self.round else { return };
        let Some(s) = &mut r.secure else { return };
        r.stats.secagg = Some(Box::new(s.server.stats()));
        let Some(output) = s.server.take_result() else {
            return self.fail(now, FailReason::SecureAggregation("no result".into()));
        };
        let quant: QuantPlan = s.task.quant;
        let accepted = decode_sum_checked(&output.sum, &quant, output.contributors.len())
            .map_err(|e| e.to_string())
            .and_then(|sum| {
                let agg = r.aggregator.as_mut().expect("collecting rounds have an aggregator");
                agg.accept_sum(sum, output.contributors.len()).map_err(|e| e.to_string())
            });
        if let Err(e) = accepted {
            return self.fail(now, FailReason::SecureAggregation(e));
        }
        let round = r.id;
        for c in &output.contributors {
            let before = r.participants.insert(*c, Participant::Reported);
            if before.is_some() {
                r.stats.reported += 1;
                r.stats.total_weight += 1.0;
            }
            if before == Some(Participant::Dropped) {
                // It disconnected after its masked input: its update is in the sum all the same.
                r.stats.dropped = r.stats.dropped.saturating_sub(1);
            }
        }
        let contributors = output.contributors;
        for c in contributors {
            self.events.push_back(RoundEvent::UpdateAccepted { round, client: c });
            self.send(c, CoordinatorMessage::Receipt { round });
        }
        self.finish_round(now);
    }
}
