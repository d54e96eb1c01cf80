//! The async client apps embed.
//!
//! ```no_run
//! # async fn demo(transport: starling_sdk::transport::memory::MemoryTransport) -> anyhow::Result<()> {
//! use starling_sdk::{Client, ClientConfig, Consent, ModelSpec, Storage};
//! use starling_proto::ids::ClientId;
//! let config = ClientConfig::new(ClientId(7), b"token".to_vec(), ModelSpec::mf(1682, 32), Storage::InMemory);
//! let client = Client::open(config, transport)?;
//! client.set_consent(Consent { personalization: true, training: true })?;
//! let top = client.recommend(10, None); // never fails, falls back to non-personal ranking
//! let report = client.run_round().await?; // only if consent and device conditions allow
//! # Ok(()) }
//! ```
//!
//! Local operations (`record`, `recommend`, `export`, …) are synchronous: they touch only the
//! on-device database and take well under a millisecond. Talking to the coordinator is async:
//! [`Client::run_round`] on demand, or [`Client::spawn_scheduler`] in the background. Both drive
//! the same [`Participant`] (the protocol's session machine) over the configured [`Transport`];
//! without training consent neither opens a connection.
//!
//! Withdrawing training consent ([`Client::set_consent`]) or calling [`Client::forget`] cancels a
//! running round before anything more is sent: both move the device's
//! [`SessionEpoch`] before they wait for the device, and every frame
//! is handed to the transport only while holding the device lock and only if the epoch it was
//! produced under is still current. So once `forget()` has returned, the round in progress sends
//! nothing more (at most a `Withdraw`); a local training step already running finishes first (it
//! holds the device), and its update is dropped.

use crate::config::{ClientConfig, Consent, NotAllowed, StorageKey};
use crate::device::{
    Device, Export, OpenError, PrivacyReport, Recommendations, RecordError, SessionEpoch, SimilarItems,
    SimilarItemsError,
};
use crate::participant::{Participant, SessionReport, StartError};
use crate::store::StoreError;
use crate::transport::{Connection, Transport, TransportError};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use starling_models::data::events::{Context, Event};
use starling_proto::message::{DeviceConditions, WithdrawReason};
use starling_proto::session::SessionOutcome;
use starling_proto::time::Instant as ProtoInstant;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Why a round could not be run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoundError {
    /// The user has not consented to training: no connection was opened.
    #[error("the user has not consented to federated training")]
    NoConsent,
    /// The device conditions do not allow training: no connection was opened.
    #[error("training not allowed now: {0}")]
    NotAllowed(#[from] NotAllowed),
    /// The coordinator asked to come back later: no connection was opened.
    #[error("the coordinator asked to come back in {after:?}")]
    ComeBackLater {
        /// How long to wait.
        after: Duration,
    },
    /// Another round is running on this client.
    #[error("a round is already running")]
    Busy,
    /// The coordinator could not be reached (after retries where retrying made sense).
    #[error("could not reach the coordinator after {attempts} attempt(s): {error}")]
    Transport {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        error: TransportError,
    },
}

/// How a round went for this device.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundReport {
    /// The session's report.
    pub session: SessionReport,
    /// Connection attempts it took.
    pub connect_attempts: u32,
}

impl RoundReport {
    /// Whether the device's update was accepted.
    pub fn accepted(&self) -> bool {
        matches!(self.session.outcome, SessionOutcome::Accepted { .. })
    }
}

/// When the background scheduler tries to join a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Time between attempts.
    pub interval: Duration,
    /// Random extra delay in `0..=jitter` per attempt (spreads a fleet's check-ins).
    pub jitter: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { interval: Duration::from_secs(15 * 60), jitter: Duration::from_secs(5 * 60) }
    }
}

struct RoundState {
    participant: Participant,
    not_before: Option<Instant>,
}

