//! The coordinator side of one secure-aggregation round.

use super::client::SHARE_CIPHERTEXT_LEN;
use super::crypto::{self, KeyPair};
use super::graph::neighbourhood_graph;
use super::outcome::{SecAggAbort, SecAggOutput, SecAggPhase, SecAggPhaseStats, SecAggReject, SecAggStats};
use super::params::{
    KeyAdvert, MaskedInput, NeighbourKeys, Neighbourhood, RoutedShare, RoutedShares, SecAggClientMessage,
    SecAggConfigError, SecAggParams, SecAggServerMessage, ShareBundle, UnmaskRequest, UnmaskResponse,
};
use super::shamir::{self, Share};
use crate::ids::{ClientId, ModelVersion, RoundId};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use zeroize::Zeroizing;

#[derive(Default)]
struct Member {
    keys: Option<KeyAdvert>,
    neighbours: Vec<ClientId>,
    bundle: BTreeMap<ClientId, Vec<u8>>,
    request: Option<(BTreeSet<ClientId>, BTreeSet<ClientId>)>,
    response: Option<UnmaskResponse>,
    /// Disconnected, or excluded for a malformed message.
    gone: bool,
    /// Sent the current phase's message.
    sent: bool,
}

/// The coordinator side of one round. Feed it client messages ([`SecAggServer::handle_message`])
/// and dropouts, close each phase at its deadline or when [`SecAggServer::waiting_for`] is 0, and
/// send what [`SecAggServer::poll_transmit`] returns.
pub struct SecAggServer {
    round: RoundId,
    base_version: ModelVersion,
    params: SecAggParams,
    needed: usize,
    graph_seed: Zeroizing<[u8; 32]>,
    phase: SecAggPhase,
    members: BTreeMap<ClientId, Member>,
    participants: BTreeSet<ClientId>,
    /// Live participants that have not sent the current phase's message (kept up to date on every
    /// input, so that `waiting_for` is O(1): the host asks after every message).
    owed: usize,
    u2: BTreeSet<ClientId>,
    u3: BTreeSet<ClientId>,
    keys_seen: BTreeSet<[u8; 32]>,
    sum: Vec<u32>,
    outbox: VecDeque<(ClientId, SecAggServerMessage)>,
    result: Option<SecAggOutput>,
    abort: Option<SecAggAbort>,
    stats: SecAggStats,
}

