//! The device's state and everything the SDK does locally: recording behaviour, recommending,
//! training on the device, and the user's controls (consent, forget, export, privacy report).
//!
//! A [`Device`] owns the SQLite [`Store`] and the in-memory copies of what is in it: the global
//! model the device last received, the user's private vector and the device's privacy ledger.
//! Nothing here touches the network: [`crate::participant`] drives the session machine around it,
//! and [`crate::client`] adds a transport and a clock.
//!
//! ## What is stored (keys of the store's `kv` table)
//! | key | value |
//! |---|---|
//! | `consent` | the user's [`Consent`] (JSON) |
//! | `global_version` | version of the stored global model (JSON number) |
//! | `global_params` | the global model's parameters (raw little-endian `f32`) |
//! | `user_vector` | the private user vector (raw `f32`); never leaves the device |
//! | `stats` | counters for the privacy report ([`Stats`], JSON) |

use crate::config::{ClientConfig, Clock, Consent, ModelSpec, PrivacyMode, Retention, Storage, StorageKey};
use crate::privacy::{self, Contribution};
use crate::store::{LedgerEntry, Store, StoreError, create_private_dir};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use starling_models::data::events::{Context, Event, EventError, Examples};
use starling_models::mf::{self, LocalTraining, MfLayout};
use starling_proto::dp::ledger::BudgetError;
use starling_proto::dp::local::{DeviceLedger, LocalDpError, LocalRelease, protect};
use starling_proto::dp::{Budget, Delta, Epsilon};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::{NoiseSettings, TrainingPlan};
use starling_proto::update::{ModelShape, Update};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const KEY_CONSENT: &str = "consent";
const KEY_GLOBAL_VERSION: &str = "global_version";
const KEY_GLOBAL_PARAMS: &str = "global_params";
const KEY_USER: &str = "user_vector";
const KEY_STATS: &str = "stats";

/// Why the device could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The model settings are unusable.
    #[error("invalid model settings: {0}")]
    Model(String),
    /// A privacy setting is out of range.
    #[error("invalid privacy settings: {0}")]
    Privacy(String),
    /// The storage directory could not be created.
    #[error("cannot create storage directory {path}: {detail}")]
    Dir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        detail: String,
    },
    /// The database could not be opened: foreign, corrupt, too new, I/O; or, for encryption at
    /// rest, a wrong storage key ([`StoreError::WrongKey`]), an encrypted store opened without a
    /// key ([`StoreError::KeyRequired`]) or an unencrypted one with a key
    /// ([`StoreError::NotEncrypted`]). In each of these cases the files were left untouched.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why an event was not recorded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The user has consented neither to personalization nor to training: nothing is stored.
    #[error("the user has not consented to personalization or training; the event was not stored")]
    NoConsent,
    /// The event is malformed (unknown item, bad rating, context out of range).
    #[error("invalid event: {0}")]
    Invalid(#[from] EventError),
    /// The event's time is further in the future than the allowed clock skew.
    #[error("event time {at_ms} ms is in the future (now {now_ms} ms)")]
    InFuture {
        /// The event's time.
        at_ms: i64,
        /// The device's time.
        now_ms: i64,
    },
    /// The event is older than the retention period and would be deleted at once.
    #[error("event time {at_ms} ms is older than the retention period (cut-off {cutoff_ms} ms)")]
    TooOld {
        /// The event's time.
        at_ms: i64,
        /// The oldest time kept.
        cutoff_ms: i64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

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
}

/// A list of recommendations, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recommendations {
    /// The items.
    pub items: Vec<Scored>,
    /// How they were ranked.
    pub source: Source,
}

/// Counters kept for the privacy report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Check-ins (sessions started).
    pub sessions: u64,
    /// Rounds whose update the coordinator accepted.
    pub rounds_accepted: u64,
    /// Bytes sent to the coordinator (all messages, frame headers included).
    pub bytes_sent: u64,
    /// Bytes received from the coordinator.
    pub bytes_received: u64,
}

