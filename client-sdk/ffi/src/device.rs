//! [`StarlingDevice`]: the SDK as one object for foreign code. It wraps the SDK's
//! [`BlockingClient`] over QUIC (every method is synchronous and safe to call from any thread;
//! local calls never wait for a round in progress) and adds what hosts supply: conditions from a
//! [`HostConditions`] callback, a [`HostClock`], and round reports to a [`RoundListener`].

use starling_sdk::blocking::BlockingClient;
use starling_sdk::client::SchedulerConfig;
use starling_sdk::config::Clock;
use starling_sdk::transport::quic::{QuicConnection, QuicTransport};
use starling_sdk::transport::{Transport, TransportError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::DeviceConfig;
use crate::error::{StarlingError, guard};
use crate::host::{HostClock, HostConditions};
use crate::types::{
    Consent, DeviceConditions, Event, EventContext, PrivacyReport, Recommendations, RoundOutcome,
    SimilarItems,
};

/// QUIC to the configured coordinator, or nothing (an offline device: every connection attempt
/// fails at once with a configuration error, which is not retried).
pub struct DeviceTransport(Option<QuicTransport>);

impl Transport for DeviceTransport {
    type Connection = QuicConnection;

    async fn connect(&self) -> Result<QuicConnection, TransportError> {
        match &self.0 {
            Some(quic) => quic.connect().await,
            None => Err(TransportError::Config("no coordinator is configured".into())),
        }
    }
}

/// Receives the background scheduler's round results (on a thread of the SDK's; keep it short).
#[uniffi::export(with_foreign)]
pub trait RoundListener: Send + Sync {
    /// A round ended: its outcome, or the error that kept the device out of it.
    fn on_round(&self, outcome: Option<RoundOutcome>, error: Option<String>);
}

/// Polls the host's conditions while the scheduler runs.
struct Monitor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// One device: the user's events, model and controls, and its part in federated training.
#[derive(uniffi::Object)]
pub struct StarlingDevice {
    client: BlockingClient<DeviceTransport>,
    conditions: Mutex<Option<Arc<dyn HostConditions>>>,
    monitor: Mutex<Option<Monitor>>,
}

impl std::fmt::Debug for StarlingDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StarlingDevice").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl StarlingDevice {
    /// Opens the device (Rust callers; foreign code uses the exported constructors).
    pub fn open_config(
        config: &DeviceConfig,
        clock: Option<Arc<dyn HostClock>>,
    ) -> Result<Self, StarlingError> {
        let mut cc = config.to_client_config()?;
        if let Some(clock) = clock {
            cc.clock = Clock::from_fn(move || clock.now_ms());
        }
        let client = BlockingClient::open_with(cc, |cc| {
            Ok(DeviceTransport(match &cc.coordinator {
                Some(endpoint) => Some(QuicTransport::new(endpoint)?),
                None => None,
            }))
        })?;
        Ok(Self { client, conditions: Mutex::new(None), monitor: Mutex::new(None) })
    }

    /// Asks the host's provider, if any, and hands the answer to the client.
    fn refresh_conditions(&self) {
        let provider = lock(&self.conditions).clone();
        if let Some(p) = provider {
            self.client.set_conditions(p.current().into());
        }
    }

    fn stop_monitor(&self) {
        if let Some(m) = lock(&self.monitor).take() {
            m.stop.store(true, Ordering::Relaxed);
            m.thread.thread().unpark();
            let _ = m.thread.join();
        }
    }
}

#[uniffi::export]
impl StarlingDevice {
    /// Opens (or creates) the device's store with `config`, on the system clock.
    #[uniffi::constructor]
    pub fn open(config: DeviceConfig) -> Result<Arc<Self>, StarlingError> {
        guard(|| Self::open_config(&config, None).map(Arc::new))
    }

