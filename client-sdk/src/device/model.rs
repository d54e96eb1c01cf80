//! The model side of the device: the global model and the private user vector, training on
//! the device and what a contribution costs, recommending, and the global model's
//! non-personal ranking.

use super::explain::{self, Reason};
use super::{Device, KEY_GLOBAL_PARAMS, KEY_GLOBAL_VERSION, KEY_STATS, KEY_USER};
use crate::config::PrivacyMode;
use crate::privacy::{self, Contribution, ContributionKind};
use crate::store::StoreError;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use starling_models::data::events::{Context, Examples, Positive};
use starling_models::family::{ModelDef, Query};
use starling_models::mf::{self, LocalTraining};
use starling_proto::dp::ledger::BudgetError;
use starling_proto::dp::local::{LOCAL_DP_WEIGHT, LocalDpError, LocalRelease, local_dp_metrics, protect};
use starling_proto::ids::{ModelVersion, RoundId};
use starling_proto::message::{EvalMetrics, LocalMetrics, NoiseSettings, TrainingPlan};
use starling_proto::update::{ModelShape, Update};
use std::sync::Arc;

/// Why the device will not (or could not) train on a task.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The user has not consented to training.
    #[error("the user has not consented to federated training")]
    NoConsent,
    /// The device has no positive interaction to learn from.
    #[error("no training data on the device")]
    NoData,
    /// The task's model does not match the device's model.
    #[error("the task's model ({got:?}) does not match the device's ({expected:?})")]
    Shape {
        /// The device's model shape.
        expected: ModelShape,
        /// The task's.
        got: ModelShape,
    },
    /// The plan does not give the protection the device's privacy mode requires.
    #[error("the plan's protection is too weak for this device: {0}")]
    Protection(String),
    /// The device's own privacy budget would be exceeded.
    #[error("the device's privacy budget would be exceeded: {0}")]
    Budget(#[from] BudgetError),
    /// Clipping or noising refused the plan or the update.
    #[error("local privacy step failed: {0}")]
    Privatize(#[from] LocalDpError),
    /// Local training failed (diverged, bad parameters).
    #[error("local training failed: {0}")]
    Training(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a list of recommendations came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The user's private vector and the global model.
    Personal,
    /// The global model's non-personal ranking (too little local data, or no consent to personalize).
    Global,
    /// The app's configured fallback order (no global model on the device yet).
    Catalogue,
}

/// One recommended item.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// The item.
    pub item: u32,
    /// Its score (comparable within one list only).
    pub score: f32,
    /// Why it is recommended, for the app to show (computed on the device; see [`Reason`]).
    pub reason: Reason,
}

/// A list of recommendations, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recommendations {
    /// The items.
    pub items: Vec<Scored>,
    /// How they were ranked.
    pub source: Source,
}

/// Why [`Device::similar_items`] refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimilarItemsError {
    /// The item is not in the catalogue.
    #[error("unknown item {item} (catalogue has {items} items)")]
    UnknownItem {
        /// The item asked about.
        item: u32,
        /// Catalogue size.
        items: u32,
    },
}

/// Where a list of similar items came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimilarSource {
    /// Cosine similarity of the global model's item embeddings.
    GlobalModel,
    /// The device holds no global model yet: the list is empty.
    NoModel,
}

/// One similar item.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Similar {
    /// The item.
    pub item: u32,
    /// Cosine similarity of its embedding to the asked item's, in `[-1, 1]`.
    pub similarity: f32,
}

/// "More like this": items whose global embeddings are closest to an item's, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimilarItems {
    /// The item asked about.
    pub item: u32,
    /// The similar items (never the item itself), most similar first.
    pub items: Vec<Similar>,
    /// How they were found.
    pub source: SimilarSource,
    /// Version of the global model used, if any.
    pub model_version: Option<u64>,
}

