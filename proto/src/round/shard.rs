//! Rounds served by several coordinator nodes (a cluster on one database).
//!
//! One node, the **leader**, runs the schedule and owns the population's privacy ledger; every
//! node, leader included, terminates its own clients' connections and runs the round for them:
//!
//! ```text
//!  leader:   start_round ──▶ Selecting ──▶ Collecting ──▶ Combining ──handle_shares──▶ Committed
//!  follower:      start_shard ──▶ Selecting ──▶ Collecting ──▶ ShardDone(partial)  ─┘ (via the host)
//! ```
//!
//! - The leader's engine is told how many nodes serve the population
//!   ([`Orchestrator::set_cluster_nodes`]). Its rounds aim for `⌈target / nodes⌉` reports of its
//!   own, and when its own part is over it does not finish: it enters [`Phase::Combining`] and
//!   emits [`RoundEvent::AwaitingShares`]. The host gathers the other nodes' [`ShardOutcome`]s
//!   and hands them over with [`Orchestrator::handle_shares`]; only then is `min_reports`
//!   checked (over all nodes), the aggregate finished — central DP's noise added **once**, to
//!   the merged sum — the server optimizer stepped and the round committed.
//! - A follower's engine starts the same round id from the leader's [`ShardSpec`]
//!   ([`Orchestrator::start_shard`]), on the same model version (the host adopts the leader's
//!   checkpoints with [`Orchestrator::adopt_model`]). Its strategy is not asked to admit the
//!   round (the leader did, against the ledger) and nothing is charged or committed: when its
//!   part is over it emits [`RoundEvent::ShardDone`] with its [`PartialAggregate`] (the running
//!   sum, unnoised) and its figures. A share that failed (secure aggregation below its
//!   threshold, say) carries no partial: its clients' updates are lost, never half-counted.
//! - Under secure aggregation each node runs its own secure aggregation among its own clients;
//!   the node learns only the sum of its cohort (which must meet the configured threshold) and
//!   the leader only per-node sums. Partial sums of masked vectors are still sums.

use super::{Orchestrator, Phase, RoundEvent, RoundStats, StartError};
use crate::ids::{ModelVersion, RoundId};
use crate::message::TaskKind;
use crate::strategy::{PartialAggregate, RoundContext};
use crate::time::Instant;
use serde::{Deserialize, Serialize};

/// The part a round's node plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Share {
    /// A single coordinator: the round is finished here.
    Alone,
    /// A follower's share: it ends with a partial aggregate.
    Shard,
    /// The leader's round: it ends by combining every node's share.
    Leader {
        /// `min_reports`, checked over all nodes once the shares are in.
        min_total: usize,
        /// Poisson sampling: `min_total` gates the check-ins (whether a round releases must not
        /// depend on who was sampled), not the reports.
        on_check_ins: bool,
    },
}

/// What a follower needs to serve its share of a round the leader started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    /// The round (the leader's id).
    pub round: RoundId,
    /// The model version the round trains from.
    pub version: ModelVersion,
    /// Reports this node aims for (fixed-size selection: the target split over the nodes).
    pub target: usize,
    /// N, the enrolled population the leader's strategy saw (the Poisson sampling rate).
    pub population: Option<u64>,
}

/// A node's figures for its share of a round.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardStats {
    /// Eligible check-ins gathered.
    pub candidates: u64,
    /// Clients sent the task.
    pub selected: u64,
    /// Updates accepted.
    pub reported: u64,
    /// Updates rejected.
    pub rejected: u64,
    /// Selected clients that disconnected or withdrew.
    pub dropped: u64,
    /// Selected clients still training when the share closed.
    pub unfinished: u64,
    /// Sum of accepted weights.
    pub total_weight: f64,
    /// `Σ wᵢ·lossᵢ` and `Σ wᵢ` over reports with a finite loss.
    pub loss_sum: f64,
    /// See `loss_sum`.
    pub loss_weight: f64,
    /// Sum and count of reported local HR@10 values.
    pub hit_sum: f64,
    /// See `hit_sum`.
    pub hit_count: u64,
    /// Reports with an adaptive-clipping indicator, and how many said "within the clip".
    pub clip_indicators: u64,
    /// See `clip_indicators`.
    pub within_clip: u64,
}

