//! The device side of one secure-aggregation round.

use super::crypto::{self, KeyPair};
use super::params::{
    EncryptedShare, KeyAdvert, MaskedInput, NeighbourKeys, Neighbourhood, RevealedShare, RoutedShares,
    SecAggConfigError, SecAggParams, SecAggPolicy, ShareBundle, UnmaskRequest, UnmaskResponse,
};
use super::shamir::{self, Share};
use crate::ids::{ClientId, ModelVersion, RoundId};
use hkdf::Hkdf;
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use zeroize::{Zeroize, Zeroizing};

/// Bytes of a share-pair plaintext: round, from, to (`u64` LE each), then the `b` share and the
/// mask-key share (`x` byte + 32 bytes each).
pub(crate) const SHARE_PLAINTEXT_LEN: usize = 24 + 2 * 33;
/// Bytes of an [`EncryptedShare::ciphertext`]: the plaintext plus the 16-byte Poly1305 tag.
pub const SHARE_CIPHERTEXT_LEN: usize = SHARE_PLAINTEXT_LEN + 16;

/// Why the client refused a step. The client's state is unchanged by a refused step.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecAggError {
    /// The client already answered an unmask request this round.
    #[error("already answered an unmask request this round")]
    AlreadyAnswered,
    /// A neighbour's key is malformed: all-zero, a low-order point, or equal to one of ours.
    #[error("bad public key for {0}")]
    BadKey(ClientId),
    /// A routed share failed to decrypt or did not carry the expected round and ids.
    #[error("bad share from {0}")]
    BadShare(ClientId),
    /// Invalid parameters or policy.
    #[error(transparent)]
    Config(#[from] SecAggConfigError),
    /// The neighbourhood lists a client twice.
    #[error("neighbourhood lists {0} twice")]
    DuplicateNeighbour(ClientId),
    /// Two routed shares come from the same sender.
    #[error("two routed shares from {0}")]
    DuplicateSender(ClientId),
    /// An unmask request names a peer twice (e.g. as both survivor and dropped).
    #[error("unmask request lists {0} twice")]
    ListedTwice(ClientId),
    /// The neighbourhood is too small (or too large) for the parameters and the device policy.
    #[error("neighbourhood of {deg} in a cohort of {cohort} refused (policy minimum {min}, k = {k})")]
    NeighbourhoodSize {
        /// Neighbours offered.
        deg: usize,
        /// Cohort size claimed by the coordinator.
        cohort: u32,
        /// The policy's `min_neighbours`.
        min: usize,
        /// The round's `neighbours`.
        k: u32,
    },
    /// A routed share comes from a client that is not a neighbour.
    #[error("{0} is not a neighbour")]
    NotANeighbour(ClientId),
    /// An unmask request names a peer whose shares this client did not receive.
    #[error("unmask request names {0}, which is not a neighbour in U2")]
    NotInvolved(ClientId),
    /// The neighbourhood or an unmask request lists this client itself.
    #[error("message lists this client itself")]
    SelfListed,
    /// The effective threshold violates `t > deg / 2`, `t <= deg` or the policy's minimum fraction.
    #[error("threshold {threshold} for {deg} neighbours refused by policy")]
    ThresholdBelowPolicy {
        /// Effective threshold.
        threshold: usize,
        /// Neighbourhood size.
        deg: usize,
    },
    /// Fewer neighbours sent shares than the threshold: the round cannot be unmasked safely.
    #[error("{got} neighbours in U2, threshold {needed}")]
    TooFewSenders {
        /// Senders routed.
        got: usize,
        /// The threshold.
        needed: usize,
    },
    /// An input value is not below `2^bits`.
    #[error("input value at index {index} is not below 2^bits")]
    ValueOutOfRange {
        /// First offending index.
        index: usize,
    },
    /// The input does not have `len` values.
    #[error("input has {got} values, expected {expected}")]
    WrongLength {
        /// `params.len`.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// The step does not fit the client's phase (e.g. masking before the shares arrived).
    #[error("wrong phase: expected {expected}")]
    WrongPhase {
        /// What the client is waiting for.
        expected: &'static str,
    },
    /// The message names another round.
    #[error("message for {got}, this is {expected}")]
    WrongRound {
        /// This client's round.
        expected: RoundId,
        /// The message's round.
        got: RoundId,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    AwaitNeighbourhood,
    AwaitShares,
    ReadyToMask,
    Masked,
    Answered,
}

impl Phase {
    fn expected(self) -> &'static str {
        match self {
            Self::AwaitNeighbourhood => "neighbourhood",
            Self::AwaitShares => "routed shares",
            Self::ReadyToMask => "mask",
            Self::Masked => "unmask request",
            Self::Answered => "nothing (round finished)",
        }
    }
}

/// Per-neighbour secrets derived from the neighbourhood.
struct Peer {
    share_key: Zeroizing<[u8; 32]>,
    mask_seed: Zeroizing<[u8; 32]>,
}

/// The shares a neighbour sent us: of its self-mask seed and of its mask secret key.
struct Held {
    b: Share,
    sk: Share,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.b.zeroize();
        self.sk.zeroize();
    }
}

