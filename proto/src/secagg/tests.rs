//! End-to-end tests of the protocol: correctness under dropouts, a curious coordinator, and
//! adversarial messages. Deterministic seeds throughout.
//!
//! Parameter choice: a dropped client's secrets need `t` live neighbours, so with dropout rate `p`
//! per phase we need `k (1 - p)` comfortably above `t > k / 2`. For n = 30 we take k = 28, t = 15
//! (30% dropout leaves about 20 of 28, well above 15). For n = 200 with k = 16, t = 9, 30% dropout
//! after masked input leaves on average 11.2 of 16 live neighbours and `P[Bin(16, 0.7) < 9] ≈ 2.6%`
//! per client, so such a round usually aborts cleanly (tested as "exact or clean abort").

use super::*;
use crate::ids::{ClientId, ModelVersion, RoundId};
use std::collections::{BTreeMap, BTreeSet};

const ROUND: RoundId = RoundId(7);
const BASE: ModelVersion = ModelVersion(3);

/// SplitMix64, for test data only.
pub(super) struct Rng(u64);
impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(super) fn seed(&mut self) -> [u8; 32] {
        let mut s = [0u8; 32];
        for c in s.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        s
    }
}

pub(super) fn params(k: u32, t: u32, bits: u32, len: u32) -> SecAggParams {
    SecAggParams { neighbours: k, threshold: t, bits, len }
}

/// Who drops out, and when: after key advertisement, after share exchange, after masked input.
#[derive(Clone, Default)]
pub(super) struct Dropouts {
    pub after_keys: BTreeSet<ClientId>,
    pub after_shares: BTreeSet<ClientId>,
    pub after_masked: BTreeSet<ClientId>,
}

impl Dropouts {
    fn random(n: usize, rate: f64, phase: usize, rng: &mut Rng) -> Self {
        let mut d = Self::default();
        let set = match phase {
            0 => &mut d.after_keys,
            1 => &mut d.after_shares,
            _ => &mut d.after_masked,
        };
        let want = (n as f64 * rate).round() as usize;
        while set.len() < want {
            set.insert(ClientId(rng.next() % n as u64));
        }
        d
    }
}

/// A tamper hook: sees (and may change) every client message before the server does.
pub(super) type Tamper<'a> = &'a mut dyn FnMut(ClientId, &mut SecAggClientMessage);

pub(super) struct Run {
    pub result: Result<SecAggOutput, SecAggAbort>,
    pub inputs: BTreeMap<ClientId, Vec<u32>>,
    /// Everything the server received (a curious coordinator's view).
    pub received: Vec<(ClientId, SecAggClientMessage)>,
    pub server: SecAggServer,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("result", &self.result.as_ref().map(|o| o.contributors.len()))
            .field("server", &self.server)
            .finish()
    }
}

impl Run {
    pub fn expected_sum(&self, out: &SecAggOutput, p: &SecAggParams) -> Vec<u32> {
        let mut sum = vec![0u32; p.len as usize];
        for c in &out.contributors {
            for (s, x) in sum.iter_mut().zip(&self.inputs[c]) {
                *s = s.wrapping_add(*x) & p.mask();
            }
        }
        sum
    }
}

/// Runs a full round over clients `0..n`.
pub(super) fn run(
    n: usize,
    p: SecAggParams,
    min_survivors: usize,
    drops: &Dropouts,
    seed: u64,
    tamper: Tamper<'_>,
) -> Run {
    let mut rng = Rng(seed);
    let ids: Vec<ClientId> = (0..n as u64).map(ClientId).collect();
    let mut server = SecAggServer::new(ROUND, BASE, p, ids.clone(), min_survivors, rng.seed()).unwrap();
    let mut clients = BTreeMap::new();
    let mut inputs = BTreeMap::new();
    let mut received = Vec::new();
    let mut send = |server: &mut SecAggServer, from: ClientId, mut m: SecAggClientMessage| {
        tamper(from, &mut m);
        received.push((from, m.clone()));
        let _ = server.handle_message(from, m);
    };
    for &c in &ids {
        let (client, advert) = SecAggClient::new(ROUND, c, p, SecAggPolicy::default(), rng.seed()).unwrap();
        clients.insert(c, client);
        let input: Vec<u32> = (0..p.len).map(|_| rng.next() as u32 & p.mask()).collect();
        inputs.insert(c, input);
        send(&mut server, c, SecAggClientMessage::KeyAdvert(advert));
    }
    let phases = [&drops.after_keys, &drops.after_shares, &drops.after_masked];
    let mut result = Ok(());
    for drop in phases {
        result = server.close_phase();
        if result.is_err() {
            break;
        }
        for c in drop {
            server.handle_dropout(*c);
        }
        while let Some((to, msg)) = server.poll_transmit() {
            if drop.contains(&to) {
                continue; // Clients dropped earlier are no longer addressed by the server.
            }
            let client = clients.get_mut(&to).unwrap();
            let reply = match msg {
                SecAggServerMessage::Neighbourhood(m) => {
                    client.handle_neighbourhood(m).map(SecAggClientMessage::Shares)
                }
                SecAggServerMessage::RoutedShares(m) => client.handle_routed_shares(m).and_then(|()| {
                    assert!(client.ready_to_mask());
                    client.mask(BASE, inputs[&to].clone()).map(SecAggClientMessage::Masked)
                }),
                SecAggServerMessage::UnmaskRequest(m) => {
                    client.handle_unmask(m).map(SecAggClientMessage::Unmask)
                }
            };
            if let Ok(reply) = reply {
                send(&mut server, to, reply);
            }
        }
    }
    let result = match result {
        Ok(()) => server.close_phase().map(|()| server.take_result().expect("done")),
        Err(e) => Err(e),
    };
    Run { result, inputs, received, server }
}

