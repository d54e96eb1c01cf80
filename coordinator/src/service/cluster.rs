//! `starling serve` as one node of a cluster (`[cluster] enabled`, `[storage] postgres`).
//!
//! Every node starts as a **follower**: its engine serves the newest checkpoint, runs shares of
//! the leader's rounds for its own clients and starts nothing by itself. The node task
//! ([`crate::cluster::node`]) takes the lease when it is free; the node then builds its
//! **leader** role here ([`Roles::leader`]) — the store fenced with the lease's epoch, recovered
//! (the previous leader's unfinished round is recorded `abandoned`), the ledger replayed, the
//! newest checkpoint and its optimizer state served, the schedule's counters and the operator's
//! pause read back — and swaps it into the driver. The persistence hook is the single-node one,
//! wrapped ([`ClusterHook`]) so that the node task also sees the events it acts on.

use super::admin::Telemetry;
use super::config::{ConfigError, ServiceConfig};
use super::driver::{EventHook, Role, RoundSchedule};
use super::server::{Persist, ServeError};
use super::tokens::unix_now_s;
use super::unix_ms;
use crate::cluster::node::RoleFactory;
use crate::store::{Fence, Store};
use starling_proto::dp::PrivacyLedger;
use starling_proto::ids::{ModelVersion, RoundId};
use starling_proto::round::{Orchestrator, RoundEvent};
use starling_proto::strategy::StrategyState;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// An engine built from the store, with what the service reports about it.
pub(super) struct Built {
    pub engine: Orchestrator,
    pub ledger: PrivacyLedger,
    pub schedule: RoundSchedule,
    pub version: ModelVersion,
    pub abandoned: Vec<RoundId>,
    /// The checkpoint whose strategy state was restored, if one was.
    pub restored_from: Option<u64>,
    /// Why a saved strategy state was not restored (the strategy starts afresh).
    pub restore_error: Option<String>,
    pub population: u64,
}

/// Builds the engine from the store (blocking; the single node's start-up and a node taking
/// the lease). `recover`: the store's unfinished rounds are recorded `abandoned` and an empty
/// store is seeded with the initial model; otherwise (a follower) the newest checkpoint is only
/// read, or the initial model served as version 0 without writing it.
///
/// - The ledger is replayed into the DP strategy (what was spent stays spent); a ledger holding
///   DP rounds is refused with `privacy.mode = "off"` unless `allow_release_without_dp`.
/// - The strategy's carried state (optimizer moments, an adaptive clip norm) comes from the
///   newest checkpoint; a state of another strategy or a damaged one starts it afresh.
/// - The engine's RNG (selection, Poisson sampling) is reseeded with 256 bits from the
///   operating system, never from the config's `model.seed`, and told N, the enrolled
///   population from the token registry.
pub(super) fn build_engine(
    config: &ServiceConfig,
    store: &mut Store,
    recover: bool,
) -> Result<Built, ServeError> {
    let shape = config.shape()?;
    let (latest, next_round, abandoned) = if recover {
        let r = store.recover(unix_ms())?;
        (r.latest, r.next_round, r.abandoned)
    } else {
        (store.latest_checkpoint()?, RoundId(1), Vec::new())
    };
    let saved_state = latest.as_ref().and_then(|c| c.strategy_state.clone());
    let (model, version) = match latest {
        Some(c) if c.shape != shape => {
            return Err(ServeError::ShapeMismatch {
                version: c.version.0,
                stored: c.shape,
                configured: shape,
            });
        }
        Some(c) => (c.model, c.version),
        None => {
            let m = config.initial_model()?;
            if recover {
                store.init_model(ModelVersion(0), shape, &m, unix_ms())?;
            }
            (m, ModelVersion(0))
        }
    };
    let budget = config.budget()?;
    let ledger = PrivacyLedger::replay(budget, store.ledger_entries()?);
    if config.privacy.mode == "off"
        && !ledger.entries().is_empty()
        && !config.privacy.allow_release_without_dp
    {
        return Err(ConfigError::Invalid {
            key: "privacy.mode",
            detail: format!(
                "this store's ledger holds {} differentially private rounds (epsilon {:.4} at delta {:e}); \
                 with mode = \"off\" every model released from now on carries no guarantee at all. \
                 Keep central DP, or set privacy.allow_release_without_dp = true if that is what you want",
                ledger.entries().len(),
                ledger.spent(),
                budget.delta.get()
            ),
        }
        .into());
    }
    let strategy = config.build_strategy(ledger.clone())?;
    let mut engine = Orchestrator::new(config.orchestrator_config()?, strategy, model, version, next_round)?;
    engine.set_evaluation_target(config.evaluation_target())?;
    let (mut restored_from, mut restore_error) = (None, None);
    if let Some(bytes) = &saved_state {
        let limit = shape.len().saturating_mul(16).saturating_add(1 << 20);
        let restored = starling_proto::codec::decode_strategy_state(bytes, limit)
            .map_err(|e| e.to_string())
            .and_then(|state| engine.restore_strategy_state(&state).map_err(|e| e.to_string()));
        match restored {
            Ok(()) => restored_from = Some(version.0),
            Err(e) => restore_error = Some(e),
        }
    }
    let (already_started, committed_since_evaluation) = store.schedule_counters()?;
    let paused = store.service_state("paused")?.as_deref() == Some("true");
    engine.reseed(super::server::os_seed()?);
    let population = store.enrolled_population(unix_now_s())?;
    engine.set_population(population);
    let schedule = RoundSchedule {
        gap: Duration::from_millis(config.round.interval_ms),
        max_rounds: (config.round.max_rounds > 0).then_some(config.round.max_rounds),
        evaluate_every: config.evaluation_every(),
        already_started,
        committed_since_evaluation,
        paused,
    };
    Ok(Built { engine, ledger, schedule, version, abandoned, restored_from, restore_error, population })
}

