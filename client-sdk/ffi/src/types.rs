//! The plain data that crosses the boundary: events and their context, recommendations with their
//! reasons, similar items, consent, device conditions, the privacy report and a round's outcome.
//!
//! Each type mirrors one of the SDK's and converts to or from it without loss; the serde derives
//! give the same shapes to the C ABI's JSON.

use serde::{Deserialize, Serialize};
use starling_models::data::events as ev;
use starling_proto::message::DeviceConditions as ProtoConditions;
use starling_proto::session::SessionOutcome;
use starling_sdk::client::RoundReport;
use starling_sdk::device::{SimilarSource, Source as SdkSource};
use starling_sdk::{Consent as SdkConsent, PrivacyReport as SdkPrivacyReport, Reason as SdkReason};

/// What the user did with an item.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, uniffi::Enum)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// Viewed for `dwell_ms` milliseconds (10 s and more count as interest, 30 s and more fully).
    View {
        /// Time spent on the item.
        dwell_ms: u32,
    },
    /// Clicked or opened.
    Click,
    /// Added to a cart.
    AddToCart,
    /// Bought.
    Purchase,
    /// Rated 1–5 stars (4–5 positive, 1–2 negative).
    Rating {
        /// Stars, 1–5.
        stars: u8,
    },
    /// Shown and skipped (a negative signal).
    Skip,
}

/// The kind of device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, uniffi::Enum)]
#[serde(rename_all = "snake_case")]
pub enum DeviceClass {
    /// A phone.
    Phone,
    /// A tablet.
    Tablet,
    /// A desktop or laptop.
    Desktop,
}

/// The battery when the event happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, uniffi::Enum)]
#[serde(rename_all = "snake_case")]
pub enum BatteryLevel {
    /// Below 20 %, not charging.
    Low,
    /// 20 % to 59 %, not charging.
    Medium,
    /// 60 % or more, not charging.
    High,
    /// Plugged in.
    Charging,
}

/// The network when the event happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, uniffi::Enum)]
#[serde(rename_all = "snake_case")]
pub enum NetworkType {
    /// Wi-Fi or wired.
    Wifi,
    /// Cellular.
    Cellular,
    /// No connection.
    Offline,
}

/// Coarse context of an event or a request. Build one with `context_at` from the local
/// time and the device class, then add what the app knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, uniffi::Record)]
pub struct EventContext {
    /// Four-hour bucket of the local time of day, 0–5.
    pub time_of_day: u8,
    /// Day of the week, 0 = Monday.
    pub weekday: u8,
    /// The device class.
    pub device: DeviceClass,
    /// Battery level, if the app knows and shares it.
    #[serde(default)]
    #[uniffi(default = None)]
    pub battery: Option<BatteryLevel>,
    /// Network type, if known.
    #[serde(default)]
    #[uniffi(default = None)]
    pub network: Option<NetworkType>,
    /// Coarse region bucket 0–15 (the app maps its regions onto them), if known.
    #[serde(default)]
    #[uniffi(default = None)]
    pub region: Option<u8>,
}

/// One thing the user did.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, uniffi::Record)]
pub struct Event {
    /// The item, `0..items` of the model's catalogue.
    pub item: u32,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// What happened.
    pub kind: EventKind,
    /// Where and when, coarsely.
    pub context: EventContext,
}

/// The user's consent, one switch per purpose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, uniffi::Record)]
pub struct Consent {
    /// Personal recommendations from the user's own on-device data.
    pub personalization: bool,
    /// Taking part in federated training.
    pub training: bool,
}

/// What the host knows about the device right now (from the OS: power, network, idleness).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, uniffi::Record)]
pub struct DeviceConditions {
    /// Plugged in and charging.
    pub charging: bool,
    /// On an unmetered network (Wi-Fi).
    pub unmetered: bool,
    /// The user is not using the device.
    pub idle: bool,
    /// Battery level, 0–100.
    pub battery_percent: u8,
}

