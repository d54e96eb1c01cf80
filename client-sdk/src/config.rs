//! How an app configures the SDK: identity, storage, model, when to train, privacy, retention.
//!
//! Every setting has a default that is safe for a phone; [`ClientConfig::new`] needs only the
//! client's identity and the model the coordinator trains. Consent defaults to **off** for both
//! personalization and training: the app asks the user and calls `set_consent`.

use serde::{Deserialize, Serialize};
use starling_proto::ids::ClientId;
use starling_proto::message::DeviceConditions;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::keys::StorageKey;

/// Where the SDK keeps its database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// `DIR/starling.db`, and `DIR/starling.key` when encrypted (the directory is created with
    /// mode 0700 if missing; the files are created 0600).
    Dir(PathBuf),
    /// In memory only: nothing survives the process (tests, simulations, kiosk mode). Never
    /// encrypted (nothing is at rest).
    InMemory,
}

/// The wall clock the SDK dates events by and applies retention with (ms since the Unix epoch).
/// Clones share one clock.
#[derive(Clone)]
pub struct Clock(ClockKind);

#[derive(Clone)]
enum ClockKind {
    System,
    Manual(Arc<AtomicI64>),
    Custom(Arc<dyn Fn() -> i64 + Send + Sync>),
}

impl Clock {
    /// The system clock (the default).
    pub fn system() -> Self {
        Self(ClockKind::System)
    }

    /// A clock standing at `ms` that moves only when told ([`set_ms`](Self::set_ms),
    /// [`advance`](Self::advance)): tests and simulations with virtual time.
    pub fn manual(ms: i64) -> Self {
        Self(ClockKind::Manual(Arc::new(AtomicI64::new(ms))))
    }

    /// A clock reading `now`, e.g. the host's own trusted time source.
    pub fn from_fn(now: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Self(ClockKind::Custom(Arc::new(now)))
    }

    /// The time now, ms since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.0 {
            ClockKind::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis().min(i64::MAX as u128) as i64),
            ClockKind::Manual(t) => t.load(Ordering::Acquire),
            ClockKind::Custom(f) => f(),
        }
    }

    /// Sets a [`manual`](Self::manual) clock to `ms`. Returns whether this clock is manual (the
    /// others are not changed).
    pub fn set_ms(&self, ms: i64) -> bool {
        match &self.0 {
            ClockKind::Manual(t) => {
                t.store(ms, Ordering::Release);
                true
            }
            _ => false,
        }
    }

    /// Moves a [`manual`](Self::manual) clock forward by `by`. Returns whether this clock is manual.
    pub fn advance(&self, by: Duration) -> bool {
        match &self.0 {
            ClockKind::Manual(t) => {
                t.fetch_add(by.as_millis().min(i64::MAX as u128) as i64, Ordering::AcqRel);
                true
            }
            _ => false,
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            ClockKind::System => f.write_str("Clock::System"),
            ClockKind::Manual(t) => write!(f, "Clock::Manual({})", t.load(Ordering::Relaxed)),
            ClockKind::Custom(_) => f.write_str("Clock::Custom"),
        }
    }
}

impl PartialEq for Clock {
    /// The same clock: both the system clock, or clones of one manual or custom clock.
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (ClockKind::System, ClockKind::System) => true,
            (ClockKind::Manual(a), ClockKind::Manual(b)) => Arc::ptr_eq(a, b),
            (ClockKind::Custom(a), ClockKind::Custom(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// The coordinator to train with: its address and the CA that signed its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorEndpoint {
    /// `host:port` of the coordinator's QUIC endpoint.
    pub address: String,
    /// The name the coordinator's certificate must carry (TLS server name).
    pub server_name: String,
    /// PEM of the CA certificate(s) to trust for the coordinator (and nothing else).
    pub ca_pem: Vec<u8>,
}

/// The recommendation model on the device. It must match the coordinator's.
///
/// The device turns it into a `starling_models::family::ModelDef` when it opens
/// (`ModelDef::from_name`); an unknown family is refused with `OpenError::Model`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Model family name announced at check-in (the coordinator refuses other families):
    /// `"bpr-mf"` ([`ModelSpec::mf`]) or `"two-tower"` ([`ModelSpec::two_tower`]).
    pub family: String,
    /// Items in the catalogue: item ids are `0..items`.
    pub items: u32,
    /// Embedding dimension.
    pub dim: u32,
    /// Whether the model has per-item biases (the global non-personal ranking then uses them).
    pub item_bias: bool,
}

impl ModelSpec {
    /// Matrix factorisation over `items` items with `dim`-dimensional embeddings, no biases.
    pub fn mf(items: u32, dim: u32) -> Self {
        Self { family: starling_models::family::MF_NAME.into(), items, dim, item_bias: false }
    }

