//! How a client's self-reported weight becomes its aggregation weight.
//!
//! A client reports a weight with its update (for FedAvg, its number of local examples). Nothing
//! proves that number, so the round engine never uses it unbounded: under [`Weighting::Equal`]
//! every accepted update counts 1, under [`Weighting::Examples`] the reported weight counts up to
//! [`RoundConfig::max_weight`](crate::round::RoundConfig::max_weight) (larger claims are
//! **clamped**, not rejected: an honest heavy user still takes part, at the cap), and
//! [`Weighting::Auto`] (the default) is `Equal` whenever the round's plan carries noise (any
//! differential-privacy mode) and `Examples` otherwise. Weights that are not finite, zero or
//! negative are always rejected.

use crate::message::NoiseSettings;

/// The weighting policy of the round engine. See the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Weighting {
    /// `Equal` when the round's plan carries noise (central or local DP), `Examples` otherwise.
    #[default]
    Auto,
    /// Every accepted update has weight 1.
    Equal,
    /// The reported weight, clamped to `max_weight`.
    Examples,
}

impl Weighting {
    /// The policy for a round whose plan adds `noise`: `Auto` resolved, the others as they are.
    pub fn resolve(self, noise: &NoiseSettings) -> Weighting {
        match (self, noise) {
            (Weighting::Auto, NoiseSettings::None) => Weighting::Examples,
            (Weighting::Auto, _) => Weighting::Equal,
            (w, _) => w,
        }
    }

    /// The aggregation weight admitted for a `reported` weight in a round whose plan adds `noise`,
    /// with the cap `max_weight`; `None` when the reported weight is not a positive finite number.
    pub fn admit(self, reported: f32, max_weight: f32, noise: &NoiseSettings) -> Option<f32> {
        if !(reported.is_finite() && reported > 0.0) {
            return None;
        }
        Some(match self.resolve(noise) {
            Weighting::Equal => 1.0,
            _ => reported.min(max_weight),
        })
    }

    /// The name used in configuration files (`auto`, `equal`, `examples`).
    pub fn name(self) -> &'static str {
        match self {
            Weighting::Auto => "auto",
            Weighting::Equal => "equal",
            Weighting::Examples => "examples",
        }
    }

    /// The policy named `name` in a configuration file.
    pub fn from_name(name: &str) -> Option<Weighting> {
        [Weighting::Auto, Weighting::Equal, Weighting::Examples].into_iter().find(|w| w.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admitted_weights() {
        let none = NoiseSettings::None;
        let central = NoiseSettings::Central { multiplier: 1.0 };
        assert_eq!(Weighting::Auto.admit(5.0, 100.0, &none), Some(5.0));
        assert_eq!(Weighting::Auto.admit(1e5, 100.0, &none), Some(100.0));
        assert_eq!(Weighting::Auto.admit(1e5, 100.0, &central), Some(1.0));
        assert_eq!(Weighting::Equal.admit(1e5, 100.0, &none), Some(1.0));
        assert_eq!(Weighting::Examples.admit(1e5, 100.0, &central), Some(100.0));
        for bad in [0.0, -0.0, -3.0, f32::NAN, f32::INFINITY] {
            assert_eq!(Weighting::Equal.admit(bad, 100.0, &none), None);
        }
        for w in [Weighting::Auto, Weighting::Equal, Weighting::Examples] {
            assert_eq!(Weighting::from_name(w.name()), Some(w));
        }
        assert_eq!(Weighting::from_name("max"), None);
    }
}
