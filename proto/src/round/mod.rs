//! The coordinator's round engine.
//!
//! [`Orchestrator`] is the machine a coordinator host drives. It owns the global model, its
//! recent history (for patch downloads), the [`Strategy`] and a seeded RNG, and runs one round at a
//! time. Each round moves through [`Phase`]:
//!
//! ```text
//! Idle ──start_round──▶ Selecting ──pool full / selection deadline──▶ Collecting
//!   ▲                        │ too few check-ins                        │ target reached, deadline,
//!   │                        ▼                                          │ or everyone reported/dropped
//!   └──────────────────── Failed ◀── too few reports / aggregation error ┤
//!   └──────────────────── Committed ◀──────────── Aggregating ◀──────────┘
//! ```
//!
//! # Calling contract
//! Feed inputs with the current time: [`Orchestrator::start_round`],
//! [`Orchestrator::handle_message`], [`Orchestrator::handle_disconnect`],
//! [`Orchestrator::handle_timeout`] (whenever the instant from [`Orchestrator::poll_timeout`] has
//! passed). After every input, drain [`Orchestrator::poll_transmit`] (messages to send, in order)
//! and [`Orchestrator::poll_event`] (what happened). Nothing here blocks, reads a clock or does I/O.
//!
//! A committed round's new model is in the [`RoundEvent::Committed`] event. When that event carries a
//! [`PrivacyCharge`](crate::strategy::PrivacyCharge), the host must make it durable (the privacy ledger) before it releases the
//! model to anyone; the orchestrator itself only hands the new model to clients of the *next*
//! round, which the host starts.