/// Why the device will not (or could not) evaluate a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// The user has not consented to training (an evaluation report is a contribution).
    #[error("the user has not consented to federated training")]
    NoConsent,
    /// The task's model does not match the device's model.
    #[error("the task's model ({got} values) does not match the device's ({expected:?})")]
    Shape {
        /// The device's model shape.
        expected: ModelShape,
        /// Values in the task's model.
        got: usize,
    },
    /// The device's privacy mode forbids sending evaluation figures (under local DP nothing
    /// data-dependent may leave the device without noise).
    #[error("the device's privacy mode refuses evaluation: {0}")]
    Protection(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A trained, protected update, ready to encode and send.
#[derive(Clone, Debug, PartialEq)]
pub struct Trained {
    /// The round.
    pub round: RoundId,
    /// The update (clipped, and noised under local DP).
    pub update: Update,
    /// The weight to send: the positive examples' total weight, or under local DP
    /// [`LOCAL_DP_WEIGHT`] (1) whatever the data.
    pub weight: f32,
    /// Mean local loss (for the device's own report; under local DP it is not sent, see
    /// [`metrics`](Self::metrics)).
    pub loss: f32,
    /// The local-DP release to charge when the update is sent.
    pub release: Option<LocalRelease>,
    /// The clip norm applied.
    pub clip_norm: Option<f32>,
    /// Under central DP: whether the update's norm before clipping was within the clip norm
    /// (adaptive clipping's indicator, sent with the update). `None` otherwise — in particular
    /// under local DP, where nothing data-dependent leaves the device unnoised.
    pub norm_within_clip: Option<bool>,
}

impl Trained {
    /// The metrics to send with the update: the loss and the measured `train_ms`; under local DP
    /// none that depend on the data ([`local_dp_metrics`]: loss NaN, no hit rate, time 0).
    pub fn metrics(&self, train_ms: u32) -> LocalMetrics {
        if self.release.is_some() {
            local_dp_metrics()
        } else {
            LocalMetrics {
                loss: self.loss,
                hit_rate_at_10: None,
                train_ms,
                norm_within_clip: self.norm_within_clip,
            }
        }
    }
}

/// The global model held by the device.
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalModel {
    /// Its version.
    pub version: ModelVersion,
    /// Its parameters (shape of the device's [`ModelSpec`](crate::config::ModelSpec)).
    pub params: Arc<[f32]>,
}

impl Device {
    /// The global model held, if any.
    pub fn global(&self) -> Option<&GlobalModel> {
        self.global.as_ref()
    }

    /// Version of the global model held, if any.
    pub fn model_version(&self) -> Option<ModelVersion> {
        self.global.as_ref().map(|g| g.version)
    }

    /// Stores a newer global model (ignored if not newer or of the wrong shape).
    pub fn set_global(&mut self, version: ModelVersion, params: Arc<[f32]>) -> Result<bool, StoreError> {
        if params.len() != self.shape.len() || self.model_version().is_some_and(|v| v >= version) {
            return Ok(false);
        }
        if self.store_global {
            self.store.put_f32s(KEY_GLOBAL_PARAMS, &params)?;
            self.store.put(KEY_GLOBAL_VERSION, &version.0)?;
        }
        self.global = Some(GlobalModel { version, params });
        Ok(true)
    }

    /// The private user vector, if the device has trained (for on-device evaluation).
    pub fn user_vector(&self) -> Option<&[f32]> {
        self.user.as_deref()
    }

    pub(super) fn cached_examples(&mut self) -> Result<&Examples, StoreError> {
        if self.examples.is_none() {
            self.examples = Some(Examples::from_events(&self.events()?));
        }
        Ok(self.examples.get_or_insert_with(Examples::default))
    }

    /// The examples the device trains on: all of them, or without the latest positive when
    /// [`ClientConfig::evaluation_holdout`](crate::ClientConfig::evaluation_holdout) is on; and the
    /// held-out positive.
    fn training_split(&mut self) -> Result<(Examples, Option<Positive>), StoreError> {
        let holdout = self.evaluation_holdout;
        let examples = self.cached_examples()?;
        Ok(if holdout { examples.hold_out_latest() } else { (examples.clone(), None) })
    }

    /// The `k` best items for the user now (retention is applied first, at the device clock's
    /// time), each with the [`Reason`] the app can show. Never fails: with no consent to
    /// personalize, too little data, no global model yet or an unreadable store, it falls back to
    /// a non-personal ranking (the global model's, else the catalogue order).
    ///
    /// Personal lists score the user's private vector and the request's `context` (the two-tower
    /// model uses it; matrix factorisation ignores it) with the user's positive items as history
    /// (most recent last). Items the user already engaged with positively are left out, and so are
    /// items the user skipped or rated low (see `docs/sdk.md`, "Signals"): they are never pushed
    /// back at the user, in personal and non-personal lists alike.
    pub fn recommend(&mut self, k: usize, context: Option<Context>) -> Recommendations {
        let k = k.min(self.spec.items as usize);
        let retained = self.enforce_retention(self.clock.now_ms()).is_ok();
        let (history, excluded) = if self.consent.personalization && retained {
            self.cached_examples().map(explain::history_and_excluded).unwrap_or_default()
        } else {
            (Vec::new(), Vec::new())
        };
        let def = self.def;
        if let (Some(global), Some(user)) = (&self.global, &self.user)
            && history.len() >= self.min_personal_events
        {
            let mut scores = Vec::with_capacity(self.spec.items as usize);
            def.score_all(&global.params, user, &Query { history: &history, context }, &mut scores);
            if scores.len() == self.spec.items as usize && scores.iter().all(|s| s.is_finite()) {
                let top = mf::top_k(&scores, k, &excluded);
                let reasons =
                    explain::personal(&def, &global.params, user, &history, context, &top, &excluded);
                let items = top
                    .into_iter()
                    .zip(reasons)
                    .map(|((item, score), reason)| Scored { item, score, reason })
                    .collect();
                return Recommendations { items, source: Source::Personal };
            }
        }
        if let Some(global) = &self.global {
            let scores = def.global_ranking(&global.params);
            let items = mf::top_k(&scores, k, &excluded)
                .into_iter()
                .map(|(item, score)| Scored { item, score, reason: Reason::PopularNow })
                .collect();
            return Recommendations { items, source: Source::Global };
        }
        let items = (0..self.spec.items)
            .filter(|i| excluded.binary_search(i).is_err())
            .take(k)
            .map(|item| Scored { item, score: 0.0, reason: Reason::Catalogue })
            .collect();
        Recommendations { items, source: Source::Catalogue }
    }

    /// "More like this": the `k` items whose global item embeddings are most similar (cosine) to
    /// `item`'s. It uses the global model alone — no consent, event or private state is needed or
    /// read — so it works for any user, signed in or not. Before the device has received a global
    /// model the list is empty with [`SimilarSource::NoModel`]. Items whose embedding is zero or
    /// not finite are left out.
    pub fn similar_items(&self, item: u32, k: usize) -> Result<SimilarItems, SimilarItemsError> {
        if item >= self.spec.items {
            return Err(SimilarItemsError::UnknownItem { item, items: self.spec.items });
        }
        let Some(global) = &self.global else {
            return Ok(SimilarItems {
                item,
                items: Vec::new(),
                source: SimilarSource::NoModel,
                model_version: None,
            });
        };
        let k = k.min(self.spec.items as usize - 1);
        let items = self
            .def
            .similar_items(&global.params, item, k)
            .into_iter()
            .filter(|(_, s)| s.is_finite())
            .map(|(item, similarity)| Similar { item, similarity })
            .collect();
        Ok(SimilarItems {
            item,
            items,
            source: SimilarSource::GlobalModel,
            model_version: Some(global.version.0),
        })
    }

    /// Federated evaluation of the global `params` (version `version`, for round `round`) on the
    /// device's held-out case: its latest positive interaction, which it did not train on (see
    /// [`ClientConfig::evaluation_holdout`](crate::ClientConfig::evaluation_holdout)), ranked
    /// against sampled negatives by `ModelDef::evaluate_case` with the device's private vector and
    /// its training positives as history. With no held-out case (fewer than two positives, or the
    /// hold-out switched off) the figures have `cases: 0`.
    ///
    /// It requires training consent (the figures are a contribution) and is refused under local
    /// DP (they are not noised). **It changes nothing on the device**: not the private vector,
    /// not the stored global model or its version, not the events (retention is not applied
    /// here), not the device's RNG. A device that has no private vector yet scores with a
    /// temporary one fitted to `params` (seeded by client and round) and throws it away.
    pub fn evaluate(
        &mut self,
        round: RoundId,
        version: ModelVersion,
        params: &[f32],
    ) -> Result<EvalMetrics, EvalError> {
        let _ = version;
        if !self.consent.training {
            return Err(EvalError::NoConsent);
        }
        if let PrivacyMode::Local { .. } = self.mode {
            return Err(EvalError::Protection(
                "under local DP evaluation figures would leave the device without noise".into(),
            ));
        }
        if params.len() != self.shape.len() {
            return Err(EvalError::Shape { expected: self.shape, got: params.len() });
        }
        if !self.evaluation_holdout {
            return Ok(EvalMetrics::default());
        }
        let (train, held) = self.training_split()?;
        let Some(held) = held else {
            return Ok(EvalMetrics::default());
        };
        let history = train.positive_items();
        let def = self.def;
        let private = match &self.user {
            Some(u) => u.clone(),
            None => {
                let seed = self.client.0 ^ round.0.rotate_left(32) ^ 0x0E7A_1000;
                let mut private = def.init_private(seed, 0.1);
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let fit = LocalTraining { epochs: self.personal_epochs.max(1), ..LocalTraining::default() };
                // A failed fit leaves the initial vector (fit_private restores it).
                let _ = def.fit_private(params, &mut private, &train, &fit, &mut rng);
                private
            }
        };
        Ok(def.evaluate_case(params, &private, &history, &held, self.client.0))
    }

    /// Whether the device would accept a task with `plan` (consent, protection, budget, data).
    pub fn check_task(&self, plan: &TrainingPlan) -> Result<(), TrainError> {
        if !self.consent.training {
            return Err(TrainError::NoConsent);
        }
        let sigma = match (&self.mode, &plan.noise) {
            (_, NoiseSettings::Local { multiplier }) => Some(f64::from(*multiplier)),
            (PrivacyMode::Local { .. }, _) => {
                return Err(TrainError::Protection("local DP required, the plan adds no local noise".into()));
            }
            (PrivacyMode::Central, _) => None,
        };
        if plan.clip_norm.is_none() {
            return Err(TrainError::Protection("the plan does not clip updates".into()));
        }
        if let (PrivacyMode::Local { min_noise_multiplier }, Some(s)) = (self.mode, sigma)
            && s < min_noise_multiplier
        {
            return Err(TrainError::Protection(format!(
                "local noise multiplier {s} is below the device's minimum {min_noise_multiplier}"
            )));
        }
        if let Some(s) = sigma {
            self.ledger.check(s)?;
        }
        Ok(())
    }

    /// Trains on the device's data from the global `params` (version `version`) as `plan` says,
    /// then clips (and under local DP noises) the update. Retention is applied first, at the
    /// device clock's time. The private vector is updated and stored; the global model is kept
    /// for recommendations. The release is not charged yet: call
    /// [`record_contribution`](Self::record_contribution) before sending it.
    pub fn train(
        &mut self,
        round: RoundId,
        version: ModelVersion,
        params: Arc<[f32]>,
        plan: &TrainingPlan,
    ) -> Result<Trained, TrainError> {
        self.check_task(plan)?;
        if params.len() != self.shape.len() {
            let rows = (params.len() / self.shape.row_len.max(1) as usize) as u32;
            return Err(TrainError::Shape {
                expected: self.shape,
                got: ModelShape::new(rows, self.shape.row_len).unwrap_or(self.shape),
            });
        }
        self.enforce_retention(self.clock.now_ms())?;
        if let Some(hook) = self.train_hook.0.as_mut() {
            hook(round);
        }
        let (train, _held_out) = self.training_split()?;
        let total_weight = train.total_weight();
        if train.positives.is_empty() {
            return Err(TrainError::NoData);
        }
        let mut user = match self.user.clone() {
            Some(u) => u,
            None => self.ensure_user_vector()?.to_vec(),
        };
        let cfg = LocalTraining {
            epochs: plan.epochs.clamp(1, 100),
            batch_size: plan.batch_size.max(1) as usize,
            negatives: plan.negatives.clamp(1, 100),
            item_lr: plan.learning_rate,
            user_lr: plan.private_learning_rate,
            reg: LocalTraining::default().reg,
        };
        let def = self.def;
        let result = def
            .train(&params, &mut user, &train, &cfg, &mut self.rng)
            .map_err(|e| TrainError::Training(e.to_string()))?;
        if !user.iter().all(|v| v.is_finite()) || !result.loss.is_finite() {
            return Err(TrainError::Training("local training diverged".into()));
        }
        let norm_within_clip = starling_proto::dp::clip_indicator(&result.update, plan);
        let (update, release) = protect(result.update, plan, round.0, self.noise, &mut self.rng)?;
        if self.personal_epochs > 0 {
            // Fit the private vector to the global part (which stays as received); on failure
            // `fit_private` leaves the vector as it was.
            let fit = LocalTraining { epochs: self.personal_epochs, ..cfg };
            let _ = def.fit_private(&params, &mut user, &train, &fit, &mut self.rng);
        }
        self.store.put_f32s(KEY_USER, &user)?;
        self.user = Some(user);
        self.set_global(version, params)?;
        // Under local DP the example count is not sent: it is data, and not noised.
        let weight = if release.is_some() { LOCAL_DP_WEIGHT } else { total_weight.max(1.0) };
        Ok(Trained {
            round,
            update,
            weight,
            loss: result.loss,
            release,
            clip_norm: plan.clip_norm,
            norm_within_clip,
        })
    }

    /// Sets the private user vector if the device has none yet (a host migrating a user's vector
    /// from an older install, or a simulation that fixes initial vectors by seed). Returns
    /// whether it was set.
    pub fn seed_user_vector(&mut self, user: Vec<f32>) -> Result<bool, StoreError> {
        if self.user.is_some() || user.len() != self.def.private_len() || !user.iter().all(|v| v.is_finite())
        {
            return Ok(false);
        }
        self.store.put_f32s(KEY_USER, &user)?;
        self.user = Some(user);
        Ok(true)
    }

    /// The private user vector, drawn (N(0, 0.1²), as the reference model initialises it) and
    /// stored first if the device has none yet.
    pub fn ensure_user_vector(&mut self) -> Result<&[f32], StoreError> {
        if self.user.is_none() {
            let user: Vec<f32> = (0..self.def.private_len())
                .map(|_| {
                    let z: f32 = rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut self.rng);
                    0.1 * z
                })
                .collect();
            self.store.put_f32s(KEY_USER, &user)?;
            self.user = Some(user);
        }
        Ok(self.user.as_deref().unwrap_or_default())
    }

    /// Charges a contribution durably (ledger row first, then counters) — call it before the
    /// update leaves the device. Returns the device's ε after it.
    pub fn record_contribution(
        &mut self,
        round: RoundId,
        bytes: u64,
        trained: &Trained,
        now_ms: i64,
    ) -> Result<f64, StoreError> {
        self.record_sent(round, bytes, trained.clip_norm, trained.release, now_ms)
    }

    /// [`Self::record_contribution`] from the parts it records (under secure aggregation the
    /// masked input leaves after training, once the neighbours' shares arrived).
    pub fn record_sent(
        &mut self,
        round: RoundId,
        bytes: u64,
        clip_norm: Option<f32>,
        release: Option<LocalRelease>,
        now_ms: i64,
    ) -> Result<f64, StoreError> {
        let c = Contribution {
            round: round.0,
            at_ms: now_ms,
            bytes_sent: bytes,
            clip_norm: clip_norm.map(f64::from),
            release,
            kind: ContributionKind::Update,
        };
        privacy::record(&self.store, &mut self.ledger, c)
    }

    /// Records an evaluation report (its frame of `bytes` bytes) on the device's contribution
    /// record durably — call it before the report leaves the device. It costs no ε (evaluation
    /// runs only under central DP; see [`Device::evaluate`]). Returns the device's ε.
    pub fn record_evaluation(&mut self, round: RoundId, bytes: u64, now_ms: i64) -> Result<f64, StoreError> {
        let c = Contribution {
            round: round.0,
            at_ms: now_ms,
            bytes_sent: bytes,
            clip_norm: None,
            release: None,
            kind: ContributionKind::Evaluation,
        };
        privacy::record(&self.store, &mut self.ledger, c)
    }

    /// Adds to the traffic counters (and, if `accepted`, the accepted rounds) and stores them.
    pub fn count_session(&mut self, sent: u64, received: u64, accepted: bool) -> Result<(), StoreError> {
        self.stats.sessions += 1;
        self.stats.bytes_sent += sent;
        self.stats.bytes_received += received;
        self.stats.rounds_accepted += u64::from(accepted);
        self.store.put(KEY_STATS, &self.stats)
    }

    /// The device's ε under local DP.
    pub fn local_epsilon(&self) -> f64 {
        self.ledger.epsilon()
    }
}