struct Inner<T> {
    config: ClientConfig,
    device: Mutex<Device>,
    transport: T,
    conditions: watch::Sender<DeviceConditions>,
    consent: watch::Sender<Consent>,
    round: tokio::sync::Mutex<RoundState>,
    rng: Mutex<ChaCha8Rng>,
    started: Instant,
    session_epoch: SessionEpoch,
}

/// What became of a frame given to [`Client::send_gated`].
enum Gate {
    /// Handed to the transport.
    Sent,
    /// The transport failed.
    Failed(TransportError),
    /// The session was cancelled; `started`: part of the frame may have been handed over.
    Cancelled { started: bool },
}

/// The SDK's client. Cheap to clone (all clones share one device). See the module docs.
pub struct Client<T: Transport> {
    inner: Arc<Inner<T>>,
}

impl<T: Transport> Clone for Client<T> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<T: Transport> std::fmt::Debug for Client<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("client", &self.inner.config.client_id).finish_non_exhaustive()
    }
}

impl<T: Transport> Client<T> {
    /// Opens the device's store and loads its state. Initial device conditions are "nothing
    /// allowed" (not charging, metered, busy, 0 %) until the host reports them.
    pub fn open(config: ClientConfig, transport: T) -> Result<Self, OpenError> {
        let mut device = Device::open(&config)?;
        let seed = config.seed.unwrap_or_else(|| device.random_u64());
        let participant = Participant::new(&config, seed);
        let consent = device.consent();
        let session_epoch = device.session_epoch().clone();
        Ok(Self {
            inner: Arc::new(Inner {
                conditions: watch::Sender::new(DeviceConditions {
                    charging: false,
                    unmetered: false,
                    idle: false,
                    battery_percent: 0,
                }),
                consent: watch::Sender::new(consent),
                round: tokio::sync::Mutex::new(RoundState { participant, not_before: None }),
                rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed.rotate_left(17))),
                started: Instant::now(),
                session_epoch,
                device: Mutex::new(device),
                transport,
                config,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.inner.transport
    }

    fn device(&self) -> MutexGuard<'_, Device> {
        // A panic while holding the lock cannot leave the device half-updated in a way later
        // calls could misread (every change is stored before it is applied), so go on.
        self.inner.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> i64 {
        self.inner.config.clock.now_ms()
    }

    /// Runs `f` with the device (for hosts and tools that need lower-level access).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut Device) -> R) -> R {
        f(&mut self.device())
    }

    /// Records a behaviour event (validated; see [`RecordError`]). Returns its row id.
    pub fn record(&self, event: Event) -> Result<i64, RecordError> {
        let now = self.now_ms();
        self.device().record(&event, now)
    }

    /// Records several events in one transaction; all or none are stored.
    pub fn record_batch(&self, events: &[Event]) -> Result<Vec<i64>, RecordError> {
        let now = self.now_ms();
        self.device().record_batch(events, now)
    }

    /// The `k` best items for the user now. Never fails (see [`Device::recommend`]).
    pub fn recommend(&self, k: usize, context: Option<Context>) -> Recommendations {
        self.device().recommend(k, context)
    }

    /// "More like this" from the global model alone; needs no consent and no personal data (see
    /// [`Device::similar_items`]).
    pub fn similar_items(&self, item: u32, k: usize) -> Result<SimilarItems, SimilarItemsError> {
        self.device().similar_items(item, k)
    }

    /// The consent in force.
    pub fn consent(&self) -> Consent {
        self.device().consent()
    }

    /// Records the user's choice. Turning training off cancels a running round at once: nothing
    /// more is sent for it (but a `Withdraw`) once this returns.
    pub fn set_consent(&self, consent: Consent) -> Result<(), StoreError> {
        if !consent.training {
            // Before waiting for the device: a training step in progress must not be sent.
            self.inner.session_epoch.bump();
        }
        self.device().set_consent(consent)?;
        self.inner.consent.send_replace(consent);
        tracing::info!(
            personalization = consent.personalization,
            training = consent.training,
            "consent recorded"
        );
        Ok(())
    }

    /// The host reports the device's conditions. A running round is withdrawn when they stop
    /// allowing training.
    pub fn set_conditions(&self, conditions: DeviceConditions) {
        self.inner.conditions.send_replace(conditions);
    }

    /// The conditions last reported.
    pub fn conditions(&self) -> DeviceConditions {
        *self.inner.conditions.borrow()
    }

    /// "Forget me": cancels a running round and erases everything stored on the device but the
    /// privacy ledger (see [`Device::forget`]). Once it returns, nothing more is sent for the
    /// round that was running (at most a `Withdraw`).
    pub fn forget(&self) -> Result<(), StoreError> {
        // Before waiting for the device: a training step in progress must not be sent.
        self.inner.session_epoch.bump();
        let mut d = self.device();
        d.forget()?;
        self.inner.consent.send_replace(d.consent());
        tracing::info!("forgot the user: local data erased (the privacy ledger is kept)");
        Ok(())
    }

    /// [`forget`](Self::forget), rotating the storage key: the new store's data key is wrapped
    /// by `key` (see [`Device::forget_with_key`]). Open the client with `key` from now on (this
    /// client's [`config`](Self::config) still shows the old one).
    pub fn forget_with_key(&self, key: &StorageKey) -> Result<(), StoreError> {
        self.inner.session_epoch.bump();
        let mut d = self.device();
        d.forget_with_key(key)?;
        self.inner.consent.send_replace(d.consent());
        Ok(())
    }

    /// "Show me my data": everything stored about the user.
    pub fn export(&self) -> Result<Export, StoreError> {
        let now = self.now_ms();
        self.device().export(now)
    }

    /// [`export`](Self::export) as pretty JSON (schema in `docs/sdk.md`).
    pub fn export_json(&self) -> Result<String, StoreError> {
        let export = self.export()?;
        serde_json::to_string_pretty(&export)
            .map_err(|e| StoreError::BadValue { what: "export".into(), detail: e.to_string() })
    }

    /// What has been shared (retention is applied first).
    pub fn privacy_report(&self) -> Result<PrivacyReport, StoreError> {
        let now = self.now_ms();
        let mut d = self.device();
        d.enforce_retention(now)?;
        d.privacy_report()
    }

    /// Applies the retention limits now (they are also applied on open, on every `record`, and
    /// before training, recommending and exporting).
    pub fn enforce_retention(&self) -> Result<usize, StoreError> {
        let now = self.now_ms();
        self.device().enforce_retention(now)
    }

    fn proto_now(&self) -> ProtoInstant {
        ProtoInstant::from_micros(self.inner.started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64)
    }

    fn tokio_at(&self, at: ProtoInstant) -> Instant {
        self.inner.started + Duration::from_micros(at.as_micros())
    }

    /// Sends `frame` (produced under session epoch `epoch`) on `conn`. Every poll of the send —
    /// the only moments bytes are handed to the transport — happens under the device lock and
    /// only while `epoch` is current; `forget` and consent withdrawal move the epoch and then take
    /// that lock, so once they return no poll of a stale frame can happen.
    async fn send_gated(&self, conn: &mut T::Connection, frame: Vec<u8>, epoch: u64) -> Gate {
        let mut send = std::pin::pin!(conn.send(frame.into()));
        let mut started = false;
        std::future::poll_fn(|cx| {
            let _device = self.device();
            if self.inner.session_epoch.current() != epoch {
                return Poll::Ready(Gate::Cancelled { started });
            }
            started = true;
            match send.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Gate::Sent),
                Poll::Ready(Err(e)) => Poll::Ready(Gate::Failed(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Sends what the participant has queued. Returns `false` if the connection must be aborted
    /// (a cancelled frame was partly handed to the transport).
    async fn send_queued(&self, state: &mut RoundState, conn: &mut T::Connection, last: bool) -> bool {
        while let Some(frame) = state.participant.poll_transmit() {
            let epoch = state.participant.epoch();
            match self.send_gated(conn, frame, epoch).await {
                Gate::Sent => {}
                Gate::Failed(e) => {
                    tracing::debug!(error = %e, "send failed");
                    if last {
                        return true;
                    }
                    state.participant.handle_disconnect(self.proto_now(), &mut self.device());
                }
                Gate::Cancelled { started } => {
                    if !started {
                        state.participant.discard_last();
                    }
                    state.participant.check_epoch(self.proto_now(), &mut self.device());
                    if started {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Whether a round could start now (consent, conditions, "come back at"), without connecting.
    pub async fn ready(&self) -> Result<(), RoundError> {
        let state = self.inner.round.lock().await;
        self.check_ready(&state)
    }

    fn check_ready(&self, state: &RoundState) -> Result<(), RoundError> {
        if !self.consent().training {
            return Err(RoundError::NoConsent);
        }
        self.inner.config.participation.check(&self.conditions())?;
        if let Some(at) = state.not_before {
            let now = Instant::now();
            if now < at {
                return Err(RoundError::ComeBackLater { after: at - now });
            }
        }
        Ok(())
    }

    /// Joins one round now: checks in, and if selected trains, protects and uploads its update.
    /// Opens no connection unless consent, conditions and the coordinator's "come back at" allow.
    pub async fn run_round(&self) -> Result<RoundReport, RoundError> {
        let mut state = self.inner.round.try_lock().map_err(|_| RoundError::Busy)?;
        self.check_ready(&state)?;
        let (mut conn, connect_attempts) = self.connect().await?;
        let mut conditions = self.inner.conditions.subscribe();
        let mut consent = self.inner.consent.subscribe();
        let start = {
            let device = self.device();
            state.participant.start(self.proto_now(), self.now_ms(), &device, *conditions.borrow_and_update())
        };
        if let Err(e) = start {
            conn.close("not participating").await;
            return Err(match e {
                StartError::NoConsent => RoundError::NoConsent,
                StartError::NotAllowed(n) => RoundError::NotAllowed(n),
                StartError::TooEarly { at } => RoundError::ComeBackLater {
                    after: self.tokio_at(at).saturating_duration_since(Instant::now()),
                },
                _ => RoundError::Busy,
            });
        }
        let mut intact = true;
        let report = loop {
            intact &= self.send_queued(&mut state, &mut conn, false).await;
            if let Some(report) = state.participant.poll_report() {
                break report;
            }
            let timeout = state.participant.poll_timeout().map(|t| self.tokio_at(t));
            tokio::select! {
                received = conn.recv() => {
                    let now = self.proto_now();
                    match received {
                        Ok(Some(bytes)) => state.participant.handle_bytes(now, &bytes, &mut self.device()),
                        Ok(None) | Err(_) => state.participant.handle_disconnect(now, &mut self.device()),
                    }
                }
                _ = tokio::time::sleep_until(timeout.unwrap_or_else(Instant::now)), if timeout.is_some() => {
                    state.participant.handle_timeout(self.proto_now(), &mut self.device());
                }
                Ok(()) = conditions.changed() => {
                    let c = *conditions.borrow_and_update();
                    state.participant.handle_conditions(self.proto_now(), c, &mut self.device());
                }
                Ok(()) = consent.changed() => {
                    // `forget` also notifies here: a moved epoch cancels the session.
                    let training = consent.borrow_and_update().training;
                    let mut device = self.device();
                    if !state.participant.check_epoch(self.proto_now(), &mut device) && !training {
                        state.participant.withdraw(self.proto_now(), WithdrawReason::ConsentWithdrawn, &mut device);
                    }
                }
            }
        };
        // Let the last frames (e.g. a withdrawal) go out, then close.
        if intact {
            intact = self.send_queued(&mut state, &mut conn, true).await;
        }
        if intact {
            conn.close("session over").await;
        } else {
            // Part of a cancelled frame may be in the transport's buffers: drop them unsent.
            conn.abort("cancelled").await;
        }
        state.not_before = state.participant.next_check_in_at().map(|t| self.tokio_at(t));
        tracing::info!(
            outcome = ?report.outcome,
            round = report.round.map(|r| r.0),
            sent = report.sent_update,
            bytes_sent = report.bytes_sent,
            "round session ended"
        );
        Ok(RoundReport { session: report, connect_attempts })
    }

    async fn connect(&self) -> Result<(T::Connection, u32), RoundError> {
        let policy = self.inner.config.retry;
        let attempts = policy.attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.inner.transport.connect().await {
                Ok(c) => return Ok((c, attempt)),
                Err(error) if !error.is_transient() || attempt >= attempts => {
                    return Err(RoundError::Transport { attempts: attempt, error });
                }
                Err(error) => {
                    let cap = policy
                        .initial_backoff
                        .saturating_mul(1u32 << (attempt - 1).min(16))
                        .min(policy.max_backoff);
                    // Full jitter: uniform in 0..=cap.
                    let wait = {
                        let mut rng = self.inner.rng.lock().unwrap_or_else(|p| p.into_inner());
                        cap.mul_f64(rng.random::<f64>())
                    };
                    tracing::debug!(%error, attempt, ?wait, "connect failed, retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Starts a background task that joins rounds whenever consent and conditions allow, at most
    /// every `config.interval` (plus jitter), honouring the coordinator's "come back at". Reports
    /// are delivered on the handle (the oldest are dropped if the host does not read them).
    pub fn spawn_scheduler(&self, config: SchedulerConfig) -> SchedulerHandle {
        let client = self.clone();
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let (report_tx, report_rx) = mpsc::channel(16);
        let task = tokio::spawn(async move {
            let mut conditions = client.inner.conditions.subscribe();
            let mut consent = client.inner.consent.subscribe();
            loop {
                let wait = match client.ready().await {
                    Ok(()) => {
                        let result = client.run_round().await;
                        let _ = report_tx.try_send(result);
                        let jitter = {
                            let mut rng = client.inner.rng.lock().unwrap_or_else(|p| p.into_inner());
                            config.jitter.mul_f64(rng.random::<f64>())
                        };
                        Some(config.interval + jitter)
                    }
                    Err(RoundError::ComeBackLater { after }) => Some(after),
                    // Wait for the host to report conditions or consent that allow training.
                    Err(_) => None,
                };
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    _ = tokio::time::sleep(wait.unwrap_or(Duration::MAX / 4)), if wait.is_some() => {}
                    Ok(()) = conditions.changed(), if wait.is_none() => {}
                    Ok(()) = consent.changed(), if wait.is_none() => {}
                }
            }
        });
        SchedulerHandle { task: Some(task), stop: stop_tx, reports: report_rx }
    }
}

/// A running background scheduler. Dropping it stops the scheduler (a round in progress is
/// abandoned as if the connection dropped).
#[derive(Debug)]
pub struct SchedulerHandle {
    task: Option<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
    reports: mpsc::Receiver<Result<RoundReport, RoundError>>,
}

impl SchedulerHandle {
    /// The next round's result.
    pub async fn next_report(&mut self) -> Option<Result<RoundReport, RoundError>> {
        self.reports.recv().await
    }

    /// Moves the stream of reports out of the handle (for a reader elsewhere); `next_report` then
    /// returns `None`.
    pub fn take_reports(&mut self) -> mpsc::Receiver<Result<RoundReport, RoundError>> {
        std::mem::replace(&mut self.reports, mpsc::channel(1).1)
    }

    /// Stops the scheduler after the round in progress, if any, and waits for it.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SchedulerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