/// The single-node persistence hook, also handing the cluster's events to the node task.
pub(super) struct ClusterHook {
    pub inner: Persist,
    pub events: mpsc::UnboundedSender<RoundEvent>,
}

impl EventHook for ClusterHook {
    fn on_event(&mut self, event: &RoundEvent) -> Result<(), String> {
        self.inner.on_event(event)?;
        if matches!(
            event,
            RoundEvent::Started { .. }
                | RoundEvent::AwaitingShares { .. }
                | RoundEvent::Committed(_)
                | RoundEvent::Failed { .. }
                | RoundEvent::ShardDone(_)
        ) {
            let _ = self.events.send(event.clone());
        }
        Ok(())
    }

    fn blocking(&self, event: &RoundEvent) -> bool {
        self.inner.blocking(event)
    }

    fn install_checkpoint(
        &mut self,
        version: ModelVersion,
        source: ModelVersion,
    ) -> Result<(Vec<f32>, Option<StrategyState>), String> {
        self.inner.install_checkpoint(version, source)
    }
}

/// Builds this node's roles from its configuration and store.
pub(super) struct Roles {
    pub config: ServiceConfig,
    pub telemetry: Arc<Telemetry>,
    /// A connection for reading checkpoints (followers keeping up).
    pub reader: Mutex<Store>,
}

impl Roles {
    /// The node's name and population.
    pub fn fence(&self, epoch: i64) -> Fence {
        Fence {
            population: self.config.cluster.population.clone(),
            holder: self.config.cluster.node.clone(),
            epoch,
        }
    }
}

impl RoleFactory for Roles {
    fn leader(
        &self,
        epoch: i64,
        nodes: usize,
        events: mpsc::UnboundedSender<RoundEvent>,
    ) -> Result<Role, String> {
        let mut store = Store::open_config(&self.config.storage).map_err(|e| e.to_string())?;
        store.set_fence(Some(self.fence(epoch))).map_err(|e| e.to_string())?;
        let mut built = build_engine(&self.config, &mut store, true).map_err(|e| e.to_string())?;
        if let Some(e) = &built.restore_error {
            tracing::warn!(error = %e, "strategy state not restored; the strategy starts afresh");
        }
        built.engine.set_cluster_nodes(Some(nodes.max(1)));
        let t = &self.telemetry;
        if !built.abandoned.is_empty() {
            tracing::warn!(rounds = ?built.abandoned, "the previous leader's unfinished rounds were recorded as abandoned");
            for r in &built.abandoned {
                t.failure("round", format!("{r} abandoned: the leader changed mid-round"));
            }
        }
        let spent = built.ledger.status().epsilon_spent;
        t.epsilon_spent.set(spent);
        t.model_version.set(built.version.0 as i64);
        t.update_status(|s| {
            s.model_version = built.version.0;
            s.epsilon_spent = spent;
            s.population = Some(built.population);
            s.strategy_state_restored_from = built.restored_from;
            s.rounds_abandoned_at_start.extend(built.abandoned.iter().map(|r| r.0));
        });
        let shape = self.config.shape().map_err(|e| e.to_string())?;
        let inner = Persist {
            store,
            ledger: built.ledger,
            shape,
            keep: self.config.storage.keep_checkpoints,
            telemetry: self.telemetry.clone(),
        };
        Ok(Role {
            engine: built.engine,
            hook: Box::new(ClusterHook { inner, events }),
            schedule: Some(built.schedule),
        })
    }

    fn latest_version(&self) -> Result<Option<ModelVersion>, String> {
        let store = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        Ok(store.checkpoint_versions().map_err(|e| e.to_string())?.into_iter().max())
    }

    fn checkpoint(
        &self,
        version: ModelVersion,
    ) -> Result<Option<crate::cluster::node::Checkpointed>, String> {
        let store = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = store.checkpoint(version).map_err(|e| e.to_string())? else { return Ok(None) };
        let limit = c.shape.len().saturating_mul(16).saturating_add(1 << 20);
        let state = c
            .strategy_state
            .as_deref()
            .and_then(|b| starling_proto::codec::decode_strategy_state(b, limit).ok());
        Ok(Some((c.model, state)))
    }
}