    /// The context-aware two-tower model over `items` items with `dim`-dimensional embeddings
    /// (family `"two-tower"`): the user tower combines the private user vector with the request's
    /// context (time of day, weekday, device class); see `docs/sdk.md`, "Model families".
    pub fn two_tower(items: u32, dim: u32) -> Self {
        Self { family: starling_models::family::TWO_TOWER_NAME.into(), items, dim, item_bias: false }
    }
}

/// When the device may train. Production federated learning trains only on devices that are
/// charging, on an unmetered network and idle, so that users never pay for it in battery, data or
/// responsiveness; that is the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipationPolicy {
    /// Train only while charging.
    pub require_charging: bool,
    /// Train only on an unmetered network (e.g. Wi-Fi).
    pub require_unmetered: bool,
    /// Train only while the device is idle.
    pub require_idle: bool,
    /// Train only above this battery level (percent).
    pub min_battery_percent: u8,
}

impl Default for ParticipationPolicy {
    fn default() -> Self {
        Self { require_charging: true, require_unmetered: true, require_idle: true, min_battery_percent: 0 }
    }
}

/// Why the device conditions do not allow training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum NotAllowed {
    /// Not charging.
    #[error("the device is not charging")]
    NotCharging,
    /// On a metered network.
    #[error("the network is metered")]
    Metered,
    /// In use.
    #[error("the device is in use")]
    NotIdle,
    /// Battery below the minimum.
    #[error("battery at {0}% is below the policy's minimum")]
    LowBattery(u8),
}

impl ParticipationPolicy {
    /// Any conditions allow training (simulations, tests, desktop apps that do not care).
    pub fn always() -> Self {
        Self {
            require_charging: false,
            require_unmetered: false,
            require_idle: false,
            min_battery_percent: 0,
        }
    }

    /// Whether `c` allows training, and if not, the first reason why.
    pub fn check(&self, c: &DeviceConditions) -> Result<(), NotAllowed> {
        if self.require_charging && !c.charging {
            return Err(NotAllowed::NotCharging);
        }
        if self.require_unmetered && !c.unmetered {
            return Err(NotAllowed::Metered);
        }
        if self.require_idle && !c.idle {
            return Err(NotAllowed::NotIdle);
        }
        if c.battery_percent < self.min_battery_percent {
            return Err(NotAllowed::LowBattery(c.battery_percent));
        }
        Ok(())
    }
}

/// What protection the device insists on before its update leaves it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum PrivacyMode {
    /// Trust the coordinator's plan (central DP: the coordinator adds the noise), but always clip:
    /// a task without a clip norm is refused.
    Central,
    /// Add the noise on the device (local DP): tasks whose plan does not ask for local noise of at
    /// least `min_noise_multiplier` are refused.
    Local {
        /// The smallest noise multiplier the device accepts.
        min_noise_multiplier: f64,
    },
}

/// The device's privacy settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyPolicy {
    /// Central or local DP.
    pub mode: PrivacyMode,
    /// δ at which the device's own ε is reported.
    pub delta: f64,
    /// The most ε this device will ever spend under local DP (tasks beyond it are refused).
    pub max_epsilon: Option<f64>,
}

impl Default for PrivacyPolicy {
    fn default() -> Self {
        Self { mode: PrivacyMode::Central, delta: 1e-5, max_epsilon: None }
    }
}

/// How long events are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Events older than this are deleted.
    pub max_age: Option<Duration>,
    /// At most this many events are kept (the oldest go first).
    pub max_events: Option<u64>,
}

impl Default for Retention {
    /// 90 days, 10,000 events.
    fn default() -> Self {
        Self { max_age: Some(Duration::from_secs(90 * 86_400)), max_events: Some(10_000) }
    }
}

/// The user's consent, one switch per purpose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    /// Personal recommendations from the user's own on-device data.
    pub personalization: bool,
    /// Taking part in federated training (sending clipped, noised model updates).
    pub training: bool,
}