impl std::fmt::Debug for SecAggServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecAggServer")
            .field("round", &self.round)
            .field("phase", &self.phase)
            .field("participants", &self.participants.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl SecAggServer {
    /// Opens a round over `cohort` (at least two distinct clients). The round aborts whenever
    /// fewer than `max(min_survivors, 2, t)` clients remain, where `t` is the threshold of the
    /// largest neighbourhood the cohort allows (`threshold_for(min(|cohort| - 1, k))`).
    /// `seed` (uniform, fresh) draws the neighbourhood graph.
    pub fn new(
        round: RoundId,
        base_version: ModelVersion,
        params: SecAggParams,
        cohort: Vec<ClientId>,
        min_survivors: usize,
        seed: [u8; 32],
    ) -> Result<Self, SecAggConfigError> {
        params.validate()?;
        if cohort.len() < 2 {
            return Err(SecAggConfigError::SmallCohort(cohort.len()));
        }
        let mut members = BTreeMap::new();
        for c in &cohort {
            if members.insert(*c, Member::default()).is_some() {
                return Err(SecAggConfigError::DuplicateClient(*c));
            }
        }
        if min_survivors == 0 || min_survivors > cohort.len() {
            return Err(SecAggConfigError::MinSurvivors { min: min_survivors, cohort: cohort.len() });
        }
        let full = (cohort.len() - 1).min(params.neighbours as usize);
        let needed = min_survivors.max(2).max(params.threshold_for(full));
        let graph_seed = crypto::derive(&seed, b"starling secagg graph v1", round, ClientId(0), ClientId(0));
        let stats = SecAggStats {
            advertise_keys: SecAggPhaseStats { participants: cohort.len(), ..Default::default() },
            ..Default::default()
        };
        Ok(Self {
            round,
            base_version,
            params,
            needed,
            graph_seed,
            phase: SecAggPhase::AdvertiseKeys,
            participants: members.keys().copied().collect(),
            owed: members.len(),
            members,
            u2: BTreeSet::new(),
            u3: BTreeSet::new(),
            keys_seen: BTreeSet::new(),
            sum: Vec::new(),
            outbox: VecDeque::new(),
            result: None,
            abort: None,
            stats,
        })
    }

    /// The current phase.
    pub fn phase(&self) -> SecAggPhase {
        self.phase
    }

    /// Why the round aborted, once it has.
    pub fn abort_reason(&self) -> Option<&SecAggAbort> {
        self.abort.as_ref()
    }

    /// The smallest number of contributors this round accepts.
    pub fn min_survivors(&self) -> usize {
        self.needed
    }

    fn phase_stats(&mut self) -> Option<&mut SecAggPhaseStats> {
        match self.phase {
            SecAggPhase::AdvertiseKeys => Some(&mut self.stats.advertise_keys),
            SecAggPhase::ShareKeys => Some(&mut self.stats.share_keys),
            SecAggPhase::MaskedInput => Some(&mut self.stats.masked_input),
            SecAggPhase::Unmask => Some(&mut self.stats.unmask),
            SecAggPhase::Done | SecAggPhase::Aborted => None,
        }
    }

    /// Accepts one client message for the current phase (see [`SecAggReject`] for what a refusal
    /// changes).
    pub fn handle_message(&mut self, from: ClientId, msg: SecAggClientMessage) -> Result<(), SecAggReject> {
        let r = self.accept(from, msg);
        match &r {
            Ok(bytes) => {
                let bytes = *bytes;
                if let Some(m) = self.members.get_mut(&from) {
                    // Accepted only from a live participant that had not sent yet.
                    m.sent = true;
                    self.owed = self.owed.saturating_sub(1);
                }
                if let Some(s) = self.phase_stats() {
                    s.responded += 1;
                    s.bytes_received += bytes;
                }
            }
            Err(e) => {
                self.stats.refused += 1;
                let excluding = matches!(
                    e,
                    SecAggReject::Malformed(_)
                        | SecAggReject::NotANeighbour(_)
                        | SecAggReject::NotRequested(_)
                        | SecAggReject::ValueOutOfRange { .. }
                        | SecAggReject::WrongBaseVersion { .. }
                        | SecAggReject::WrongLength { .. }
                );
                let owing = self.participants.contains(&from);
                if excluding && let Some(m) = self.members.get_mut(&from) {
                    if owing && !m.gone && !m.sent {
                        self.owed = self.owed.saturating_sub(1);
                    }
                    m.gone = true;
                }
            }
        }
        r.map(|_| ())
    }

    /// Validates and stores a message; returns its approximate payload size.
    fn accept(&mut self, from: ClientId, msg: SecAggClientMessage) -> Result<u64, SecAggReject> {
        let Some(member) = self.members.get(&from) else {
            return Err(SecAggReject::NotInCohort);
        };
        if msg.round() != self.round {
            return Err(SecAggReject::WrongRound { expected: self.round, got: msg.round() });
        }
        let fits = matches!(
            (&msg, self.phase),
            (SecAggClientMessage::KeyAdvert(_), SecAggPhase::AdvertiseKeys)
                | (SecAggClientMessage::Shares(_), SecAggPhase::ShareKeys)
                | (SecAggClientMessage::Masked(_), SecAggPhase::MaskedInput)
                | (SecAggClientMessage::Unmask(_), SecAggPhase::Unmask)
        );
        if !fits {
            return Err(SecAggReject::WrongPhase { phase: self.phase });
        }
        if !self.participants.contains(&from) || member.gone {
            return Err(SecAggReject::NotParticipating);
        }
        if member.sent {
            return Err(SecAggReject::Duplicate);
        }
        match msg {
            SecAggClientMessage::KeyAdvert(m) => self.accept_keys(from, m),
            SecAggClientMessage::Shares(m) => self.accept_bundle(from, m),
            SecAggClientMessage::Masked(m) => self.accept_masked(m),
            SecAggClientMessage::Unmask(m) => self.accept_unmask(from, m),
        }
    }

    fn accept_keys(&mut self, from: ClientId, m: KeyAdvert) -> Result<u64, SecAggReject> {
        if m.cipher_pk == m.mask_pk || m.cipher_pk == [0; 32] || m.mask_pk == [0; 32] {
            return Err(SecAggReject::Malformed("degenerate public keys".into()));
        }
        if self.keys_seen.contains(&m.cipher_pk) || self.keys_seen.contains(&m.mask_pk) {
            return Err(SecAggReject::Malformed("public key already advertised by another client".into()));
        }
        self.keys_seen.insert(m.cipher_pk);
        self.keys_seen.insert(m.mask_pk);
        self.members.get_mut(&from).expect("checked").keys = Some(m);
        Ok(64)
    }

    fn accept_bundle(&mut self, from: ClientId, m: ShareBundle) -> Result<u64, SecAggReject> {
        let member = &self.members[&from];
        if m.shares.len() != member.neighbours.len() {
            return Err(SecAggReject::Malformed(format!(
                "{} shares for {} neighbours",
                m.shares.len(),
                member.neighbours.len()
            )));
        }
        let mut bundle = BTreeMap::new();
        let mut bytes = 0u64;
        for s in m.shares {
            if member.neighbours.binary_search(&s.to).is_err() {
                return Err(SecAggReject::NotANeighbour(s.to));
            }
            if s.ciphertext.len() != SHARE_CIPHERTEXT_LEN {
                return Err(SecAggReject::Malformed(format!(
                    "share ciphertext of {} bytes",
                    s.ciphertext.len()
                )));
            }
            bytes += 8 + s.ciphertext.len() as u64;
            if bundle.insert(s.to, s.ciphertext).is_some() {
                return Err(SecAggReject::Malformed(format!("two shares for {}", s.to)));
            }
        }
        self.members.get_mut(&from).expect("checked").bundle = bundle;
        Ok(bytes)
    }

    fn accept_masked(&mut self, m: MaskedInput) -> Result<u64, SecAggReject> {
        if m.base_version != self.base_version {
            return Err(SecAggReject::WrongBaseVersion { expected: self.base_version, got: m.base_version });
        }
        let len = self.params.len as usize;
        if m.masked.len() != len {
            return Err(SecAggReject::WrongLength { expected: len, got: m.masked.len() });
        }
        let mask = self.params.mask();
        if let Some(index) = m.masked.iter().position(|&v| v > mask) {
            return Err(SecAggReject::ValueOutOfRange { index });
        }
        if self.sum.is_empty() {
            self.sum = vec![0; len];
        }
        for (s, v) in self.sum.iter_mut().zip(&m.masked) {
            *s = s.wrapping_add(*v) & mask;
        }
        Ok(4 * len as u64)
    }

    fn accept_unmask(&mut self, from: ClientId, m: UnmaskResponse) -> Result<u64, SecAggReject> {
        let (survivors, dropped) =
            self.members[&from].request.as_ref().expect("every U3 participant was asked");
        let mut seen = BTreeSet::new();
        let lists = [(&m.self_mask_shares, survivors), (&m.mask_key_shares, dropped)];
        for (shares, requested) in lists {
            for s in shares.iter() {
                if !requested.contains(&s.of) {
                    return Err(SecAggReject::NotRequested(s.of));
                }
                if !seen.insert(s.of) {
                    return Err(SecAggReject::Malformed(format!("two shares of {}", s.of)));
                }
                // The dealer numbered its neighbours 1..=deg in id order.
                let expected = self.members[&s.of].neighbours.binary_search(&from).map(|p| p + 1);
                if expected != Ok(s.share.x as usize) {
                    return Err(SecAggReject::Malformed(format!("share of {} has x = {}", s.of, s.share.x)));
                }
            }
        }
        let bytes = 41 * seen.len() as u64;
        self.members.get_mut(&from).expect("checked").response = Some(m);
        Ok(bytes)
    }

    /// Reports that `client` disconnected: it is no longer waited for and takes no part in later
    /// phases. A message it already delivered in the current phase still counts.
    pub fn handle_dropout(&mut self, client: ClientId) {
        let owing = self.participants.contains(&client);
        if let Some(m) = self.members.get_mut(&client)
            && !m.gone
        {
            if owing && !m.sent {
                self.owed = self.owed.saturating_sub(1);
            }
            m.gone = true;
            self.stats.dropouts += 1;
        }
    }

    /// Live participants that still owe this phase's message (0: the phase may close early).
    pub fn waiting_for(&self) -> usize {
        if matches!(self.phase, SecAggPhase::Done | SecAggPhase::Aborted) {
            return 0;
        }
        debug_assert_eq!(
            self.owed,
            self.participants.iter().filter(|c| !self.members[*c].gone && !self.members[*c].sent).count()
        );
        self.owed
    }

    /// Ends the current phase and queues the next phase's messages; closing the unmask phase
    /// computes the sum. On an abort the round ends in [`SecAggPhase::Aborted`] without revealing
    /// anything further.
    pub fn close_phase(&mut self) -> Result<(), SecAggAbort> {
        let r = match self.phase {
            SecAggPhase::Done | SecAggPhase::Aborted => return Err(SecAggAbort::AlreadyFinished),
            SecAggPhase::AdvertiseKeys => self.close_advertise(),
            SecAggPhase::ShareKeys => self.close_shares(),
            SecAggPhase::MaskedInput => self.close_masked(),
            SecAggPhase::Unmask => self.close_unmask(),
        };
        if let Err(e) = &r {
            self.phase = SecAggPhase::Aborted;
            self.abort = Some(e.clone());
            self.sum = Vec::new();
            for m in self.members.values_mut() {
                m.bundle.clear();
                m.response = None;
            }
        }
        r
    }

    /// Members of the current phase that sent its message (and, unless `keep_gone`, are live).
    fn senders(&self, keep_gone: bool) -> BTreeSet<ClientId> {
        self.participants
            .iter()
            .copied()
            .filter(|c| self.members[c].sent && (keep_gone || !self.members[c].gone))
            .collect()
    }

    fn enter(&mut self, phase: SecAggPhase, participants: BTreeSet<ClientId>) {
        self.phase = phase;
        for m in self.members.values_mut() {
            m.sent = false;
        }
        self.participants = participants;
        self.owed = self.participants.iter().filter(|c| !self.members[*c].gone).count();
        let n = self.participants.len();
        if let Some(s) = self.phase_stats() {
            s.participants = n;
        }
    }

    fn survivors_check(&self, phase: SecAggPhase, got: usize) -> Result<(), SecAggAbort> {
        if got < self.needed {
            return Err(SecAggAbort::TooFewSurvivors { phase, got, needed: self.needed });
        }
        Ok(())
    }

    fn close_advertise(&mut self) -> Result<(), SecAggAbort> {
        let u1 = self.senders(false);
        self.survivors_check(SecAggPhase::AdvertiseKeys, u1.len())?;
        let members: Vec<ClientId> = u1.iter().copied().collect();
        let graph = neighbourhood_graph(&members, self.params.neighbours as usize, *self.graph_seed);
        for (c, ns) in graph {
            let neighbours = ns
                .iter()
                .map(|n| {
                    let k = self.members[n].keys.as_ref().expect("U1 advertised");
                    NeighbourKeys { client: *n, cipher_pk: k.cipher_pk, mask_pk: k.mask_pk }
                })
                .collect();
            let msg = Neighbourhood { round: self.round, cohort: u1.len() as u32, neighbours };
            self.outbox.push_back((c, SecAggServerMessage::Neighbourhood(msg)));
            self.members.get_mut(&c).expect("member").neighbours = ns;
        }
        self.enter(SecAggPhase::ShareKeys, u1);
        Ok(())
    }

    fn threshold_of(&self, c: ClientId) -> usize {
        self.params.threshold_for(self.members[&c].neighbours.len())
    }

    fn close_shares(&mut self) -> Result<(), SecAggAbort> {
        let mut u2 = self.senders(false);
        // A client with fewer than its threshold of neighbours in U2 would refuse its routed
        // shares (and its secrets could not be reconstructed): leave it out, until stable.
        loop {
            let short: Vec<ClientId> = u2
                .iter()
                .copied()
                .filter(|c| {
                    self.members[c].neighbours.iter().filter(|n| u2.contains(n)).count()
                        < self.threshold_of(*c)
                })
                .collect();
            if short.is_empty() {
                break;
            }
            for c in short {
                u2.remove(&c);
            }
        }
        self.survivors_check(SecAggPhase::ShareKeys, u2.len())?;
        for &i in &u2 {
            let senders: Vec<ClientId> =
                self.members[&i].neighbours.iter().copied().filter(|j| u2.contains(j)).collect();
            let shares = senders
                .into_iter()
                .map(|j| {
                    let ct =
                        self.members.get_mut(&j).expect("member").bundle.remove(&i).expect("bundle complete");
                    RoutedShare { from: j, ciphertext: ct }
                })
                .collect();
            let msg = RoutedShares { round: self.round, shares };
            self.outbox.push_back((i, SecAggServerMessage::RoutedShares(msg)));
        }
        for m in self.members.values_mut() {
            m.bundle.clear();
        }
        self.u2 = u2.clone();
        self.enter(SecAggPhase::MaskedInput, u2);
        Ok(())
    }

    fn close_masked(&mut self) -> Result<(), SecAggAbort> {
        // A masked input that arrived counts even if its sender disconnected afterwards.
        let u3 = self.senders(true);
        self.survivors_check(SecAggPhase::MaskedInput, u3.len())?;
        // Refuse to ask for any share unless every secret can be reconstructed from live clients.
        let live: BTreeSet<ClientId> = u3.iter().copied().filter(|c| !self.members[c].gone).collect();
        for &c in &self.u2 {
            let got = self.members[&c].neighbours.iter().filter(|n| live.contains(n)).count();
            let needed = self.threshold_of(c);
            if got < needed {
                return Err(SecAggAbort::NotEnoughShares { client: c, got, needed });
            }
        }
        for &i in &live {
            let (survivors, dropped): (Vec<ClientId>, Vec<ClientId>) = self.members[&i]
                .neighbours
                .iter()
                .copied()
                .filter(|n| self.u2.contains(n))
                .partition(|n| u3.contains(n));
            let msg =
                UnmaskRequest { round: self.round, survivors: survivors.clone(), dropped: dropped.clone() };
            self.outbox.push_back((i, SecAggServerMessage::UnmaskRequest(msg)));
            self.members.get_mut(&i).expect("member").request =
                Some((survivors.into_iter().collect(), dropped.into_iter().collect()));
        }
        self.u3 = u3;
        self.enter(SecAggPhase::Unmask, live);
        Ok(())
    }

    /// The shares of `of`'s secret revealed by responders, in neighbour order.
    fn revealed(&self, of: ClientId, self_mask: bool) -> Vec<Share> {
        self.members[&of]
            .neighbours
            .iter()
            .filter_map(|j| {
                let r = self.members[j].response.as_ref()?;
                let list = if self_mask { &r.self_mask_shares } else { &r.mask_key_shares };
                list.iter().find(|s| s.of == of).map(|s| s.share.clone())
            })
            .collect()
    }

    fn reconstruct(&self, of: ClientId, self_mask: bool) -> Result<Zeroizing<[u8; 32]>, SecAggAbort> {
        let shares = Zeroizing::new(self.revealed(of, self_mask));
        let needed = self.threshold_of(of);
        if shares.len() < needed {
            return Err(SecAggAbort::NotEnoughShares { client: of, got: shares.len(), needed });
        }
        let inconsistent = SecAggAbort::InconsistentShares { client: of };
        if self_mask && !shamir::consistent(&shares, needed) {
            return Err(inconsistent);
        }
        let secret = Zeroizing::new(shamir::combine(&shares, needed).map_err(|_| inconsistent.clone())?);
        if self_mask {
            let committed = self.members[&of].keys.as_ref().map(|k| k.self_mask_commitment);
            if committed != Some(crypto::self_mask_commitment(self.round, of, &secret)) {
                return Err(inconsistent);
            }
        }
        Ok(secret)
    }

    fn close_unmask(&mut self) -> Result<(), SecAggAbort> {
        let bits = self.params.bits;
        let mut sum = std::mem::take(&mut self.sum);
        // Reconstruct everything before touching the sum, so an abort reveals nothing.
        let mut self_seeds = Vec::with_capacity(self.u3.len());
        for &y in &self.u3 {
            self_seeds.push(self.reconstruct(y, true)?);
        }
        let mut dropped_keys = Vec::new();
        for &z in self.u2.difference(&self.u3) {
            let sk = self.reconstruct(z, false)?;
            let kp = KeyPair::from_seed(*sk);
            let advertised = self.members[&z].keys.as_ref().expect("U2 advertised").mask_pk;
            if kp.public() != advertised {
                return Err(SecAggAbort::InconsistentShares { client: z });
            }
            dropped_keys.push((z, kp));
        }
        for b in &self_seeds {
            crypto::expand_mask(b, &mut sum, bits, -1);
        }
        for (z, kp) in &dropped_keys {
            for &j in self.members[z].neighbours.iter().filter(|j| self.u3.contains(j)) {
                let pk = self.members[&j].keys.as_ref().expect("U3 advertised").mask_pk;
                let s = crypto::mask_seed(kp, &pk, self.round, *z, j)
                    .map_err(|_| SecAggAbort::BadKey { client: j })?;
                // j added sign(j, z)·PRG(s_jz); remove it.
                crypto::expand_mask(&s, &mut sum, bits, if j < *z { -1 } else { 1 });
            }
        }
        self.result = Some(SecAggOutput { sum, contributors: self.u3.iter().copied().collect() });
        for m in self.members.values_mut() {
            m.response = None;
        }
        self.enter(SecAggPhase::Done, BTreeSet::new());
        Ok(())
    }

    /// The next message to send, with its recipient.
    pub fn poll_transmit(&mut self) -> Option<(ClientId, SecAggServerMessage)> {
        self.outbox.pop_front()
    }

    /// The round's result, once (after [`SecAggPhase::Done`]).
    pub fn take_result(&mut self) -> Option<SecAggOutput> {
        self.result.take()
    }

    /// Per-phase counters.
    pub fn stats(&self) -> SecAggStats {
        self.stats
    }
}
