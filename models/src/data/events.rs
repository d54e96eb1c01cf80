//! Behaviour events as an app records them, and how they become training examples.
//!
//! | event | meaning | training signal |
//! |---|---|---|
//! | `View { dwell_ms }` | the item was shown/opened for `dwell_ms` | positive (weight 1) if dwell ≥ 30 s, weak positive (0.5) if ≥ 10 s, ignored below |
//! | `Click` | the user opened the item | positive, weight 1 |
//! | `AddToCart` | intent | positive, weight 2 |
//! | `Purchase` | strongest implicit signal | positive, weight 3 |
//! | `Rating { stars }` (1–5) | explicit | ≥ 4: positive (weight 2); 3: weak positive (0.5); ≤ 2: negative |
//! | `Skip` | shown and dismissed | negative (used as a hard negative, never as a positive) |
//!
//! For one item the strongest signal wins: its weight is the largest positive weight seen, and it
//! is a negative only if it never earned a positive (a later purchase overrides an earlier skip).
//! Both families scale each positive's BPR loss by its weight, normalised so that the mean weight
//! over the user's positives is 1 (the step size stays that of unweighted BPR), and use the
//! negatives as hard negatives (a share of the sampled negatives equal to the user's share of
//! rejections among their signals, at most half); the weights
//! also sum into the client's FedAvg weight. The two-tower model also uses each positive's
//! context.

use serde::{Deserialize, Serialize};

/// Hour-of-day bucket (0: 0–4 h, 1: 4–8 h, …, 5: 20–24 h).
pub const TIME_BUCKETS: usize = 6;
/// Days of the week.
pub const WEEKDAYS: usize = 7;
/// Device classes.
pub const DEVICE_CLASSES: usize = 3;
/// Battery levels ([`BatteryLevel`]).
pub const BATTERY_LEVELS: usize = 4;
/// Network types ([`NetworkType`]).
pub const NETWORK_TYPES: usize = 3;
/// Coarse region buckets: a region is `0..REGIONS` (the host maps its own regions onto them).
pub const REGIONS: usize = 16;

/// The kind of device the event happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceClass {
    /// A phone.
    Phone,
    /// A tablet.
    Tablet,
    /// A desktop or laptop.
    Desktop,
}

impl DeviceClass {
    /// Index in `0..DEVICE_CLASSES`.
    pub fn index(self) -> usize {
        match self {
            DeviceClass::Phone => 0,
            DeviceClass::Tablet => 1,
            DeviceClass::Desktop => 2,
        }
    }
}

/// The device's battery when the event happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

impl BatteryLevel {
    /// Index in `0..BATTERY_LEVELS`.
    pub fn index(self) -> usize {
        match self {
            BatteryLevel::Low => 0,
            BatteryLevel::Medium => 1,
            BatteryLevel::High => 2,
            BatteryLevel::Charging => 3,
        }
    }

    /// The level of a battery at `percent` (values above 100 count as 100), or `Charging`.
    pub fn from_percent(percent: u8, charging: bool) -> Self {
        match (charging, percent) {
            (true, _) => BatteryLevel::Charging,
            (false, 0..20) => BatteryLevel::Low,
            (false, 20..60) => BatteryLevel::Medium,
            (false, _) => BatteryLevel::High,
        }
    }

    /// The level of index `i` (`i % BATTERY_LEVELS`).
    pub fn from_index(i: usize) -> Self {
        match i % BATTERY_LEVELS {
            0 => BatteryLevel::Low,
            1 => BatteryLevel::Medium,
            2 => BatteryLevel::High,
            _ => BatteryLevel::Charging,
        }
    }
}

/// The device's network when the event happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkType {
    /// Wi-Fi (or wired).
    Wifi,
    /// A cellular connection.
    Cellular,
    /// No connection.
    Offline,
}

