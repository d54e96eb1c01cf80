//! The one error type every foreign call can raise, and the guard that turns a Rust panic into it.
//!
//! Each variant becomes a typed exception in the host language (`StarlingException.NoConsent`
//! in Kotlin, `StarlingError.NoConsent` in Swift and Python); the C ABI returns the matching
//! [`crate::c_api::StarlingStatus`] and keeps the message for `starling_last_error()`.

use starling_sdk::client::RoundError;
use starling_sdk::device::{OpenError, RecordError, SimilarItemsError};
use starling_sdk::store::StoreError;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Why a call failed. Every variant carries a human-readable `message` (English, for logs; not for
/// the user interface).
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[non_exhaustive]
pub enum StarlingError {
    /// The configuration is unusable (unknown model family, zero items, bad privacy settings, an
    /// unreadable CA certificate, a malformed JSON configuration in the C ABI).
    #[error("invalid configuration: {message}")]
    InvalidConfig {
        /// What is wrong.
        message: String,
    },
    /// The on-device database could not be opened or written: foreign, corrupt, too new, wrong
    /// storage key, I/O. Nothing was changed.
    #[error("storage: {message}")]
    Storage {
        /// What SQLite or the file system reported.
        message: String,
    },
    /// The user has not consented to what the call needs (recording needs personalization or
    /// training; a round needs training). Nothing was stored or sent.
    #[error("no consent: {message}")]
    NoConsent {
        /// Which consent is missing.
        message: String,
    },
    /// The event or argument is invalid: unknown item, rating outside 1–5, context out of range,
    /// a time too far in the future or older than the retention period.
    #[error("invalid input: {message}")]
    InvalidInput {
        /// What is wrong.
        message: String,
    },
    /// The device's conditions (charging, network, idle, battery) do not allow training now.
    #[error("not allowed now: {message}")]
    NotAllowed {
        /// Which condition failed.
        message: String,
    },
    /// The coordinator asked the device to come back later.
    #[error("come back in {retry_after_ms} ms")]
    ComeBackLater {
        /// How long to wait, in milliseconds.
        retry_after_ms: u64,
        /// The coordinator's words, for logs.
        message: String,
    },
    /// Another round is already running on this device.
    #[error("busy: {message}")]
    Busy {
        /// What is running.
        message: String,
    },
    /// The coordinator could not be reached, or no coordinator is configured.
    #[error("network: {message}")]
    Network {
        /// The last transport error.
        message: String,
    },
    /// A bug inside the SDK: a Rust panic caught at the boundary. The call did nothing it could
    /// not undo (every change is stored before it is applied); the device stays usable.
    #[error("internal error (a bug in the Starling SDK): {message}")]
    Internal {
        /// The panic's message.
        message: String,
    },
}

impl StarlingError {
    pub(crate) fn invalid_config(message: impl Into<String>) -> Self {
        Self::InvalidConfig { message: message.into() }
    }

    pub(crate) fn invalid_input(message: impl Into<String>) -> Self {
        Self::InvalidInput { message: message.into() }
    }
}

impl From<StoreError> for StarlingError {
    fn from(e: StoreError) -> Self {
        Self::Storage { message: e.to_string() }
    }
}

impl From<OpenError> for StarlingError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Store(e) => e.into(),
            OpenError::Dir { .. } => Self::Storage { message: e.to_string() },
            e => Self::InvalidConfig { message: e.to_string() },
        }
    }
}

impl From<RecordError> for StarlingError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::NoConsent => Self::NoConsent { message: e.to_string() },
            RecordError::Store(e) => e.into(),
            e => Self::InvalidInput { message: e.to_string() },
        }
    }
}

impl From<SimilarItemsError> for StarlingError {
    fn from(e: SimilarItemsError) -> Self {
        Self::InvalidInput { message: e.to_string() }
    }
}

impl From<RoundError> for StarlingError {
    fn from(e: RoundError) -> Self {
        let message = e.to_string();
        match e {
            RoundError::NoConsent => Self::NoConsent { message },
            RoundError::NotAllowed(_) => Self::NotAllowed { message },
            RoundError::ComeBackLater { after } => Self::ComeBackLater {
                retry_after_ms: after.as_millis().try_into().unwrap_or(u64::MAX),
                message,
            },
            RoundError::Busy => Self::Busy { message },
            _ => Self::Network { message },
        }
    }
}

/// Runs `f`, turning a panic inside it into [`StarlingError::Internal`] (the process goes on; the
/// panic is also logged through `tracing`). Every exported function and method runs in it.
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, StarlingError>) -> Result<T, StarlingError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            tracing::error!(target: "starling_sdk_ffi", %message, "a panic was caught at the FFI boundary");
            Err(StarlingError::Internal { message })
        }
    }
}

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_error_and_the_thread_goes_on() {
        let r: Result<(), _> = guard(|| panic!("boom {}", 42));
        match r {
            Err(StarlingError::Internal { message }) => assert_eq!(message, "boom 42"),
            other => panic!("expected Internal, got {other:?}"),
        }
        assert_eq!(guard(|| Ok(7)).unwrap(), 7);
    }
}
