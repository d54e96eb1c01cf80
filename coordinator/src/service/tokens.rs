//! Enrollment tokens: what a client presents as the `credential` of its check-in.
//!
//! A token is `stk1.` followed by URL-safe base64 (no padding) of
//!
//! ```text
//! payload = version:u8 (=1)  token_id:u64-be  client_id:u64-be  expires_unix_s:u64-be
//! token   = payload  HMAC-SHA256(secret, "starling-token-v1" || payload)   (57 bytes)
//! ```
//!
//! The coordinator verifies the tag in constant time (`ring::hmac::verify`), that the token names
//! the client that checked in, that it has not expired, and that neither the token nor its client
//! is revoked. Issued tokens and revocations are kept in the store (`starling token issue|revoke`);
//! the running coordinator holds the revocation set in memory and reloads it from the store
//! (see [`TokenAuthority::reload_revocations`]). The secret never leaves the coordinator: a
//! leaked secret lets anyone mint tokens, so rotate it (and re-enroll) if it leaks.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use starling_proto::ids::ClientId;
use std::collections::HashSet;
use std::sync::RwLock;

/// Prefix of every token.
pub const TOKEN_PREFIX: &str = "stk1.";
/// Bytes of a secret `starling init` generates.
pub const SECRET_BYTES: usize = 32;
const PAYLOAD_BYTES: usize = 25;
const TAG_BYTES: usize = 32;
const CONTEXT: &[u8] = b"starling-token-v1";

/// What a valid token says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    /// The token's id (what revocation names).
    pub token_id: u64,
    /// The client it was issued to.
    pub client: ClientId,
    /// Expiry, seconds since the Unix epoch.
    pub expires_unix_s: u64,
}

/// Why a credential was refused. Every variant maps to `Refusal::Unauthenticated` on the wire;
/// the coordinator logs and counts the precise reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// Not a token at all (wrong prefix, bad base64, wrong length or version).
    #[error("malformed token")]
    Malformed,
    /// The token was issued to another client.
    #[error("token issued to another client")]
    OtherClient,
    /// The token or its client was revoked.
    #[error("token revoked")]
    Revoked,
    /// The signature does not verify (forged, or signed with another secret).
    #[error("bad token signature")]
    Signature,
}

impl TokenError {
    /// A short label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            TokenError::Expired => "expired",
            TokenError::Malformed => "malformed",
            TokenError::OtherClient => "other_client",
            TokenError::Revoked => "revoked",
            TokenError::Signature => "bad_signature",
        }
    }
}

/// Why a secret could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The secret is shorter than 16 bytes.
    #[error("token secret too short ({0} bytes, need at least 16)")]
    TooShort(usize),
    /// The secret file is not base64.
    #[error("token secret is not base64: {0}")]
    Encoding(String),
}

#[derive(Debug, Default)]
struct Revocations {
    tokens: HashSet<u64>,
    clients: HashSet<u64>,
}

/// Issues and verifies tokens; holds the revocation set.
pub struct TokenAuthority {
    key: hmac::Key,
    revoked: RwLock<Revocations>,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuthority").finish_non_exhaustive()
    }
}