/// What has been shared, as shown to the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyReport {
    /// The consent in force.
    pub consent: Consent,
    /// Events stored on the device.
    pub events_stored: u64,
    /// Time of the oldest stored event.
    pub oldest_event_ms: Option<i64>,
    /// Updates sent (one per round joined).
    pub updates_sent: u64,
    /// Rounds whose update was accepted.
    pub rounds_accepted: u64,
    /// Bytes sent to the coordinator.
    pub bytes_sent: u64,
    /// Bytes received from the coordinator.
    pub bytes_received: u64,
    /// The rounds this device sent an update to.
    pub rounds: Vec<u64>,
    /// Privacy mode.
    pub mode: PrivacyMode,
    /// ε this device has spent under local DP (0 when all noise was central), at `delta`.
    pub local_epsilon: f64,
    /// δ of `local_epsilon`.
    pub delta: f64,
    /// The device's ε cap, if any.
    pub max_epsilon: Option<f64>,
    /// Version of the global model on the device.
    pub model_version: Option<u64>,
}

/// Schema identifier of [`Export`].
pub const EXPORT_SCHEMA: &str = "starling.sdk.export/1";

/// Everything the device stores about its user ("show me my data"). The JSON schema is
/// documented in `docs/sdk.md`; `schema` identifies its version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Export {
    /// [`EXPORT_SCHEMA`].
    pub schema: String,
    /// When the export was made, ms since the Unix epoch.
    pub exported_at_ms: i64,
    /// The client's id at the coordinator.
    pub client_id: u64,
    /// The consent in force.
    pub consent: Consent,
    /// Retention settings.
    pub retention: Retention,
    /// Every stored event, oldest first.
    pub events: Vec<ExportedEvent>,
    /// The private user vector (never sent anywhere), if one exists.
    pub user_vector: Option<Vec<f32>>,
    /// Version of the (non-personal) global model held, if any.
    pub global_model_version: Option<u64>,
    /// Every contribution this device made (the local privacy ledger).
    pub contributions: Vec<LedgerEntry>,
    /// The privacy report.
    pub privacy: PrivacyReport,
}

/// One event in an [`Export`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportedEvent {
    /// Row id.
    pub id: i64,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

/// A trained, protected update, ready to encode and send.
#[derive(Clone, Debug, PartialEq)]
pub struct Trained {
    /// The round.
    pub round: RoundId,
    /// The update (clipped, and noised under local DP).
    pub update: Update,
    /// FedAvg weight (positive examples).
    pub weight: f32,
    /// Mean local loss.
    pub loss: f32,
    /// The local-DP release to charge when the update is sent.
    pub release: Option<LocalRelease>,
    /// The clip norm applied.
    pub clip_norm: Option<f32>,
}

/// The global model held by the device.
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalModel {
    /// Its version.
    pub version: ModelVersion,
    /// Its parameters (shape of the device's [`ModelSpec`]).
    pub params: Arc<[f32]>,
}

/// The device's session epoch, shared with whoever sends on its behalf: it moves whenever a
/// running session must stop at once — the user withdrew training consent, or asked the device to
/// forget them. A sender checks that the epoch a frame was produced under is still current
/// before handing it to the transport ([`crate::participant::Participant::is_current`]).
#[derive(Clone, Debug, Default)]
pub struct SessionEpoch(Arc<AtomicU64>);

