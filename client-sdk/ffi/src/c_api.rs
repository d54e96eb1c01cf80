//! The C ABI: `extern "C"` functions over [`StarlingDevice`], for C and C++ hosts. The header,
//! `client-sdk/ffi/include/starling.h`, is generated from this file by cbindgen
//! (`starling-cbindgen`); `examples/c/` uses it.
//!
//! Conventions:
//! - Every function returns a [`StarlingStatus`]; on failure `starling_last_error()` gives the
//!   message (thread-local, valid until the thread's next call into the library).
//! - Pointers the caller passes must be valid for the call; strings are NUL-terminated UTF-8.
//!   A null pointer where one is required gives `STARLING_STATUS_NULL_ARGUMENT`, never a crash.
//! - Strings the library returns (`char **out_json`) are owned by the caller and freed with
//!   `starling_string_free`; a device is freed with `starling_device_free`.
//! - A Rust panic inside a call returns `STARLING_STATUS_INTERNAL`; it never unwinds into C.
//! - Structured results (recommendations, reports, exports) come as JSON: the same shapes as
//!   the UniFFI records (docs/sdk.md, "C").

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::ptr;

use crate::config::DeviceConfig;
use crate::device::StarlingDevice;
use crate::error::{StarlingError, guard};
use crate::types::{
    BatteryLevel, Consent, DeviceClass, DeviceConditions, Event, EventContext, EventKind, NetworkType,
};

/// What a call returned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StarlingStatus {
    /// Success.
    Ok = 0,
    /// The configuration is unusable.
    InvalidConfig = 1,
    /// The on-device database failed.
    Storage = 2,
    /// The user has not consented.
    NoConsent = 3,
    /// The event or argument is invalid.
    InvalidInput = 4,
    /// The device's conditions do not allow training now.
    NotAllowed = 5,
    /// The coordinator asked the device to come back later.
    ComeBackLater = 6,
    /// A round is already running.
    Busy = 7,
    /// The coordinator could not be reached, or none is configured.
    Network = 8,
    /// A bug in the SDK (a Rust panic, caught).
    Internal = 9,
    /// A required pointer was null.
    NullArgument = 10,
}

/// `StarlingEvent::kind`: viewed for `value` milliseconds.
pub const STARLING_EVENT_VIEW: u32 = 0;
/// `StarlingEvent::kind`: clicked.
pub const STARLING_EVENT_CLICK: u32 = 1;
/// `StarlingEvent::kind`: added to a cart.
pub const STARLING_EVENT_ADD_TO_CART: u32 = 2;
/// `StarlingEvent::kind`: bought.
pub const STARLING_EVENT_PURCHASE: u32 = 3;
/// `StarlingEvent::kind`: rated `value` stars (1–5).
pub const STARLING_EVENT_RATING: u32 = 4;
/// `StarlingEvent::kind`: shown and skipped.
pub const STARLING_EVENT_SKIP: u32 = 5;

/// `StarlingContext::device`: a phone.
pub const STARLING_DEVICE_PHONE: u32 = 0;
/// `StarlingContext::device`: a tablet.
pub const STARLING_DEVICE_TABLET: u32 = 1;
/// `StarlingContext::device`: a desktop or laptop.
pub const STARLING_DEVICE_DESKTOP: u32 = 2;

/// An optional context field the app does not know (`battery`, `network`, `region`).
pub const STARLING_UNKNOWN: i32 = -1;

/// The context of an event or a request.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StarlingContext {
    /// Four-hour bucket of the local time of day, 0–5.
    pub time_of_day: u8,
    /// Day of the week, 0 = Monday.
    pub weekday: u8,
    /// `STARLING_DEVICE_*`.
    pub device: u32,
    /// 0 low, 1 medium, 2 high, 3 charging, or `STARLING_UNKNOWN`.
    pub battery: i32,
    /// 0 Wi-Fi, 1 cellular, 2 offline, or `STARLING_UNKNOWN`.
    pub network: i32,
    /// Region bucket 0–15, or `STARLING_UNKNOWN`.
    pub region: i32,
}