/// The device side of one round. Create it with [`SecAggClient::new`], then feed it the server's
/// messages in order; every method either advances the client or refuses without changing it.
pub struct SecAggClient {
    round: RoundId,
    me: ClientId,
    params: SecAggParams,
    policy: SecAggPolicy,
    phase: Phase,
    /// Dropped once the shares are made.
    keys: Option<(KeyPair, KeyPair)>,
    /// Self-mask seed `b`, and the seeds of the two Shamir splits; dropped after masking.
    self_seed: Zeroizing<[u8; 32]>,
    split_seeds: Zeroizing<[[u8; 32]; 2]>,
    threshold: usize,
    peers: BTreeMap<ClientId, Peer>,
    held: BTreeMap<ClientId, Held>,
}

impl std::fmt::Debug for SecAggClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggClient")
            .field("round", &self.round)
            .field("me", &self.me)
            .field("phase", &self.phase)
            .field("neighbours", &self.peers.len())
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

fn expand_entropy(entropy: &[u8; 32], round: RoundId, me: ClientId) -> Zeroizing<[u8; 160]> {
    let mut info = b"starling secagg client v1".to_vec();
    info.extend_from_slice(&round.0.to_le_bytes());
    info.extend_from_slice(&me.0.to_le_bytes());
    let mut okm = Zeroizing::new([0u8; 160]);
    Hkdf::<Sha256>::new(None, entropy).expand(&info, okm.as_mut()).expect("160 bytes is a valid HKDF length");
    okm
}

fn take32(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&b[..32]);
    out
}

impl SecAggClient {
    /// Starts a round: derives the two key pairs and the self-mask seed from `entropy` (32 bytes
    /// from the OS RNG; never reuse it) and returns the key advertisement to send.
    pub fn new(
        round: RoundId,
        me: ClientId,
        params: SecAggParams,
        policy: SecAggPolicy,
        entropy: [u8; 32],
    ) -> Result<(Self, KeyAdvert), SecAggError> {
        params.validate()?;
        if !(0.0..1.0).contains(&policy.min_threshold_fraction) {
            return Err(SecAggConfigError::Policy("min_threshold_fraction must be in [0, 1)".into()).into());
        }
        if params.len > policy.max_len {
            return Err(SecAggConfigError::LenAbovePolicy { len: params.len, max: policy.max_len }.into());
        }
        let mut entropy = Zeroizing::new(entropy);
        let okm = expand_entropy(&entropy, round, me);
        entropy.zeroize();
        let cipher = KeyPair::from_seed(take32(&okm[0..]));
        let mask = KeyPair::from_seed(take32(&okm[32..]));
        let self_seed = Zeroizing::new(take32(&okm[64..]));
        let advert = KeyAdvert {
            round,
            cipher_pk: cipher.public(),
            mask_pk: mask.public(),
            self_mask_commitment: crypto::self_mask_commitment(round, me, &self_seed),
        };
        let client = Self {
            round,
            me,
            params,
            policy,
            phase: Phase::AwaitNeighbourhood,
            keys: Some((cipher, mask)),
            self_seed,
            split_seeds: Zeroizing::new([take32(&okm[96..]), take32(&okm[128..])]),
            threshold: 0,
            peers: BTreeMap::new(),
            held: BTreeMap::new(),
        };
        Ok((client, advert))
    }

    fn expect(&self, phase: Phase, round: RoundId) -> Result<(), SecAggError> {
        if round != self.round {
            return Err(SecAggError::WrongRound { expected: self.round, got: round });
        }
        if self.phase == Phase::Answered && phase == Phase::Masked {
            return Err(SecAggError::AlreadyAnswered);
        }
        if self.phase != phase {
            return Err(SecAggError::WrongPhase { expected: self.phase.expected() });
        }
        Ok(())
    }