/// Retry policy for reaching the coordinator: exponential backoff with full jitter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Connection attempts per round (1 = no retry).
    pub attempts: u32,
    /// Delay before the first retry.
    pub initial_backoff: Duration,
    /// Upper bound of any delay.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Everything the SDK needs. See the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientConfig {
    /// The client's enrolled id.
    pub client_id: ClientId,
    /// The enrollment token presented at check-in.
    pub credential: Vec<u8>,
    /// The coordinator to reach (used by the QUIC transport).
    pub coordinator: Option<CoordinatorEndpoint>,
    /// Where the database lives.
    pub storage: Storage,
    /// The host's key for encryption at rest (a key-encryption key from the OS keystore), or
    /// `None` for an unencrypted store. Ignored for [`Storage::InMemory`]. A store created with a
    /// key can only be opened with it, and one created without a key only without.
    pub storage_key: Option<StorageKey>,
    /// The wall clock (dates events, applies retention). Default: the system clock.
    pub clock: Clock,
    /// The model.
    pub model: ModelSpec,
    /// When training is allowed.
    pub participation: ParticipationPolicy,
    /// Privacy settings.
    pub privacy: PrivacyPolicy,
    /// Retention of events.
    pub retention: Retention,
    /// Consent used until the user has made a choice (stored choices take precedence).
    pub default_consent: Consent,
    /// Positive interactions needed before recommendations become personal.
    pub min_personal_events: usize,
    /// Hold the user's latest positive interaction out of training, so that the device can answer
    /// federated evaluation tasks with an honest figure (the model never trained on the case it is
    /// scored on). Default `true`. The cost: the most recent positive does not shape the private
    /// vector (it still counts as "seen" and is still used for explanations and the history a
    /// two-tower query carries). With `false` the device trains on every positive and answers
    /// evaluation tasks with no case (`cases: 0`).
    pub evaluation_holdout: bool,
    /// Extra epochs fitting only the private user vector to the newly received global model
    /// after each task (the item rows stay as received; nothing of it is sent). Cheap, and it is
    /// what makes a newcomer's recommendations personal after its first round.
    pub personal_epochs: u32,
    /// How long to wait for the coordinator to answer a check-in or an upload.
    pub response_timeout: Duration,
    /// Connection retries.
    pub retry: RetryPolicy,
    /// Largest accepted clock skew of an event's timestamp into the future.
    pub max_future_skew: Duration,
    /// Keep the received global model in the database (so recommendations work offline after a
    /// restart). Simulations of thousands of devices in one process turn it off and share one
    /// copy in memory.
    pub store_global_model: bool,
    /// Seed of the device's randomness (training order, negatives, stochastic quantisation).
    /// `None`: from the OS. Only simulations and tests should fix it. Local-DP noise never comes
    /// from it (unless `simulation_seeded_noise` is set).
    pub seed: Option<u64>,
    /// **For simulations only; leave it `false` in an app.** Draws local-DP noise with the fast
    /// floating-point sampler on the device's seeded RNG instead of opendp's discrete Gaussian
    /// from a secure source: runs become reproducible from `seed` and noising takes microseconds,
    /// but anyone who knows or guesses the seed can subtract the noise, and the floating-point
    /// attack on textbook samplers (Mironov 2012) applies. `Device::open` refuses it unless the
    /// storage is [`Storage::InMemory`] and `seed` is fixed. Default `false`.
    #[doc(hidden)]
    pub simulation_seeded_noise: bool,
    /// The device's floor under secure aggregation: the smallest threshold (as a fraction of its
    /// neighbourhood, above one half) and neighbourhood it accepts from the coordinator, and the
    /// longest vector. The coordinator cannot lower these; a task below them is refused.
    pub secure_aggregation: starling_proto::secagg::SecAggPolicy,
    /// Draw distributed-DP noise (secure aggregation) with opendp's exact discrete Gaussian
    /// instead of the fast floating-point sampler on an OS-seeded ChaCha20. Exact costs about
    /// 40 µs per coordinate (seconds per round for a 64k-parameter model). Default `false`.
    pub exact_distributed_noise: bool,
}

impl ClientConfig {
    /// Defaults for a client `client_id` with `credential`, running `model`, storing in `storage`.
    pub fn new(client_id: ClientId, credential: Vec<u8>, model: ModelSpec, storage: Storage) -> Self {
        Self {
            client_id,
            credential,
            coordinator: None,
            storage,
            storage_key: None,
            clock: Clock::system(),
            model,
            participation: ParticipationPolicy::default(),
            privacy: PrivacyPolicy::default(),
            retention: Retention::default(),
            default_consent: Consent::default(),
            min_personal_events: 3,
            evaluation_holdout: true,
            personal_epochs: 10,
            response_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            max_future_skew: Duration::from_secs(300),
            store_global_model: true,
            seed: None,
            simulation_seeded_noise: false,
            secure_aggregation: starling_proto::secagg::SecAggPolicy::default(),
            exact_distributed_noise: false,
        }
    }
}