/// One event.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StarlingEvent {
    /// The item, `0..items`.
    pub item: u32,
    /// When, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// `STARLING_EVENT_*`.
    pub kind: u32,
    /// Dwell time in ms for a view, stars for a rating; ignored otherwise.
    pub value: u32,
    /// Where and when.
    pub context: StarlingContext,
}

/// One recommended item (the reasons come with `starling_recommend_json`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StarlingRecommendation {
    /// The item.
    pub item: u32,
    /// Its score (comparable within one list only).
    pub score: f32,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn status_of(e: &StarlingError) -> StarlingStatus {
    match e {
        StarlingError::InvalidConfig { .. } => StarlingStatus::InvalidConfig,
        StarlingError::Storage { .. } => StarlingStatus::Storage,
        StarlingError::NoConsent { .. } => StarlingStatus::NoConsent,
        StarlingError::InvalidInput { .. } => StarlingStatus::InvalidInput,
        StarlingError::NotAllowed { .. } => StarlingStatus::NotAllowed,
        StarlingError::ComeBackLater { .. } => StarlingStatus::ComeBackLater,
        StarlingError::Busy { .. } => StarlingStatus::Busy,
        StarlingError::Network { .. } => StarlingStatus::Network,
        _ => StarlingStatus::Internal,
    }
}

/// A failure before the device was reached.
enum CallError {
    Null(&'static str),
    Sdk(StarlingError),
}

impl From<StarlingError> for CallError {
    fn from(e: StarlingError) -> Self {
        CallError::Sdk(e)
    }
}

/// Runs a call: catches panics, records the error message, maps it to a status.
fn call(f: impl FnOnce() -> Result<(), CallError>) -> StarlingStatus {
    let mut null = None;
    let r = guard(|| match f() {
        Ok(()) => Ok(()),
        Err(CallError::Sdk(e)) => Err(e),
        Err(CallError::Null(what)) => {
            null = Some(what);
            Ok(())
        }
    });
    if let Some(what) = null {
        set_last_error(&format!("{what} is null"));
        return StarlingStatus::NullArgument;
    }
    match r {
        Ok(()) => StarlingStatus::Ok,
        Err(e) => {
            set_last_error(&e.to_string());
            status_of(&e)
        }
    }
}

/// # Safety
/// `p` is null or points to a NUL-terminated string valid for the call.
unsafe fn str_arg<'a>(p: *const c_char, what: &'static str) -> Result<&'a str, CallError> {
    if p.is_null() {
        return Err(CallError::Null(what));
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| CallError::Sdk(StarlingError::invalid_input(format!("{what} is not UTF-8"))))
}

/// # Safety
/// `p` is null or points to a live device made by `starling_device_open`.
unsafe fn device<'a>(p: *const StarlingDevice) -> Result<&'a StarlingDevice, CallError> {
    // SAFETY: the caller's contract.
    unsafe { p.as_ref() }.ok_or(CallError::Null("device"))
}