impl SessionEpoch {
    /// The current epoch.
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Moves to a new epoch: every session started before is cancelled.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Called when a local training step starts (instrumentation; tests use it to simulate a slow
/// device). It runs while the device is in use, so it must not call back into the device.
pub type TrainHook = Box<dyn FnMut(RoundId) + Send>;

struct Hook(Option<TrainHook>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(TrainHook)" } else { "None" })
    }
}

/// The device. See the module docs.
#[derive(Debug)]
pub struct Device {
    client: ClientId,
    spec: ModelSpec,
    layout: MfLayout,
    shape: ModelShape,
    mode: PrivacyMode,
    delta: Delta,
    max_epsilon: Option<f64>,
    retention: Retention,
    default_consent: Consent,
    min_personal_events: usize,
    personal_epochs: u32,
    max_future_skew_ms: i64,
    store: Store,
    consent: Consent,
    global: Option<GlobalModel>,
    user: Option<Vec<f32>>,
    ledger: DeviceLedger,
    stats: Stats,
    event_count: u64,
    /// Training examples derived from the stored events, while they are unchanged.
    examples: Option<Examples>,
    store_global: bool,
    rng: ChaCha8Rng,
    clock: Clock,
    epoch: SessionEpoch,
    forgets: u64,
    train_hook: Hook,
}

fn budget(delta: Delta, max_epsilon: Option<f64>) -> Result<Option<Budget>, OpenError> {
    max_epsilon
        .map(|e| {
            Epsilon::new(e)
                .map(|epsilon| Budget { epsilon, delta })
                .map_err(|err| OpenError::Privacy(format!("max_epsilon: {err}")))
        })
        .transpose()
}

impl Device {
    /// Opens the device's store (creating it if needed), loads its state and applies the
    /// retention limits at the configured clock's time.
    pub fn open(config: &ClientConfig) -> Result<Self, OpenError> {
        let spec = config.model.clone();
        if spec.items == 0 || spec.dim == 0 {
            return Err(OpenError::Model(format!("{} items of dimension {}", spec.items, spec.dim)));
        }
        let layout = if spec.item_bias {
            MfLayout::with_bias(spec.items, spec.dim)
        } else {
            MfLayout::new(spec.items, spec.dim)
        };
        let shape = layout.shape().map_err(|e| OpenError::Model(e.to_string()))?;
        let delta =
            Delta::new(config.privacy.delta).map_err(|e| OpenError::Privacy(format!("delta: {e}")))?;
        if let PrivacyMode::Local { min_noise_multiplier } = config.privacy.mode
            && !(min_noise_multiplier.is_finite() && min_noise_multiplier > 0.0)
        {
            return Err(OpenError::Privacy(format!(
                "min_noise_multiplier {min_noise_multiplier} must be > 0"
            )));
        }
        let store = match &config.storage {
            Storage::InMemory => Store::open_in_memory()?,
            Storage::Dir(dir) => {
                create_private_dir(dir)
                    .map_err(|e| OpenError::Dir { path: dir.clone(), detail: e.to_string() })?;
                Store::open_with_key(dir.join("starling.db"), config.storage_key.as_ref())?
            }
        };
        let ledger = privacy::load(&store, delta, budget(delta, config.privacy.max_epsilon)?)?;
        let seed = config.seed.unwrap_or_else(rand::random);
        let mut device = Self {
            client: config.client_id,
            spec,
            layout,
            shape,
            mode: config.privacy.mode,
            delta,
            max_epsilon: config.privacy.max_epsilon,
            retention: config.retention,
            default_consent: config.default_consent,
            min_personal_events: config.min_personal_events,
            personal_epochs: config.personal_epochs.min(1000),
            max_future_skew_ms: config.max_future_skew.as_millis().min(i64::MAX as u128) as i64,
            consent: config.default_consent,
            global: None,
            user: None,
            ledger,
            stats: Stats::default(),
            event_count: 0,
            examples: None,
            store_global: config.store_global_model,
            rng: ChaCha8Rng::seed_from_u64(seed),
            store,
            clock: config.clock.clone(),
            epoch: SessionEpoch::default(),
            forgets: 0,
            train_hook: Hook(None),
        };
        device.load_state()?;
        device.enforce_retention(device.clock.now_ms())?;
        Ok(device)
    }

    fn load_state(&mut self) -> Result<(), StoreError> {
        self.consent = self.store.get(KEY_CONSENT)?.unwrap_or(self.default_consent);
        self.stats = self.store.get(KEY_STATS)?.unwrap_or_default();
        self.global =
            match (self.store.get::<u64>(KEY_GLOBAL_VERSION)?, self.store.get_f32s(KEY_GLOBAL_PARAMS)?) {
                // A model of another shape (the app changed its catalogue) is dropped, not used.
                (Some(v), Some(p)) if p.len() == self.shape.len() => {
                    Some(GlobalModel { version: ModelVersion(v), params: p.into() })
                }
                _ => None,
            };
        self.user = self.store.get_f32s(KEY_USER)?.filter(|u| u.len() == self.spec.dim as usize);
        self.event_count = self.store.event_count()?;
        Ok(())
    }

    /// The client's id.
    pub fn client(&self) -> ClientId {
        self.client
    }

    /// The model settings.
    pub fn model(&self) -> &ModelSpec {
        &self.spec
    }

    /// The shape of the global parameters.
    pub fn shape(&self) -> ModelShape {
        self.shape
    }

    /// The consent in force.
    pub fn consent(&self) -> Consent {
        self.consent
    }

    /// The device's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The session epoch (see [`SessionEpoch`]).
    pub fn session_epoch(&self) -> &SessionEpoch {
        &self.epoch
    }

