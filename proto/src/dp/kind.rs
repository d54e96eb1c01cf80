//! The choice of accountant: [`AccountantKind::Pld`] (the default; tight) or
//! [`AccountantKind::Rdp`] (Rényi DP; looser, kept for comparison and continuity), and
//! [`Accountant`], which composes mechanisms with the chosen one.

use super::accountant::{CalibrationError, Mechanism, RdpAccountant};
use super::params::{Delta, Epsilon, NoiseMultiplier, SamplingRate};
use super::pld::PldAccountant;
use serde::{Deserialize, Serialize};

/// Which accountant turns the recorded rounds into ε.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountantKind {
    /// Privacy-loss distributions ([`super::pld`]): a tight upper bound.
    #[default]
    Pld,
    /// Rényi DP ([`super::accountant`]): an upper bound, often several times looser.
    Rdp,
}

/// An accountant name that is neither `pld` nor `rdp`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown accountant {0:?}: expected \"pld\" or \"rdp\"")]
pub struct UnknownAccountant(pub String);

impl AccountantKind {
    /// Every kind.
    pub const ALL: [AccountantKind; 2] = [AccountantKind::Pld, AccountantKind::Rdp];

    /// The lowercase name (as in serde and on the command line).
    pub fn name(self) -> &'static str {
        match self {
            AccountantKind::Pld => "pld",
            AccountantKind::Rdp => "rdp",
        }
    }

    /// ε at δ of `rounds` rounds of rate `q` and multiplier `sigma`, with the best RDP order
    /// (RDP only).
    pub fn epsilon(
        self,
        q: SamplingRate,
        sigma: NoiseMultiplier,
        rounds: u64,
        delta: Delta,
    ) -> (f64, Option<f64>) {
        let mut acc = Accountant::new(self);
        acc.compose(&Mechanism { q, sigma, steps: rounds });
        acc.epsilon(delta)
    }

    /// The smallest σ (to 0.01 %) for which `rounds` rounds at rate `q` stay within `target`.
    pub fn calibrate_sigma(
        self,
        q: SamplingRate,
        rounds: u64,
        delta: Delta,
        target: Epsilon,
    ) -> Result<f64, CalibrationError> {
        match self {
            AccountantKind::Pld => super::pld::calibrate_sigma(q, rounds, delta, target),
            AccountantKind::Rdp => super::accountant::calibrate_sigma(q, rounds, delta, target),
        }
    }
}

impl std::fmt::Display for AccountantKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AccountantKind {
    type Err = UnknownAccountant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| UnknownAccountant(s.to_owned()))
    }
}

/// An accountant of either kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Accountant {
    /// The PLD accountant.
    Pld(PldAccountant),
    /// The RDP accountant.
    Rdp(RdpAccountant),
}

impl Accountant {
    /// An empty accountant of `kind`.
    pub fn new(kind: AccountantKind) -> Self {
        match kind {
            AccountantKind::Pld => Accountant::Pld(PldAccountant::new()),
            AccountantKind::Rdp => Accountant::Rdp(RdpAccountant::default()),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> AccountantKind {
        match self {
            Accountant::Pld(_) => AccountantKind::Pld,
            Accountant::Rdp(_) => AccountantKind::Rdp,
        }
    }

    /// Records `m`.
    pub fn compose(&mut self, m: &Mechanism) {
        match self {
            Accountant::Pld(a) => a.compose(m),
            Accountant::Rdp(a) => a.compose(m),
        }
    }

    /// ε spent at δ, with the best RDP order (RDP only).
    pub fn epsilon(&self, delta: Delta) -> (f64, Option<f64>) {
        match self {
            Accountant::Pld(a) => (a.epsilon(delta), None),
            Accountant::Rdp(a) => {
                let (eps, order) = a.epsilon(delta);
                (eps, order.is_finite().then_some(order))
            }
        }
    }

    /// ε at δ if `m` were recorded too (the accountant is unchanged).
    pub fn epsilon_with(&self, m: &Mechanism, delta: Delta) -> f64 {
        match self {
            Accountant::Pld(a) => a.epsilon_with(m, delta),
            Accountant::Rdp(a) => a.epsilon_with(m, delta),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_from_str() {
        assert_eq!(AccountantKind::default(), AccountantKind::Pld);
        for k in AccountantKind::ALL {
            assert_eq!(k.name().parse::<AccountantKind>().unwrap(), k);
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.name()));
            assert_eq!(serde_json::from_str::<AccountantKind>(&json).unwrap(), k);
            assert_eq!(Accountant::new(k).kind(), k);
        }
        assert_eq!("PLD".parse::<AccountantKind>(), Err(UnknownAccountant("PLD".into())));
        assert!(serde_json::from_str::<AccountantKind>("\"moments\"").is_err());
    }

    #[test]
    fn both_kinds_answer_and_pld_is_the_tighter() {
        let (q, s, d) =
            (SamplingRate::new(0.01).unwrap(), NoiseMultiplier::new(1.1).unwrap(), Delta::new(1e-5).unwrap());
        let (pld, order) = AccountantKind::Pld.epsilon(q, s, 1000, d);
        assert_eq!(order, None);
        let (rdp, order) = AccountantKind::Rdp.epsilon(q, s, 1000, d);
        assert!(order.is_some_and(|o| o > 1.0));
        assert!(pld < rdp, "pld {pld} rdp {rdp}");
    }
}
