//! The randomised Hadamard rotation `x ↦ H·D·x / √p` used before quantisation.
//!
//! `p` is a power of two, `H` the `p × p` Walsh–Hadamard matrix (entries ±1) and `D` a diagonal of
//! independent random signs drawn from ChaCha8 seeded with the round's `rotation_seed`, so every
//! device and the coordinator derive the same `D`. `H/√p` is orthogonal and symmetric, so the
//! rotation preserves the L2 norm and its inverse is `x ↦ D·H·x / √p`. Both run in place in
//! `O(p log p)` with the fast Walsh–Hadamard transform.
//!
//! Why rotate: clipping bounds the L2 norm, but the modulus has to hold every coordinate; after a
//! random rotation the mass of a spiky update is spread over all coordinates, so (in expectation)
//! the coordinates are about `C/√p` instead of up to `C`. The overflow bound here is still the
//! deterministic `|x_i| ≤ ‖x‖₂ ≤ C`, so rotation does not change the scale; it makes the
//! stochastic rounding error isotropic (it spreads over the whole model after the inverse).

use rand::{Rng, SeedableRng};

/// The rotation's random signs: bit `i` of the ChaCha8 stream seeded from `seed` set means `D_ii = −1`.
fn signs(seed: u64, len: usize) -> Vec<u64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len.div_ceil(64)).map(|_| rng.next_u64()).collect()
}

fn apply_signs(x: &mut [f64], seed: u64) {
    let words = signs(seed, x.len());
    for (chunk, word) in x.chunks_mut(64).zip(words) {
        for (j, v) in chunk.iter_mut().enumerate() {
            if (word >> j) & 1 == 1 {
                *v = -*v;
            }
        }
    }
}

/// In-place unnormalised fast Walsh–Hadamard transform. `x.len()` must be a power of two (or 0).
pub(crate) fn fwht(x: &mut [f64]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for block in x.chunks_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (s, d) = (*u + *v, *u - *v);
                *u = s;
                *v = d;
            }
        }
        h *= 2;
    }
}

/// Rotates `x` in place: `x ← H·D·x / √p`. `x.len()` must be a power of two; callers guarantee
/// it (the plan's `padded_dim` is validated).
pub fn rotate(x: &mut [f64], seed: u64) {
    apply_signs(x, seed);
    fwht(x);
    normalise(x);
}

/// Undoes [`rotate`] in place: `x ← D·H·x / √p`.
pub fn unrotate(x: &mut [f64], seed: u64) {
    fwht(x);
    normalise(x);
    apply_signs(x, seed);
}

fn normalise(x: &mut [f64]) {
    if x.is_empty() {
        return;
    }
    let f = 1.0 / (x.len() as f64).sqrt();
    for v in x {
        *v *= f;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;

    fn norm(x: &[f64]) -> f64 {
        x.iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    #[test]
    fn distributed_rotation_preserves_l2_and_inverts_exactly() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for p in [1usize, 2, 8, 64, 1024, 4096] {
            let x: Vec<f64> = (0..p).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
            let mut y = x.clone();
            rotate(&mut y, 42);
            assert!((norm(&y) - norm(&x)).abs() <= 1e-12 * norm(&x).max(1.0), "p {p}");
            if p >= 64 {
                assert_ne!(x, y, "the rotation moves things");
            }
            unrotate(&mut y, 42);
            let err = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(err < 1e-12, "p {p}: inverse error {err}");
        }
    }

    #[test]
    fn distributed_rotation_spreads_a_spike_and_depends_on_the_seed() {
        let p = 1024;
        let mut x = vec![0.0; p];
        x[3] = 1.0;
        let mut a = x.clone();
        rotate(&mut a, 1);
        let flat = 1.0 / (p as f64).sqrt();
        assert!(a.iter().all(|v| (v.abs() - flat).abs() < 1e-12), "a spike becomes ±1/√p everywhere");
        // A dense vector's image depends on all the signs, hence on the seed.
        let y: Vec<f64> = (0..p).map(|i| (i % 7) as f64 - 3.0).collect();
        let (mut a, mut b) = (y.clone(), y);
        rotate(&mut a, 1);
        rotate(&mut b, 2);
        assert_ne!(a, b);
    }
}