    /// How many times the device has been told to forget (since it was opened): a session
    /// started before a forget stores nothing about itself afterwards.
    pub fn forget_count(&self) -> u64 {
        self.forgets
    }

    /// Sets (or clears) the hook called when a local training step starts.
    pub fn set_train_hook(&mut self, hook: Option<TrainHook>) {
        self.train_hook = Hook(hook);
    }

    /// Records the user's choice. Withdrawing both consents deletes the stored events (nothing
    /// may be kept for a purpose the user refused); withdrawing personalization alone keeps them
    /// for training, and vice versa. Without training consent, a running session is cancelled
    /// (the [`SessionEpoch`] moves).
    pub fn set_consent(&mut self, consent: Consent) -> Result<(), StoreError> {
        if !consent.training {
            self.epoch.bump();
        }
        self.store.put(KEY_CONSENT, &consent)?;
        self.consent = consent;
        if !consent.personalization && !consent.training {
            self.store.purge_before(i64::MAX)?;
            self.event_count = 0;
            self.examples = None;
        }
        Ok(())
    }

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

    /// Events stored.
    pub fn event_count(&self) -> u64 {
        self.event_count
    }

    /// Validates and stores one event. `now_ms` is the device's clock.
    pub fn record(&mut self, event: &Event, now_ms: i64) -> Result<i64, RecordError> {
        self.check_event(event, now_ms)?;
        let id = self.store.insert_event(event.at_ms, event.kind.name(), event.item, event)?;
        self.event_count += 1;
        self.examples = None;
        self.enforce_retention(now_ms)?;
        Ok(id)
    }

    /// Validates and stores several events in one transaction; all or none are stored.
    pub fn record_batch(&mut self, events: &[Event], now_ms: i64) -> Result<Vec<i64>, RecordError> {
        for e in events {
            self.check_event(e, now_ms)?;
        }
        let ids = self.store.insert_events(events.iter().map(|e| (e.at_ms, e.kind.name(), e.item, e)))?;
        self.event_count += ids.len() as u64;
        self.examples = None;
        self.enforce_retention(now_ms)?;
        Ok(ids)
    }

    fn check_event(&self, event: &Event, now_ms: i64) -> Result<(), RecordError> {
        if !self.consent.personalization && !self.consent.training {
            return Err(RecordError::NoConsent);
        }
        event.validate(self.spec.items)?;
        if event.at_ms > now_ms.saturating_add(self.max_future_skew_ms) {
            return Err(RecordError::InFuture { at_ms: event.at_ms, now_ms });
        }
        if let Some(cutoff_ms) = self.cutoff_ms(now_ms)
            && event.at_ms < cutoff_ms
        {
            return Err(RecordError::TooOld { at_ms: event.at_ms, cutoff_ms });
        }
        Ok(())
    }

    fn cutoff_ms(&self, now_ms: i64) -> Option<i64> {
        self.retention.max_age.map(|a| now_ms.saturating_sub(a.as_millis().min(i64::MAX as u128) as i64))
    }

    /// Applies the retention limits at `now_ms`; returns how many events were deleted. Also
    /// applied when the device is opened, on every `record`, and before training, recommending
    /// and exporting.
    pub fn enforce_retention(&mut self, now_ms: i64) -> Result<usize, StoreError> {
        let mut deleted = 0;
        if let Some(cutoff) = self.cutoff_ms(now_ms)
            && self.event_count > 0
            && self.store.oldest_event_ms()?.is_some_and(|oldest| oldest < cutoff)
        {
            deleted += self.store.purge_before(cutoff)?;
        }
        if let Some(cap) = self.retention.max_events
            && self.event_count.saturating_sub(deleted as u64) > cap
        {
            deleted += self.store.enforce_cap(cap)?;
        }
        if deleted > 0 {
            self.event_count = self.store.event_count()?;
            self.examples = None;
        }
        Ok(deleted)
    }

    /// Every stored event, oldest first.
    pub fn events(&self) -> Result<Vec<Event>, StoreError> {
        Ok(self.store.events::<Event>()?.into_iter().map(|e| e.event).collect())
    }

    fn cached_examples(&mut self) -> Result<&Examples, StoreError> {
        if self.examples.is_none() {
            self.examples = Some(Examples::from_events(&self.events()?));
        }
        Ok(self.examples.get_or_insert_with(Examples::default))
    }

