//! What the device does with the user's data: recording events, retention, consent, "forget
//! me", the export ("show me my data") and the privacy report.

use super::{Device, KEY_CONSENT, Stats};
use crate::config::{Consent, PrivacyMode, Retention, StorageKey};
use crate::store::{ContributionKind, LedgerEntry, StoreError};
use serde::{Deserialize, Serialize};
use starling_models::data::events::{Event, EventError};

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

/// What has been shared, as shown to the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyReport {
    /// The consent in force.
    pub consent: Consent,
    /// Events stored on the device.
    pub events_stored: u64,
    /// Time of the oldest stored event.
    pub oldest_event_ms: Option<i64>,
    /// Updates sent (one per training round joined).
    pub updates_sent: u64,
    /// Evaluation reports sent (one per evaluation round joined): the figures of the device's
    /// held-out case, no model update.
    pub evaluations_sent: u64,
    /// Rounds whose update was accepted.
    pub rounds_accepted: u64,
    /// Bytes sent to the coordinator.
    pub bytes_sent: u64,
    /// Bytes received from the coordinator.
    pub bytes_received: u64,
    /// The rounds this device sent an update to.
    pub rounds: Vec<u64>,
    /// The rounds this device sent an evaluation report to.
    pub evaluation_rounds: Vec<u64>,
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
    /// What the explanations of recommendations are computed from, on the device
    /// ([`EXPLANATION_INPUTS`](super::EXPLANATION_INPUTS)).
    pub explanation_inputs: Vec<String>,
}

/// Schema identifier of [`Export`].
pub const EXPORT_SCHEMA: &str = "starling.sdk.export/2";

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
    /// Every contribution this device made (the local privacy ledger): updates and evaluation
    /// reports (`kind`).
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

impl Device {
    /// Records the user's choice. Withdrawing both consents deletes the stored events (nothing
    /// may be kept for a purpose the user refused); withdrawing personalization alone keeps them
    /// for training, and vice versa. Without training consent, a running session is cancelled
    /// (the [`SessionEpoch`](super::SessionEpoch) moves).
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
            deleted += self.store.enforce_cap(cap, self.event_count.saturating_sub(deleted as u64))?;
        }
        if deleted > 0 {
            // Exact (every delete reports its rows), and O(1) where `COUNT(*)` scans the table.
            self.event_count = self.event_count.saturating_sub(deleted as u64);
            self.examples = None;
        }
        Ok(deleted)
    }

    /// Every stored event, oldest first.
    pub fn events(&self) -> Result<Vec<Event>, StoreError> {
        Ok(self.store.events::<Event>()?.into_iter().map(|e| e.event).collect())
    }

    /// "Forget me": cancels a running session (the [`SessionEpoch`] moves), deletes every event,
    /// the private user vector, the global model, the counters and the stored consent, and
    /// replaces the database (and, when encrypted, its data key) so that none of it remains in
    /// any file of the store (see [`Store::forget`]). Consent returns to the configured default.
    ///
    /// The privacy ledger is kept: it holds no event or item, only what this device released,
    /// and resetting it would let the device spend its privacy budget again.
    ///
    /// [`SessionEpoch`]: super::SessionEpoch
    /// [`Store::forget`]: crate::store::Store::forget
    pub fn forget(&mut self) -> Result<(), StoreError> {
        self.forget_inner(None)
    }

    /// [`forget`](Self::forget), and the new store's data key is wrapped by `key` (see
    /// [`Store::forget_with_key`]): the host rotates its storage key, and must open the device
    /// with `key` from now on. Ignored for an in-memory store.
    ///
    /// [`Store::forget_with_key`]: crate::store::Store::forget_with_key
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
        let rounds = |kind| ledger.iter().filter(|e| e.kind == kind).map(|e| e.round).collect::<Vec<_>>();
        let (rounds, evaluation_rounds) =
            (rounds(ContributionKind::Update), rounds(ContributionKind::Evaluation));
        Ok(PrivacyReport {
            consent: self.consent,
            events_stored: self.event_count,
            oldest_event_ms: self.store.oldest_event_ms()?,
            updates_sent: rounds.len() as u64,
            evaluations_sent: evaluation_rounds.len() as u64,
            rounds_accepted: self.stats.rounds_accepted,
            bytes_sent: self.stats.bytes_sent,
            bytes_received: self.stats.bytes_received,
            rounds,
            evaluation_rounds,
            mode: self.mode,
            local_epsilon: self.ledger.epsilon(),
            delta: self.delta.get(),
            max_epsilon: self.max_epsilon,
            model_version: self.model_version().map(|v| v.0),
            explanation_inputs: super::EXPLANATION_INPUTS.iter().map(|s| s.to_string()).collect(),
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
}