    /// Opens the device with the host's clock.
    #[uniffi::constructor]
    pub fn open_with_clock(
        config: DeviceConfig,
        clock: Arc<dyn HostClock>,
    ) -> Result<Arc<Self>, StarlingError> {
        guard(|| Self::open_config(&config, Some(clock)).map(Arc::new))
    }

    /// The consent in force.
    pub fn consent(&self) -> Result<Consent, StarlingError> {
        guard(|| Ok(self.client.client().consent().into()))
    }

    /// Records the user's choice (stored; withdrawing training consent cancels a round in
    /// progress before anything more is sent; withdrawing both deletes the events).
    pub fn set_consent(&self, consent: Consent) -> Result<(), StarlingError> {
        guard(|| Ok(self.client.set_consent(consent.into())?))
    }

    /// Stores one event; returns its id. Needs consent to personalization or training.
    pub fn record(&self, event: Event) -> Result<i64, StarlingError> {
        guard(|| Ok(self.client.record(event.into())?))
    }

    /// Stores events atomically (all or none); returns their ids.
    pub fn record_batch(&self, events: Vec<Event>) -> Result<Vec<i64>, StarlingError> {
        guard(|| {
            let events: Vec<_> = events.into_iter().map(Into::into).collect();
            Ok(self.client.record_batch(&events)?)
        })
    }

    /// The `k` best items for the user, in `context` if given, with the reason for each. Never
    /// fails for lack of data: it falls back to the global ranking, then the catalogue.
    #[uniffi::method(default(context = None))]
    pub fn recommend(&self, k: u32, context: Option<EventContext>) -> Result<Recommendations, StarlingError> {
        guard(|| Ok(self.client.recommend(k as usize, context.map(Into::into)).into()))
    }

    /// The `k` items most similar to `item` by the global model ("more like this"); needs no
    /// consent and no data of the user's.
    pub fn similar_items(&self, item: u32, k: u32) -> Result<SimilarItems, StarlingError> {
        guard(|| Ok(self.client.similar_items(item, k as usize)?.into()))
    }

    /// "Forget me": cancels a round in progress and erases everything on the device except the
    /// privacy ledger (what was already sent cannot be recalled; the ledger says what it was).
    pub fn forget(&self) -> Result<(), StarlingError> {
        guard(|| Ok(self.client.forget()?))
    }

    /// "Forget me" and rotate the storage key: as `forget`, and the new, empty store's data key
    /// is wrapped by `new_key` (32 bytes, a fresh key from the Keystore/Keychain), so that what
    /// was stored under the old key cannot be read even from a backup of the key. Open the device
    /// with `new_key` from now on.
    pub fn forget_with_key(&self, new_key: Vec<u8>) -> Result<(), StarlingError> {
        guard(|| {
            let key = starling_sdk::StorageKey::from_slice(&new_key)
                .map_err(|e| StarlingError::invalid_input(format!("new_key: {e}")))?;
            Ok(self.client.forget_with_key(&key)?)
        })
    }

    /// "Show me my data": everything the device stores about the user, as JSON (schema
    /// `starling.sdk.export/2`, documented in docs/sdk.md).
    pub fn export_json(&self) -> Result<String, StarlingError> {
        guard(|| Ok(self.client.export_json()?))
    }

    /// What is stored and what was sent, in figures.
    pub fn privacy_report(&self) -> Result<PrivacyReport, StarlingError> {
        guard(|| Ok(self.client.privacy_report()?.into()))
    }

    /// The full privacy report as JSON (with the rounds joined and the explanation inputs).
    pub fn privacy_report_json(&self) -> Result<String, StarlingError> {
        guard(|| {
            let report = self.client.privacy_report()?;
            serde_json::to_string_pretty(&report)
                .map_err(|e| StarlingError::Internal { detail: e.to_string() })
        })
    }

    /// Deletes events past the retention limits now (also done on every read); returns how many.
    pub fn enforce_retention(&self) -> Result<u64, StarlingError> {
        guard(|| Ok(self.client.client().enforce_retention()? as u64))
    }

