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
use crate::transport::Transport;
use starling_models::data::events::{Context, Event};
use starling_proto::message::DeviceConditions;

/// A [`Client`] with a blocking API. See the module docs.
#[derive(Debug)]
pub struct BlockingClient<T: Transport> {
    client: Client<T>,
    runtime: tokio::runtime::Runtime,
    scheduler: Option<SchedulerHandle>,
}

impl<T: Transport> BlockingClient<T> {
    /// Opens the client (see [`Client::open`]) with its own runtime.
    pub fn open(config: ClientConfig, transport: T) -> Result<Self, OpenError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("starling-sdk")
            .enable_all()
            .build()
            .map_err(|e| OpenError::Model(format!("cannot start the SDK's runtime: {e}")))?;
        // The transport may need the runtime's reactor when it is created or used.
        let client = {
            let _guard = runtime.enter();
            Client::open(config, transport)?
        };
        Ok(Self { client, runtime, scheduler: None })
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
    pub fn start_scheduler(&mut self, config: SchedulerConfig) {
        let _guard = self.runtime.enter();
        self.scheduler = Some(self.client.spawn_scheduler(config));
    }

    /// Stops the background scheduler, waiting for a round in progress.
    pub fn stop_scheduler(&mut self) {
        if let Some(s) = self.scheduler.take() {
            self.runtime.block_on(s.stop());
        }
    }
}