use crate::encoding::EncodingKind;
use crate::ids::{ClientId, ModelVersion, RoundId};
use crate::message::{
    AbortReason, CheckIn, ClientMessage, ClientUpdate, ComeBackAt, CoordinatorMessage, ModelPayload, Refusal,
    RejectReason, Task, TaskKind, TrainingPlan, WithdrawReason,
};
use crate::strategy::{AdmissionError, Aggregator, RoundContext, SelectionPolicy, Strategy};
use crate::time::{Duration, Instant, millis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

mod config;
mod evaluation;
mod events;
mod secure;
mod shard;

pub use config::{ConfigError, Eligibility, OrchestratorConfig, RoundConfig, Weighting};
pub use evaluation::{FederatedEval, MAX_EVAL_CASES};
pub use events::{
    CommittedRound, EvaluatedRound, FailReason, InstallError, Phase, RoundEvent, RoundStats, StartError,
    Transmit,
};
pub use secure::SecureAggregation;
pub use shard::{ShardOutcome, ShardSpec, ShardStats, SharesError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Participant {
    Training,
    Reported,
    Rejected,
    Dropped,
}

/// Per-round state (the `Round` of the design): one round's selection and collection.
struct Round {
    id: RoundId,
    phase: Phase,
    ctx: RoundContext,
    plan: TrainingPlan,
    started: Instant,
    deadline: Instant,
    candidates: Vec<(ClientId, Option<ModelVersion>)>,
    checked_in: HashSet<ClientId>,
    participants: HashMap<ClientId, Participant>,
    aggregator: Option<Box<dyn Aggregator>>,
    patches: BTreeMap<ModelVersion, Option<ModelPayload>>,
    stats: RoundStats,
    loss_sum: f64,
    loss_weight: f64,
    hit_sum: f64,
    hit_count: usize,
    secure: Option<Box<secure::SecureRound>>,
    /// Train or evaluate.
    kind: TaskKind,
    /// Reports the round aims for (`target_participants`, or the evaluation target).
    target: usize,
    /// Fewest reports for the round to release.
    min_reports: usize,
    /// An evaluation round's running sums and release.
    eval: Option<Box<evaluation::EvalState>>,
    /// Alone, a follower's share, or the leader's round of a cluster.
    share: shard::Share,
    /// Other nodes' shares that failed or did not fit (the leader's round).
    shares_failed: usize,
}

/// The credential check applied to every check-in: `(claimed client, credential) -> accepted`.
pub type Authenticator = Box<dyn FnMut(ClientId, &[u8]) -> bool + Send>;

/// The coordinator's round engine. See the module docs for the calling contract.
pub struct Orchestrator {
    config: OrchestratorConfig,
    strategy: Box<dyn Strategy>,
    rng: ChaCha8Rng,
    model: Arc<[f32]>,
    version: ModelVersion,
    history: VecDeque<(ModelVersion, Arc<[f32]>)>,
    next_round: RoundId,
    round: Option<Round>,
    last_phase: Phase,
    halted: Option<Refusal>,
    population: Option<u64>,
    authenticate: Authenticator,
    /// The model replaced by the last commit, until the next round starts (for [`Orchestrator::revert_commit`]).
    replaced: Option<(ModelVersion, Arc<[f32]>, crate::strategy::StrategyState)>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<RoundEvent>,
    /// Reports an evaluation round aims for (`None`: the training target).
    evaluation_target: Option<usize>,
    /// The coordinator nodes of the cluster this engine leads (`None`: it serves alone).
    cluster_nodes: Option<usize>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator")
            .field("strategy", &self.strategy.name())
            .field("version", &self.version)
            .field("next_round", &self.next_round)
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

impl Orchestrator {
    /// A new engine serving `model` (of `config.shape`) as `version`, with rounds numbered from
    /// `next_round`. Every client is accepted until [`set_authenticator`](Self::set_authenticator).
    pub fn new(
        config: OrchestratorConfig,
        strategy: Box<dyn Strategy>,
        model: Vec<f32>,
        version: ModelVersion,
        next_round: RoundId,
    ) -> Result<Self, ConfigError> {
        let r = &config.round;
        if r.target_participants == 0 {
            return Err(ConfigError::NoTarget);
        }
        if r.min_reports == 0 || r.min_reports > r.target_participants {
            return Err(ConfigError::MinReports { min: r.min_reports, target: r.target_participants });
        }
        if !(r.over_selection.is_finite() && r.over_selection >= 1.0) {
            return Err(ConfigError::OverSelection(r.over_selection));
        }
        if let Some(secure) = &r.secure {
            secure.validate(config.shape).map_err(ConfigError::SecureAggregation)?;
        }
        if !(r.max_weight.is_finite() && r.max_weight > 0.0) {
            return Err(ConfigError::MaxWeight);
        }
        if r.selection_pool == Some(0) {
            return Err(ConfigError::EmptyPool);
        }
        if model.len() != config.shape.len() {
            return Err(ConfigError::ModelLength { got: model.len(), want: config.shape.len() });
        }
        if model.iter().any(|v| !v.is_finite()) {
            return Err(ConfigError::NonFiniteModel);
        }
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(config.rng_seed),
            config,
            strategy,
            model: model.into(),
            version,
            history: VecDeque::new(),
            next_round,
            round: None,
            last_phase: Phase::Idle,
            halted: None,
            population: None,
            authenticate: Box::new(|_, _| true),
            replaced: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            evaluation_target: None,
            cluster_nodes: None,
        })
    }

    /// Replaces the RNG's seed (selection, and noise for samplers that use the caller's RNG) with
    /// 256 bits the host drew from a secure source. A service must call this with operating-system
    /// entropy: [`OrchestratorConfig::rng_seed`] is for reproducible simulations and tests, and a
    /// seed anyone can read from a config file makes selection (and any noise drawn from this
    /// RNG) predictable.
    pub fn reseed(&mut self, seed: [u8; 32]) {
        self.rng = ChaCha8Rng::from_seed(seed);
    }

    /// Tells the engine N, the number of devices enrolled (and not revoked) now. Rounds started
    /// afterwards carry it in [`RoundContext::population`]; central DP samples each checked-in
    /// device with probability `q = min(1, target / N)` and charges that `q`. Call before every
    /// round if the population changes.
    pub fn set_population(&mut self, n: u64) {
        self.population = Some(n);
    }

    /// Installs the credential check applied to every check-in.
    pub fn set_authenticator(&mut self, f: impl FnMut(ClientId, &[u8]) -> bool + Send + 'static) {
        self.authenticate = Box::new(f);
    }

    /// The current global model and its version.
    pub fn model(&self) -> (ModelVersion, &Arc<[f32]>) {
        (self.version, &self.model)
    }

    /// The configuration.
    pub fn config(&self) -> &OrchestratorConfig {
        &self.config
    }

    /// The strategy's name.
    pub fn strategy_name(&self) -> String {
        self.strategy.name()
    }

    /// The phase of the current (or last) round.
    pub fn phase(&self) -> Phase {
        self.round.as_ref().map_or(self.last_phase, |r| r.phase)
    }

    /// The running round, if any.
    pub fn current_round(&self) -> Option<RoundId> {
        self.round.as_ref().map(|r| r.id)
    }

    /// The id the next round will get.
    pub fn next_round_id(&self) -> RoundId {
        self.next_round
    }

    /// Starts a round: the strategy's admission check (privacy budget) runs first; a refusal leaves
    /// everything unchanged. A budget refusal also makes later check-ins get
    /// [`Refusal::BudgetExhausted`].
    pub fn start_round(&mut self, now: Instant) -> Result<RoundId, StartError> {
        if let Some(r) = &self.round {
            return Err(StartError::Busy(r.id));
        }
        match &self.halted {
            Some(Refusal::ShuttingDown) => return Err(StartError::ShutDown),
            Some(reason) => return Err(StartError::Halted(reason.clone())),
            None => {}
        }
        let id = self.next_round;
        let cfg = &self.config.round;
        let ctx = RoundContext {
            round: id,
            model_version: self.version,
            shape: self.config.shape,
            target_participants: cfg.target_participants,
            selected: 0,
            population: self.population,
            secure: cfg.secure.is_some(),
            quant: None,
        };
        if let Err(e) = self.strategy.admit(&ctx) {
            if matches!(e, AdmissionError::BudgetExhausted { .. }) {
                self.halted = Some(Refusal::BudgetExhausted);
            }
            return Err(e.into());
        }
        self.next_round = id.next();
        let (target, min_reports, share) = match self.cluster_nodes {
            None => (cfg.target_participants, cfg.min_reports, shard::Share::Alone),
            Some(nodes) => (
                cfg.target_participants.div_ceil(nodes).max(1),
                0,
                shard::Share::Leader {
                    min_total: cfg.min_reports,
                    on_check_ins: self.strategy.selection_policy() == SelectionPolicy::Poisson,
                },
            ),
        };
        self.begin_round(now, ctx, TaskKind::Train, target, min_reports, share);
        self.events.push_back(RoundEvent::Started {
            round: id,
            version: self.version,
            kind: TaskKind::Train,
        });
        Ok(id)
    }

    /// Sets up a training round (or a follower's share of one) and configures its plan.
    fn begin_round(
        &mut self,
        now: Instant,
        ctx: RoundContext,
        kind: TaskKind,
        target: usize,
        min_reports: usize,
        share: shard::Share,
    ) {
        let cfg = &self.config.round;
        let mut plan = cfg.plan.clone();
        self.strategy.configure(&ctx, &mut plan);
        if let Some(secure) = &cfg.secure {
            // Every device's contribution to the modular sum must be bounded.
            plan.clip_norm = Some(plan.clip_norm.unwrap_or(secure.clip_norm));
        }
        let clip_norm = plan.clip_norm;
        // From here on the last commit's model may be shipped: it can no longer be reverted.
        self.replaced = None;
        self.round = Some(Round {
            id: ctx.round,
            phase: Phase::Selecting,
            ctx,
            plan,
            started: now,
            deadline: now + cfg.selection_timeout,
            candidates: Vec::new(),
            checked_in: HashSet::new(),
            participants: HashMap::new(),
            aggregator: None,
            patches: BTreeMap::new(),
            stats: RoundStats { clip_norm, ..RoundStats::default() },
            loss_sum: 0.0,
            loss_weight: 0.0,
            hit_sum: 0.0,
            hit_count: 0,
            secure: None,
            kind,
            target,
            min_reports,
            eval: None,
            share,
            shares_failed: 0,
        });
    }

    /// Handles one decoded message from `client`.
    pub fn handle_message(&mut self, now: Instant, client: ClientId, message: ClientMessage) {
        match message {
            ClientMessage::CheckIn(c) => self.handle_check_in(now, client, c),
            ClientMessage::Update(u) => self.handle_update(now, client, u),
            ClientMessage::Withdraw { round, reason } => self.handle_withdraw(now, client, round, reason),
            ClientMessage::SecAgg(m) => self.handle_secagg(now, client, m),
            ClientMessage::Evaluation(e) => self.handle_evaluation(now, client, e),
        }
    }

    /// The connection to `client` closed: if it was training, it counts as a dropout.
    pub fn handle_disconnect(&mut self, now: Instant, client: ClientId) {
        let Some(r) = &mut self.round else { return };
        r.checked_in.remove(&client);
        r.candidates.retain(|(c, _)| *c != client);
        if r.participants.get(&client) == Some(&Participant::Training) {
            r.participants.insert(client, Participant::Dropped);
            r.stats.dropped += 1;
            self.events.push_back(RoundEvent::ClientDropped { round: r.id, client });
            self.secure_dropout(client);
            self.maybe_close(now);
        }
    }

    /// Advances deadlines. Call when the instant from [`poll_timeout`](Self::poll_timeout) is reached.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(r) = &self.round else { return };
        if now < r.deadline {
            return;
        }
        match r.phase {
            Phase::Selecting => self.close_selection(now),
            Phase::Collecting if r.secure.is_some() => self.close_secure_phase(now),
            Phase::Collecting => self.finish_round(now),
            _ => {}
        }
    }

    /// Stops accepting work: aborts the running round (failing it) and refuses later check-ins.
    pub fn shutdown(&mut self, now: Instant) {
        self.halted = Some(Refusal::ShuttingDown);
        if let Some(r) = self.round.take() {
            let mut r = r;
            let mut training: Vec<ClientId> = r
                .participants
                .iter()
                .filter(|(_, p)| **p == Participant::Training)
                .map(|(c, _)| *c)
                .collect();
            training.sort_unstable();
            for c in training {
                self.transmits.push_back(Transmit {
                    to: c,
                    message: CoordinatorMessage::Abort { round: r.id, reason: AbortReason::ShuttingDown },
                });
            }
            r.stats.duration = now.saturating_duration_since(r.started);
            self.last_phase = Phase::Failed;
            self.events.push_back(RoundEvent::Failed {
                round: r.id,
                reason: FailReason::ShutDown,
                stats: r.stats,
            });
        }
    }

    /// Aborts the running round, if any: clients still training are told
    /// ([`AbortReason::RoundFailed`]), the round fails with [`FailReason::Aborted`] and the model
    /// is unchanged. For a host that could not make the round's start durable.
    pub fn abort_round(&mut self, now: Instant, reason: impl Into<String>) {
        let Some(r) = &self.round else { return };
        let round = r.id;
        let mut training: Vec<ClientId> =
            r.participants.iter().filter(|(_, p)| **p == Participant::Training).map(|(c, _)| *c).collect();
        training.sort_unstable();
        for c in training {
            self.send(c, CoordinatorMessage::Abort { round, reason: AbortReason::RoundFailed });
        }
        self.fail(now, FailReason::Aborted(reason.into()));
    }

    /// Undoes the last commit: the model and version go back to what they were before it, so a
    /// model the host failed to record is never served. Possible only until the next round
    /// starts (no client can have received the reverted model before then); returns whether a
    /// commit was undone. The strategy's carried state (server-optimizer moments, an adaptive
    /// clip norm) is rewound with it; a DP ledger held in memory is not (an over-counted privacy
    /// charge is the safe side, and the host stops starting rounds after a storage failure).
    pub fn revert_commit(&mut self) -> bool {
        if self.round.is_some() {
            return false;
        }
        let Some((version, model, state)) = self.replaced.take() else { return false };
        if self.history.back().is_some_and(|(v, _)| *v == version) {
            self.history.pop_back();
        }
        self.model = model;
        self.version = version;
        // It was saved by this very strategy a moment ago: restoring it cannot fail.
        let _ = self.strategy.restore_state(&state, self.model.len());
        self.last_phase = Phase::Failed;
        true
    }

    /// The strategy's carried state now (what the last commit's
    /// [`CommittedRound::strategy_state`] holds).
    pub fn strategy_state(&self) -> crate::strategy::StrategyState {
        self.strategy.save_state()
    }

    /// Puts back a checkpointed strategy state (at start-up, before any round). On error nothing
    /// changes.
    pub fn restore_strategy_state(
        &mut self,
        state: &crate::strategy::StrategyState,
    ) -> Result<(), crate::strategy::StateError> {
        self.strategy.restore_state(state, self.model.len())
    }

    /// Serves `model` as the next version (an operator's rollback to an earlier checkpoint: the
    /// version number still only grows, so every device sees a new version) and, if given, puts
    /// back the strategy state saved with it. Only between rounds; the host records it durably
    /// first. Returns the new version.
    pub fn install_model(
        &mut self,
        model: Vec<f32>,
        state: Option<&crate::strategy::StrategyState>,
    ) -> Result<ModelVersion, InstallError> {
        if let Some(r) = &self.round {
            return Err(InstallError::Busy(r.id));
        }
        if model.len() != self.model.len() {
            return Err(InstallError::Shape { got: model.len(), want: self.model.len() });
        }
        if model.iter().any(|v| !v.is_finite()) {
            return Err(InstallError::NonFinite);
        }
        if let Some(state) = state {
            self.strategy.restore_state(state, model.len()).map_err(InstallError::State)?;
        }
        if self.config.history > 0 {
            self.history.push_back((self.version, self.model.clone()));
            while self.history.len() > self.config.history {
                self.history.pop_front();
            }
        }
        self.replaced = None;
        self.model = model.into();
        self.version = self.version.next();
        Ok(self.version)
    }

    /// The next message to send, in order.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<RoundEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.round
            .as_ref()
            .filter(|r| matches!(r.phase, Phase::Selecting | Phase::Collecting))
            .map(|r| r.deadline)
    }

    fn send(&mut self, to: ClientId, message: CoordinatorMessage) {
        self.transmits.push_back(Transmit { to, message });
    }

    fn refuse(&mut self, client: ClientId, reason: Refusal) {
        self.events.push_back(RoundEvent::CheckInRefused { client, reason: reason.clone() });
        self.send(client, CoordinatorMessage::Refusal(reason));
    }

    fn come_back(&mut self, client: ClientId, after: Duration) {
        let window = millis(self.config.round.retry_window);
        self.send(
            client,
            CoordinatorMessage::ComeBackAt(ComeBackAt { after_ms: millis(after), window_ms: window }),
        );
    }

    fn handle_check_in(&mut self, now: Instant, client: ClientId, c: CheckIn) {
        if let Some(reason) = self.halted.clone() {
            return self.refuse(client, reason);
        }
        if c.client != client {
            return self.refuse(client, Refusal::Unauthenticated);
        }
        if !(self.authenticate)(client, &c.credential) {
            return self.refuse(client, Refusal::Unauthenticated);
        }
        if c.model_family != self.config.model_family {
            let expected = self.config.model_family.clone();
            return self.refuse(client, Refusal::WrongModelFamily { expected });
        }
        if !self.config.round.eligibility.admits(&c.conditions) {
            return self.refuse(client, Refusal::NotEligible);
        }
        let wanted_encoding =
            self.round.as_ref().map_or(self.config.round.plan.encoding, |r| r.plan.encoding);
        let dense_too_big = wanted_encoding == EncodingKind::Dense
            && c.capabilities.max_update_values < self.config.shape.len() as u64;
        if !c.capabilities.encodings.contains(&wanted_encoding) || dense_too_big {
            return self.refuse(client, Refusal::IncompatibleCapabilities);
        }
        let retry = self.config.round.retry_after;
        let Some(r) = &mut self.round else {
            return self.come_back(client, retry);
        };
        if r.phase != Phase::Selecting {
            // Round in progress: come back around when it should be over.
            let left = r.deadline.saturating_duration_since(now);
            return self.come_back(client, left.max(retry));
        }
        if r.participants.contains_key(&client) || !r.checked_in.insert(client) {
            return self.refuse(client, Refusal::AlreadyCheckedIn);
        }
        r.candidates.push((client, c.have_version));
        if let Some(pool) = self.config.round.selection_pool
            && r.candidates.len() >= pool
        {
            self.close_selection(now);
        }
    }

    fn close_selection(&mut self, now: Instant) {
        let retry = self.config.round.retry_after;
        let over_selection = self.config.round.over_selection;
        let Some(r) = &mut self.round else { return };
        let goal = ((r.target as f64) * over_selection).ceil() as usize;
        let min_reports = r.min_reports;
        let kind = r.kind;
        r.stats.candidates = r.candidates.len();
        r.stats.selection_time = now.saturating_duration_since(r.started);
        // Under Poisson sampling `min_reports` gates the check-ins, before any coin is tossed: the
        // decision to release must not depend on who was sampled.
        if r.candidates.len() < min_reports {
            let candidates: Vec<ClientId> = r.candidates.iter().map(|(c, _)| *c).collect();
            let reason = FailReason::TooFewCheckIns { got: candidates.len(), needed: min_reports };
            for c in candidates {
                self.come_back(c, retry);
            }
            return self.fail(now, reason);
        }
        let ids: Vec<ClientId> = r.candidates.iter().map(|(c, _)| *c).collect();
        let chosen = self.strategy.select(&r.ctx, &ids, goal, &mut self.rng);
        let chosen_set: HashSet<ClientId> = chosen.iter().copied().collect();
        let have: HashMap<ClientId, Option<ModelVersion>> = r.candidates.iter().copied().collect();
        r.ctx.selected = chosen.len();
        r.stats.selected = chosen.len();
        r.phase = Phase::Collecting;
        r.deadline = now + self.config.round.report_timeout;
        let (round, version) = (r.id, self.version);
        self.events.push_back(RoundEvent::SelectionClosed {
            round,
            candidates: ids.len(),
            selected: chosen.len(),
        });
        let secure = if self.config.round.secure.is_some() && kind == TaskKind::Train {
            match self.start_secure(now, &chosen) {
                Ok(task) => Some(task),
                Err(reason) => {
                    for c in ids {
                        self.come_back(c, retry);
                    }
                    return self.fail(now, reason);
                }
            }
        } else {
            None
        };
        let Some(r) = &mut self.round else { return };
        if kind == TaskKind::Train {
            r.aggregator = Some(self.strategy.aggregator(&r.ctx));
        }
        if chosen.is_empty() {
            // Only Poisson sampling can pick nobody; the round still releases (noise only).
            return self.finish_round(now);
        }
        let report_within_ms = millis(self.config.round.report_timeout);
        for c in &chosen {
            let payload = self.payload_for(have.get(c).copied().flatten());
            let Some(r) = &mut self.round else { return };
            r.participants.insert(*c, Participant::Training);
            let task = Task {
                round,
                model_version: version,
                model: payload,
                plan: r.plan.clone(),
                report_within_ms,
                secure: secure.clone(),
                kind,
            };
            self.send(*c, CoordinatorMessage::Task(task));
        }
        for c in ids.into_iter().filter(|c| !chosen_set.contains(c)) {
            self.come_back(c, retry);
        }
    }

    /// The payload for a client holding `have`: a patch when that version is in the history and
    /// the patch is smaller than the full model, else the full model.
    fn payload_for(&mut self, have: Option<ModelVersion>) -> ModelPayload {
        let shape = self.config.shape;
        let full = ModelPayload::Full { shape, values: self.model.clone() };
        let Some(have) = have else { return full };
        let Some(r) = &mut self.round else { return full };
        if let Some(cached) = r.patches.get(&have) {
            return cached.clone().unwrap_or(full);
        }
        let patch = self.history.iter().find(|(v, _)| *v == have).and_then(|(_, old)| {
            let row_len = shape.row_len as usize;
            let mut rows = Vec::new();
            let mut values = Vec::new();
            for (i, (new_row, old_row)) in
                self.model.chunks_exact(row_len).zip(old.chunks_exact(row_len)).enumerate()
            {
                if new_row.iter().zip(old_row).any(|(a, b)| a.to_bits() != b.to_bits()) {
                    rows.push(i as u32);
                    values.extend_from_slice(new_row);
                }
            }
            (values.len() < self.model.len() / 2).then(|| ModelPayload::Patch {
                from: have,
                shape,
                rows: rows.into(),
                values: values.into(),
            })
        });
        r.patches.insert(have, patch.clone());
        patch.unwrap_or(full)
    }

    fn reject(&mut self, round: RoundId, client: ClientId, reason: RejectReason) {
        if let Some(r) = &mut self.round
            && r.id == round
        {
            r.stats.rejected += 1;
        }
        self.events.push_back(RoundEvent::UpdateRejected { round, client, reason: reason.clone() });
        self.send(client, CoordinatorMessage::Rejection { round, reason });
    }

    fn handle_update(&mut self, now: Instant, client: ClientId, u: ClientUpdate) {
        let round = u.round;
        let Some(r) = &mut self.round else {
            return self.reject(round, client, RejectReason::Late);
        };
        if round != r.id {
            let reason = if round < r.id { RejectReason::Late } else { RejectReason::WrongRound };
            return self.reject(round, client, reason);
        }
        if r.kind == TaskKind::Evaluate {
            let reason = "this is an evaluation round: send an evaluation report, not an update";
            return self.reject(round, client, RejectReason::Refused(reason.into()));
        }
        if r.secure.is_some() {
            let reason = "this round runs secure aggregation: send the masked input, not the update";
            return self.reject(round, client, RejectReason::SecAgg(reason.into()));
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
        if u.base_version != self.version {
            let reason = RejectReason::StaleVersion { expected: self.version, got: u.base_version };
            r.participants.insert(client, Participant::Rejected);
            self.reject(round, client, reason);
            return self.maybe_close(now);
        }
        let cfg = &self.config.round;
        let admitted = cfg.weighting.admit(u.weight, cfg.max_weight, &r.plan.noise);
        let weight = admitted.unwrap_or(0.0);
        let decoded = if admitted.is_none() {
            Err(RejectReason::InvalidWeight)
        } else {
            u.update
                .decode(self.config.shape, self.config.round.max_update_values)
                .map_err(|e| RejectReason::Malformed(e.to_string()))
        };
        let accepted = decoded.and_then(|update| {
            let agg = r.aggregator.as_mut().expect("collecting rounds have an aggregator");
            agg.accept_report(update, f64::from(weight), &u.metrics)
                .map_err(|e| RejectReason::Refused(e.to_string()))
        });
        match accepted {
            Err(reason) => {
                r.participants.insert(client, Participant::Rejected);
                self.reject(round, client, reason);
            }
            Ok(()) => {
                r.participants.insert(client, Participant::Reported);
                r.stats.reported += 1;
                r.stats.total_weight += f64::from(weight);
                if let Some(within) = u.metrics.norm_within_clip {
                    r.stats.clip_indicators += 1;
                    r.stats.within_clip += usize::from(within);
                }
                if u.metrics.loss.is_finite() {
                    r.loss_sum += f64::from(weight) * f64::from(u.metrics.loss);
                    r.loss_weight += f64::from(weight);
                }
                if let Some(h) = u.metrics.hit_rate_at_10.filter(|h| h.is_finite()) {
                    r.hit_sum += f64::from(h);
                    r.hit_count += 1;
                }
                self.events.push_back(RoundEvent::UpdateAccepted { round, client });
                self.send(client, CoordinatorMessage::Receipt { round });
            }
        }
        self.maybe_close(now);
    }

    fn handle_withdraw(&mut self, now: Instant, client: ClientId, round: RoundId, _reason: WithdrawReason) {
        let Some(r) = &mut self.round else { return };
        if r.id != round {
            return;
        }
        if r.participants.get(&client) == Some(&Participant::Training) {
            r.participants.insert(client, Participant::Dropped);
            r.stats.dropped += 1;
            self.events.push_back(RoundEvent::ClientDropped { round, client });
            self.secure_dropout(client);
            self.maybe_close(now);
        } else if r.phase == Phase::Selecting {
            r.checked_in.remove(&client);
            r.candidates.retain(|(c, _)| *c != client);
        }
    }

    /// Closes a collecting round early once the target is reached or nobody is left training.
    fn maybe_close(&mut self, now: Instant) {
        // Under Poisson sampling every sampled client's report is taken: a cap at the target
        // would let one client's presence push another's update out (sensitivity 2C, not C).
        let Some(r) = &self.round else { return };
        let cap = match self.strategy.selection_policy() {
            SelectionPolicy::FixedSize => r.target,
            SelectionPolicy::Poisson => usize::MAX,
        };
        if r.phase != Phase::Collecting {
            return;
        }
        if r.secure.is_some() {
            return self.maybe_close_secure(now);
        }
        let training = r.participants.values().filter(|p| **p == Participant::Training).count();
        if r.stats.reported >= cap || training == 0 {
            self.finish_round(now);
        }
    }

    fn finish_round(&mut self, now: Instant) {
        let policy = self.strategy.selection_policy();
        let Some(r) = &mut self.round else { return };
        let min_reports = match policy {
            SelectionPolicy::FixedSize => r.min_reports,
            // Whether a Poisson-sampled round releases must not depend on who reported.
            SelectionPolicy::Poisson => 0,
        };
        let still: Vec<ClientId> =
            r.participants.iter().filter(|(_, p)| **p == Participant::Training).map(|(c, _)| *c).collect();
        r.stats.unfinished = still.len();
        let round = r.id;
        if r.stats.reported < min_reports {
            let reason = FailReason::TooFewReports { got: r.stats.reported, needed: min_reports };
            let mut still = still;
            still.sort_unstable();
            for c in still {
                self.send(c, CoordinatorMessage::Abort { round, reason: AbortReason::RoundFailed });
            }
            return self.fail(now, reason);
        }
        let mut still = still;
        still.sort_unstable();
        for c in still {
            self.send(c, CoordinatorMessage::Abort { round, reason: AbortReason::RoundFull });
        }
        let Some(r) = &mut self.round else { return };
        if r.kind == TaskKind::Evaluate {
            return self.finish_evaluation(now);
        }
        match r.share {
            shard::Share::Alone => {}
            shard::Share::Shard => return self.finish_shard(now, None),
            shard::Share::Leader { .. } => {
                // This node's part is over; the other nodes' shares come from the host.
                r.phase = Phase::Combining;
                self.events.push_back(RoundEvent::AwaitingShares { round });
                return;
            }
        }
        self.aggregate_and_commit(now);
    }

    /// Finishes the aggregate, applies it and commits (a single node's round, or the leader's
    /// once every share is merged).
    fn aggregate_and_commit(&mut self, now: Instant) {
        let Some(r) = &mut self.round else { return };
        r.phase = Phase::Aggregating;
        let aggregator = r.aggregator.take().expect("collecting rounds have an aggregator");
        let ctx = r.ctx.clone();
        let before = self.strategy.save_state();
        let result = aggregator.finish(&mut self.rng).and_then(|agg| {
            let mut next = self.model.to_vec();
            self.strategy.apply(&ctx, &mut next, &agg)?;
            if next.iter().any(|v| !v.is_finite()) {
                return Err(crate::strategy::AggregateError::NonFinite);
            }
            Ok((next, agg.privacy))
        });
        match result {
            Err(e) => self.fail(now, FailReason::Aggregation(e)),
            Ok((next, privacy)) => {
                let Some(mut r) = self.round.take() else { return };
                self.replaced = Some((self.version, self.model.clone(), before));
                if self.config.history > 0 {
                    self.history.push_back((self.version, self.model.clone()));
                    while self.history.len() > self.config.history {
                        self.history.pop_front();
                    }
                }
                self.model = next.into();
                self.version = self.version.next();
                r.stats.duration = now.saturating_duration_since(r.started);
                if r.loss_weight > 0.0 {
                    r.stats.mean_loss = Some(r.loss_sum / r.loss_weight);
                }
                if r.hit_count > 0 {
                    r.stats.mean_local_hit_rate = Some(r.hit_sum / r.hit_count as f64);
                }
                self.last_phase = Phase::Committed;
                self.events.push_back(RoundEvent::Committed(Box::new(CommittedRound {
                    round: r.id,
                    version: self.version,
                    model: self.model.clone(),
                    privacy,
                    strategy_state: Arc::new(self.strategy.save_state()),
                    stats: r.stats,
                })));
            }
        }
    }

    fn fail(&mut self, now: Instant, reason: FailReason) {
        if self.round.as_ref().is_some_and(|r| r.share == shard::Share::Shard) {
            // A follower's share fails alone: the leader's round goes on without its updates.
            return self.finish_shard(now, Some(reason.to_string()));
        }
        let Some(mut r) = self.round.take() else { return };
        r.stats.duration = now.saturating_duration_since(r.started);
        self.last_phase = Phase::Failed;
        self.events.push_back(RoundEvent::Failed { round: r.id, reason, stats: r.stats });
    }
}