    /// The host reports the device's conditions (a round in progress is withdrawn if they stop
    /// allowing training).
    pub fn set_conditions(&self, conditions: DeviceConditions) -> Result<(), StarlingError> {
        guard(|| {
            self.client.set_conditions(conditions.into());
            Ok(())
        })
    }

    /// The conditions last reported.
    pub fn conditions(&self) -> Result<DeviceConditions, StarlingError> {
        guard(|| {
            let c = self.client.client().conditions();
            Ok(DeviceConditions {
                charging: c.charging,
                unmetered: c.unmetered,
                idle: c.idle,
                battery_percent: c.battery_percent,
            })
        })
    }

    /// Lets the SDK ask the host for the conditions itself: before each round, and while the
    /// scheduler runs.
    pub fn set_conditions_provider(&self, provider: Arc<dyn HostConditions>) -> Result<(), StarlingError> {
        guard(|| {
            *lock(&self.conditions) = Some(provider);
            self.refresh_conditions();
            Ok(())
        })
    }

    /// Takes part in one round now, blocking until it ends (call it from a background worker:
    /// Android WorkManager, iOS BGProcessingTask). Fails without consent or when the conditions
    /// do not allow training, before anything is sent.
    pub fn run_round(&self) -> Result<RoundOutcome, StarlingError> {
        guard(|| {
            self.refresh_conditions();
            Ok(self.client.run_round()?.into())
        })
    }

    /// Starts joining rounds in the background whenever consent and conditions allow, at most
    /// every `interval_ms` plus up to `jitter_ms`. With a conditions provider, the SDK asks it
    /// every `conditions_poll_ms` (at least 100). Replaces a running scheduler.
    pub fn start_scheduler(
        &self,
        interval_ms: u64,
        jitter_ms: u64,
        conditions_poll_ms: u64,
        listener: Option<Arc<dyn RoundListener>>,
    ) -> Result<(), StarlingError> {
        guard(|| {
            if interval_ms == 0 {
                return Err(StarlingError::invalid_input("interval_ms must be above 0"));
            }
            self.stop_monitor();
            self.refresh_conditions();
            let config = SchedulerConfig {
                interval: Duration::from_millis(interval_ms),
                jitter: Duration::from_millis(jitter_ms),
            };
            self.client.start_scheduler_with_reports(config, move |report| {
                if let Some(l) = &listener {
                    let (outcome, error) = match report {
                        Ok(r) => (Some(r.into()), None),
                        Err(e) => (None, Some(e.to_string())),
                    };
                    // A listener that raises loses its report, nothing else.
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.on_round(outcome, error)));
                }
            });
            if let Some(provider) = lock(&self.conditions).clone() {
                let stop = Arc::new(AtomicBool::new(false));
                let poll = Duration::from_millis(conditions_poll_ms.max(100));
                let client_stop = stop.clone();
                let client = self.client.client().clone();
                let thread = std::thread::Builder::new()
                    .name("starling-sdk-conditions".into())
                    .spawn(move || {
                        while !client_stop.load(Ordering::Relaxed) {
                            let now =
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| provider.current()));
                            if let Ok(c) = now {
                                client.set_conditions(c.into());
                            }
                            std::thread::park_timeout(poll);
                        }
                    })
                    .map_err(|e| StarlingError::Internal { detail: format!("cannot start a thread: {e}") })?;
                *lock(&self.monitor) = Some(Monitor { stop, thread });
            }
            Ok(())
        })
    }

    /// Stops the background scheduler, waiting for a round in progress to end.
    pub fn stop_scheduler(&self) -> Result<(), StarlingError> {
        guard(|| {
            self.stop_monitor();
            self.client.stop_scheduler();
            Ok(())
        })
    }

    /// Whether the background scheduler is running.
    pub fn scheduler_running(&self) -> bool {
        self.client.scheduler_running()
    }
}

impl Drop for StarlingDevice {
    fn drop(&mut self) {
        self.stop_monitor();
        self.client.stop_scheduler();
    }
}