/// # Safety
/// `out` is null or valid for one write.
unsafe fn put_string(out: *mut *mut c_char, s: String) -> Result<(), CallError> {
    if out.is_null() {
        return Err(CallError::Null("out_json"));
    }
    let c = CString::new(s).map_err(|_| StarlingError::Internal { detail: "NUL in JSON output".into() })?;
    // SAFETY: non-null and valid for a write by the caller's contract.
    unsafe { *out = c.into_raw() };
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StarlingError> {
    serde_json::to_string(v).map_err(|e| StarlingError::Internal { detail: e.to_string() })
}

fn context_from_c(c: &StarlingContext) -> Result<EventContext, StarlingError> {
    let device = match c.device {
        STARLING_DEVICE_PHONE => DeviceClass::Phone,
        STARLING_DEVICE_TABLET => DeviceClass::Tablet,
        STARLING_DEVICE_DESKTOP => DeviceClass::Desktop,
        d => return Err(StarlingError::invalid_input(format!("device class {d}"))),
    };
    let battery = match c.battery {
        STARLING_UNKNOWN => None,
        0 => Some(BatteryLevel::Low),
        1 => Some(BatteryLevel::Medium),
        2 => Some(BatteryLevel::High),
        3 => Some(BatteryLevel::Charging),
        b => return Err(StarlingError::invalid_input(format!("battery level {b}"))),
    };
    let network = match c.network {
        STARLING_UNKNOWN => None,
        0 => Some(NetworkType::Wifi),
        1 => Some(NetworkType::Cellular),
        2 => Some(NetworkType::Offline),
        n => return Err(StarlingError::invalid_input(format!("network type {n}"))),
    };
    let region = match c.region {
        STARLING_UNKNOWN => None,
        r => Some(u8::try_from(r).map_err(|_| StarlingError::invalid_input(format!("region {r}")))?),
    };
    Ok(EventContext { time_of_day: c.time_of_day, weekday: c.weekday, device, battery, network, region })
}

fn event_from_c(e: &StarlingEvent) -> Result<Event, StarlingError> {
    let kind = match e.kind {
        STARLING_EVENT_VIEW => EventKind::View { dwell_ms: e.value },
        STARLING_EVENT_CLICK => EventKind::Click,
        STARLING_EVENT_ADD_TO_CART => EventKind::AddToCart,
        STARLING_EVENT_PURCHASE => EventKind::Purchase,
        STARLING_EVENT_RATING => EventKind::Rating {
            stars: u8::try_from(e.value)
                .map_err(|_| StarlingError::invalid_input(format!("rating {}", e.value)))?,
        },
        STARLING_EVENT_SKIP => EventKind::Skip,
        k => return Err(StarlingError::invalid_input(format!("event kind {k}"))),
    };
    Ok(Event { item: e.item, at_ms: e.at_ms, kind, context: context_from_c(&e.context)? })
}

/// The message of this thread's last failed call ("" if none). Valid until the thread's next
/// call into the library; do not free it.
#[unsafe(no_mangle)]
pub extern "C" fn starling_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// This library's version and protocol, e.g. `0.1.0 (protocol 4)`. Free it with
/// `starling_string_free`.
#[unsafe(no_mangle)]
pub extern "C" fn starling_version() -> *mut c_char {
    CString::new(crate::sdk_version()).map(CString::into_raw).unwrap_or(ptr::null_mut())
}

/// Frees a string the library returned (null is ignored).
///
/// # Safety
/// `s` is null or a string returned by this library and not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: made by `CString::into_raw` in this library, freed once by the contract.
        drop(unsafe { CString::from_raw(s) });
    }
}

/// Opens (or creates) a device from a JSON configuration (the fields of `DeviceConfig`, see
/// docs/sdk.md: at least `client_id`, `credential`, `model_family`, `items`, `dim`). On success
/// `*out` holds the device; free it with `starling_device_free`.
///
/// # Safety
/// `config_json` is a NUL-terminated string; `out` is valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_device_open(
    config_json: *const c_char,
    out: *mut *mut StarlingDevice,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let json = unsafe { str_arg(config_json, "config_json") }?;
        if out.is_null() {
            return Err(CallError::Null("out"));
        }
        let config: DeviceConfig = serde_json::from_str(json)
            .map_err(|e| StarlingError::invalid_config(format!("configuration JSON: {e}")))?;
        let device = StarlingDevice::open_config(&config, None)?;
        // SAFETY: non-null, valid for a write.
        unsafe { *out = Box::into_raw(Box::new(device)) };
        Ok(())
    })
}

