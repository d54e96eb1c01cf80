//! What only the host app knows, implemented in Kotlin, Swift or Python and called by the SDK:
//! the device's conditions ([`HostConditions`]), the wall clock if the host wants to control it
//! ([`HostClock`]), and the platform log ([`HostLogger`], fed from the SDK's `tracing` events).
//!
//! A host implementation must not raise or throw: UniFFI reports an exception from a method that
//! declares none as a panic in Rust, which the SDK's boundary turns into
//! [`StarlingError::Internal`] for the call that was running.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use crate::error::{StarlingError, guard};
use crate::types::DeviceConditions;

/// The device's conditions, asked for before each round and, while the background scheduler
/// runs, every `conditions_poll_ms`. On Android: `BatteryManager`, `ConnectivityManager`,
/// `PowerManager.isDeviceIdleMode`; on iOS: `UIDevice.batteryState`, `NWPathMonitor`.
#[uniffi::export(with_foreign)]
pub trait HostConditions: Send + Sync {
    /// The conditions now.
    fn current(&self) -> DeviceConditions;
}

/// The wall clock, in milliseconds since the Unix epoch: events are dated and retention applied
/// by it. Hosts that trust the system clock need none.
#[uniffi::export(with_foreign)]
pub trait HostClock: Send + Sync {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// Severity of a log record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, uniffi::Enum)]
pub enum LogLevel {
    /// Failures.
    Error = 1,
    /// Something unexpected that the SDK handled.
    Warn = 2,
    /// Rounds, consent changes, forget/export.
    Info = 3,
    /// Protocol steps.
    Debug = 4,
    /// Everything.
    Trace = 5,
}

/// The platform log (Android `Log`, iOS `os_log`, Python `logging`).
#[uniffi::export(with_foreign)]
pub trait HostLogger: Send + Sync {
    /// One record: its level, its `tracing` target (a Rust module path such as
    /// `starling_sdk::client`) and the message with its fields (`message key=value …`).
    fn log(&self, level: LogLevel, target: String, message: String);
}

/// The logger and its level; 0 = off.
static MAX_LEVEL: AtomicU8 = AtomicU8::new(0);
static LOGGER: RwLock<Option<Arc<dyn HostLogger>>> = RwLock::new(None);
/// Whether the forwarding subscriber is this process's global `tracing` subscriber.
static INSTALLED: OnceLock<bool> = OnceLock::new();

thread_local! {
    /// Set while a record is being handed to the host: a record the host's logger causes (it
    /// calls back into the SDK) is dropped instead of recursing.
    static IN_LOGGER: Cell<bool> = const { Cell::new(false) };
}

fn level_of(l: &tracing::Level) -> LogLevel {
    match *l {
        tracing::Level::ERROR => LogLevel::Error,
        tracing::Level::WARN => LogLevel::Warn,
        tracing::Level::INFO => LogLevel::Info,
        tracing::Level::DEBUG => LogLevel::Debug,
        tracing::Level::TRACE => LogLevel::Trace,
    }
}

struct Forward;

#[derive(Default)]
struct Message {
    text: String,
    fields: String,
}

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.text.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.text, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for Forward {
    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        (level_of(metadata.level()) as u8) <= MAX_LEVEL.load(Ordering::Relaxed)
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = level_of(event.metadata().level());
        if (level as u8) > MAX_LEVEL.load(Ordering::Relaxed) || IN_LOGGER.get() {
            return;
        }
        let Some(logger) = LOGGER.read().unwrap_or_else(|p| p.into_inner()).clone() else { return };
        let mut m = Message::default();
        event.record(&mut m);
        m.text.push_str(&m.fields);
        IN_LOGGER.set(true);
        // A logger that raises must not take the SDK down with it: the record is lost.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            logger.log(level, event.metadata().target().to_owned(), m.text)
        }));
        IN_LOGGER.set(false);
    }
}

/// Forwards the SDK's log records at `max_level` and more severe to `logger` (replacing a logger
/// set before). The first call installs the forwarding subscriber as the process's global
/// `tracing` subscriber; if the process already has one (a Rust host that set up its own), the
/// call fails with `InvalidConfig` and that subscriber keeps receiving the records.
#[uniffi::export]
pub fn set_logger(logger: Arc<dyn HostLogger>, max_level: LogLevel) -> Result<(), StarlingError> {
    guard(|| {
        let installed = *INSTALLED.get_or_init(|| {
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Forward)).is_ok()
        });
        if !installed {
            return Err(StarlingError::invalid_config(
                "this process already has a global tracing subscriber; the SDK logs to it",
            ));
        }
        *LOGGER.write().unwrap_or_else(|p| p.into_inner()) = Some(logger);
        MAX_LEVEL.store(max_level as u8, Ordering::Relaxed);
        tracing::callsite::rebuild_interest_cache();
        Ok(())
    })
}

/// Stops forwarding log records (the logger set by `set_logger` is released).
#[uniffi::export]
pub fn clear_logger() {
    MAX_LEVEL.store(0, Ordering::Relaxed);
    *LOGGER.write().unwrap_or_else(|p| p.into_inner()) = None;
    tracing::callsite::rebuild_interest_cache();
}