fn no_tamper() -> impl FnMut(ClientId, &mut SecAggClientMessage) {
    |_, _| {}
}

fn check_exact(n: usize, p: SecAggParams, drops: &Dropouts, seed: u64) -> Run {
    let r = run(n, p, n / 2, drops, seed, &mut no_tamper());
    let out = r.result.clone().unwrap_or_else(|e| panic!("n={n} {p:?}: aborted: {e}"));
    assert_eq!(out.sum, r.expected_sum(&out, &p));
    let gone: BTreeSet<ClientId> = drops.after_keys.union(&drops.after_shares).copied().collect();
    for c in &out.contributors {
        assert!(!gone.contains(c), "{c} dropped before masking but counted");
    }
    for c in &drops.after_masked {
        assert!(out.contributors.contains(c), "{c} sent its masked input and must count");
    }
    r
}

mod adversarial;
mod timing;

#[test]
fn sum_is_exact_under_dropouts_n30() {
    let mut rng = Rng(1);
    for bits in [32, 20] {
        let p = params(28, 15, bits, 1000);
        check_exact(30, p, &Dropouts::default(), rng.next());
        for rate in [0.1, 0.3] {
            for phase in 0..3 {
                let drops = Dropouts::random(30, rate, phase, &mut rng);
                let r = check_exact(30, p, &drops, rng.next());
                let out = r.result.unwrap();
                let expect_n = 30 - drops.after_keys.len() - drops.after_shares.len();
                assert_eq!(out.contributors.len(), expect_n, "bits {bits} rate {rate} phase {phase}");
            }
        }
    }
}

#[test]
fn sum_is_exact_under_dropouts_n200_k16() {
    let mut rng = Rng(2);
    for bits in [32, 20] {
        let p = params(16, 9, bits, 200);
        check_exact(200, p, &Dropouts::default(), rng.next());
        for phase in 0..3 {
            check_exact(200, p, &Dropouts::random(200, 0.1, phase, &mut rng), rng.next());
            let drops = Dropouts::random(200, 0.3, phase, &mut rng);
            let r = run(200, p, 100, &drops, rng.next(), &mut no_tamper());
            match &r.result {
                Ok(out) => assert_eq!(out.sum, r.expected_sum(out, &p)),
                // Clients left with fewer than t live neighbours either get pruned from U2 (which
                // on a ring can cascade) or make the unmask impossible: a clean abort.
                Err(e) => assert!(
                    matches!(e, SecAggAbort::NotEnoughShares { .. } | SecAggAbort::TooFewSurvivors { .. }),
                    "phase {phase}: {e}"
                ),
            }
        }
    }
}

#[test]
fn all_dropouts_combined_n30() {
    let mut rng = Rng(3);
    let p = params(28, 15, 20, 300);
    let mut drops = Dropouts::random(30, 0.1, 0, &mut rng);
    drops.after_shares = Dropouts::random(30, 0.1, 1, &mut rng).after_shares;
    drops.after_masked = Dropouts::random(30, 0.1, 2, &mut rng).after_masked;
    check_exact(30, p, &drops, 9);
}

#[test]
fn small_cohort_uses_complete_graph() {
    // 5 clients, k = 8: complete graph of degree 4, t_eff = max(3, ceil(5 * 4 / 8)) = 3.
    let p = params(8, 5, 32, 64);
    assert_eq!(p.threshold_for(4), 3);
    let mut drops = Dropouts::default();
    drops.after_masked.insert(ClientId(2));
    check_exact(5, p, &drops, 4);
}

/// Chi-square statistic of byte values against uniform.
fn chi2_bytes(words: &[u32], bytes_per_word: usize) -> f64 {
    let mut counts = [0u64; 256];
    for w in words {
        for b in &w.to_le_bytes()[..bytes_per_word] {
            counts[*b as usize] += 1;
        }
    }
    let total: u64 = counts.iter().sum();
    let e = total as f64 / 256.0;
    counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum()
}

#[test]
fn curious_coordinator_sees_uniform_masked_vectors() {
    for (bits, bytes) in [(32u32, 4usize), (20, 2)] {
        let p = params(4, 3, bits, 20_000);
        let r = run(6, p, 3, &Dropouts::default(), 11, &mut no_tamper());
        let masked: Vec<&Vec<u32>> = r
            .received
            .iter()
            .filter_map(|(_, m)| match m {
                SecAggClientMessage::Masked(m) => Some(&m.masked),
                _ => None,
            })
            .collect();
        assert_eq!(masked.len(), 6);
        // Masking is additive, so client 0's masked vector for a constant input x is
        // y - x_0 + x. Whether x is all zeros or all ones, what the server sees is uniform.
        for flip in [false, true] {
            let x = if flip { p.mask() } else { 0 };
            // The masked vector of client 0 for a constant input: re-run its masking with x.
            let shifted: Vec<u32> = masked[0]
                .iter()
                .zip(&r.inputs[&ClientId(0)])
                .map(|(y, x0)| y.wrapping_sub(*x0).wrapping_add(x) & p.mask())
                .collect();
            // 255 degrees of freedom: p = 0.001 critical value ≈ 330.
            let chi2 = chi2_bytes(&shifted, bytes);
            assert!(chi2 < 330.0, "bits {bits} flip {flip}: chi2 = {chi2}");
            // No correlation with the input: the mask makes low bytes of y and x independent.
            let agree = shifted.iter().filter(|y| (**y & 0xff) == (x & 0xff)).count() as f64;
            assert!((agree / shifted.len() as f64) < 0.01);
        }
    }
}