/// Why an item is recommended (computed on the device).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, uniffi::Enum)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reason {
    /// Similar to `item`, one of the user's own positive items ("because you watched …").
    BecauseYouEngagedWith {
        /// The user's item.
        item: u32,
        /// Cosine similarity of the two items' embeddings.
        similarity: f32,
    },
    /// The request's context put it there ("popular at this time of day").
    InThisContext,
    /// Personal, but unlike anything in the user's history.
    NewForYou,
    /// The global, non-personal ranking.
    PopularNow,
    /// Catalogue order: the device has no global model yet.
    Catalogue,
}

/// How a list was ranked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, uniffi::Enum)]
#[serde(rename_all = "snake_case")]
pub enum RecommendationSource {
    /// From the user's private vector and the global model.
    Personal,
    /// The global model's non-personal ranking (little data, or no consent to personalize).
    Global,
    /// Catalogue order (no global model on the device yet).
    Catalogue,
}

/// One recommended item.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, uniffi::Record)]
pub struct Recommendation {
    /// The item.
    pub item: u32,
    /// Its score (comparable within one list only).
    pub score: f32,
    /// Why it is recommended.
    pub reason: Reason,
}

/// A list of recommendations, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, uniffi::Record)]
pub struct Recommendations {
    /// The items.
    pub items: Vec<Recommendation>,
    /// How they were ranked.
    pub source: RecommendationSource,
}

/// One item similar to another.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, uniffi::Record)]
pub struct SimilarItem {
    /// The item.
    pub item: u32,
    /// Cosine similarity, −1 to 1.
    pub similarity: f32,
}

/// "More like this".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, uniffi::Record)]
pub struct SimilarItems {
    /// The item asked about.
    pub item: u32,
    /// The similar items, most similar first (empty before the device has a global model).
    pub items: Vec<SimilarItem>,
    /// Version of the global model used, if any.
    pub model_version: Option<u64>,
}

/// What the device has stored and sent (the full report, with the rounds, is
/// `StarlingDevice::privacy_report_json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, uniffi::Record)]
pub struct PrivacyReport {
    /// The consent in force.
    pub consent: Consent,
    /// Events stored on the device.
    pub events_stored: u64,
    /// Time of the oldest stored event.
    pub oldest_event_ms: Option<i64>,
    /// Model updates sent.
    pub updates_sent: u64,
    /// Evaluation reports sent.
    pub evaluations_sent: u64,
    /// Rounds whose update was accepted.
    pub rounds_accepted: u64,
    /// Bytes sent to the coordinator.
    pub bytes_sent: u64,
    /// Bytes received from the coordinator.
    pub bytes_received: u64,
    /// ε this device spent under local DP (0 when the noise is central), at `delta`.
    pub local_epsilon: f64,
    /// δ of `local_epsilon`.
    pub delta: f64,
    /// Version of the global model on the device.
    pub model_version: Option<u64>,
}

/// How a round went for this device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, uniffi::Record)]
pub struct RoundOutcome {
    /// The device's update (or evaluation report) was accepted.
    pub accepted: bool,
    /// The round the device was given a task for, if any.
    pub round: Option<u64>,
    /// Whether the device trained and sent an update (or evaluation report).
    pub sent_update: bool,
    /// How the session ended: `accepted`, `come back later`, `deadline missed`, `timed out`, or
    /// `rejected: `, `refused: `, `aborted: `, `withdrawn: `, `version mismatch: `,
    /// `protocol violation: ` followed by the reason (the prefix is stable, the reason is for logs).
    pub outcome: String,
    /// Bytes sent in the session.
    pub bytes_sent: u64,
    /// Bytes received in the session.
    pub bytes_received: u64,
    /// Connection attempts it took.
    pub connect_attempts: u32,
}