/// A node's share of a round, as the host hands it to the leader.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardOutcome {
    /// The round.
    pub round: RoundId,
    /// The model version its updates were computed from.
    pub version: ModelVersion,
    /// The running sum of its accepted updates; `None` when the share failed.
    pub partial: Option<PartialAggregate>,
    /// Why the share failed, if it did.
    pub failure: Option<String>,
    /// Its figures.
    pub stats: ShardStats,
}

impl Orchestrator {
    /// Tells the engine it leads a cluster of `nodes` coordinator nodes (`None`: it serves alone).
    /// Takes effect from the next round.
    pub fn set_cluster_nodes(&mut self, nodes: Option<usize>) {
        self.cluster_nodes = nodes.map(|n| n.max(1));
    }

    /// The cluster size the engine was told, if it leads one.
    pub fn cluster_nodes(&self) -> Option<usize> {
        self.cluster_nodes
    }

    /// Starts this node's share of the leader's round `spec` (a follower). The engine must serve
    /// `spec.version` (adopt the leader's checkpoint first). Nothing is admitted or charged here.
    pub fn start_shard(&mut self, now: Instant, spec: &ShardSpec) -> Result<(), StartError> {
        if let Some(r) = &self.round {
            return Err(StartError::Busy(r.id));
        }
        if let Some(reason) = &self.halted {
            return Err(match reason {
                crate::message::Refusal::ShuttingDown => StartError::ShutDown,
                other => StartError::Halted(other.clone()),
            });
        }
        if spec.version != self.version {
            return Err(StartError::VersionMismatch { serving: self.version, wanted: spec.version });
        }
        let cfg = &self.config.round;
        let ctx = RoundContext {
            round: spec.round,
            model_version: self.version,
            shape: self.config.shape,
            target_participants: cfg.target_participants,
            selected: 0,
            population: spec.population,
            secure: cfg.secure.is_some(),
            quant: None,
        };
        if spec.round >= self.next_round {
            self.next_round = spec.round.next();
        }
        self.begin_round(now, ctx, TaskKind::Train, spec.target.max(1), 0, Share::Shard);
        self.events.push_back(RoundEvent::ShardStarted { round: spec.round, version: self.version });
        Ok(())
    }

    /// The running round's [`ShardSpec`] for the followers (the leader, once its round started).
    pub fn shard_spec(&self) -> Option<ShardSpec> {
        let r = self.round.as_ref()?;
        matches!(r.share, Share::Leader { .. }).then(|| ShardSpec {
            round: r.id,
            version: r.ctx.model_version,
            target: r.target,
            population: r.ctx.population,
        })
    }

    /// The other nodes' shares of the leader's round `round`, which is waiting for them
    /// ([`Phase::Combining`]). Each share is checked and merged; a share that does not fit (another
    /// round or version, a malformed partial) is left out and counted as failed. Then the round
    /// finishes as a single node's would. Returns how many shares were merged; `Err` when the
    /// engine is not waiting for `round`'s shares (nothing changes then).
    pub fn handle_shares(
        &mut self,
        now: Instant,
        round: RoundId,
        shares: Vec<ShardOutcome>,
    ) -> Result<usize, SharesError> {
        let Some(r) = &mut self.round else { return Err(SharesError::NotWaiting(round)) };
        if r.id != round || r.phase != Phase::Combining {
            return Err(SharesError::NotWaiting(round));
        }
        let mut merged = 0;
        for share in shares {
            let fits = share.round == r.id && share.version == r.ctx.model_version;
            let Some(partial) = share.partial.filter(|_| fits) else {
                r.shares_failed += 1;
                continue;
            };
            let agg = r.aggregator.as_mut().expect("combining rounds have an aggregator");
            if agg.merge_partial(partial).is_err() {
                r.shares_failed += 1;
                continue;
            }
            merged += 1;
            let s = &share.stats;
            add_stats(&mut r.stats, s);
            r.loss_sum += s.loss_sum;
            r.loss_weight += s.loss_weight;
            r.hit_sum += s.hit_sum;
            r.hit_count += s.hit_count as usize;
        }
        let (min_total, on_check_ins) = match r.share {
            Share::Leader { min_total, on_check_ins } => (min_total, on_check_ins),
            _ => (0, false),
        };
        let reason = if on_check_ins && r.stats.candidates < min_total {
            Some(super::FailReason::TooFewCheckIns { got: r.stats.candidates, needed: min_total })
        } else if !on_check_ins && r.stats.reported < min_total {
            Some(super::FailReason::TooFewReports { got: r.stats.reported, needed: min_total })
        } else {
            None
        };
        if let Some(reason) = reason {
            self.fail(now, reason);
            return Ok(merged);
        }
        self.aggregate_and_commit(now);
        Ok(merged)
    }

