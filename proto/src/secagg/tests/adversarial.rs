//! Adversarial clients and coordinators.

use super::*;
use proptest::prelude::*;

/// A hand-driven round: the test decides what each side sees.
struct Net {
    server: SecAggServer,
    clients: BTreeMap<ClientId, SecAggClient>,
    inputs: BTreeMap<ClientId, Vec<u32>>,
    p: SecAggParams,
}

impl Net {
    /// Clients `0..n`, all advertised.
    fn new(n: u64, p: SecAggParams, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let ids: Vec<ClientId> = (0..n).map(ClientId).collect();
        let mut server = SecAggServer::new(ROUND, BASE, p, ids.clone(), 2, rng.seed()).unwrap();
        let mut clients = BTreeMap::new();
        let mut inputs = BTreeMap::new();
        for c in ids {
            let (client, advert) =
                SecAggClient::new(ROUND, c, p, SecAggPolicy::default(), rng.seed()).unwrap();
            server.handle_message(c, SecAggClientMessage::KeyAdvert(advert)).unwrap();
            clients.insert(c, client);
            inputs.insert(c, (0..p.len).map(|_| rng.next() as u32 & p.mask()).collect());
        }
        Self { server, clients, inputs, p }
    }

    fn close(&mut self) -> Vec<(ClientId, SecAggServerMessage)> {
        self.server.close_phase().unwrap();
        std::iter::from_fn(|| self.server.poll_transmit()).collect()
    }

    /// The honest client's answer to a server message.
    fn answer(&mut self, to: ClientId, msg: SecAggServerMessage) -> Result<SecAggClientMessage, SecAggError> {
        let c = self.clients.get_mut(&to).unwrap();
        match msg {
            SecAggServerMessage::Neighbourhood(m) => {
                c.handle_neighbourhood(m).map(SecAggClientMessage::Shares)
            }
            SecAggServerMessage::RoutedShares(m) => {
                c.handle_routed_shares(m)?;
                c.mask(BASE, self.inputs[&to].clone()).map(SecAggClientMessage::Masked)
            }
            SecAggServerMessage::UnmaskRequest(m) => c.handle_unmask(m).map(SecAggClientMessage::Unmask),
        }
    }

    /// Delivers every message honestly and feeds the answers to the server.
    fn step_honest(&mut self) {
        for (to, msg) in self.close() {
            let reply = self.answer(to, msg).unwrap();
            self.server.handle_message(to, reply).unwrap();
        }
    }

    fn expected(&self, out: &SecAggOutput) -> Vec<u32> {
        let mut sum = vec![0u32; self.p.len as usize];
        for c in &out.contributors {
            for (s, x) in sum.iter_mut().zip(&self.inputs[c]) {
                *s = s.wrapping_add(*x) & self.p.mask();
            }
        }
        sum
    }

    fn finish(&mut self) -> SecAggOutput {
        self.server.close_phase().unwrap();
        let out = self.server.take_result().unwrap();
        assert_eq!(out.sum, self.expected(&out));
        out
    }
}

/// 12 clients, k = 10, t = 6: each client misses one other, so several exclusions are tolerable.
fn p12() -> SecAggParams {
    params(10, 6, 20, 32)
}

fn neighbourhood_of(msgs: &[(ClientId, SecAggServerMessage)], c: ClientId) -> Neighbourhood {
    msgs.iter()
        .find_map(|(to, m)| match m {
            SecAggServerMessage::Neighbourhood(n) if *to == c => Some(n.clone()),
            _ => None,
        })
        .unwrap()
}