impl From<DeviceClass> for ev::DeviceClass {
    fn from(d: DeviceClass) -> Self {
        match d {
            DeviceClass::Phone => ev::DeviceClass::Phone,
            DeviceClass::Tablet => ev::DeviceClass::Tablet,
            DeviceClass::Desktop => ev::DeviceClass::Desktop,
        }
    }
}

impl From<ev::DeviceClass> for DeviceClass {
    fn from(d: ev::DeviceClass) -> Self {
        match d {
            ev::DeviceClass::Phone => DeviceClass::Phone,
            ev::DeviceClass::Tablet => DeviceClass::Tablet,
            ev::DeviceClass::Desktop => DeviceClass::Desktop,
        }
    }
}

impl From<BatteryLevel> for ev::BatteryLevel {
    fn from(b: BatteryLevel) -> Self {
        match b {
            BatteryLevel::Low => ev::BatteryLevel::Low,
            BatteryLevel::Medium => ev::BatteryLevel::Medium,
            BatteryLevel::High => ev::BatteryLevel::High,
            BatteryLevel::Charging => ev::BatteryLevel::Charging,
        }
    }
}

impl From<ev::BatteryLevel> for BatteryLevel {
    fn from(b: ev::BatteryLevel) -> Self {
        match b {
            ev::BatteryLevel::Low => BatteryLevel::Low,
            ev::BatteryLevel::Medium => BatteryLevel::Medium,
            ev::BatteryLevel::High => BatteryLevel::High,
            ev::BatteryLevel::Charging => BatteryLevel::Charging,
        }
    }
}

impl From<NetworkType> for ev::NetworkType {
    fn from(n: NetworkType) -> Self {
        match n {
            NetworkType::Wifi => ev::NetworkType::Wifi,
            NetworkType::Cellular => ev::NetworkType::Cellular,
            NetworkType::Offline => ev::NetworkType::Offline,
        }
    }
}

impl From<ev::NetworkType> for NetworkType {
    fn from(n: ev::NetworkType) -> Self {
        match n {
            ev::NetworkType::Wifi => NetworkType::Wifi,
            ev::NetworkType::Cellular => NetworkType::Cellular,
            ev::NetworkType::Offline => NetworkType::Offline,
        }
    }
}

impl From<EventContext> for ev::Context {
    fn from(c: EventContext) -> Self {
        ev::Context {
            time_of_day: c.time_of_day,
            weekday: c.weekday,
            device: c.device.into(),
            battery: c.battery.map(Into::into),
            network: c.network.map(Into::into),
            region: c.region,
        }
    }
}

impl From<ev::Context> for EventContext {
    fn from(c: ev::Context) -> Self {
        EventContext {
            time_of_day: c.time_of_day,
            weekday: c.weekday,
            device: c.device.into(),
            battery: c.battery.map(Into::into),
            network: c.network.map(Into::into),
            region: c.region,
        }
    }
}

impl From<EventKind> for ev::EventKind {
    fn from(k: EventKind) -> Self {
        match k {
            EventKind::View { dwell_ms } => ev::EventKind::View { dwell_ms },
            EventKind::Click => ev::EventKind::Click,
            EventKind::AddToCart => ev::EventKind::AddToCart,
            EventKind::Purchase => ev::EventKind::Purchase,
            EventKind::Rating { stars } => ev::EventKind::Rating { stars },
            EventKind::Skip => ev::EventKind::Skip,
        }
    }
}

impl From<Event> for ev::Event {
    fn from(e: Event) -> Self {
        ev::Event { item: e.item, at_ms: e.at_ms, kind: e.kind.into(), context: e.context.into() }
    }
}

impl From<Consent> for SdkConsent {
    fn from(c: Consent) -> Self {
        SdkConsent { personalization: c.personalization, training: c.training }
    }
}

impl From<SdkConsent> for Consent {
    fn from(c: SdkConsent) -> Self {
        Consent { personalization: c.personalization, training: c.training }
    }
}