impl NetworkType {
    /// Index in `0..NETWORK_TYPES`.
    pub fn index(self) -> usize {
        match self {
            NetworkType::Wifi => 0,
            NetworkType::Cellular => 1,
            NetworkType::Offline => 2,
        }
    }

    /// The type of index `i` (`i % NETWORK_TYPES`).
    pub fn from_index(i: usize) -> Self {
        match i % NETWORK_TYPES {
            0 => NetworkType::Wifi,
            1 => NetworkType::Cellular,
            _ => NetworkType::Offline,
        }
    }
}

/// Generic, implicit context of an event.
///
/// The optional fields are what an app may or may not know (or share); events stored without
/// them (by an SDK older than these fields) deserialize with `None`, and `None` fields are not
/// serialized, so such events are stored exactly as before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Context {
    /// Hour-of-day bucket, `0..TIME_BUCKETS`.
    pub time_of_day: u8,
    /// Day of the week, 0 = Monday.
    pub weekday: u8,
    /// Device class.
    pub device: DeviceClass,
    /// Battery level, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery: Option<BatteryLevel>,
    /// Network type, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkType>,
    /// Coarse region bucket (`< REGIONS`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<u8>,
}

impl Context {
    /// The context of a moment (seconds since the Unix epoch, in the device's local time) on a device.
    pub fn at(local_seconds: i64, device: DeviceClass) -> Self {
        let secs = local_seconds.rem_euclid(86_400);
        // 1970-01-01 was a Thursday (3 with Monday = 0).
        let weekday = ((local_seconds.div_euclid(86_400) + 3).rem_euclid(7)) as u8;
        Self {
            time_of_day: (secs / 14_400) as u8,
            weekday,
            device,
            battery: None,
            network: None,
            region: None,
        }
    }

    /// The same context with a battery level.
    pub fn with_battery(self, battery: BatteryLevel) -> Self {
        Self { battery: Some(battery), ..self }
    }

    /// The same context with a network type.
    pub fn with_network(self, network: NetworkType) -> Self {
        Self { network: Some(network), ..self }
    }

    /// The same context with a region bucket (must be `< REGIONS` to be valid).
    pub fn with_region(self, region: u8) -> Self {
        Self { region: Some(region), ..self }
    }

    /// Whether every field is in range.
    pub fn is_valid(&self) -> bool {
        usize::from(self.time_of_day) < TIME_BUCKETS
            && usize::from(self.weekday) < WEEKDAYS
            && self.region.is_none_or(|r| usize::from(r) < REGIONS)
    }
}

/// What the user did.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The item was viewed for `dwell_ms` milliseconds.
    View {
        /// Time spent on the item.
        dwell_ms: u32,
    },
    /// The item was clicked/opened.
    Click,
    /// The item was added to a cart.
    AddToCart,
    /// The item was bought.
    Purchase,
    /// An explicit rating, 1–5 stars.
    Rating {
        /// Stars, 1–5.
        stars: u8,
    },
    /// The item was shown and skipped.
    Skip,
}

impl EventKind {
    /// A short name (stored as a column by the SDK).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::View { .. } => "view",
            EventKind::Click => "click",
            EventKind::AddToCart => "add_to_cart",
            EventKind::Purchase => "purchase",
            EventKind::Rating { .. } => "rating",
            EventKind::Skip => "skip",
        }
    }

    /// The training signal: `Some(w > 0)` positive with weight `w`, `Some(w < 0)` negative,
    /// `None` no signal. See the module docs for the table.
    pub fn signal(&self) -> Option<f32> {
        match *self {
            EventKind::View { dwell_ms } if dwell_ms >= 30_000 => Some(1.0),
            EventKind::View { dwell_ms } if dwell_ms >= 10_000 => Some(0.5),
            EventKind::View { .. } => None,
            EventKind::Click => Some(1.0),
            EventKind::AddToCart => Some(2.0),
            EventKind::Purchase => Some(3.0),
            EventKind::Rating { stars } if stars >= 4 => Some(2.0),
            EventKind::Rating { stars: 3 } => Some(0.5),
            EventKind::Rating { .. } => Some(-1.0),
            EventKind::Skip => Some(-1.0),
        }
    }
}