#[test]
fn server_refuses_malformed_duplicate_and_misaddressed_bundles() {
    let mut net = Net::new(12, p12(), 21);
    let msgs = net.close();
    let mut bundles = BTreeMap::new();
    for (to, msg) in msgs.clone() {
        let SecAggClientMessage::Shares(b) = net.answer(to, msg).unwrap() else { panic!() };
        bundles.insert(to, b);
    }
    let (a, b, c, d) = (ClientId(0), ClientId(1), ClientId(2), ClientId(3));
    let send = |net: &mut Net, from, bundle: ShareBundle| {
        net.server.handle_message(from, SecAggClientMessage::Shares(bundle))
    };
    // Truncated ciphertext: malformed, and `a` is out of the phase.
    let mut bad = bundles[&a].clone();
    bad.shares[0].ciphertext.pop();
    assert!(matches!(send(&mut net, a, bad), Err(SecAggReject::Malformed(_))));
    assert_eq!(send(&mut net, a, bundles[&a].clone()), Err(SecAggReject::NotParticipating));
    assert_eq!(net.server.waiting_for(), 11);
    // Duplicate message.
    send(&mut net, b, bundles[&b].clone()).unwrap();
    assert_eq!(send(&mut net, b, bundles[&b].clone()), Err(SecAggReject::Duplicate));
    // Share addressed to a non-neighbour.
    let ns: Vec<ClientId> = neighbourhood_of(&msgs, c).neighbours.iter().map(|n| n.client).collect();
    let stranger = (0..12).map(ClientId).find(|x| *x != c && !ns.contains(x)).unwrap();
    let mut bad = bundles[&c].clone();
    bad.shares[0].to = stranger;
    assert_eq!(send(&mut net, c, bad), Err(SecAggReject::NotANeighbour(stranger)));
    // Two shares for the same neighbour.
    let mut bad = bundles[&d].clone();
    bad.shares[1].to = bad.shares[0].to;
    assert!(matches!(send(&mut net, d, bad), Err(SecAggReject::Malformed(_))));
    // Replays: an advert in the share phase, a bundle from another round, a stranger.
    let e = ClientId(4);
    let (_, advert) = SecAggClient::new(ROUND, e, p12(), SecAggPolicy::default(), [9; 32]).unwrap();
    let phase = SecAggPhase::ShareKeys;
    assert_eq!(
        net.server.handle_message(e, SecAggClientMessage::KeyAdvert(advert)),
        Err(SecAggReject::WrongPhase { phase })
    );
    let mut old = bundles[&e].clone();
    old.round = RoundId(ROUND.0 - 1);
    assert_eq!(
        send(&mut net, e, old),
        Err(SecAggReject::WrongRound { expected: ROUND, got: RoundId(ROUND.0 - 1) })
    );
    assert_eq!(send(&mut net, ClientId(999), bundles[&e].clone()), Err(SecAggReject::NotInCohort));
    for (from, bundle) in &bundles {
        if ![a, b, c, d].contains(from) {
            send(&mut net, *from, bundle.clone()).unwrap();
        }
    }
    assert_eq!(net.server.waiting_for(), 0);
    let routed = net.close();
    let got: BTreeSet<ClientId> = routed.iter().map(|(to, _)| *to).collect();
    assert!(got.contains(&b) && !got.contains(&a) && !got.contains(&c) && !got.contains(&d));
    for (to, msg) in routed {
        let SecAggServerMessage::RoutedShares(r) = &msg else { panic!() };
        assert!(r.shares.iter().all(|s| ![a, c, d].contains(&s.from)), "only U2 senders are routed");
        let reply = net.answer(to, msg).unwrap();
        net.server.handle_message(to, reply).unwrap();
    }
    net.step_honest();
    let out = net.finish();
    assert!(!out.contributors.contains(&a));
    assert!(net.server.stats().refused >= 7);
}

#[test]
fn client_refuses_bad_routed_shares() {
    let mut net = Net::new(12, p12(), 22);
    net.step_honest();
    let routed = net.close();
    let (x, msg) = routed[0].clone();
    let SecAggServerMessage::RoutedShares(good) = msg else { panic!() };
    let client = net.clients.get_mut(&x).unwrap();
    let from0 = good.shares[0].from;
    let mut m = good.clone();
    m.shares[0].ciphertext[5] ^= 1;
    assert_eq!(client.handle_routed_shares(m), Err(SecAggError::BadShare(from0)));
    let mut m = good.clone();
    m.shares.push(m.shares[0].clone());
    assert_eq!(client.handle_routed_shares(m), Err(SecAggError::DuplicateSender(from0)));
    let mut m = good.clone();
    m.shares[0].from = ClientId(999);
    assert_eq!(client.handle_routed_shares(m), Err(SecAggError::NotANeighbour(ClientId(999))));
    let mut m = good.clone();
    let other = m.shares[1].ciphertext.clone();
    m.shares[0].ciphertext = other; // a share for x, but sealed by another sender
    assert_eq!(client.handle_routed_shares(m), Err(SecAggError::BadShare(from0)));
    let mut m = good.clone();
    m.shares.truncate(5); // fewer than t = 6 neighbours in U2
    assert_eq!(client.handle_routed_shares(m), Err(SecAggError::TooFewSenders { got: 5, needed: 6 }));
    let mut m = good.clone();
    m.round = RoundId(1);
    assert!(matches!(client.handle_routed_shares(m), Err(SecAggError::WrongRound { .. })));
    assert!(!client.ready_to_mask());
    assert!(matches!(client.mask(BASE, vec![0; 32]), Err(SecAggError::WrongPhase { .. })));
    client.handle_routed_shares(good).unwrap(); // refusals changed nothing
    assert!(client.ready_to_mask());
    assert_eq!(client.mask(BASE, vec![0; 31]), Err(SecAggError::WrongLength { expected: 32, got: 31 }));
    assert_eq!(client.mask(BASE, vec![1 << 20; 32]), Err(SecAggError::ValueOutOfRange { index: 0 }));
}

