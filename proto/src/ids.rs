//! Identifier newtypes shared by every message and state machine.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// A client (device installation), assigned at enrollment.
    ClientId,
    "client-"
);
id_type!(
    /// A training round; increases by one for each round the coordinator starts.
    RoundId,
    "round-"
);
id_type!(
    /// A version of the global model; increases by one for each committed round.
    ModelVersion,
    "v"
);

impl ModelVersion {
    /// The version after this one.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl RoundId {
    /// The round after this one.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}