    fn check_neighbourhood(&self, msg: &Neighbourhood) -> Result<usize, SecAggError> {
        let deg = msg.neighbours.len();
        let size_err = || SecAggError::NeighbourhoodSize {
            deg,
            cohort: msg.cohort,
            min: self.policy.min_neighbours,
            k: self.params.neighbours,
        };
        let whole_cohort = deg as u64 + 1 == msg.cohort as u64;
        if deg < 1
            || deg > self.params.neighbours as usize
            || deg as u64 + 1 > msg.cohort as u64
            || (deg < self.policy.min_neighbours && !whole_cohort)
        {
            return Err(size_err());
        }
        let t = self.params.threshold_for(deg);
        let min_t = (self.policy.min_threshold_fraction * deg as f64).ceil() as usize;
        if 2 * t <= deg || t > deg || t < min_t {
            return Err(SecAggError::ThresholdBelowPolicy { threshold: t, deg });
        }
        let (cipher, mask) = self.keys.as_ref().expect("keys are held until the neighbourhood is accepted");
        let mut seen = BTreeSet::new();
        for n in &msg.neighbours {
            if n.client == self.me {
                return Err(SecAggError::SelfListed);
            }
            if !seen.insert(n.client) {
                return Err(SecAggError::DuplicateNeighbour(n.client));
            }
            let own = [cipher.public(), mask.public()];
            if own.contains(&n.cipher_pk) || own.contains(&n.mask_pk) || n.cipher_pk == n.mask_pk {
                return Err(SecAggError::BadKey(n.client));
            }
        }
        Ok(t)
    }

    /// Checks the neighbourhood and returns one encrypted share pair per neighbour.
    pub fn handle_neighbourhood(&mut self, msg: Neighbourhood) -> Result<ShareBundle, SecAggError> {
        self.expect(Phase::AwaitNeighbourhood, msg.round)?;
        let t = self.check_neighbourhood(&msg)?;
        let mut neighbours: Vec<&NeighbourKeys> = msg.neighbours.iter().collect();
        neighbours.sort_by_key(|n| n.client);
        let deg = neighbours.len();
        let (cipher, mask) = self.keys.as_ref().expect("checked above");
        let mut peers = BTreeMap::new();
        for n in &neighbours {
            let bad = |_| SecAggError::BadKey(n.client);
            let share_key =
                crypto::share_key(cipher, &n.cipher_pk, self.round, self.me, n.client).map_err(bad)?;
            let mask_seed =
                crypto::mask_seed(mask, &n.mask_pk, self.round, self.me, n.client).map_err(bad)?;
            peers.insert(n.client, Peer { share_key, mask_seed });
        }
        let b_shares = shamir::split(&self.self_seed, t, deg, self.split_seeds[0])
            .map_err(|e| SecAggConfigError::Policy(e.to_string()))?;
        let sk_shares = shamir::split(&mask.secret_bytes(), t, deg, self.split_seeds[1])
            .map_err(|e| SecAggConfigError::Policy(e.to_string()))?;
        let mut shares = Vec::with_capacity(deg);
        let mut plain = Zeroizing::new([0u8; SHARE_PLAINTEXT_LEN]);
        for ((n, b), sk) in neighbours.iter().zip(&b_shares).zip(&sk_shares) {
            plain[0..8].copy_from_slice(&self.round.0.to_le_bytes());
            plain[8..16].copy_from_slice(&self.me.0.to_le_bytes());
            plain[16..24].copy_from_slice(&n.client.0.to_le_bytes());
            plain[24] = b.x;
            plain[25..57].copy_from_slice(&b.y);
            plain[57] = sk.x;
            plain[58..90].copy_from_slice(&sk.y);
            let key = &peers[&n.client].share_key;
            let ciphertext = crypto::seal(key, self.round, self.me, n.client, plain.as_ref());
            shares.push(EncryptedShare { to: n.client, ciphertext });
        }
        let mut all = b_shares;
        all.extend(sk_shares);
        all.iter_mut().for_each(Zeroize::zeroize);
        self.threshold = t;
        self.peers = peers;
        self.keys = None;
        self.split_seeds.zeroize();
        self.phase = Phase::AwaitShares;
        Ok(ShareBundle { round: self.round, shares })
    }