impl From<DeviceConditions> for ProtoConditions {
    fn from(c: DeviceConditions) -> Self {
        ProtoConditions {
            charging: c.charging,
            unmetered: c.unmetered,
            idle: c.idle,
            battery_percent: c.battery_percent.min(100),
        }
    }
}

impl From<SdkReason> for Reason {
    fn from(r: SdkReason) -> Self {
        match r {
            SdkReason::BecauseYouEngagedWith { item, similarity } => {
                Reason::BecauseYouEngagedWith { item, similarity }
            }
            SdkReason::InThisContext { .. } => Reason::InThisContext,
            SdkReason::NewForYou => Reason::NewForYou,
            SdkReason::PopularNow => Reason::PopularNow,
            SdkReason::Catalogue => Reason::Catalogue,
            // A reason newer than this library's bindings: the honest generic one.
            _ => Reason::PopularNow,
        }
    }
}

impl From<starling_sdk::Recommendations> for Recommendations {
    fn from(r: starling_sdk::Recommendations) -> Self {
        Recommendations {
            items: r
                .items
                .into_iter()
                .map(|s| Recommendation { item: s.item, score: s.score, reason: s.reason.into() })
                .collect(),
            source: match r.source {
                SdkSource::Personal => RecommendationSource::Personal,
                SdkSource::Global => RecommendationSource::Global,
                SdkSource::Catalogue => RecommendationSource::Catalogue,
            },
        }
    }
}

impl From<starling_sdk::SimilarItems> for SimilarItems {
    fn from(s: starling_sdk::SimilarItems) -> Self {
        let items = match s.source {
            SimilarSource::GlobalModel => {
                s.items.into_iter().map(|x| SimilarItem { item: x.item, similarity: x.similarity }).collect()
            }
            _ => Vec::new(),
        };
        SimilarItems { item: s.item, items, model_version: s.model_version }
    }
}

impl From<SdkPrivacyReport> for PrivacyReport {
    fn from(r: SdkPrivacyReport) -> Self {
        PrivacyReport {
            consent: r.consent.into(),
            events_stored: r.events_stored,
            oldest_event_ms: r.oldest_event_ms,
            updates_sent: r.updates_sent,
            evaluations_sent: r.evaluations_sent,
            rounds_accepted: r.rounds_accepted,
            bytes_sent: r.bytes_sent,
            bytes_received: r.bytes_received,
            local_epsilon: r.local_epsilon,
            delta: r.delta,
            model_version: r.model_version,
        }
    }
}

impl From<RoundReport> for RoundOutcome {
    fn from(r: RoundReport) -> Self {
        let s = &r.session;
        let outcome = match &s.outcome {
            SessionOutcome::Accepted { .. } => "accepted".to_owned(),
            SessionOutcome::ComeBackAt { .. } => "come back later".to_owned(),
            SessionOutcome::Rejected { reason, .. } => format!("rejected: {reason:?}"),
            SessionOutcome::Refused(refusal) => format!("refused: {refusal:?}"),
            SessionOutcome::Aborted { reason, .. } => format!("aborted: {reason:?}"),
            SessionOutcome::Withdrawn { reason } => format!("withdrawn: {reason:?}"),
            SessionOutcome::DeadlineMissed { .. } => "deadline missed".to_owned(),
            SessionOutcome::TimedOut => "timed out".to_owned(),
            SessionOutcome::VersionMismatch { min, max } => {
                format!("version mismatch: the coordinator speaks {min}..={max}")
            }
            SessionOutcome::ProtocolViolation(what) => format!("protocol violation: {what}"),
            other => format!("other: {other:?}"),
        };
        RoundOutcome {
            accepted: r.accepted(),
            round: s.round.map(|r| r.0),
            sent_update: s.sent_update,
            outcome,
            bytes_sent: s.bytes_sent,
            bytes_received: s.bytes_received,
            connect_attempts: r.connect_attempts,
        }
    }
}