/// One recorded event.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The item (0-based id in the model's catalogue).
    pub item: u32,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// What happened.
    pub kind: EventKind,
    /// Where and when, coarsely.
    pub context: Context,
}

/// Why an event is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The item is not in the catalogue.
    #[error("unknown item {item} (catalogue has {items} items)")]
    UnknownItem {
        /// The item.
        item: u32,
        /// Catalogue size.
        items: u32,
    },
    /// A rating outside 1–5.
    #[error("rating must be 1 to 5 stars, got {0}")]
    BadRating(u8),
    /// A context field out of range.
    #[error("context out of range: time_of_day {time_of_day}, weekday {weekday}")]
    BadContext {
        /// The bucket given.
        time_of_day: u8,
        /// The weekday given.
        weekday: u8,
    },
    /// A region bucket outside `0..REGIONS`.
    #[error("region bucket {0} out of range (0..{REGIONS})")]
    BadRegion(u8),
}

impl Event {
    /// Checks the event against a catalogue of `items` items.
    pub fn validate(&self, items: u32) -> Result<(), EventError> {
        if self.item >= items {
            return Err(EventError::UnknownItem { item: self.item, items });
        }
        if let EventKind::Rating { stars } = self.kind
            && !(1..=5).contains(&stars)
        {
            return Err(EventError::BadRating(stars));
        }
        if let Some(r) = self.context.region
            && usize::from(r) >= REGIONS
        {
            return Err(EventError::BadRegion(r));
        }
        if !self.context.is_valid() {
            return Err(EventError::BadContext {
                time_of_day: self.context.time_of_day,
                weekday: self.context.weekday,
            });
        }
        Ok(())
    }
}

/// A positive training example.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Positive {
    /// The item.
    pub item: u32,
    /// Its weight (strongest signal seen).
    pub weight: f32,
    /// Context of the strongest signal.
    pub context: Context,
    /// Time of the latest positive event for the item, ms since the Unix epoch.
    pub last_ms: i64,
}

/// Training examples derived from a user's events.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Examples {
    /// Positives, sorted by item.
    pub positives: Vec<Positive>,
    /// Items with only negative signals, sorted.
    pub negatives: Vec<u32>,
}

impl Examples {
    /// Applies the mapping of the module docs to `events`.
    pub fn from_events(events: &[Event]) -> Self {
        let mut best: std::collections::BTreeMap<u32, (f32, Context, i64)> =
            std::collections::BTreeMap::new();
        for e in events {
            let Some(w) = e.kind.signal() else { continue };
            let entry = best.entry(e.item).or_insert((w, e.context, i64::MIN));
            if w > entry.0 {
                entry.0 = w;
                entry.1 = e.context;
            }
            if w > 0.0 {
                entry.2 = entry.2.max(e.at_ms);
            }
        }
        let mut out = Examples::default();
        for (item, (w, context, last_ms)) in best {
            if w > 0.0 {
                out.positives.push(Positive { item, weight: w, context, last_ms });
            } else {
                out.negatives.push(item);
            }
        }
        out
    }

    /// Splits off the latest positive (the largest `last_ms`, ties to the larger item id) for
    /// evaluation: the rest is what the device trains on. `None` with fewer than two positives
    /// (the one positive is kept for training), as in [`crate::data::LeaveOneOut`].
    pub fn hold_out_latest(&self) -> (Examples, Option<Positive>) {
        if self.positives.len() < 2 {
            return (self.clone(), None);
        }
        let Some(k) =
            (0..self.positives.len()).max_by_key(|&k| (self.positives[k].last_ms, self.positives[k].item))
        else {
            return (self.clone(), None);
        };
        let mut train = self.clone();
        let held = train.positives.remove(k);
        (train, Some(held))
    }