    /// Serves the leader's checkpoint `version` exactly (a follower keeping up with the leader,
    /// or a node taking over), with the strategy state saved with it. Only between rounds; a
    /// version older than the one served is refused (versions only grow).
    pub fn adopt_model(
        &mut self,
        version: ModelVersion,
        model: Vec<f32>,
        state: Option<&crate::strategy::StrategyState>,
    ) -> Result<(), super::InstallError> {
        if let Some(r) = &self.round {
            return Err(super::InstallError::Busy(r.id));
        }
        if version < self.version {
            return Err(super::InstallError::Older { got: version, serving: self.version });
        }
        if model.len() != self.model.len() {
            return Err(super::InstallError::Shape { got: model.len(), want: self.model.len() });
        }
        if model.iter().any(|v| !v.is_finite()) {
            return Err(super::InstallError::NonFinite);
        }
        if let Some(state) = state {
            self.strategy.restore_state(state, model.len()).map_err(super::InstallError::State)?;
        }
        if version == self.version {
            return Ok(());
        }
        if self.config.history > 0 {
            self.history.push_back((self.version, self.model.clone()));
            while self.history.len() > self.config.history {
                self.history.pop_front();
            }
        }
        self.replaced = None;
        self.model = model.into();
        self.version = version;
        Ok(())
    }

    /// A follower's share is over: its partial aggregate and figures leave as
    /// [`RoundEvent::ShardDone`]. The model is unchanged.
    pub(super) fn finish_shard(&mut self, now: Instant, failure: Option<String>) {
        let Some(mut r) = self.round.take() else { return };
        r.stats.duration = now.saturating_duration_since(r.started);
        let partial = match (failure.is_none(), r.aggregator.take()) {
            (true, Some(agg)) => agg.into_partial().map_err(|e| e.to_string()),
            (true, None) => Ok(PartialAggregate::empty(self.model.len())),
            (false, _) => Err(failure.clone().unwrap_or_default()),
        };
        let (partial, failure) = match partial {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        };
        let s = &r.stats;
        let stats = ShardStats {
            candidates: s.candidates as u64,
            selected: s.selected as u64,
            reported: if partial.is_some() { s.reported as u64 } else { 0 },
            rejected: s.rejected as u64,
            dropped: s.dropped as u64,
            unfinished: s.unfinished as u64,
            total_weight: if partial.is_some() { s.total_weight } else { 0.0 },
            loss_sum: r.loss_sum,
            loss_weight: r.loss_weight,
            hit_sum: r.hit_sum,
            hit_count: r.hit_count as u64,
            clip_indicators: s.clip_indicators as u64,
            within_clip: s.within_clip as u64,
        };
        self.last_phase = Phase::Idle;
        self.events.push_back(RoundEvent::ShardDone(Box::new(ShardOutcome {
            round: r.id,
            version: r.ctx.model_version,
            partial,
            failure,
            stats,
        })));
    }
}

fn add_stats(into: &mut RoundStats, s: &ShardStats) {
    let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    into.candidates = into.candidates.saturating_add(n(s.candidates));
    into.selected = into.selected.saturating_add(n(s.selected));
    into.reported = into.reported.saturating_add(n(s.reported));
    into.rejected = into.rejected.saturating_add(n(s.rejected));
    into.dropped = into.dropped.saturating_add(n(s.dropped));
    into.unfinished = into.unfinished.saturating_add(n(s.unfinished));
    into.total_weight += s.total_weight;
    into.clip_indicators = into.clip_indicators.saturating_add(n(s.clip_indicators));
    into.within_clip = into.within_clip.saturating_add(n(s.within_clip));
}

/// Why [`Orchestrator::handle_shares`] refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SharesError {
    /// The engine is not waiting for this round's shares (another round, or none, is running).
    #[error("not waiting for the shares of {0}")]
    NotWaiting(RoundId),
}
