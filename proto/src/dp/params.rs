//! Validated privacy settings: each newtype refuses values that make no sense, with a clear error.

use serde::{Deserialize, Serialize};

/// Why a privacy setting was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ParamError {
    /// The clip norm must be a positive finite number.
    #[error("clip norm must be positive and finite, got {0}")]
    ClipNorm(f64),
    /// The noise multiplier must be a non-negative finite number.
    #[error("noise multiplier must be >= 0 and finite, got {0}")]
    NoiseMultiplier(f64),
    /// δ must lie strictly between 0 and 1.
    #[error("delta must be in (0, 1), got {0}")]
    Delta(f64),
    /// ε must be a positive finite number.
    #[error("epsilon must be positive and finite, got {0}")]
    Epsilon(f64),
    /// The sampling rate must lie in (0, 1].
    #[error("sampling rate must be in (0, 1], got {0}")]
    SamplingRate(f64),
    /// The target quantile of adaptive clipping must lie in (0, 1).
    #[error("target quantile must be in (0, 1), got {0}")]
    Quantile(f64),
}

macro_rules! newtype {
    ($(#[$doc:meta])* $name:ident, $check:expr, $err:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
        #[serde(try_from = "f64", into = "f64")]
        pub struct $name(f64);

        impl $name {
            /// Validates `v`.
            pub fn new(v: f64) -> Result<Self, ParamError> {
                let ok: fn(f64) -> bool = $check;
                if ok(v) { Ok(Self(v)) } else { Err(ParamError::$err(v)) }
            }

            /// The value.
            pub fn get(self) -> f64 {
                self.0
            }
        }

        impl TryFrom<f64> for $name {
            type Error = ParamError;
            fn try_from(v: f64) -> Result<Self, ParamError> {
                Self::new(v)
            }
        }

        impl From<$name> for f64 {
            fn from(v: $name) -> f64 {
                v.0
            }
        }
    };
}

newtype!(
    /// The L2 norm every update is clipped to (C > 0).
    ClipNorm,
    |v| v.is_finite() && v > 0.0,
    ClipNorm
);
newtype!(
    /// σ: noise standard deviation in units of the L2 sensitivity (σ ≥ 0; 0 = no noise, no privacy).
    NoiseMultiplier,
    |v| v.is_finite() && v >= 0.0,
    NoiseMultiplier
);
newtype!(
    /// δ of (ε, δ)-DP, in (0, 1); choose it well below 1/(number of users).
    Delta,
    |v| v > 0.0 && v < 1.0,
    Delta
);
newtype!(
    /// ε of (ε, δ)-DP (> 0).
    Epsilon,
    |v| v.is_finite() && v > 0.0,
    Epsilon
);
newtype!(
    /// q: the probability that a given user takes part in a round, in (0, 1].
    SamplingRate,
    |v| v > 0.0 && v <= 1.0,
    SamplingRate
);
impl SamplingRate {
    /// Full participation, `q = 1`.
    pub const FULL: Self = Self(1.0);
}

newtype!(
    /// γ: the norm quantile adaptive clipping tracks, in (0, 1).
    Quantile,
    |v| v > 0.0 && v < 1.0,
    Quantile
);

/// An (ε, δ) privacy budget.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// The most ε that may be spent.
    pub epsilon: Epsilon,
    /// The δ at which ε is measured.
    pub delta: Delta,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newtypes_refuse_nonsense() {
        assert!(ClipNorm::new(1.0).is_ok());
        assert_eq!(ClipNorm::new(0.0), Err(ParamError::ClipNorm(0.0)));
        assert!(ClipNorm::new(f64::INFINITY).is_err());
        assert!(NoiseMultiplier::new(0.0).is_ok());
        assert!(NoiseMultiplier::new(-0.1).is_err());
        assert!(Delta::new(1e-5).is_ok());
        assert!(Delta::new(0.0).is_err() && Delta::new(1.0).is_err() && Delta::new(f64::NAN).is_err());
        assert!(Epsilon::new(8.0).is_ok() && Epsilon::new(0.0).is_err());
        assert!(
            SamplingRate::new(1.0).is_ok()
                && SamplingRate::new(0.0).is_err()
                && SamplingRate::new(1.5).is_err()
        );
        assert!(Quantile::new(0.5).is_ok() && Quantile::new(1.0).is_err());
        let json = serde_json::to_string(&Delta::new(1e-5).unwrap()).unwrap();
        assert_eq!(serde_json::from_str::<Delta>(&json).unwrap().get(), 1e-5);
        assert!(serde_json::from_str::<Delta>("2.0").is_err(), "deserialising validates too");
    }
}