#[test]
fn client_refuses_bad_neighbourhoods() {
    let p = p12();
    let mk = |c| SecAggClient::new(ROUND, ClientId(c), p, SecAggPolicy::default(), [c as u8; 32]).unwrap();
    let keys: Vec<NeighbourKeys> = (1..=6)
        .map(|c| {
            let (_, a) = mk(c);
            NeighbourKeys { client: ClientId(c), cipher_pk: a.cipher_pk, mask_pk: a.mask_pk }
        })
        .collect();
    let hood = |ns: Vec<NeighbourKeys>, cohort| Neighbourhood { round: ROUND, cohort, neighbours: ns };
    let (mut me, advert) = mk(0);
    let mut with_self = keys.clone();
    with_self[0].client = ClientId(0);
    assert_eq!(me.handle_neighbourhood(hood(with_self, 12)), Err(SecAggError::SelfListed));
    let mut dup = keys.clone();
    dup[1].client = dup[0].client;
    assert_eq!(me.handle_neighbourhood(hood(dup, 12)), Err(SecAggError::DuplicateNeighbour(ClientId(1))));
    assert!(matches!(
        me.handle_neighbourhood(hood(keys[..2].to_vec(), 12)),
        Err(SecAggError::NeighbourhoodSize { .. })
    ));
    let mut low = keys.clone();
    low[2].mask_pk = [0; 32];
    assert_eq!(me.handle_neighbourhood(hood(low, 12)), Err(SecAggError::BadKey(ClientId(3))));
    let mut mine = keys.clone();
    mine[3].cipher_pk = advert.cipher_pk;
    assert_eq!(me.handle_neighbourhood(hood(mine, 12)), Err(SecAggError::BadKey(ClientId(4))));
    // A policy demanding t >= 0.9 deg refuses t_eff = max(4, ceil(6 * 6 / 10)) = 4 of 6.
    let strict = SecAggPolicy { min_threshold_fraction: 0.9, ..SecAggPolicy::default() };
    let (mut picky, _) = SecAggClient::new(ROUND, ClientId(0), p, strict, [0; 32]).unwrap();
    assert_eq!(
        picky.handle_neighbourhood(hood(keys.clone(), 12)),
        Err(SecAggError::ThresholdBelowPolicy { threshold: 4, deg: 6 })
    );
    // The whole cohort may be smaller than min_neighbours.
    assert!(me.handle_neighbourhood(hood(keys[..2].to_vec(), 3)).is_ok());
}

#[test]
fn server_refuses_bad_masked_inputs_and_excludes_the_sender() {
    let mut net = Net::new(12, p12(), 23);
    net.step_honest();
    let send = |net: &mut Net, from, m| net.server.handle_message(from, SecAggClientMessage::Masked(m));
    for (i, (to, msg)) in net.close().into_iter().enumerate() {
        let SecAggClientMessage::Masked(m) = net.answer(to, msg).unwrap() else { panic!() };
        match i {
            0 => {
                let mut bad = m.clone();
                bad.masked.pop();
                assert_eq!(send(&mut net, to, bad), Err(SecAggReject::WrongLength { expected: 32, got: 31 }));
            }
            1 => {
                let mut bad = m.clone();
                bad.masked[3] = 1 << 20;
                assert_eq!(send(&mut net, to, bad), Err(SecAggReject::ValueOutOfRange { index: 3 }));
            }
            2 => {
                let mut bad = m.clone();
                bad.base_version = ModelVersion(0);
                assert!(matches!(send(&mut net, to, bad), Err(SecAggReject::WrongBaseVersion { .. })));
            }
            _ => {}
        }
        let _ = send(&mut net, to, m);
    }
    net.step_honest();
    let out = net.finish();
    assert_eq!(out.contributors.len(), 9, "the three senders of bad inputs count as dropped");
}

