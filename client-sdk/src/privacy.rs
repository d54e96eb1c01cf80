//! The device's own privacy ledger, kept in its [`Store`]: every round this device contributed to,
//! the bytes it sent, the clip norm and — under local differential privacy — the noise multiplier
//! and the ε this device has spent so far.
//!
//! The accounting itself is `starling_proto::dp::local::DeviceLedger` (each local release is a
//! Gaussian mechanism on this user's data, accounted with q = 1); this module persists it and
//! replays it when the app restarts, so the device's ε never resets.

pub use crate::store::ContributionKind;
use crate::store::{LedgerEntry, Store, StoreError};
use starling_proto::dp::local::{DeviceLedger, LocalRelease};
use starling_proto::dp::{Budget, Delta};

/// Rebuilds the device's ledger from its store. With a `budget`, the ledger refuses releases
/// beyond it ([`DeviceLedger::check`]).
pub fn load(store: &Store, delta: Delta, budget: Option<Budget>) -> Result<DeviceLedger, StoreError> {
    let ledger = match budget {
        Some(b) => DeviceLedger::with_budget(b),
        None => DeviceLedger::new(delta),
    };
    let releases = store.ledger()?.into_iter().filter_map(|e| {
        let sigma = e.noise_multiplier?;
        Some(LocalRelease { round: e.round, clip: e.clip_norm.unwrap_or(0.0), sigma })
    });
    Ok(ledger.replay(releases))
}

/// One contribution to record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Contribution {
    /// The coordinator's round.
    pub round: u64,
    /// When it was sent, ms since the Unix epoch.
    pub at_ms: i64,
    /// Bytes sent for it.
    pub bytes_sent: u64,
    /// The clip norm applied, if any.
    pub clip_norm: Option<f64>,
    /// The local-DP release, if the update was noised on the device.
    pub release: Option<LocalRelease>,
    /// A model update or an evaluation report.
    pub kind: ContributionKind,
}

/// Records a contribution durably, then in `ledger`; returns the ε spent after it (0 when no
/// local noise was ever added, ∞ once a release without noise was made under local DP).
pub fn record(store: &Store, ledger: &mut DeviceLedger, c: Contribution) -> Result<f64, StoreError> {
    let epsilon = match c.release {
        Some(r) => {
            let mut after = ledger.clone();
            Some(after.record(r))
        }
        None => None,
    };
    store.append_ledger(&LedgerEntry {
        round: c.round,
        at_ms: c.at_ms,
        bytes_sent: c.bytes_sent,
        clip_norm: c.clip_norm.or(c.release.map(|r| r.clip)),
        noise_multiplier: c.release.map(|r| r.sigma),
        epsilon: epsilon.filter(|e| e.is_finite()),
        kind: c.kind,
    })?;
    if let Some(r) = c.release {
        ledger.record(r);
    }
    Ok(ledger.epsilon())
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_proto::dp::Epsilon;

    #[test]
    fn the_device_ledger_survives_a_restart_and_keeps_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sdk.db");
        let delta = Delta::new(1e-5).unwrap();
        let budget = Budget { epsilon: Epsilon::new(6.0).unwrap(), delta };
        let spent;
        {
            let store = Store::open(&path).unwrap();
            let mut l = load(&store, delta, Some(budget)).unwrap();
            assert_eq!(l.epsilon(), 0.0);
            // A central-DP contribution (clipped, not noised here) costs the device nothing locally.
            let plain = Contribution {
                round: 1,
                at_ms: 1,
                bytes_sent: 100,
                clip_norm: Some(0.5),
                release: None,
                kind: ContributionKind::Update,
            };
            assert_eq!(record(&store, &mut l, plain).unwrap(), 0.0);
            let mut round = 2;
            while l.check(4.0).is_ok() {
                let release = Some(LocalRelease { round, clip: 0.5, sigma: 4.0 });
                let kind = ContributionKind::Update;
                let c = Contribution {
                    round,
                    at_ms: round as i64,
                    bytes_sent: 1000,
                    clip_norm: None,
                    release,
                    kind,
                };
                record(&store, &mut l, c).unwrap();
                round += 1;
            }
            spent = l.epsilon();
            assert!(spent > 0.0 && spent <= 6.0, "{spent}");
            assert_eq!(store.ledger().unwrap().len() as u64, round - 1);
        }
        let store = Store::open(&path).unwrap();
        let l = load(&store, delta, Some(budget)).unwrap();
        assert_eq!(l.epsilon(), spent, "a restart does not reset the device's epsilon");
        assert!(l.check(4.0).is_err(), "and the budget still holds");
        let last = store.ledger().unwrap().pop().unwrap();
        assert_eq!(last.epsilon, Some(spent));
    }
}
