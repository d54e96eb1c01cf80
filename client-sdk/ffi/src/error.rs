//! The one error type every foreign call can raise, and the guard that turns a Rust panic into it.
//!
//! Each variant becomes a typed exception in the host language (`StarlingException.NoConsent`
//! in Kotlin, `StarlingError.NoConsent` in Swift and Python); the C ABI returns the matching
//! [`crate::c_api::StarlingStatus`] and keeps the message for `starling_last_error()`.

use starling_sdk::client::RoundError;
use starling_sdk::device::{OpenError, RecordError, SimilarItemsError};
use starling_sdk::store::StoreError;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Why a call failed. Every variant carries a human-readable `detail` (English, for logs; not for
/// the user interface): read it as `e.detail` in every language. The field is not called
/// `message`: in Kotlin that would clash with `Throwable.message` (mozilla/uniffi-rs#1434). The
/// exception's own message (Kotlin `message`, Python `str(e)`) is UniFFI's `detail=…` rendering.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[non_exhaustive]
pub enum StarlingError {
    /// The configuration is unusable (unknown model family, zero items, bad privacy settings, an
    /// unreadable CA certificate, a malformed JSON configuration in the C ABI).
    #[error("{detail}")]
    InvalidConfig {
        /// What is wrong.
        detail: String,
    },
    /// The on-device database could not be opened or written: foreign, corrupt, too new, wrong
    /// storage key, I/O. Nothing was changed.
    #[error("{detail}")]
    Storage {
        /// What SQLite or the file system reported.
        detail: String,
    },
    /// The user has not consented to what the call needs (recording needs personalization or
    /// training; a round needs training). Nothing was stored or sent.
    #[error("{detail}")]
    NoConsent {
        /// Which consent is missing.
        detail: String,
    },
    /// The event or argument is invalid: unknown item, rating outside 1–5, context out of range,
    /// a time too far in the future or older than the retention period.
    #[error("{detail}")]
    InvalidInput {
        /// What is wrong.
        detail: String,
    },
    /// The device's conditions (charging, network, idle, battery) do not allow training now.
    #[error("{detail}")]
    NotAllowed {
        /// Which condition failed.
        detail: String,
    },
    /// The coordinator asked the device to come back later.
    #[error("{detail}")]
    ComeBackLater {
        /// How long to wait, in milliseconds.
        retry_after_ms: u64,
        /// The coordinator's words, for logs.
        detail: String,
    },
    /// Another round is already running on this device.
    #[error("{detail}")]
    Busy {
        /// What is running.
        detail: String,
    },
    /// The coordinator could not be reached, or no coordinator is configured.
    #[error("{detail}")]
    Network {
        /// The last transport error.
        detail: String,
    },
    /// A bug inside the SDK: a Rust panic caught at the boundary. The call did nothing it could
    /// not undo (every change is stored before it is applied); the device stays usable.
    #[error("{detail}")]
    Internal {
        /// The panic's message.
        detail: String,
    },
}

impl StarlingError {
    pub(crate) fn invalid_config(message: impl Into<String>) -> Self {
        Self::InvalidConfig { detail: message.into() }
    }

    pub(crate) fn invalid_input(message: impl Into<String>) -> Self {
        Self::InvalidInput { detail: message.into() }
    }
}

impl From<StoreError> for StarlingError {
    fn from(e: StoreError) -> Self {
        Self::Storage { detail: e.to_string() }
    }
}

impl From<OpenError> for StarlingError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Store(e) => e.into(),
            OpenError::Dir { .. } => Self::Storage { detail: e.to_string() },
            e => Self::InvalidConfig { detail: e.to_string() },
        }
    }
}

impl From<RecordError> for StarlingError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::NoConsent => Self::NoConsent { detail: e.to_string() },
            RecordError::Store(e) => e.into(),
            e => Self::InvalidInput { detail: e.to_string() },
        }
    }
}

impl From<SimilarItemsError> for StarlingError {
    fn from(e: SimilarItemsError) -> Self {
        Self::InvalidInput { detail: e.to_string() }
    }
}

impl From<RoundError> for StarlingError {
    fn from(e: RoundError) -> Self {
        let detail = e.to_string();
        match e {
            RoundError::NoConsent => Self::NoConsent { detail },
            RoundError::NotAllowed(_) => Self::NotAllowed { detail },
            RoundError::ComeBackLater { after } => Self::ComeBackLater {
                retry_after_ms: after.as_millis().try_into().unwrap_or(u64::MAX),
                detail,
            },
            RoundError::Busy => Self::Busy { detail },
            _ => Self::Network { detail },
        }
    }
}

/// Runs `f`, turning a panic inside it into `StarlingError::Internal` (the process goes on; the
/// panic is also logged through `tracing`). Every exported function and method that can fail runs
/// in it; the infallible ones (`scheduler_running`, `clear_logger`, `context_at`, `sdk_version`)
/// only read or swap a value and have no panic path of their own.
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, StarlingError>) -> Result<T, StarlingError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let detail = panic_message(payload.as_ref());
            tracing::error!(target: "starling_sdk_ffi", panic = %detail, "a panic was caught at the FFI boundary");
            Err(StarlingError::Internal { detail })
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
            Err(StarlingError::Internal { detail }) => assert_eq!(detail, "boom 42"),
            other => panic!("expected Internal, got {other:?}"),
        }
        assert_eq!(guard(|| Ok(7)).unwrap(), 7);
    }
}