/// Closes a device (stopping its scheduler) and frees it (null is ignored).
///
/// # Safety
/// `device` is null or a device from `starling_device_open` not freed yet, and no other call on
/// it is running.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_device_free(device: *mut StarlingDevice) {
    if !device.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: made by `Box::into_raw` in `starling_device_open`, freed once.
            drop(unsafe { Box::from_raw(device) })
        }));
    }
}

/// Records the user's consent.
///
/// # Safety
/// `device` is a live device.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_set_consent(
    device: *const StarlingDevice,
    personalization: bool,
    training: bool,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        Ok(d.set_consent(Consent { personalization, training })?)
    })
}

/// Stores one event; `*out_id` (if not null) receives its id.
///
/// # Safety
/// `device` is a live device; `event` points to an event; `out_id` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_record(
    device: *const StarlingDevice,
    event: *const StarlingEvent,
    out_id: *mut i64,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        // SAFETY: the caller's contract.
        let e = unsafe { event.as_ref() }.ok_or(CallError::Null("event"))?;
        let id = d.record(event_from_c(e)?)?;
        if !out_id.is_null() {
            // SAFETY: non-null, valid for a write.
            unsafe { *out_id = id };
        }
        Ok(())
    })
}

/// Stores `count` events atomically (all or none).
///
/// # Safety
/// `device` is a live device; `events` points to `count` events (may be null if `count` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_record_batch(
    device: *const StarlingDevice,
    events: *const StarlingEvent,
    count: usize,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        if count == 0 {
            return Ok(());
        }
        if events.is_null() {
            return Err(CallError::Null("events"));
        }
        // SAFETY: non-null, `count` valid events by the caller's contract.
        let slice = unsafe { std::slice::from_raw_parts(events, count) };
        let events = slice.iter().map(event_from_c).collect::<Result<Vec<_>, _>>()?;
        d.record_batch(events)?;
        Ok(())
    })
}

/// The best `capacity` items (at most) for the user, in `context` if not null, written to `out`;
/// `*out_len` receives how many were written and `*out_personal` (if not null) whether the list
/// is personal (`false`: the global or catalogue fallback).
///
/// # Safety
/// `device` is a live device; `context` is null or valid; `out` is valid for `capacity` writes;
/// `out_len` is valid for a write; `out_personal` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_recommend(
    device: *const StarlingDevice,
    context: *const StarlingContext,
    out: *mut StarlingRecommendation,
    capacity: usize,
    out_len: *mut usize,
    out_personal: *mut bool,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        if out_len.is_null() {
            return Err(CallError::Null("out_len"));
        }
        if out.is_null() && capacity > 0 {
            return Err(CallError::Null("out"));
        }
        // SAFETY: null or valid by the caller's contract.
        let context = unsafe { context.as_ref() }.map(context_from_c).transpose()?;
        let k = u32::try_from(capacity).unwrap_or(u32::MAX);
        let recs = d.recommend(k, context)?;
        let n = recs.items.len().min(capacity);
        for (i, r) in recs.items.iter().take(n).enumerate() {
            // SAFETY: i < capacity, `out` valid for `capacity` writes.
            unsafe { *out.add(i) = StarlingRecommendation { item: r.item, score: r.score } };
        }
        // SAFETY: non-null, valid for a write.
        unsafe { *out_len = n };
        if !out_personal.is_null() {
            // SAFETY: non-null, valid for a write.
            unsafe { *out_personal = recs.source == crate::types::RecommendationSource::Personal };
        }
        Ok(())
    })
}

/// The best `k` items as JSON (`Recommendations`: items with score and reason, and the source),
/// in `context` if not null.
///
/// # Safety
/// `device` is a live device; `context` is null or valid; `out_json` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_recommend_json(
    device: *const StarlingDevice,
    k: u32,
    context: *const StarlingContext,
    out_json: *mut *mut c_char,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        // SAFETY: null or valid by the caller's contract.
        let context = unsafe { context.as_ref() }.map(context_from_c).transpose()?;
        let recs = d.recommend(k, context)?;
        // SAFETY: the caller's contract.
        unsafe { put_string(out_json, to_json(&recs)?) }
    })
}