impl TokenAuthority {
    /// An authority signing with `secret` (at least 16 bytes).
    pub fn new(secret: &[u8]) -> Result<Self, SecretError> {
        if secret.len() < 16 {
            return Err(SecretError::TooShort(secret.len()));
        }
        Ok(Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret), revoked: RwLock::default() })
    }

    /// An authority from the base64 text of a secret file (surrounding whitespace ignored).
    pub fn from_secret_file_text(text: &str) -> Result<Self, SecretError> {
        let secret = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| SecretError::Encoding(e.to_string()))?;
        Self::new(&secret)
    }

    /// A new random secret, base64 (what `starling init` writes).
    pub fn generate_secret_text() -> String {
        let mut secret = [0u8; SECRET_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .expect("the system RNG is available");
        base64::engine::general_purpose::STANDARD.encode(secret)
    }

    /// A signed token for `claims`.
    pub fn issue(&self, claims: TokenClaims) -> String {
        let payload = encode_payload(&claims);
        let tag = self.tag(&payload);
        let mut raw = Vec::with_capacity(PAYLOAD_BYTES + TAG_BYTES);
        raw.extend_from_slice(&payload);
        raw.extend_from_slice(tag.as_ref());
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
    }

    fn tag(&self, payload: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(CONTEXT);
        ctx.update(payload);
        ctx.sign()
    }

    /// Checks `credential` for `client` at `now_unix_s`. Never panics on any input.
    pub fn verify(
        &self,
        client: ClientId,
        credential: &[u8],
        now_unix_s: u64,
    ) -> Result<TokenClaims, TokenError> {
        let text = std::str::from_utf8(credential).map_err(|_| TokenError::Malformed)?;
        let body = text.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Malformed)?;
        if body.len() > 128 {
            return Err(TokenError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| TokenError::Malformed)?;
        if raw.len() != PAYLOAD_BYTES + TAG_BYTES || raw[0] != 1 {
            return Err(TokenError::Malformed);
        }
        let (payload, tag) = raw.split_at(PAYLOAD_BYTES);
        let mut msg = Vec::with_capacity(CONTEXT.len() + PAYLOAD_BYTES);
        msg.extend_from_slice(CONTEXT);
        msg.extend_from_slice(payload);
        hmac::verify(&self.key, &msg, tag).map_err(|_| TokenError::Signature)?;
        let claims = decode_payload(payload);
        if claims.client != client {
            return Err(TokenError::OtherClient);
        }
        if now_unix_s >= claims.expires_unix_s {
            return Err(TokenError::Expired);
        }
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        if revoked.tokens.contains(&claims.token_id) || revoked.clients.contains(&claims.client.0) {
            return Err(TokenError::Revoked);
        }
        Ok(claims)
    }

    /// Replaces the revocation set: `tokens` by id, and every token of `clients`.
    pub fn reload_revocations(
        &self,
        tokens: impl IntoIterator<Item = u64>,
        clients: impl IntoIterator<Item = u64>,
    ) {
        let mut r = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        r.tokens = tokens.into_iter().collect();
        r.clients = clients.into_iter().collect();
    }

    /// Revokes one token in memory (the store is the durable copy).
    pub fn revoke_token(&self, token_id: u64) {
        self.revoked.write().unwrap_or_else(|p| p.into_inner()).tokens.insert(token_id);
    }
}

fn encode_payload(c: &TokenClaims) -> [u8; PAYLOAD_BYTES] {
    let mut p = [0u8; PAYLOAD_BYTES];
    p[0] = 1;
    p[1..9].copy_from_slice(&c.token_id.to_be_bytes());
    p[9..17].copy_from_slice(&c.client.0.to_be_bytes());
    p[17..25].copy_from_slice(&c.expires_unix_s.to_be_bytes());
    p
}

fn decode_payload(p: &[u8]) -> TokenClaims {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&p[i..i + 8]);
        u64::from_be_bytes(b)
    };
    TokenClaims { token_id: word(1), client: ClientId(word(9)), expires_unix_s: word(17) }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority() -> TokenAuthority {
        TokenAuthority::new(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    #[test]
    fn issue_verify_and_every_refusal() {
        let a = authority();
        let claims = TokenClaims { token_id: 7, client: ClientId(42), expires_unix_s: 1_000 };
        let t = a.issue(claims);
        assert!(t.starts_with(TOKEN_PREFIX));
        assert_eq!(a.verify(ClientId(42), t.as_bytes(), 999), Ok(claims));
        assert_eq!(a.verify(ClientId(42), t.as_bytes(), 1_000), Err(TokenError::Expired));
        assert_eq!(a.verify(ClientId(43), t.as_bytes(), 10), Err(TokenError::OtherClient));
        let other = TokenAuthority::new(b"another secret of enough length!").unwrap();
        assert_eq!(other.verify(ClientId(42), t.as_bytes(), 10), Err(TokenError::Signature));
        // One flipped character anywhere in the body breaks it.
        let mut forged = t.clone().into_bytes();
        let i = forged.len() - 3;
        forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
        assert!(matches!(
            a.verify(ClientId(42), &forged, 10),
            Err(TokenError::Signature | TokenError::Malformed)
        ));
        for junk in [&b""[..], b"stk1.", b"stk1.!!!!", b"\xff\xfe", b"bearer xyz", &[b'a'; 5000]] {
            assert_eq!(a.verify(ClientId(42), junk, 10), Err(TokenError::Malformed));
        }
        a.revoke_token(7);
        assert_eq!(a.verify(ClientId(42), t.as_bytes(), 10), Err(TokenError::Revoked));
        a.reload_revocations([], [42]);
        assert_eq!(a.verify(ClientId(42), t.as_bytes(), 10), Err(TokenError::Revoked));
        a.reload_revocations([], []);
        assert_eq!(a.verify(ClientId(42), t.as_bytes(), 10), Ok(claims));
    }

    #[test]
    fn secrets() {
        assert_eq!(TokenAuthority::new(b"short").unwrap_err(), SecretError::TooShort(5));
        let text = TokenAuthority::generate_secret_text();
        assert!(TokenAuthority::from_secret_file_text(&format!("{text}\n")).is_ok());
        assert!(TokenAuthority::from_secret_file_text("not base64 !").is_err());
    }
}