/// The global model's non-personal ranking (`ModelDef::global_ranking`): item biases when the
/// model has them; otherwise each item embedding's squared norm. Under BPR with uniformly sampled
/// negatives, an item many users like is pulled towards many user vectors and its embedding grows,
/// while an item few like is only ever a random negative and shrinks under regularisation; so the
/// norm ranks popular items first without the coordinator ever seeing an interaction count or a
/// user vector. (On the synthetic population after 60 rounds, 23 of its top 30 are among the 30
/// most popular items.)
pub fn global_ranking(def: &ModelDef, params: &[f32]) -> Vec<f32> {
    def.global_ranking(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_global_ranking_puts_long_embeddings_first_and_uses_biases_when_present() {
        let def = ModelDef::mf(3, 2);
        let params = [0.1, 0.0, 1.0, -1.0, 0.0, 0.5];
        let scores = global_ranking(&def, &params);
        assert_eq!(mf::top_k(&scores, 3, &[]).iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 0]);
        let biased = ModelDef::from_name("bpr-mf", 3, 2, true).unwrap();
        let layout = biased.mf_layout().unwrap();
        let mut p = vec![0.0; biased.shape().unwrap().len()];
        p[layout.bias_index(2)] = 3.0;
        p[layout.bias_index(0)] = 1.0;
        assert_eq!(
            mf::top_k(&global_ranking(&biased, &p), 3, &[]).iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![2, 0, 1]
        );
    }
}