    /// Decrypts and checks the shares sent by neighbours in `U2`; at least the threshold of
    /// neighbours must have sent shares.
    pub fn handle_routed_shares(&mut self, msg: RoutedShares) -> Result<(), SecAggError> {
        self.expect(Phase::AwaitShares, msg.round)?;
        let mut held = BTreeMap::new();
        for s in &msg.shares {
            let Some(peer) = self.peers.get(&s.from) else {
                return Err(if s.from == self.me {
                    SecAggError::SelfListed
                } else {
                    SecAggError::NotANeighbour(s.from)
                });
            };
            if held.contains_key(&s.from) {
                return Err(SecAggError::DuplicateSender(s.from));
            }
            if s.ciphertext.len() != SHARE_CIPHERTEXT_LEN {
                return Err(SecAggError::BadShare(s.from));
            }
            let plain = crypto::open(&peer.share_key, self.round, s.from, self.me, &s.ciphertext)
                .map_err(|_| SecAggError::BadShare(s.from))?;
            let ids_ok = plain[0..8] == self.round.0.to_le_bytes()
                && plain[8..16] == s.from.0.to_le_bytes()
                && plain[16..24] == self.me.0.to_le_bytes();
            if !ids_ok || plain[24] == 0 || plain[24] != plain[57] {
                return Err(SecAggError::BadShare(s.from));
            }
            let b = Share { x: plain[24], y: take32(&plain[25..57]) };
            let sk = Share { x: plain[57], y: take32(&plain[58..90]) };
            held.insert(s.from, Held { b, sk });
        }
        if held.len() < self.threshold {
            return Err(SecAggError::TooFewSenders { got: held.len(), needed: self.threshold });
        }
        self.held = held;
        self.phase = Phase::ReadyToMask;
        Ok(())
    }

    /// Whether the routed shares were accepted and [`SecAggClient::mask`] may be called.
    pub fn ready_to_mask(&self) -> bool {
        self.phase == Phase::ReadyToMask
    }

    /// Masks `input` (`params.len` values, each below `2^bits`):
    /// `y = x + PRG(b) + Σ_{j ∈ U2 ∩ N(i)} ±PRG(s_ij) mod 2^bits`.
    pub fn mask(&mut self, base_version: ModelVersion, input: Vec<u32>) -> Result<MaskedInput, SecAggError> {
        self.expect(Phase::ReadyToMask, self.round)?;
        if input.len() != self.params.len as usize {
            return Err(SecAggError::WrongLength { expected: self.params.len as usize, got: input.len() });
        }
        let m = self.params.mask();
        if let Some(index) = input.iter().position(|&v| v > m) {
            return Err(SecAggError::ValueOutOfRange { index });
        }
        let mut y = input;
        let bits = self.params.bits;
        crypto::expand_mask(&self.self_seed, &mut y, bits, 1);
        for j in self.held.keys() {
            let sign = if self.me < *j { 1 } else { -1 };
            crypto::expand_mask(&self.peers[j].mask_seed, &mut y, bits, sign);
        }
        self.self_seed.zeroize();
        self.peers.clear();
        self.phase = Phase::Masked;
        Ok(MaskedInput { round: self.round, base_version, masked: y })
    }

    /// Answers the (single) unmask request: self-mask shares of `survivors`, mask-key shares of
    /// `dropped`. Refuses a second request, a peer listed twice or in both lists, a peer outside
    /// `U2 ∩ N(i)`, and a request naming this client.
    pub fn handle_unmask(&mut self, msg: UnmaskRequest) -> Result<UnmaskResponse, SecAggError> {
        self.expect(Phase::Masked, msg.round)?;
        let mut seen = BTreeSet::new();
        for &c in msg.survivors.iter().chain(&msg.dropped) {
            if c == self.me {
                return Err(SecAggError::SelfListed);
            }
            if !self.held.contains_key(&c) {
                return Err(SecAggError::NotInvolved(c));
            }
            if !seen.insert(c) {
                return Err(SecAggError::ListedTwice(c));
            }
        }
        let reveal = |list: &[ClientId], pick: fn(&Held) -> &Share| -> Vec<RevealedShare> {
            list.iter().map(|c| RevealedShare { of: *c, share: pick(&self.held[c]).clone() }).collect()
        };
        let response = UnmaskResponse {
            round: self.round,
            self_mask_shares: reveal(&msg.survivors, |h| &h.b),
            mask_key_shares: reveal(&msg.dropped, |h| &h.sk),
        };
        self.held.clear();
        self.phase = Phase::Answered;
        Ok(response)
    }
}
