//! The round's random k-regular neighbourhood graph (a Harary / circulant graph on a random ring).

use crate::ids::ClientId;
use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use std::collections::BTreeMap;

/// Builds the neighbourhood graph over `members` (deduplicated; the result does not depend on
/// their order): if there are at most `k + 1` members the complete graph; otherwise the members
/// are placed on a ring in a random order drawn from `seed` and each is joined to the `k / 2`
/// nearest on each side (`k` even). Returns every member's neighbours, sorted by id.
///
/// The permutation uses a Fisher-Yates shuffle driven by the ChaCha20 keystream of `seed`, with
/// multiply-shift index reduction (bias below `n / 2^64`, negligible).
pub fn neighbourhood_graph(
    members: &[ClientId],
    k: usize,
    seed: [u8; 32],
) -> BTreeMap<ClientId, Vec<ClientId>> {
    let mut ring: Vec<ClientId> = members.to_vec();
    ring.sort_unstable();
    ring.dedup();
    let n = ring.len();
    if n <= k + 1 {
        return ring.iter().map(|&c| (c, ring.iter().copied().filter(|&o| o != c).collect())).collect();
    }
    let mut cipher = ChaCha20::new(&seed.into(), &[0u8; 12].into());
    for i in (1..n).rev() {
        let mut r = [0u8; 8];
        cipher.apply_keystream(&mut r);
        let j = ((u64::from_le_bytes(r) as u128 * (i as u128 + 1)) >> 64) as usize;
        ring.swap(i, j);
    }
    let half = k / 2;
    let mut graph = BTreeMap::new();
    for (p, &c) in ring.iter().enumerate() {
        let mut ns: Vec<ClientId> =
            (1..=half).flat_map(|d| [ring[(p + d) % n], ring[(p + n - d) % n]]).collect();
        ns.sort_unstable();
        graph.insert(c, ns);
    }
    graph
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_symmetric_and_seeded() {
        let members: Vec<ClientId> = (0..50).map(|i| ClientId(i * 7 + 3)).collect();
        let g = neighbourhood_graph(&members, 8, [4; 32]);
        assert_eq!(g.len(), 50);
        for (c, ns) in &g {
            assert_eq!(ns.len(), 8);
            assert!(!ns.contains(c));
            assert!(ns.windows(2).all(|w| w[0] < w[1]));
            for n in ns {
                assert!(g[n].contains(c), "symmetric");
            }
        }
        let mut rev = members.clone();
        rev.reverse();
        assert_eq!(g, neighbourhood_graph(&rev, 8, [4; 32]));
        assert_ne!(g, neighbourhood_graph(&members, 8, [5; 32]));
        let small = neighbourhood_graph(&members[..9], 8, [4; 32]);
        assert!(small.values().all(|ns| ns.len() == 8));
        let tiny = neighbourhood_graph(&members[..3], 8, [4; 32]);
        assert!(tiny.values().all(|ns| ns.len() == 2));
    }
}