#[test]
fn client_answers_one_unmask_request_and_never_both_kinds() {
    let mut net = Net::new(12, p12(), 24);
    net.step_honest();
    net.step_honest();
    let reqs = net.close();
    let (x, SecAggServerMessage::UnmaskRequest(good)) = reqs[0].clone() else { panic!() };
    let client = net.clients.get_mut(&x).unwrap();
    let peer = good.survivors[0];
    let mut both = good.clone();
    both.dropped.push(peer);
    assert_eq!(client.handle_unmask(both), Err(SecAggError::ListedTwice(peer)));
    let mut me = good.clone();
    me.survivors.push(x);
    assert_eq!(client.handle_unmask(me), Err(SecAggError::SelfListed));
    let mut stranger = good.clone();
    stranger.dropped.push(ClientId(999));
    assert_eq!(client.handle_unmask(stranger), Err(SecAggError::NotInvolved(ClientId(999))));
    let r = client.handle_unmask(good.clone()).unwrap();
    assert_eq!(r.self_mask_shares.len(), good.survivors.len());
    assert!(r.mask_key_shares.is_empty());
    // Asking again, now claiming everyone dropped, is refused.
    let flipped = UnmaskRequest { round: ROUND, survivors: vec![], dropped: good.survivors.clone() };
    assert_eq!(client.handle_unmask(flipped), Err(SecAggError::AlreadyAnswered));
}

/// A malicious coordinator tells some of y's neighbours that y survived and the others that it
/// dropped. Each honest neighbour reveals one kind of share of y, once; since t > deg / 2, no split
/// yields t shares of both kinds, so b_y and y's mask key are never both reconstructible.
#[test]
fn coordinator_cannot_gather_both_kinds_of_share() {
    let p = p12();
    let y = ClientId(0);
    for split_at in 0..=10 {
        let mut net = Net::new(12, p, 25);
        net.step_honest();
        net.step_honest();
        let reqs = net.close();
        let ns: Vec<ClientId> = reqs
            .iter()
            .filter(|(_, m)| match m {
                SecAggServerMessage::UnmaskRequest(r) => r.survivors.contains(&y) || r.dropped.contains(&y),
                _ => false,
            })
            .map(|(to, _)| *to)
            .collect();
        assert_eq!(ns.len(), 10);
        let (mut b_shares, mut sk_shares) = (Vec::new(), Vec::new());
        for (k, j) in ns.iter().enumerate() {
            let client = net.clients.get_mut(j).unwrap();
            // Ask neighbour j about y only, with a role chosen by the attacker.
            let req = if k < split_at {
                UnmaskRequest { round: ROUND, survivors: vec![y], dropped: vec![] }
            } else {
                UnmaskRequest { round: ROUND, survivors: vec![], dropped: vec![y] }
            };
            let r = client.handle_unmask(req).unwrap();
            b_shares.extend(r.self_mask_shares.into_iter().map(|s| s.share));
            sk_shares.extend(r.mask_key_shares.into_iter().map(|s| s.share));
            // The second, opposite question gets nothing.
            let again = UnmaskRequest { round: ROUND, survivors: vec![y], dropped: vec![] };
            assert_eq!(client.handle_unmask(again), Err(SecAggError::AlreadyAnswered));
        }
        let t = p.threshold_for(10);
        assert_eq!(b_shares.len() + sk_shares.len(), 10);
        assert!(!(b_shares.len() >= t && sk_shares.len() >= t), "split {split_at}");
        let short = if b_shares.len() < t { &b_shares } else { &sk_shares };
        assert!(matches!(combine(short, t), Err(ShamirError::NotEnoughShares { .. })));
    }
}

fn corrupt_first(kind: bool) -> impl FnMut(ClientId, &mut SecAggClientMessage) {
    let mut done = false;
    move |_, m| {
        if let SecAggClientMessage::Unmask(r) = m {
            let list = if kind { &mut r.self_mask_shares } else { &mut r.mask_key_shares };
            if !done && let Some(s) = list.first_mut() {
                s.share.y[7] ^= 0x40;
                done = true;
            }
        }
    }
}