/// The `k` items most similar to `item`, as JSON (`SimilarItems`).
///
/// # Safety
/// `device` is a live device; `out_json` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_similar_items_json(
    device: *const StarlingDevice,
    item: u32,
    k: u32,
    out_json: *mut *mut c_char,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        let similar = d.similar_items(item, k)?;
        // SAFETY: the caller's contract.
        unsafe { put_string(out_json, to_json(&similar)?) }
    })
}

/// "Show me my data": everything stored about the user, as JSON (`starling.sdk.export/2`).
///
/// # Safety
/// `device` is a live device; `out_json` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_export_json(
    device: *const StarlingDevice,
    out_json: *mut *mut c_char,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        let export = d.export_json()?;
        // SAFETY: the caller's contract.
        unsafe { put_string(out_json, export) }
    })
}

/// The privacy report as JSON.
///
/// # Safety
/// `device` is a live device; `out_json` is valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_privacy_report_json(
    device: *const StarlingDevice,
    out_json: *mut *mut c_char,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        let report = d.privacy_report_json()?;
        // SAFETY: the caller's contract.
        unsafe { put_string(out_json, report) }
    })
}

/// "Forget me": erases everything on the device but the privacy ledger.
///
/// # Safety
/// `device` is a live device.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_forget(device: *const StarlingDevice) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        Ok(d.forget()?)
    })
}

/// "Forget me" and rotate the storage key: as `starling_forget`, and the new store's data key is
/// wrapped by the `key_len` (= 32) bytes at `new_key`. Open the device with the new key from now on.
///
/// # Safety
/// `device` is a live device; `new_key` points to `key_len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_forget_with_key(
    device: *const StarlingDevice,
    new_key: *const u8,
    key_len: usize,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        if new_key.is_null() {
            return Err(CallError::Null("new_key"));
        }
        // SAFETY: non-null, `key_len` readable bytes by the caller's contract.
        let key = unsafe { std::slice::from_raw_parts(new_key, key_len) }.to_vec();
        Ok(d.forget_with_key(key)?)
    })
}

/// The consent in force, into `*personalization` and `*training`.
///
/// # Safety
/// `device` is a live device; both out-pointers are valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_consent(
    device: *const StarlingDevice,
    personalization: *mut bool,
    training: *mut bool,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        if personalization.is_null() || training.is_null() {
            return Err(CallError::Null("personalization or training"));
        }
        let c = d.consent()?;
        // SAFETY: non-null, valid for a write.
        unsafe {
            *personalization = c.personalization;
            *training = c.training;
        }
        Ok(())
    })
}

/// Deletes the events past the retention limits now; `*out_deleted` (if not null) receives how
/// many.
///
/// # Safety
/// `device` is a live device; `out_deleted` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_enforce_retention(
    device: *const StarlingDevice,
    out_deleted: *mut u64,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        let n = d.enforce_retention()?;
        if !out_deleted.is_null() {
            // SAFETY: non-null, valid for a write.
            unsafe { *out_deleted = n };
        }
        Ok(())
    })
}

/// Reports the device's conditions.
///
/// # Safety
/// `device` is a live device.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_set_conditions(
    device: *const StarlingDevice,
    charging: bool,
    unmetered: bool,
    idle: bool,
    battery_percent: u8,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        Ok(d.set_conditions(DeviceConditions { charging, unmetered, idle, battery_percent })?)
    })
}

