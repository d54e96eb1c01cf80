//! The client for hosts without an async runtime (a desktop app's UI thread, a C/FFI wrapper).
//!
//! [`BlockingClient`] owns a small `tokio` runtime (one worker thread) and runs the async
//! [`Client`]'s network operations on it; the local operations are the same synchronous calls.
//! Do not call it from inside an async runtime (blocking there would stall it): use [`Client`].

use crate::client::{Client, RoundError, RoundReport, SchedulerConfig, SchedulerHandle};
use crate::config::{ClientConfig, Consent, StorageKey};
use crate::device::{
    Export, OpenError, PrivacyReport, Recommendations, RecordError, SimilarItems, SimilarItemsError,
};
use crate::store::StoreError;
use crate::transport::{Transport, TransportError};
use starling_models::data::events::{Context, Event};
use starling_proto::message::DeviceConditions;
use std::sync::{Mutex, MutexGuard};

/// A [`Client`] with a blocking API. See the module docs. Every method takes `&self`: one
/// client can be shared between threads (a UI thread recommending while a worker runs a round).
#[derive(Debug)]
pub struct BlockingClient<T: Transport> {
    client: Client<T>,
    runtime: tokio::runtime::Runtime,
    scheduler: Mutex<Option<SchedulerHandle>>,
}

impl<T: Transport> BlockingClient<T> {
    /// Opens the client (see [`Client::open`]) with its own runtime.
    pub fn open(config: ClientConfig, transport: T) -> Result<Self, OpenError> {
        Self::open_with(config, |_| Ok(transport))
    }

    /// Opens the client with a transport made by `make_transport` from the configuration, inside
    /// the client's runtime (a [`QuicTransport`](crate::transport::quic::QuicTransport) needs one
    /// to open its socket).
    pub fn open_with(
        config: ClientConfig,
        make_transport: impl FnOnce(&ClientConfig) -> Result<T, TransportError>,
    ) -> Result<Self, OpenError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("starling-sdk")
            .enable_all()
            .build()
            .map_err(|e| OpenError::Model(format!("cannot start the SDK's runtime: {e}")))?;
        // The transport may need the runtime's reactor when it is created or used.
        let client = {
            let _guard = runtime.enter();
            let transport = make_transport(&config)?;
            Client::open(config, transport)?
        };
        Ok(Self { client, runtime, scheduler: Mutex::new(None) })
    }

    fn scheduler(&self) -> MutexGuard<'_, Option<SchedulerHandle>> {
        self.scheduler.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The async client underneath.
    pub fn client(&self) -> &Client<T> {
        &self.client
    }

    /// See [`Client::record`].
    pub fn record(&self, event: Event) -> Result<i64, RecordError> {
        self.client.record(event)
    }

    /// See [`Client::record_batch`].
    pub fn record_batch(&self, events: &[Event]) -> Result<Vec<i64>, RecordError> {
        self.client.record_batch(events)
    }

    /// See [`Client::recommend`].
    pub fn recommend(&self, k: usize, context: Option<Context>) -> Recommendations {
        self.client.recommend(k, context)
    }

    /// See [`Client::similar_items`].
    pub fn similar_items(&self, item: u32, k: usize) -> Result<SimilarItems, SimilarItemsError> {
        self.client.similar_items(item, k)
    }

    /// See [`Client::set_consent`].
    pub fn set_consent(&self, consent: Consent) -> Result<(), StoreError> {
        self.client.set_consent(consent)
    }

    /// See [`Client::set_conditions`].
    pub fn set_conditions(&self, conditions: DeviceConditions) {
        self.client.set_conditions(conditions)
    }

    /// See [`Client::forget`].
    pub fn forget(&self) -> Result<(), StoreError> {
        self.client.forget()
    }

    /// See [`Client::forget_with_key`].
    pub fn forget_with_key(&self, key: &StorageKey) -> Result<(), StoreError> {
        self.client.forget_with_key(key)
    }

    /// See [`Client::export`].
    pub fn export(&self) -> Result<Export, StoreError> {
        self.client.export()
    }

    /// See [`Client::export_json`].
    pub fn export_json(&self) -> Result<String, StoreError> {
        self.client.export_json()
    }

    /// See [`Client::privacy_report`].
    pub fn privacy_report(&self) -> Result<PrivacyReport, StoreError> {
        self.client.privacy_report()
    }

    /// Joins one round now, blocking until it ends. See [`Client::run_round`].
    pub fn run_round(&self) -> Result<RoundReport, RoundError> {
        self.runtime.block_on(self.client.run_round())
    }

    /// Starts the background scheduler on the client's runtime (replacing a running one).
    pub fn start_scheduler(&self, config: SchedulerConfig) {
        self.start_scheduler_with_reports(config, |_| {});
    }

    /// Starts the background scheduler (replacing a running one) and calls `on_report` with each
    /// round's result, on a thread of its own (never on the runtime: a slow host callback cannot
    /// stall the SDK's network work).
    pub fn start_scheduler_with_reports(
        &self,
        config: SchedulerConfig,
        mut on_report: impl FnMut(Result<RoundReport, RoundError>) + Send + 'static,
    ) {
        let mut handle = {
            let _guard = self.runtime.enter();
            self.client.spawn_scheduler(config)
        };
        let mut reports = handle.take_reports();
        let old = self.scheduler().replace(handle);
        if let Some(old) = old {
            self.runtime.block_on(old.stop());
        }
        // Ends when the scheduler's task ends (its sender is dropped).
        let _ = std::thread::Builder::new().name("starling-sdk-reports".into()).spawn(move || {
            while let Some(report) = reports.blocking_recv() {
                on_report(report);
            }
        });
    }

    /// Whether the background scheduler is running.
    pub fn scheduler_running(&self) -> bool {
        self.scheduler().is_some()
    }

    /// Stops the background scheduler, waiting for a round in progress.
    pub fn stop_scheduler(&self) {
        let handle = self.scheduler().take();
        if let Some(s) = handle {
            self.runtime.block_on(s.stop());
        }
    }
}
