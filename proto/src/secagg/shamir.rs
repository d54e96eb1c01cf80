//! Shamir secret sharing of 32-byte secrets over GF(2^8), byte by byte.
//!
//! Field arithmetic is constant-time: multiplication is a bitwise carry-less multiply with masked
//! reduction by the AES polynomial `x^8 + x^4 + x^3 + x + 1`, and inversion is the fixed
//! exponentiation `a^254`; there are no secret-indexed table lookups and no secret-dependent
//! branches. The x-coordinates are public (`1..=255`).
//!
//! A secret split with threshold `t` lives in the constant term of 32 independent random
//! polynomials of degree `t - 1`; any `t` shares determine it, any `t - 1` shares are consistent
//! with every secret.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::{Zeroize, Zeroizing};

/// One share: the evaluations at `x` of the 32 byte-polynomials.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The x-coordinate, `1..=255` (0 would be the secret itself).
    pub x: u8,
    /// The 32 evaluations.
    pub y: [u8; 32],
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Share").field("x", &self.x).field("y", &"<redacted>").finish()
    }
}

impl Zeroize for Share {
    fn zeroize(&mut self) {
        self.x.zeroize();
        self.y.zeroize();
    }
}

/// Why a split or a reconstruction was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShamirError {
    /// Two shares have the same x-coordinate.
    #[error("two shares have x = {0}")]
    DuplicateX(u8),
    /// Fewer shares than the threshold.
    #[error("{got} shares, threshold {threshold}")]
    NotEnoughShares {
        /// Shares given.
        got: usize,
        /// Shares needed.
        threshold: usize,
    },
    /// Threshold zero, or above the number of shares to create.
    #[error("threshold must be in 1..=n, got {threshold} for n = {n}")]
    Threshold {
        /// Requested threshold.
        threshold: usize,
        /// Requested share count.
        n: usize,
    },
    /// More than 255 shares requested.
    #[error("at most 255 shares, got {0}")]
    TooManyShares(usize),
    /// A share has x = 0.
    #[error("share with x = 0")]
    ZeroX,
}

/// Multiplication in GF(2^8) (AES polynomial), constant-time.
#[inline]
pub(crate) fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    for _ in 0..8 {
        p ^= a & 0u8.wrapping_sub(b & 1);
        let hi = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (0x1b & hi);
        b >>= 1;
    }
    p
}

/// Inverse in GF(2^8) as `a^254` (maps 0 to 0), constant-time.
#[inline]
pub(crate) fn gf_inv(a: u8) -> u8 {
    let mut x = gf_mul(a, a); // a^2
    let mut r = x;
    for _ in 0..6 {
        x = gf_mul(x, x);
        r = gf_mul(r, x);
    }
    r // a^(2+4+…+128) = a^254
}

/// Splits `secret` into `n` shares (x = 1..=n), any `threshold` of which reconstruct it.
/// The polynomial coefficients are the ChaCha20 keystream of `seed`: use a fresh uniformly
/// random seed for every split.
pub fn split(
    secret: &[u8; 32],
    threshold: usize,
    n: usize,
    seed: [u8; 32],
) -> Result<Vec<Share>, ShamirError> {
    if n > 255 {
        return Err(ShamirError::TooManyShares(n));
    }
    if threshold == 0 || threshold > n {
        return Err(ShamirError::Threshold { threshold, n });
    }
    // coeffs[d * 32 + j]: coefficient of x^(d+1) of byte j's polynomial.
    let mut coeffs = Zeroizing::new(vec![0u8; (threshold - 1) * 32]);
    let mut seed = Zeroizing::new(seed);
    ChaCha20::new(&(*seed).into(), &[0u8; 12].into()).apply_keystream(&mut coeffs);
    seed.zeroize();
    let shares = (1..=n)
        .map(|x| {
            let x = x as u8;
            let mut y = [0u8; 32];
            for (j, yj) in y.iter_mut().enumerate() {
                // Horner from the highest coefficient down to the secret.
                let mut acc = 0u8;
                for d in (0..threshold - 1).rev() {
                    acc = gf_mul(acc, x) ^ coeffs[d * 32 + j];
                }
                *yj = gf_mul(acc, x) ^ secret[j];
            }
            Share { x, y }
        })
        .collect();
    Ok(shares)
}

fn check_xs(shares: &[Share]) -> Result<(), ShamirError> {
    let mut seen = [false; 256];
    for s in shares {
        if s.x == 0 {
            return Err(ShamirError::ZeroX);
        }
        if std::mem::replace(&mut seen[s.x as usize], true) {
            return Err(ShamirError::DuplicateX(s.x));
        }
    }
    Ok(())
}

/// Evaluates at `x0` the polynomial through `points` (distinct, nonzero x; not checked here).
pub(crate) fn interpolate_at(points: &[Share], x0: u8) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, pi) in points.iter().enumerate() {
        let (mut num, mut den) = (1u8, 1u8);
        for (j, pj) in points.iter().enumerate() {
            if i != j {
                num = gf_mul(num, x0 ^ pj.x);
                den = gf_mul(den, pi.x ^ pj.x);
            }
        }
        let l = gf_mul(num, gf_inv(den));
        for (o, y) in out.iter_mut().zip(pi.y.iter()) {
            *o ^= gf_mul(l, *y);
        }
    }
    out
}