    /// The positive items, sorted.
    pub fn positive_items(&self) -> Vec<u32> {
        self.positives.iter().map(|p| p.item).collect()
    }

    /// Sum of positive weights.
    pub fn total_weight(&self) -> f32 {
        self.positives.iter().map(|p| p.weight).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(item: u32, kind: EventKind) -> Event {
        Event { item, at_ms: 0, kind, context: Context::at(0, DeviceClass::Phone) }
    }

    #[test]
    fn strongest_signal_wins_and_skips_are_negatives() {
        let events = [
            ev(1, EventKind::Skip),
            ev(1, EventKind::Purchase),
            ev(2, EventKind::View { dwell_ms: 2_000 }),
            ev(3, EventKind::View { dwell_ms: 45_000 }),
            ev(4, EventKind::Skip),
            ev(5, EventKind::Rating { stars: 1 }),
            ev(6, EventKind::Rating { stars: 5 }),
        ];
        let x = Examples::from_events(&events);
        assert_eq!(x.positive_items(), vec![1, 3, 6]);
        assert_eq!(x.positives[0].weight, 3.0);
        assert_eq!(x.negatives, vec![4, 5]);
        assert_eq!(x.total_weight(), 6.0);
    }

    #[test]
    fn validation_and_context() {
        assert_eq!(ev(10, EventKind::Click).validate(5), Err(EventError::UnknownItem { item: 10, items: 5 }));
        assert_eq!(ev(1, EventKind::Rating { stars: 6 }).validate(5), Err(EventError::BadRating(6)));
        let c = Context::at(86_400 * 4 + 3600 * 13, DeviceClass::Desktop); // 1970-01-05 13:00, a Monday
        assert_eq!((c.weekday, c.time_of_day), (0, 3));
        let json = serde_json::to_string(&ev(1, EventKind::View { dwell_ms: 5 })).unwrap();
        assert!(json.contains("\"type\":\"view\""), "{json}");
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ev(1, EventKind::View { dwell_ms: 5 }));
        let mut bad = ev(1, EventKind::Click);
        bad.context = bad.context.with_region(16);
        assert_eq!(bad.validate(5), Err(EventError::BadRegion(16)));
        assert!(!bad.context.is_valid());
        assert!(ev(1, EventKind::Click).context.with_region(15).is_valid());
    }

    #[test]
    fn contexts_without_the_new_fields_still_deserialize() {
        // An event as an older SDK stored it: no battery, network or region.
        let old = r#"{"item":4,"at_ms":7,"kind":{"type":"click"},"context":{"time_of_day":2,"weekday":5,"device":"tablet"}}"#;
        let e: Event = serde_json::from_str(old).unwrap();
        assert_eq!(
            e.context,
            Context {
                time_of_day: 2,
                weekday: 5,
                device: DeviceClass::Tablet,
                battery: None,
                network: None,
                region: None
            }
        );
        // Unknown fields are not written, so old readers see what they always saw.
        assert_eq!(serde_json::to_string(&e).unwrap(), old);
        let rich = e
            .context
            .with_battery(BatteryLevel::from_percent(15, false))
            .with_network(NetworkType::Cellular)
            .with_region(3);
        assert_eq!(rich.battery, Some(BatteryLevel::Low));
        let json = serde_json::to_string(&rich).unwrap();
        assert!(json.contains(r#""battery":"low""#) && json.contains(r#""network":"cellular""#), "{json}");
        assert_eq!(serde_json::from_str::<Context>(&json).unwrap(), rich);
        assert_eq!(BatteryLevel::from_percent(100, true), BatteryLevel::Charging);
        assert_eq!(BatteryLevel::from_percent(59, false), BatteryLevel::Medium);
        assert_eq!(BatteryLevel::from_percent(60, false), BatteryLevel::High);
    }
}
