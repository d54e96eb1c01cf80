//! Keys of the encrypted on-device store (see `docs/sdk.md`, "Encryption at rest").
//!
//! - The host app's [`StorageKey`] (32 bytes, e.g. kept in the Android Keystore or the iOS
//!   Keychain) is a **key-encryption key** (KEK): it never encrypts data itself.
//! - The SDK draws a random **data key** (DEK, 32 bytes, from the OS RNG through
//!   `ring::rand::SystemRandom`) and keeps it only wrapped with the KEK, in a small key file beside
//!   the database (`starling.key`, mode 0600): ChaCha20-Poly1305 with a random 96-bit nonce and a
//!   fixed associated-data context. SQLCipher is keyed with the raw DEK.
//! - "Forget me" destroys the key file and draws a new DEK (crypto-shredding): a copy of the old
//!   database, or a remnant of it on flash, can no longer be decrypted even by someone holding
//!   the KEK — unless they also recover the old key file's bytes, which is why the host should
//!   also rotate its keystore entry after `forget()`.
//!
//! Key file layout (68 bytes): `"STLGKEY" 0x01` · nonce (12) · ChaCha20-Poly1305(DEK) (32 + 16).

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::io::Write;
use std::path::Path;
use zeroize::Zeroizing;

/// Length of the host's key and of the data key, in bytes.
pub const KEY_LEN: usize = 32;
/// First bytes of a key file: magic and format version.
pub const KEY_FILE_MAGIC: &[u8; 8] = b"STLGKEY\x01";
/// Associated data bound to every wrapped data key (a key file cannot be reused for anything else).
const WRAP_CONTEXT: &[u8] = b"starling-sdk/store-data-key/v1";
/// Size of a key file.
pub const KEY_FILE_LEN: usize = KEY_FILE_MAGIC.len() + NONCE_LEN + KEY_LEN + 16;

/// The host app's storage key: a 32-byte key-encryption key (from the OS keystore). Its bytes are
/// never printed (`Debug` shows `StorageKey(..)`) and are zeroed when it is dropped.
#[derive(Clone)]
pub struct StorageKey(Zeroizing<[u8; KEY_LEN]>);

impl StorageKey {
    /// The key with these bytes.
    pub fn new(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The key in `bytes`, which must be exactly 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; KEY_LEN] = bytes.try_into().map_err(|_| KeyError::Length(bytes.len()))?;
        Ok(Self::new(arr))
    }

    fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageKey(..)")
    }
}

impl PartialEq for StorageKey {
    /// Constant-time comparison.
    fn eq(&self, other: &Self) -> bool {
        self.bytes().iter().zip(other.bytes().iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl Eq for StorageKey {}

/// Why a key could not be made, wrapped or unwrapped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// A key of the wrong length was given.
    #[error("a storage key is 32 bytes, not {0}")]
    Length(usize),
    /// The OS random number generator failed.
    #[error("the OS random number generator failed")]
    Rng,
    /// The key file is not a Starling key file (wrong size or magic).
    #[error("not a Starling key file")]
    Malformed,
    /// The storage key does not open this key file (a wrong key, or a tampered file).
    #[error("the storage key does not match this store")]
    WrongKey,
    /// Reading or writing the key file failed.
    #[error("key file I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A data key: 32 random bytes, zeroed on drop.
pub(crate) struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl DataKey {
    /// A fresh random data key.
    pub(crate) fn generate() -> Result<Self, KeyError> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new().fill(&mut k[..]).map_err(|_| KeyError::Rng)?;
        Ok(Self(k))
    }

    /// The `PRAGMA key` statement keying SQLCipher with this raw key (no passphrase derivation).
    pub(crate) fn pragma(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(20 + 2 * KEY_LEN));
        s.push_str("PRAGMA key = \"x'");
        for b in self.0.iter() {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s.push_str("'\";");
        s
    }

    /// This key wrapped with `kek`, as the bytes of a key file.
    pub(crate) fn wrap(&self, kek: &StorageKey) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| KeyError::Rng)?;
        let key = aead_key(kek)?;
        let mut sealed = Zeroizing::new(self.0.to_vec());
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(WRAP_CONTEXT),
            &mut *sealed,
        )
        .map_err(|_| KeyError::Rng)?;
        let mut out = Vec::with_capacity(KEY_FILE_LEN);
        out.extend_from_slice(KEY_FILE_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The data key in key-file bytes `file`, unwrapped with `kek`.
    pub(crate) fn unwrap(file: &[u8], kek: &StorageKey) -> Result<Self, KeyError> {
        if file.len() != KEY_FILE_LEN || &file[..KEY_FILE_MAGIC.len()] != KEY_FILE_MAGIC {
            return Err(KeyError::Malformed);
        }
        let (nonce, sealed) = file[KEY_FILE_MAGIC.len()..].split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| KeyError::Malformed)?;
        let mut buf = Zeroizing::new(sealed.to_vec());
        let key = aead_key(kek)?;
        let plain = key
            .open_in_place(nonce, Aad::from(WRAP_CONTEXT), &mut buf[..])
            .map_err(|_| KeyError::WrongKey)?;
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        if plain.len() != KEY_LEN {
            return Err(KeyError::Malformed);
        }
        k.copy_from_slice(plain);
        Ok(Self(k))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn aead_key(kek: &StorageKey) -> Result<LessSafeKey, KeyError> {
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, kek.bytes()).map_err(|_| KeyError::Length(KEY_LEN))?;
    Ok(LessSafeKey::new(unbound))
}

/// Writes `bytes` to a new file at `path` with mode 0600 (on Unix), synced to disk.
pub(crate) fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = private_options().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Options that create files readable and writable by the owner only.
pub(crate) fn private_options() -> std::fs::OpenOptions {
    #[allow(unused_mut)]
    let mut o = std::fs::OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_data_key_opens_only_with_its_storage_key() {
        let kek = StorageKey::new([7; 32]);
        let dek = DataKey::generate().unwrap();
        let file = dek.wrap(&kek).unwrap();
        assert_eq!(file.len(), KEY_FILE_LEN);
        assert!(!file.windows(KEY_LEN).any(|w| w == &dek.0[..]), "the data key is not in the file");
        assert_eq!(*DataKey::unwrap(&file, &kek).unwrap().0, *dek.0);
        assert!(matches!(DataKey::unwrap(&file, &StorageKey::new([8; 32])), Err(KeyError::WrongKey)));
        let mut tampered = file.clone();
        tampered[30] ^= 1;
        assert!(matches!(DataKey::unwrap(&tampered, &kek), Err(KeyError::WrongKey)));
        assert!(matches!(DataKey::unwrap(&file[1..], &kek), Err(KeyError::Malformed)));
        assert_ne!(dek.wrap(&kek).unwrap(), file, "a fresh nonce per wrap");
        assert!(dek.pragma().starts_with("PRAGMA key = \"x'") && dek.pragma().len() == 16 + 64 + 3);
        assert_eq!(format!("{kek:?}"), "StorageKey(..)");
        assert!(matches!(StorageKey::from_slice(&[0; 16]), Err(KeyError::Length(16))));
    }
}