/// Reconstructs the secret from the first `threshold` shares (all shares must have distinct,
/// nonzero x-coordinates). Use [`consistent`] to check any further shares.
pub fn combine(shares: &[Share], threshold: usize) -> Result<[u8; 32], ShamirError> {
    if threshold == 0 {
        return Err(ShamirError::Threshold { threshold, n: shares.len() });
    }
    if shares.len() < threshold {
        return Err(ShamirError::NotEnoughShares { got: shares.len(), threshold });
    }
    check_xs(shares)?;
    Ok(interpolate_at(&shares[..threshold], 0))
}

/// Whether all `shares` lie on one polynomial of degree `threshold - 1` (the one through the first
/// `threshold`). False for invalid input (too few shares, zero or duplicate x).
pub fn consistent(shares: &[Share], threshold: usize) -> bool {
    if threshold == 0 || shares.len() < threshold || check_xs(shares).is_err() {
        return false;
    }
    let base = &shares[..threshold];
    shares[threshold..].iter().all(|s| {
        let y = interpolate_at(base, s.x);
        y.iter().zip(s.y.iter()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn field_inverse_and_mul() {
        for a in 1..=255u8 {
            assert_eq!(gf_mul(a, gf_inv(a)), 1, "a = {a}");
        }
        assert_eq!(gf_mul(0x57, 0x83), 0xc1); // FIPS-197 example
        assert_eq!(gf_inv(0), 0);
    }

    #[test]
    fn refuses_bad_coordinates_and_parameters() {
        let shares = split(&[7; 32], 3, 5, [1; 32]).unwrap();
        let mut dup = shares[..3].to_vec();
        dup[2].x = dup[0].x;
        assert_eq!(combine(&dup, 3), Err(ShamirError::DuplicateX(dup[0].x)));
        let mut zero = shares[..3].to_vec();
        zero[1].x = 0;
        assert_eq!(combine(&zero, 3), Err(ShamirError::ZeroX));
        assert_eq!(combine(&shares[..2], 3), Err(ShamirError::NotEnoughShares { got: 2, threshold: 3 }));
        assert!(split(&[0; 32], 0, 5, [0; 32]).is_err());
        assert!(split(&[0; 32], 6, 5, [0; 32]).is_err());
        assert_eq!(split(&[0; 32], 2, 256, [0; 32]), Err(ShamirError::TooManyShares(256)));
        assert!(!consistent(&dup, 2));
    }

    #[test]
    fn single_share_is_uniform() {
        // Chi-square over the 256 values of one share byte across many seeds, fixed secret.
        let mut counts = [0u32; 256];
        let trials = 8192u32;
        for s in 0..trials {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&s.to_le_bytes());
            let shares = split(&[0xAB; 32], 3, 5, seed).unwrap();
            for b in shares[1].y {
                counts[b as usize] += 1;
            }
        }
        let expected = (trials * 32) as f64 / 256.0;
        let chi2: f64 = counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum();
        // 255 degrees of freedom: p = 0.001 critical value is about 330.
        assert!(chi2 < 330.0, "chi2 = {chi2}");
    }

    proptest! {
        #[test]
        fn any_t_shares_reconstruct(secret in any::<[u8; 32]>(), seed in any::<[u8; 32]>(),
                                    n in 1usize..40, t_frac in 0.0f64..1.0, pick in any::<u64>()) {
            let t = 1 + ((n - 1) as f64 * t_frac) as usize;
            let shares = split(&secret, t, n, seed).unwrap();
            // A pseudo-random t-subset, in a pseudo-random order.
            let mut idx: Vec<usize> = (0..n).collect();
            let mut r = pick;
            for i in (1..n).rev() {
                r = r.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                idx.swap(i, (r >> 33) as usize % (i + 1));
            }
            let subset: Vec<Share> = idx[..t].iter().map(|&i| shares[i].clone()).collect();
            prop_assert_eq!(combine(&subset, t).unwrap(), secret);
            prop_assert!(consistent(&shares, t));
        }

        /// t - 1 shares of one secret are equally consistent with any other secret: through the
        /// t points {(0, other)} ∪ shares there is a degree-(t-1) polynomial, and the full share set
        /// it generates agrees on those t - 1 shares and reconstructs `other`.
        #[test]
        fn t_minus_one_shares_fit_every_secret(secret in any::<[u8; 32]>(), other in any::<[u8; 32]>(),
                                                seed in any::<[u8; 32]>(), n in 2usize..30, t_frac in 0.0f64..1.0) {
            let t = 2 + ((n - 2) as f64 * t_frac) as usize;
            let shares = split(&secret, t, n, seed).unwrap();
            let seen = &shares[..t - 1];
            let mut points = vec![Share { x: 0, y: other }];
            points.extend_from_slice(seen);
            let alt: Vec<Share> = (1..=n as u8).map(|x| Share { x, y: interpolate_at(&points, x) }).collect();
            prop_assert_eq!(&alt[..t - 1], seen);
            prop_assert_eq!(combine(&alt[n - t..], t).unwrap(), other);
            prop_assert!(consistent(&alt, t));
        }

        /// A corrupted extra share is detected.
        #[test]
        fn corrupted_share_is_inconsistent(secret in any::<[u8; 32]>(), seed in any::<[u8; 32]>(),
                                           n in 3usize..30, byte in 0usize..32, flip in 1u8..=255) {
            let t = n / 2 + 1;
            let mut shares = split(&secret, t, n, seed).unwrap();
            shares[n - 1].y[byte] ^= flip;
            prop_assert!(!consistent(&shares, t));
        }
    }
}
