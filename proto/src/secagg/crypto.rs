//! Key agreement, key derivation, share encryption and the mask PRG.
//!
//! - X25519 ([`KeyPair`], [`agree`]): an all-zero shared secret (the peer sent a low-order point)
//!   is refused.
//! - HKDF-SHA256 ([`derive`]) with `info = label ‖ round ‖ min(i, j) ‖ max(i, j)` (ids as
//!   little-endian `u64`), so both ends of a pair derive the same key, and keys differ per round,
//!   per pair and per purpose.
//! - ChaCha20-Poly1305 ([`seal`], [`open`]): the nonce is the sender's id (little-endian, padded
//!   with zeros to 12 bytes), so the two directions of a pair never share a nonce under their
//!   common key; the associated data binds round, sender and recipient.
//! - The mask PRG ([`expand_mask`]): the ChaCha20 keystream of a 32-byte seed (nonce 0) read as
//!   little-endian `u32` words.

use crate::ids::{ClientId, RoundId};
use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use hkdf::Hkdf;
use sha2::Sha256;
use std::fmt;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// HKDF label of share-encryption keys.
pub const SHARE_LABEL: &[u8] = b"starling secagg share v1";
/// HKDF label of pairwise mask seeds.
pub const MASK_LABEL: &[u8] = b"starling secagg mask v1";
/// Associated-data prefix of share ciphertexts.
const AAD_LABEL: &[u8] = b"starling secagg share aad v1";

/// Why a cryptographic operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The Diffie-Hellman output is all zeros: the peer's key is a low-order point.
    #[error("peer public key is a low-order point")]
    LowOrderKey,
    /// Authentication failed (wrong key, wrong ids, or tampered ciphertext).
    #[error("ciphertext failed authentication")]
    Open,
}

/// An X25519 key pair; the secret is zeroized on drop.
pub struct KeyPair {
    secret: StaticSecret,
    public: [u8; 32],
}

impl KeyPair {
    /// The key pair whose secret scalar is (the clamped) `seed`. Use a fresh uniform seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let secret = StaticSecret::from(seed);
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The secret key bytes (for Shamir sharing the mask key).
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair").field("public", &self.public).finish_non_exhaustive()
    }
}

/// X25519 of our secret and `their_pk`; refuses an all-zero (non-contributory) result.
pub fn agree(mine: &KeyPair, their_pk: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    let shared = mine.secret.diffie_hellman(&PublicKey::from(*their_pk));
    if !shared.was_contributory() {
        return Err(CryptoError::LowOrderKey);
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

/// The commitment a client advertises to its self-mask seed `b`:
/// `SHA-256("starling secagg self-mask v1" ‖ round ‖ client ‖ b)`. `b` is 256 random bits, so the
/// commitment hides it; it binds the shares the coordinator later reconstructs `b` from, so a
/// tampered share cannot turn into a wrong sum (the coordinator aborts instead).
pub fn self_mask_commitment(round: RoundId, client: ClientId, seed: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = Sha256::new();
    h.update(b"starling secagg self-mask v1");
    h.update(round.0.to_le_bytes());
    h.update(client.0.to_le_bytes());
    h.update(seed);
    h.finalize().into()
}

/// HKDF-SHA256 of `shared` with `info = label ‖ round ‖ min(a, b) ‖ max(a, b)`.
pub fn derive(
    shared: &[u8; 32],
    label: &[u8],
    round: RoundId,
    a: ClientId,
    b: ClientId,
) -> Zeroizing<[u8; 32]> {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut info = Vec::with_capacity(label.len() + 24);
    info.extend_from_slice(label);
    info.extend_from_slice(&round.0.to_le_bytes());
    info.extend_from_slice(&lo.0.to_le_bytes());
    info.extend_from_slice(&hi.0.to_le_bytes());
    let mut okm = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, shared)
        .expand(&info, okm.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

/// The share-encryption key of the pair `(me, them)`: both ends derive the same key.
pub fn share_key(
    mine: &KeyPair,
    their_pk: &[u8; 32],
    round: RoundId,
    me: ClientId,
    them: ClientId,
) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    Ok(derive(&*agree(mine, their_pk)?, SHARE_LABEL, round, me, them))
}

/// The pairwise mask seed `s_ij` of the pair `(me, them)`.
pub fn mask_seed(
    mine: &KeyPair,
    their_pk: &[u8; 32],
    round: RoundId,
    me: ClientId,
    them: ClientId,
) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    Ok(derive(&*agree(mine, their_pk)?, MASK_LABEL, round, me, them))
}

fn nonce(from: ClientId) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&from.0.to_le_bytes());
    n
}

fn aad(round: RoundId, from: ClientId, to: ClientId) -> [u8; 52] {
    let mut a = [0u8; 52];
    a[..28].copy_from_slice(AAD_LABEL);
    a[28..36].copy_from_slice(&round.0.to_le_bytes());
    a[36..44].copy_from_slice(&from.0.to_le_bytes());
    a[44..52].copy_from_slice(&to.0.to_le_bytes());
    a
}

/// Encrypts `plaintext` from `from` to `to` under the pair's share key.
pub fn seal(key: &[u8; 32], round: RoundId, from: ClientId, to: ClientId, plaintext: &[u8]) -> Vec<u8> {
    ChaCha20Poly1305::new(&(*key).into())
        .encrypt(&nonce(from).into(), Payload { msg: plaintext, aad: &aad(round, from, to) })
        .expect("a share plaintext is far below the ChaCha20-Poly1305 length limit")
}