    /// The `k` best items for the user now (retention is applied first, at the device clock's
    /// time). Never fails: with no consent to personalize, too little data, no global model yet
    /// or an unreadable store, it falls back to a non-personal ranking (the global model's, else
    /// the catalogue order). Items the user already interacted with positively are left out of
    /// personal lists. The MF model does not use `context`.
    pub fn recommend(&mut self, k: usize, _context: Option<Context>) -> Recommendations {
        let k = k.min(self.spec.items as usize);
        let retained = self.enforce_retention(self.clock.now_ms()).is_ok();
        let seen: Vec<u32> = if self.consent.personalization && retained {
            self.cached_examples().map(Examples::positive_items).unwrap_or_default()
        } else {
            Vec::new()
        };
        if let (Some(global), Some(user)) = (&self.global, &self.user)
            && seen.len() >= self.min_personal_events
        {
            let mut scores = Vec::with_capacity(self.spec.items as usize);
            mf::score_all(self.layout, &global.params, user, &mut scores);
            if scores.iter().all(|s| s.is_finite()) {
                let items = mf::top_k(&scores, k, &seen);
                return Recommendations { items: to_scored(items), source: Source::Personal };
            }
        }
        if let Some(global) = &self.global {
            let scores = global_ranking(self.layout, &global.params);
            let items = mf::top_k(&scores, k, &seen);
            return Recommendations { items: to_scored(items), source: Source::Global };
        }
        let items = (0..self.spec.items)
            .filter(|i| seen.binary_search(i).is_err())
            .take(k)
            .map(|item| Scored { item, score: 0.0 })
            .collect();
        Recommendations { items, source: Source::Catalogue }
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
        let examples = self.cached_examples()?;
        let positives = examples.positive_items();
        let total_weight = examples.total_weight();
        if positives.is_empty() {
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
        let result = mf::local_epochs(self.layout, &params, &mut user, &positives, &cfg, &mut self.rng)
            .map_err(|e| TrainError::Training(e.to_string()))?;
        if !user.iter().all(|v| v.is_finite()) || !result.loss.is_finite() {
            return Err(TrainError::Training("local training diverged".into()));
        }
        let (update, release) = protect(result.update, plan, round.0, &mut self.rng)?;
        if self.personal_epochs > 0 {
            // Fit the private vector to the global rows (item learning rate 0: rows untouched).
            let fit = LocalTraining { epochs: self.personal_epochs, item_lr: 0.0, ..cfg };
            let before = user.clone();
            let ok =
                mf::local_epochs(self.layout, &params, &mut user, &positives, &fit, &mut self.rng).is_ok();
            if !ok || !user.iter().all(|v| v.is_finite()) {
                user = before;
            }
        }
        self.store.put_f32s(KEY_USER, &user)?;
        self.user = Some(user);
        self.set_global(version, params)?;
        Ok(Trained {
            round,
            update,
            weight: total_weight.max(1.0),
            loss: result.loss,
            release,
            clip_norm: plan.clip_norm,
        })
    }

    /// Sets the private user vector if the device has none yet (a host migrating a user's vector
    /// from an older install, or a simulation that fixes initial vectors by seed). Returns
    /// whether it was set.
    pub fn seed_user_vector(&mut self, user: Vec<f32>) -> Result<bool, StoreError> {
        if self.user.is_some() || user.len() != self.spec.dim as usize || !user.iter().all(|v| v.is_finite())
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
            let user: Vec<f32> = (0..self.spec.dim)
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
        let c = Contribution {
            round: round.0,
            at_ms: now_ms,
            bytes_sent: bytes,
            clip_norm: trained.clip_norm.map(f64::from),
            release: trained.release,
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

    /// "Forget me": cancels a running session (the [`SessionEpoch`] moves), deletes every event,
    /// the private user vector, the global model, the counters and the stored consent, and
    /// replaces the database (and, when encrypted, its data key) so that none of it remains in
    /// any file of the store (see [`Store::forget`]). Consent returns to the configured default.
    ///
    /// The privacy ledger is kept: it holds no event or item, only what this device released,
    /// and resetting it would let the device spend its privacy budget again.
    pub fn forget(&mut self) -> Result<(), StoreError> {
        self.forget_inner(None)
    }

    /// [`forget`](Self::forget), and the new store's data key is wrapped by `key` (see
    /// [`Store::forget_with_key`]): the host rotates its storage key, and must open the device
    /// with `key` from now on. Ignored for an in-memory store.
    pub fn forget_with_key(&mut self, key: &StorageKey) -> Result<(), StoreError> {
        self.forget_inner(Some(key))
    }

    fn forget_inner(&mut self, key: Option<&StorageKey>) -> Result<(), StoreError> {
        self.epoch.bump();
        self.forgets += 1;
        self.user = None;
        self.global = None;
        self.stats = Stats::default();
        self.event_count = 0;
        self.examples = None;
        self.consent = self.default_consent;
        match key {
            Some(k) => self.store.forget_with_key(k)?,
            None => self.store.forget()?,
        }
        self.event_count = self.store.event_count()?;
        Ok(())
    }

    /// What has been shared.
    pub fn privacy_report(&self) -> Result<PrivacyReport, StoreError> {
        let ledger = self.store.ledger()?;
        Ok(PrivacyReport {
            consent: self.consent,
            events_stored: self.event_count,
            oldest_event_ms: self.store.oldest_event_ms()?,
            updates_sent: ledger.len() as u64,
            rounds_accepted: self.stats.rounds_accepted,
            bytes_sent: self.stats.bytes_sent,
            bytes_received: self.stats.bytes_received,
            rounds: ledger.iter().map(|e| e.round).collect(),
            mode: self.mode,
            local_epsilon: self.ledger.epsilon(),
            delta: self.delta.get(),
            max_epsilon: self.max_epsilon,
            model_version: self.model_version().map(|v| v.0),
        })
    }

    /// Everything stored about the user (retention is applied at `now_ms` first).
    pub fn export(&mut self, now_ms: i64) -> Result<Export, StoreError> {
        self.enforce_retention(now_ms)?;
        let events = self
            .store
            .events::<Event>()?
            .into_iter()
            .map(|e| ExportedEvent { id: e.id, event: e.event })
            .collect();
        Ok(Export {
            schema: EXPORT_SCHEMA.into(),
            exported_at_ms: now_ms,
            client_id: self.client.0,
            consent: self.consent,
            retention: self.retention,
            events,
            user_vector: self.user.clone(),
            global_model_version: self.model_version().map(|v| v.0),
            contributions: self.store.ledger()?,
            privacy: self.privacy_report()?,
        })
    }

    /// A random value from the device's RNG (used to seed per-session randomness).
    pub fn random_u64(&mut self) -> u64 {
        self.rng.random()
    }
}

fn to_scored(items: Vec<(u32, f32)>) -> Vec<Scored> {
    items.into_iter().map(|(item, score)| Scored { item, score }).collect()
}

/// The global model's non-personal ranking: item biases when the model has them; otherwise each
/// item embedding's squared norm. Under BPR with uniformly sampled negatives, an item many users
/// like is pulled towards many user vectors and its embedding grows, while an item few like is
/// only ever a random negative and shrinks under regularisation; so the norm ranks popular items
/// first without the coordinator ever seeing an interaction count or a user vector. (On the
/// synthetic population after 60 rounds, 23 of its top 30 are among the 30 most popular items.)
pub fn global_ranking(layout: MfLayout, params: &[f32]) -> Vec<f32> {
    if layout.bias {
        return (0..layout.items)
            .map(|i| params.get(layout.bias_index(i)).copied().unwrap_or(f32::NAN))
            .collect();
    }
    let d = layout.dim as usize;
    params.chunks_exact(d).take(layout.items as usize).map(|row| row.iter().map(|v| v * v).sum()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_global_ranking_puts_long_embeddings_first_and_uses_biases_when_present() {
        let layout = MfLayout::new(3, 2);
        let params = [0.1, 0.0, 1.0, -1.0, 0.0, 0.5];
        let scores = global_ranking(layout, &params);
        assert_eq!(mf::top_k(&scores, 3, &[]).iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 0]);
        let biased = MfLayout::with_bias(3, 2);
        let mut p = vec![0.0; biased.shape().unwrap().len()];
        p[biased.bias_index(2)] = 3.0;
        p[biased.bias_index(0)] = 1.0;
        assert_eq!(
            mf::top_k(&global_ranking(biased, &p), 3, &[]).iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![2, 0, 1]
        );
    }
}
