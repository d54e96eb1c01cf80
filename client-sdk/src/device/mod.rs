//! The device's state and everything the SDK does locally: recording behaviour, recommending,
//! training on the device, and the user's controls (consent, forget, export, privacy report).
//!
//! A [`Device`] owns the SQLite [`Store`] and the in-memory copies of what is in it: the global
//! model the device last received, the user's private vector and the device's privacy ledger.
//! Nothing here touches the network: [`crate::participant`] drives the session machine around it,
//! and [`crate::client`] adds a transport and a clock.
//!
//! The code is split along these lines: this file opens the device and holds its state;
//! `user_data.rs` holds what is done with the user's data (recording, retention, consent,
//! forget, export, the privacy report); `model.rs` the model side (the global model, training,
//! evaluation and what a contribution costs, recommending, similar items and ranking);
//! `explain.rs` the reasons given with recommendations.
//!
//! ## What is stored (keys of the store's `kv` table)
//! | key | value |
//! |---|---|
//! | `consent` | the user's [`Consent`] (JSON) |
//! | `global_version` | version of the stored global model (JSON number) |
//! | `global_params` | the global model's parameters (raw little-endian `f32`) |
//! | `user_vector` | the private user vector (raw `f32`); never leaves the device |
//! | `stats` | counters for the privacy report ([`Stats`], JSON) |

use crate::config::{ClientConfig, Clock, Consent, ModelSpec, PrivacyMode, Retention, Storage};
use crate::privacy;
use crate::store::{Store, StoreError, create_private_dir};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use starling_models::data::events::Examples;
use starling_models::family::ModelDef;
use starling_proto::dp::local::{DeviceLedger, LocalNoise};
use starling_proto::dp::{Budget, Delta, Epsilon};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::update::ModelShape;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

mod explain;
mod model;
mod user_data;

pub use explain::{EXPLANATION_INPUTS, Reason, SIMILARITY_THRESHOLD};
pub use model::{
    EvalError, GlobalModel, Recommendations, Scored, Similar, SimilarItems, SimilarItemsError, SimilarSource,
    Source, TrainError, Trained, global_ranking,
};
pub use user_data::{EXPORT_SCHEMA, Export, ExportedEvent, PrivacyReport, RecordError};

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
    /// The transport to the coordinator could not be set up (unreadable CA certificate, no UDP
    /// socket); only [`BlockingClient::open_with`](crate::blocking::BlockingClient::open_with)
    /// gives it.
    #[error("cannot set up the connection to the coordinator: {0}")]
    Transport(#[from] crate::transport::TransportError),
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
    def: ModelDef,
    shape: ModelShape,
    mode: PrivacyMode,
    /// The sampler of local-DP noise.
    noise: LocalNoise,
    delta: Delta,
    max_epsilon: Option<f64>,
    retention: Retention,
    default_consent: Consent,
    min_personal_events: usize,
    evaluation_holdout: bool,
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
        let def = ModelDef::from_name(&spec.family, spec.items, spec.dim, spec.item_bias)
            .map_err(|e| OpenError::Model(e.to_string()))?;
        let shape = def.shape().map_err(|e| OpenError::Model(e.to_string()))?;
        let delta =
            Delta::new(config.privacy.delta).map_err(|e| OpenError::Privacy(format!("delta: {e}")))?;
        if let PrivacyMode::Local { min_noise_multiplier } = config.privacy.mode
            && !(min_noise_multiplier.is_finite() && min_noise_multiplier > 0.0)
        {
            return Err(OpenError::Privacy(format!(
                "min_noise_multiplier {min_noise_multiplier} must be > 0"
            )));
        }
        // The seeded noise sampler is for simulations: an app (file storage, OS-seeded RNG)
        // cannot pick it, by accident or otherwise.
        if config.simulation_seeded_noise && (config.storage != Storage::InMemory || config.seed.is_none()) {
            return Err(OpenError::Privacy(
                "simulation_seeded_noise is for simulations only: it needs in-memory storage and a fixed seed"
                    .into(),
            ));
        }
        let noise =
            if config.simulation_seeded_noise { LocalNoise::SimulationSeeded } else { LocalNoise::Secure };
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
            def,
            shape,
            mode: config.privacy.mode,
            noise,
            delta,
            max_epsilon: config.privacy.max_epsilon,
            retention: config.retention,
            default_consent: config.default_consent,
            min_personal_events: config.min_personal_events,
            evaluation_holdout: config.evaluation_holdout,
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
        self.user = self.store.get_f32s(KEY_USER)?.filter(|u| u.len() == self.def.private_len());
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

    /// The model family, catalogue size and dimension the device runs (from its [`ModelSpec`]).
    pub fn model_def(&self) -> ModelDef {
        self.def
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

    /// A random value from the device's RNG (used to seed per-session randomness).
    pub fn random_u64(&mut self) -> u64 {
        self.rng.random()
    }
}