/// Takes part in one round now, blocking until it ends; `*out_json` (if not null) receives the
/// outcome (`RoundOutcome`).
///
/// # Safety
/// `device` is a live device; `out_json` is null or valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn starling_run_round(
    device: *const StarlingDevice,
    out_json: *mut *mut c_char,
) -> StarlingStatus {
    call(|| {
        // SAFETY: the caller's contract.
        let d = unsafe { self::device(device) }?;
        let outcome = d.run_round()?;
        if out_json.is_null() {
            return Ok(());
        }
        // SAFETY: the caller's contract.
        unsafe { put_string(out_json, to_json(&outcome)?) }
    })
}

/// Panics inside Rust on purpose (returns `STARLING_STATUS_INTERNAL`), to check a host's error
/// path.
#[unsafe(no_mangle)]
pub extern "C" fn starling_debug_panic() -> StarlingStatus {
    call(|| panic!("starling_debug_panic was called"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: the library's own thread-local string.
        unsafe { CStr::from_ptr(starling_last_error()) }.to_string_lossy().into_owned()
    }

    fn open(json: &str) -> (StarlingStatus, *mut StarlingDevice) {
        let c = CString::new(json).unwrap();
        let mut d = ptr::null_mut();
        // SAFETY: valid string and out pointer.
        let s = unsafe { starling_device_open(c.as_ptr(), &mut d) };
        (s, d)
    }

    const CONFIG: &str = r#"{"client_id": 1, "credential": "t", "model_family": "bpr-mf", "items": 20, "dim": 4,
        "default_consent": {"personalization": true, "training": false}}"#;

    #[test]
    fn every_null_argument_is_refused_with_a_status() {
        let mut d = ptr::null_mut();
        // SAFETY: null arguments are part of the contract.
        unsafe {
            assert_eq!(starling_device_open(ptr::null(), &mut d), StarlingStatus::NullArgument);
            assert_eq!(starling_set_consent(ptr::null(), true, true), StarlingStatus::NullArgument);
            assert_eq!(
                starling_record(ptr::null(), ptr::null(), ptr::null_mut()),
                StarlingStatus::NullArgument
            );
            assert_eq!(starling_export_json(ptr::null(), ptr::null_mut()), StarlingStatus::NullArgument);
            assert_eq!(starling_forget(ptr::null()), StarlingStatus::NullArgument);
            starling_device_free(ptr::null_mut());
            starling_string_free(ptr::null_mut());
        }
        assert!(last_error().contains("null"), "{}", last_error());
        let (s, d) = open(CONFIG);
        assert_eq!(s, StarlingStatus::Ok);
        // SAFETY: a live device and null out-pointers.
        unsafe {
            assert_eq!(starling_record(d, ptr::null(), ptr::null_mut()), StarlingStatus::NullArgument);
            assert_eq!(starling_export_json(d, ptr::null_mut()), StarlingStatus::NullArgument);
            let mut n = 0;
            assert_eq!(
                starling_recommend(d, ptr::null(), ptr::null_mut(), 3, &mut n, ptr::null_mut()),
                StarlingStatus::NullArgument
            );
            starling_device_free(d);
        }
    }

    #[test]
    fn bad_configuration_and_bad_events_get_typed_statuses() {
        assert_eq!(open("{not json").0, StarlingStatus::InvalidConfig);
        assert!(last_error().contains("configuration JSON"), "{}", last_error());
        assert_eq!(open(&CONFIG.replace("bpr-mf", "nope")).0, StarlingStatus::InvalidConfig);
        let (s, d) = open(CONFIG);
        assert_eq!(s, StarlingStatus::Ok);
        let ctx =
            StarlingContext { time_of_day: 1, weekday: 2, device: 0, battery: -1, network: -1, region: -1 };
        let mut e =
            StarlingEvent { item: 3, at_ms: 1_000, kind: STARLING_EVENT_PURCHASE, value: 0, context: ctx };
        let mut id = -1;
        // SAFETY: a live device, valid pointers.
        unsafe {
            assert_eq!(
                starling_record(d, &e, &mut id),
                StarlingStatus::InvalidInput,
                "too old for retention"
            );
            e.at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
                as i64;
            assert_eq!(starling_record(d, &e, &mut id), StarlingStatus::Ok, "{}", last_error());
            assert!(id > 0);
            for bad in [
                StarlingEvent { kind: 99, ..e },
                StarlingEvent { item: 20, ..e },
                StarlingEvent { kind: STARLING_EVENT_RATING, value: 6, ..e },
                StarlingEvent { kind: STARLING_EVENT_RATING, value: 300, ..e },
                StarlingEvent { context: StarlingContext { device: 7, ..ctx }, ..e },
                StarlingEvent { context: StarlingContext { battery: 4, ..ctx }, ..e },
                StarlingEvent { context: StarlingContext { region: 16, ..ctx }, ..e },
                StarlingEvent { context: StarlingContext { region: 1000, ..ctx }, ..e },
            ] {
                assert_eq!(
                    starling_record(d, &bad, ptr::null_mut()),
                    StarlingStatus::InvalidInput,
                    "{bad:?}"
                );
            }
            let mut json = ptr::null_mut();
            assert_eq!(starling_export_json(d, &mut json), StarlingStatus::Ok);
            let export: serde_json::Value =
                serde_json::from_str(CStr::from_ptr(json).to_str().unwrap()).unwrap();
            starling_string_free(json);
            assert_eq!(export["events"].as_array().unwrap().len(), 1, "only the valid event was stored");
            starling_device_free(d);
        }
    }

    #[test]
    fn consent_and_key_rotation_through_the_c_abi() {
        let dir = tempfile::tempdir().unwrap();
        let old = [7u8; 32];
        let json = |key: &[u8; 32]| {
            format!(
                r#"{{"client_id": 1, "credential": "t", "model_family": "bpr-mf", "items": 20, "dim": 4,
                    "storage_dir": {:?}, "storage_key": {:?}}}"#,
                dir.path().to_str().unwrap(),
                key.to_vec()
            )
        };
        let (s, d) = open(&json(&old));
        assert_eq!(s, StarlingStatus::Ok, "{}", last_error());
        let (mut p, mut t) = (true, true);
        // SAFETY: a live device and valid pointers throughout.
        unsafe {
            assert_eq!(starling_consent(d, &mut p, &mut t), StarlingStatus::Ok);
            assert!(!p && !t, "consent starts off");
            assert_eq!(starling_set_consent(d, true, false), StarlingStatus::Ok);
            assert_eq!(starling_consent(d, &mut p, &mut t), StarlingStatus::Ok);
            assert!(p && !t);
            assert_eq!(starling_consent(d, &mut p, ptr::null_mut()), StarlingStatus::NullArgument);
            let mut deleted = 9;
            assert_eq!(starling_enforce_retention(d, &mut deleted), StarlingStatus::Ok);
            assert_eq!(deleted, 0);
            let short = [1u8; 31];
            assert_eq!(
                starling_forget_with_key(d, short.as_ptr(), short.len()),
                StarlingStatus::InvalidInput
            );
            assert_eq!(starling_forget_with_key(d, ptr::null(), 32), StarlingStatus::NullArgument);
            let new = [9u8; 32];
            assert_eq!(
                starling_forget_with_key(d, new.as_ptr(), new.len()),
                StarlingStatus::Ok,
                "{}",
                last_error()
            );
            starling_device_free(d);
        }
        assert_eq!(open(&json(&old)).0, StarlingStatus::Storage, "the old key no longer opens the store");
        let (s, d) = open(&json(&[9u8; 32]));
        assert_eq!(s, StarlingStatus::Ok, "{}", last_error());
        // SAFETY: a live device.
        unsafe { starling_device_free(d) };
    }

    #[test]
    fn a_panic_becomes_the_internal_status() {
        assert_eq!(starling_debug_panic(), StarlingStatus::Internal);
        assert!(last_error().contains("starling_debug_panic was called"), "{}", last_error());
    }
}