/// Decrypts a ciphertext sent by `from` to `to`; fails unless key, round and ids all match.
pub fn open(
    key: &[u8; 32],
    round: RoundId,
    from: ClientId,
    to: ClientId,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    ChaCha20Poly1305::new(&(*key).into())
        .decrypt(&nonce(from).into(), Payload { msg: ciphertext, aad: &aad(round, from, to) })
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Open)
}

/// Words of keystream generated per step of [`expand_mask`] (a stack buffer of 1 KiB).
const CHUNK_WORDS: usize = 256;

/// Adds (`sign >= 0`) or subtracts (`sign < 0`) the PRG output of `seed` to `out` in place,
/// modulo `2^bits`: `out[i] = out[i] ± w_i mod 2^bits`, where `w_i` is the i-th little-endian
/// `u32` word of the ChaCha20 keystream of `seed` with nonce 0. Allocation-free.
pub fn expand_mask(seed: &[u8; 32], out: &mut [u32], bits: u32, sign: i8) {
    let mask = super::params::bits_mask(bits);
    let mut cipher = ChaCha20::new(&(*seed).into(), &[0u8; 12].into());
    let mut buf = Zeroizing::new([0u32; CHUNK_WORDS]);
    for chunk in out.chunks_mut(CHUNK_WORDS) {
        let words = &mut buf[..chunk.len()];
        cipher.write_keystream(bytemuck::cast_slice_mut(words));
        if sign >= 0 {
            for (o, w) in chunk.iter_mut().zip(words.iter()) {
                *o = o.wrapping_add(u32::from_le(*w)) & mask;
            }
        } else {
            for (o, w) in chunk.iter_mut().zip(words.iter()) {
                *o = o.wrapping_sub(u32::from_le(*w)) & mask;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_is_symmetric_and_refuses_low_order() {
        let a = KeyPair::from_seed([1; 32]);
        let b = KeyPair::from_seed([2; 32]);
        let r = RoundId(9);
        let kab = share_key(&a, &b.public(), r, ClientId(1), ClientId(2)).unwrap();
        let kba = share_key(&b, &a.public(), r, ClientId(2), ClientId(1)).unwrap();
        assert_eq!(*kab, *kba);
        let mab = mask_seed(&a, &b.public(), r, ClientId(1), ClientId(2)).unwrap();
        assert_ne!(*kab, *mab, "labels separate the keys");
        assert_eq!(agree(&a, &[0; 32]), Err(CryptoError::LowOrderKey));
        let mut one = [0u8; 32];
        one[0] = 1; // the identity (low order)
        assert_eq!(agree(&a, &one), Err(CryptoError::LowOrderKey));
    }

    #[test]
    fn seal_open_binds_ids_and_round() {
        let key = [5u8; 32];
        let ct = seal(&key, RoundId(3), ClientId(1), ClientId(2), b"hello");
        assert_eq!(&open(&key, RoundId(3), ClientId(1), ClientId(2), &ct).unwrap()[..], b"hello");
        assert!(open(&key, RoundId(4), ClientId(1), ClientId(2), &ct).is_err());
        assert!(open(&key, RoundId(3), ClientId(2), ClientId(1), &ct).is_err());
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert!(open(&key, RoundId(3), ClientId(1), ClientId(2), &bad).is_err());
    }

    #[test]
    fn expand_mask_adds_then_subtracts() {
        for bits in [1, 7, 20, 31, 32] {
            let mask = super::super::params::bits_mask(bits);
            let orig: Vec<u32> = (0..1000u32).map(|i| i.wrapping_mul(2654435761) & mask).collect();
            let mut v = orig.clone();
            expand_mask(&[9; 32], &mut v, bits, 1);
            assert_ne!(v, orig);
            assert!(v.iter().all(|&x| x <= mask));
            // Matches a reference: keystream of a zero buffer read as LE words.
            let mut ks = vec![0u8; 4000];
            ChaCha20::new(&[9u8; 32].into(), &[0u8; 12].into()).apply_keystream(&mut ks);
            for (i, w) in ks.chunks_exact(4).enumerate() {
                let w = u32::from_le_bytes(w.try_into().unwrap());
                assert_eq!(v[i], orig[i].wrapping_add(w) & mask);
            }
            expand_mask(&[9; 32], &mut v, bits, -1);
            assert_eq!(v, orig);
        }
    }

    #[test]
    #[ignore = "timing; run by hand"]
    fn expand_mask_throughput() {
        // 64,000 words (256 KB, the model size the protocol targets; cache-resident) and
        // 16 Mi words (64 MiB, memory-bound).
        for (len, reps) in [(64_000usize, 1000usize), (16 << 20, 4)] {
            let mut v = vec![0u32; len];
            expand_mask(&[1; 32], &mut v, 32, 1); // warm up
            let start = std::time::Instant::now();
            for r in 0..reps {
                expand_mask(&[r as u8; 32], &mut v, 20, if r % 2 == 0 { 1 } else { -1 });
            }
            let secs = start.elapsed().as_secs_f64();
            let mb = (len * 4 * reps) as f64 / 1e6;
            println!("expand_mask, {len} words: {:.0} MB/s ({mb:.0} MB in {secs:.3} s)", mb / secs);
            std::hint::black_box(&v);
        }
    }
}