#[test]
fn corrupted_revealed_shares_abort_never_a_wrong_sum() {
    let p = p12();
    // Self-mask share: every survivor has 10 > t responders, so the surplus shares expose it.
    let r = run(12, p, 6, &Dropouts::default(), 31, &mut corrupt_first(true));
    assert!(matches!(r.result, Err(SecAggAbort::InconsistentShares { .. })), "{:?}", r.result);
    assert_eq!(r.server.phase(), SecAggPhase::Aborted);
    // Mask-key share of a dropped client: the reconstructed key must match its advertised key.
    let mut drops = Dropouts::default();
    drops.after_masked.insert(ClientId(5));
    let mut r = run(12, p, 6, &drops, 32, &mut corrupt_first(false));
    match &r.result {
        Ok(out) => assert_eq!(out.sum, r.expected_sum(out, &p)),
        Err(e) => assert_eq!(*e, SecAggAbort::InconsistentShares { client: ClientId(5) }),
    }
    assert!(r.server.take_result().is_none());
    // A share with a wrong x-coordinate is refused and its sender's shares excluded.
    let mut bad_x = |from: ClientId, m: &mut SecAggClientMessage| {
        if let SecAggClientMessage::Unmask(r) = m
            && from == ClientId(3)
            && let Some(s) = r.self_mask_shares.first_mut()
        {
            s.share.x ^= 0x80;
        }
    };
    let r = run(12, p, 6, &Dropouts::default(), 33, &mut bad_x);
    let out = r.result.as_ref().unwrap();
    assert_eq!(out.sum, r.expected_sum(out, &p));
    assert_eq!(r.server.stats().unmask.responded, 11);
}

#[test]
fn device_lying_about_dropouts_is_refused() {
    let p = p12();
    let mut lie = |from: ClientId, m: &mut SecAggClientMessage| {
        if let SecAggClientMessage::Unmask(r) = m
            && from == ClientId(3)
            && let Some(s) = r.self_mask_shares.first().cloned()
        {
            // Also "reveals" a mask-key share of a survivor it was not asked about.
            r.mask_key_shares.push(s);
        }
    };
    let r = run(12, p, 6, &Dropouts::default(), 34, &mut lie);
    let out = r.result.as_ref().unwrap();
    assert_eq!(out.sum, r.expected_sum(out, &p));
    assert_eq!(r.server.stats().unmask.responded, 11, "the liar's response was refused");
}

#[test]
fn below_threshold_survivors_abort_and_reveal_nothing() {
    let p = params(8, 5, 32, 16);
    let drops = Dropouts { after_shares: [1, 4, 7].map(ClientId).into(), ..Default::default() };
    let mut r = run(10, p, 8, &drops, 35, &mut no_tamper());
    assert_eq!(
        r.result,
        Err(SecAggAbort::TooFewSurvivors { phase: SecAggPhase::MaskedInput, got: 7, needed: 8 })
    );
    assert!(r.server.take_result().is_none());
    assert!(r.server.poll_transmit().is_none(), "no unmask request went out");
    assert!(!r.received.iter().any(|(_, m)| matches!(m, SecAggClientMessage::Unmask(_))));
    assert_eq!(r.server.close_phase(), Err(SecAggAbort::AlreadyFinished));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    /// Random dropouts at every phase: the round yields the exact sum or aborts cleanly.
    #[test]
    fn random_dropouts_exact_or_abort(a in any::<u16>(), b in any::<u16>(), c in any::<u16>(), seed in any::<u64>()) {
        let p = params(6, 4, 20, 8);
        let set = |m: u16| (0..12u64).filter(|i| m & (1 << i) != 0 && m.count_ones() <= 5).map(ClientId).collect();
        let drops = Dropouts { after_keys: set(a), after_shares: set(b), after_masked: set(c) };
        let mut r = run(12, p, 3, &drops, seed, &mut no_tamper());
        match &r.result {
            Ok(out) => {
                prop_assert_eq!(&out.sum, &r.expected_sum(out, &p));
                prop_assert_eq!(r.server.phase(), SecAggPhase::Done);
            }
            Err(_) => {
                prop_assert_eq!(r.server.phase(), SecAggPhase::Aborted);
                prop_assert!(r.server.take_result().is_none());
            }
        }
    }
}

#[test]
fn consistently_corrupted_shares_abort_thanks_to_the_commitment() {
    // Every responder shifts its share of client 11's self-mask seed by the same amount (colluding
    // devices, or a bug): the shares still lie on one polynomial, so no consistency check can see
    // it, and the reconstructed seed is wrong. The commitment to the seed in the key advertisement
    // catches it: the round aborts instead of committing a wrong sum.
    let p = p12();
    let mut shift = |_: ClientId, m: &mut SecAggClientMessage| {
        if let SecAggClientMessage::Unmask(r) = m {
            for s in r.self_mask_shares.iter_mut().filter(|s| s.of == ClientId(11)) {
                s.share.y[7] ^= 0x40;
            }
        }
    };
    let mut r = run(12, p, 6, &Dropouts::default(), 41, &mut shift);
    assert_eq!(r.result, Err(SecAggAbort::InconsistentShares { client: ClientId(11) }), "never a wrong sum");
    assert!(r.server.take_result().is_none());
}
