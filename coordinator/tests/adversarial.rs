//! The coordinator under attack: the real `starling serve` process over loopback QUIC, each
//! attack alongside an honest fleet whose round must still commit with the honest-only model
//! (or, where an authenticated attacker is let in with a bounded update, within the clip bound).
//! Each test asserts what the attacker got and that the coordinator's peak RSS stayed under a
//! stated bound.
//!
//! Attackers bind 127.0.0.1 (or several 127.0.0.x when a test needs many connections), the
//! honest fleet 127.0.0.2, so per-address limits never hit honest clients. Deadlines bound how
//! long to wait for an expected event (the service's own timeout plus [`SLACK`]); nothing here
//! measures speed.
//!
//! The service limits exercised (all defaults, see `docs/operations.md`): `checkin_timeout_ms`
//! 5 s, `frame_timeout_ms` 30 s, `send_timeout_ms` 10 s, `retry_above_handshakes` 32,
//! `max_connections_per_ip` 64, `unauthenticated_max_frame_bytes` 16 KiB, `round.max_weight`
//! 100 with server-side clipping to `privacy.clip_norm` in every mode.

#[path = "common/adversary.rs"]
mod adversary;
mod common;

use adversary::*;
use common::check_in;
use starling_proto::encoding::EncodedUpdate;
use starling_proto::message::{CoordinatorMessage, Refusal, RejectReason};
use starling_proto::update::ModelShape;
use std::time::Duration;
use tokio::time::Instant;

// Memory bounds. The coordinator's RSS is read from /proc/<pid>/status (VmHWM: the peak over
// its whole life, start-up included), after the attack and the honest round.

/// Peak RSS of a coordinator that serves a 4-client round on the 200×8 model and nothing else:
/// measured 12.1–12.5 MiB (tokio runtime and thread stacks, rustls/ring, SQLite page cache,
/// quinn endpoint buffers), 14.8–15.0 MiB since SQLCipher and OpenSSL are linked in; with
/// headroom for another machine's allocator and thread count.
const BASELINE_RSS: u64 = 24 * MIB;

/// What one open QUIC connection that never opened a stream may cost the coordinator: quinn's
/// connection state, TLS secrets, timers and packet buffers. Measured ≈ 32 KiB (1,000 such
/// connections took the peak from 12 to 43.6 MiB); bounded at 1.5× that.
const PER_CONNECTION: u64 = 48 << 10;

/// The 200×8 model of most tests.
fn small() -> ModelShape {
    ModelShape::new(200, 8).unwrap()
}

/// Peak RSS allowed with a handful of attackers on the small model: the baseline, up to 64
/// handshakes in progress (`retry_above_handshakes` plus slack) at [`PER_CONNECTION`] each
/// (3 MiB), and a few attackers each filling a QUIC receive window (1 MiB per connection) and a
/// pre-check-in frame (16 KiB), with allocator slack: 48 MiB. Holding one 64 MiB frame (79 MiB
/// peak on the code before the fix) cannot fit.
const SMALL_RSS_BOUND: u64 = 48 * MIB;

/// Peak RSS allowed while 1,000 connections that never check in are open at once (they are
/// until the check-in deadline closes them): the baseline plus 1,000 × [`PER_CONNECTION`]
/// ≈ 63 MiB.
const THOUSAND_RSS_BOUND: u64 = BASELINE_RSS + 1000 * PER_CONNECTION;

/// Peak RSS allowed on the 20000×32 model (640,000 parameters, 2.56 MB): the baseline plus 12
/// copies of the model: engine model, history (4 versions), checkpoint blob written and read
/// back, the encoded task frame shared by every recipient (including the non-reader, whose
/// unsent frame is that same buffer), the aggregation accumulator in f64 (2 copies), the next
/// model, and slack. ≈ 45 MiB (26 MiB measured on the code before the fix).
const BIG_RSS_BOUND: u64 = BASELINE_RSS + 12 * 640_000 * 4;

fn refusal() -> String {
    short(&CoordinatorMessage::Refusal(Refusal::Unauthenticated))
}

/// Asserts that an attacker got exactly `expected` and that its connection is closed.
fn assert_attacker(what: &str, outcome: &(Vec<String>, Option<String>), expected: &[String]) {
    let (got, closed) = outcome;
    assert_eq!(got, expected, "{what}: the attacker received {got:?}");
    assert!(closed.is_some(), "{what}: the attacker's connection is still open after {got:?}");
}

/// 0. Control: the honest fleet alone commits exactly the honest-only model, and the idle
/// coordinator stays within the baseline (checks the harness and [`BASELINE_RSS`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_the_honest_fleet_alone_commits_the_honest_only_model() {
    let mut serve = Serve::start(&config("", small(), 4, 4, 60_000), 1..=4);
    let honest = join_fleet(spawn_fleet(&serve, 1..=4)).await;
    assert_honest_only(&serve, honest[0].task.round, &honest).await;
    serve.assert_memory_under(BASELINE_RSS, "control");
}

/// 1. A peer without a valid token claims the id of a client that checked in (before and after
/// it is selected): it is refused and closed, receives nothing meant for the victim, and the
/// victim's session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_less_takeover_of_a_selected_client_is_refused() {
    let shape = small();
    // Victim 1, honest 2–4; client 99 is enrolled too, and the attacker holds its token.
    let mut serve = Serve::start(&config("", shape, 4, 4, 60_000), [1, 2, 3, 4, 99]);
    let honest = serve.transport(HONEST_IP);
    let attacker = serve.transport(ATTACKER_IP);
    let window = CHECKIN_TIMEOUT + SLACK;

    let victim = {
        let (t, token) = (honest.clone(), serve.token(1));
        tokio::spawn(async move { check_in_until_task(&t, 1, token, Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Before selection: no credential at all.
    let mut a1 = Peer::connect(&attacker).await.unwrap();
    a1.send(&check_in(1, Vec::new())).await.unwrap();
    let a1 = tokio::spawn(async move { a1.drain(window).await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let fleet = spawn_fleet(&serve, 2..=4);
    let victim = victim.await.unwrap();

    // After selection: a garbage token, and a valid token of another client.
    let mut a2 = Peer::connect(&attacker).await.unwrap();
    a2.send(&check_in(1, b"stk1.garbage-that-is-no-token".to_vec())).await.unwrap();
    let a2 = tokio::spawn(async move { a2.drain(window).await });
    let mut a3 = Peer::connect(&attacker).await.unwrap();
    a3.send(&check_in(1, serve.token(99))).await.unwrap();
    let a3 = tokio::spawn(async move { a3.drain(window).await });
    let (a1, a2, a3) = (a1.await.unwrap(), a2.await.unwrap(), a3.await.unwrap());

    assert_attacker("no token, before selection", &a1, &[refusal()]);
    assert_attacker("garbage token, after selection", &a2, &[refusal()]);
    assert_attacker("another client's token, after selection", &a3, &[refusal()]);

    let (mut victim_peer, task) = victim.unwrap_or_else(|e| panic!("the victim lost its session: {e}"));
    let victim_update = honest_update(1, shape);
    report(&mut victim_peer, &task, victim_update.clone())
        .await
        .unwrap_or_else(|e| panic!("the victim's update after the attacks: {e}"));
    let mut reported = join_fleet(fleet).await;
    reported.push(Reported { client: 1, task: task.clone(), delta: dense(&victim_update, shape) });
    assert_honest_only(&serve, task.round, &reported).await;
    serve.assert_memory_under(SMALL_RSS_BOUND, "takeover");
}

/// 2. An authenticated, selected client sends a huge update with a huge weight (then, next
/// round, one of near-`f32::MAX` values): the model moves by at most the clip norm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_weight_and_huge_norm_updates_move_the_model_by_at_most_the_clip_norm() {
    let shape = small();
    let clip = 1.0f64;
    let mut serve = Serve::start(&config("", shape, 4, 3, 60_000), [1, 2, 3, 66]);
    let attacker = serve.transport(ATTACKER_IP);
    let huge = match honest_update(66, shape) {
        EncodedUpdate::RowSparse { shape, rows, values } => {
            EncodedUpdate::RowSparse { shape, rows, values: values.iter().map(|v| v * 1e6).collect() }
        }
        _ => unreachable!(),
    };
    let near_max = EncodedUpdate::Dense { shape, values: vec![f32::MAX / 4.0; shape.len()] };
    for (what, attack) in [("values ×1e6", huge), ("values f32::MAX/4", near_max)] {
        let fleet = spawn_fleet(&serve, 1..=3);
        let (mut p, task) =
            check_in_until_task(&attacker, 66, serve.token(66), Duration::from_secs(60)).await.unwrap();
        p.send(&update_for(&task, attack, 1e5)).await.unwrap();
        let answer = p.next(Duration::from_secs(30)).await;
        let honest = join_fleet(fleet).await;
        let (base, new) = serve.committed(task.round, Duration::from_secs(60)).await.unwrap();
        let deltas: Vec<&[f32]> = honest.iter().map(|r| &r.delta[..]).collect();
        let expected = honest_only(&base.model, &deltas);
        let moved = l2_distance(&new.model, &base.model);
        assert!(
            moved <= clip * (1.0 + 1e-4),
            "{what}, weight 1e5 (answered {answer:?}): the model moved by {moved:e}, clip norm {clip}"
        );
        let off = l2_distance(&new.model, &expected);
        assert!(off <= 2.0 * clip, "{what}: {off} from the honest-only model");
        eprintln!("{what}: answered {answer:?}; model moved {moved}, {off} from honest-only");
    }
    serve.assert_memory_under(SMALL_RSS_BOUND, "huge updates");
}

/// 3. 500 half-open handshakes (genuine Initials from a socket that never answers): beyond
/// `retry_above_handshakes` in progress, unvalidated addresses get a stateless Retry, so the
/// attacker makes the coordinator hold at most about that many handshakes; the honest fleet
/// connects meanwhile (more bursts keep coming) and its round commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_handshakes_get_stateless_retries_and_the_round_commits() {
    let shape = small();
    let mut serve = Serve::start(&config("", shape, 4, 4, 60_000), 1..=4);
    let mut half = HalfOpen::new(ATTACKER_IP, serve.quic, serve.hostile_client_config());
    let first = tokio::task::block_in_place(|| half.send(500));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (stateful, retried) = half.counts(first.clone());
    eprintln!("first burst of 500: {stateful} answered with handshake state, {retried} with a Retry");
    // Handshake state for at most the threshold (plus slack for handshakes the coordinator
    // counts a little late); a Retry for (nearly) all the others.
    assert!(
        stateful <= RETRY_ABOVE_HANDSHAKES + 32,
        "the coordinator started {stateful} handshakes for 500 half-open connections \
         ({retried} Retry packets); at most {} expected",
        RETRY_ABOVE_HANDSHAKES + 32
    );
    assert!(retried >= 400, "only {retried} of 500 half-open connections got a Retry ({stateful} got state)");

    let fleet = spawn_fleet(&serve, 1..=4);
    let mut bursts = vec![first];
    while !fleet.iter().all(|h| h.is_finished()) && bursts.len() < 5 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        bursts.push(tokio::task::block_in_place(|| half.send(500)));
    }
    let honest = join_fleet(fleet).await;
    assert_honest_only(&serve, honest[0].task.round, &honest).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (k, b) in bursts.into_iter().enumerate() {
        let (stateful, retried) = half.counts(b);
        eprintln!("burst {k}: {stateful} with handshake state, {retried} retried");
        assert!(stateful <= RETRY_ABOVE_HANDSHAKES + 32, "burst {k}: {stateful} handshakes started");
    }
    serve.assert_memory_under(SMALL_RSS_BOUND, "half-open handshakes");
}

/// 4a. 1,000 connections complete the handshake and never check in (16 source addresses,
/// under the per-address cap): every one is closed within the check-in deadline; the honest
/// round commits meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_that_never_check_in_are_closed() {
    let shape = small();
    let mut serve = Serve::start(&config("", shape, 4, 4, 60_000), 1..=4);
    let config = serve.hostile_client_config();
    let endpoints: Vec<quinn::Endpoint> = (0..16).map(|k| endpoint_on(loopback(10 + k))).collect();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let (endpoint, config, server) = (endpoints[i % endpoints.len()].clone(), config.clone(), serve.quic);
        set.spawn(async move {
            let s = silent_connection_retrying(&endpoint, &config, server).await?;
            let deadline = s.established + CHECKIN_TIMEOUT + SLACK;
            let closed = tokio::time::timeout_at(deadline, s.conn.closed()).await;
            Ok::<_, String>((s.established, closed.ok().map(|e| (Instant::now(), e.to_string()))))
        });
    }
    let fleet = spawn_fleet(&serve, 1..=4);
    let (mut established, mut failed, mut open, mut latest) = (0, Vec::new(), 0, Duration::ZERO);
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    while let Some(r) = set.join_next().await {
        match r.unwrap() {
            Ok((at, closed)) => {
                established += 1;
                match closed {
                    Some((when, reason)) => {
                        latest = latest.max(when - at);
                        *reasons.entry(reason).or_default() += 1;
                    }
                    None => open += 1,
                }
            }
            Err(e) => failed.push(e),
        }
    }
    eprintln!(
        "{established} established, {open} still open, close reasons {reasons:?}, latest close {latest:?}"
    );
    assert_eq!(established, 1000, "handshakes failed: {:?}", &failed[..failed.len().min(3)]);
    assert_eq!(
        open,
        0,
        "{open} of 1000 connections that never checked in were still open {:?} after their handshake",
        CHECKIN_TIMEOUT + SLACK
    );
    let honest = join_fleet(fleet).await;
    assert_honest_only(&serve, honest[0].task.round, &honest).await;
    serve.assert_memory_under(THOUSAND_RSS_BOUND, "1000 silent connections");
}

/// 4b. The connection beyond `max_connections_per_ip` from one address is refused (or closed at
/// once), while other addresses are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_beyond_the_per_address_cap_is_refused() {
    let shape = small();
    let mut serve = Serve::start(&config("", shape, 2, 2, 60_000), 1..=2);
    let config = serve.hostile_client_config();
    let endpoint = endpoint_on(loopback(3));
    let opened = futures_join(
        (0..MAX_CONNECTIONS_PER_IP)
            .map(|_| silent_connection_retrying(&endpoint, &config, serve.quic))
            .collect(),
    )
    .await;
    let opened: Vec<Silent> = opened
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|e| panic!("connection {i} of {MAX_CONNECTIONS_PER_IP} from 127.0.0.3: {e}"))
        })
        .collect();
    let still_open = opened.iter().filter(|s| s.conn.close_reason().is_none()).count();
    assert_eq!(still_open, MAX_CONNECTIONS_PER_IP, "the test is too slow: some closed before the extra one");
    let extra = match silent_connection(&endpoint, &config, serve.quic).await {
        Err(e) => format!("refused: {e}"),
        Ok(s) => match tokio::time::timeout(Duration::from_secs(2), s.conn.closed()).await {
            Ok(e) => format!("closed at once: {e}"),
            Err(_) => {
                panic!("connection {} from 127.0.0.3 was accepted and kept open", MAX_CONNECTIONS_PER_IP + 1)
            }
        },
    };
    eprintln!("connection {} from one address: {extra}", MAX_CONNECTIONS_PER_IP + 1);
    let honest = join_fleet(spawn_fleet(&serve, 1..=2)).await;
    assert_honest_only(&serve, honest[0].task.round, &honest).await;
    drop(opened);
    serve.assert_memory_under(SMALL_RSS_BOUND, "per-address cap");
}

/// Awaits every future of `v` concurrently.
async fn futures_join<F: std::future::Future>(v: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = v.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in pinned.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}

/// Sends `bytes` in 1 MiB chunks until the connection closes or everything is sent; returns
/// whether everything was sent.
async fn stream_out(p: &mut Peer, total: usize, within: Duration) -> bool {
    let chunk = vec![0u8; 1 << 20];
    let deadline = Instant::now() + within;
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        let conn = p.conn.connection().clone();
        tokio::select! {
            r = p.send_bytes(&chunk[..n]) => if r.is_err() { return false },
            _ = conn.closed() => return false,
            _ = tokio::time::sleep_until(deadline) => return false,
        }
        sent += n;
    }
    true
}

/// 5. A frame announcing 64 MiB before check-in: refused from its header, the connection closed
/// before the body is through, and the coordinator's memory does not grow by anything like it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_frame_before_check_in_is_refused_from_its_header() {
    let shape = small();
    let mut serve = Serve::start(&config("", shape, 4, 4, 60_000), 1..=4);
    let fleet = spawn_fleet(&serve, 1..=4);
    let attacker = serve.transport(ATTACKER_IP);
    let total = 64usize << 20;
    let mut p = Peer::connect(&attacker).await.unwrap();
    let mut header = ((total - 4) as u32).to_le_bytes().to_vec();
    header.extend_from_slice(&1u16.to_le_bytes());
    p.send_bytes(&header).await.unwrap();
    let sent_all = stream_out(&mut p, total - header.len(), Duration::from_secs(30)).await;
    let (got, closed) = p.drain(SLACK).await;
    let tx = p.conn.connection().stats().udp_tx.bytes;
    eprintln!(
        "64 MiB frame: sent everything: {sent_all}; {tx} bytes transmitted; got {got:?}; closed {closed:?}"
    );
    assert!(got.is_empty(), "the attacker received {got:?}");
    assert!(closed.is_some(), "the connection is still open");
    assert!(!sent_all, "the coordinator took the whole 64 MiB body ({tx} bytes transmitted) before closing");
    let honest = join_fleet(fleet).await;
    assert_honest_only(&serve, honest[0].task.round, &honest).await;
    serve.assert_memory_under(SMALL_RSS_BOUND, "64 MiB frame");
}

/// Sends `frame` one byte per second until the coordinator closes the connection (returns how
/// long it took from the first byte) or `limit` passes or the frame is complete (returns the
/// bytes sent).
async fn dribble(p: &mut Peer, frame: &[u8], limit: Duration) -> Result<Duration, usize> {
    let start = Instant::now();
    let conn = p.conn.connection().clone();
    for (k, b) in frame.iter().enumerate() {
        if conn.close_reason().is_some() || p.send_bytes(&[*b]).await.is_err() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(k + 1);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = conn.closed() => return Ok(start.elapsed()),
        }
    }
    Err(frame.len())
}

/// 6. Slow-loris: a selected client dribbles its update, an unauthenticated peer dribbles a
/// check-in, one byte per second. The first is cut off by the frame deadline, the second by the
/// check-in deadline; the round commits without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_frames_are_cut_off() {
    let shape = small();
    let mut serve = Serve::start(&config("", shape, 4, 3, 90_000), [1, 2, 3, 70, 71]);
    let attacker = serve.transport(ATTACKER_IP);
    let fleet = spawn_fleet(&serve, 1..=3);
    let (mut slow, task) =
        check_in_until_task(&attacker, 70, serve.token(70), Duration::from_secs(60)).await.unwrap();
    let mut unauth = Peer::connect(&attacker).await.unwrap();
    let check_in_frame = Peer::frame(&check_in(71, serve.token(71)));
    let unauth =
        tokio::spawn(async move { dribble(&mut unauth, &check_in_frame, CHECKIN_TIMEOUT + SLACK).await });
    let update = EncodedUpdate::Dense { shape, values: vec![0.001; shape.len()] };
    let frame = Peer::frame(&update_for(&task, update, 1.0));
    let slow = dribble(&mut slow, &frame, FRAME_TIMEOUT + SLACK).await;
    let unauth = unauth.await.unwrap();
    eprintln!("slow selected client: {slow:?}; unauthenticated dribbler: {unauth:?}");
    assert!(
        unauth.is_ok(),
        "a check-in dribbled at 1 byte/s was not cut off ({:?} bytes sent)",
        unauth.err()
    );
    assert!(slow.is_ok(), "an update dribbled at 1 byte/s was not cut off ({:?} bytes sent)", slow.err());
    let honest = join_fleet(fleet).await;
    assert_honest_only(&serve, task.round, &honest).await;
    serve.assert_memory_under(SMALL_RSS_BOUND, "slow-loris");
}

/// 7. A selected client that never reads its stream (the 2.56 MB task frame exceeds its flow
/// control window): its connection is closed by the send timeout and the round commits with the
/// honest others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_closed_by_the_send_timeout() {
    let shape = ModelShape::new(20_000, 32).unwrap();
    let mut serve = Serve::start(&config("", shape, 4, 3, 90_000), [1, 2, 3, 80]);
    let fleet = spawn_fleet(&serve, 1..=3);
    let endpoint = endpoint_on(ATTACKER_IP);
    let client_config = starling_sdk::transport::quic::client_config(&serve.ca).unwrap();
    let conn = endpoint.connect_with(client_config, serve.quic, "localhost").unwrap().await.unwrap();
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(&Peer::frame(&check_in(80, serve.token(80)))).await.unwrap();
    // `recv` is held, never read (dropping it would tell the coordinator to stop sending).
    let honest = join_fleet(fleet).await;
    // Every honest client had its task, so the non-reader's task was sent no later than now.
    let closed = tokio::time::timeout(SEND_TIMEOUT + SLACK, conn.closed()).await;
    eprintln!("non-reader: {closed:?}");
    assert!(
        closed.is_ok(),
        "a selected client that does not read was still connected {:?} after its task was sent",
        SEND_TIMEOUT + SLACK
    );
    drop(recv);
    assert_honest_only(&serve, honest[0].task.round, &honest).await;
    serve.assert_memory_under(BIG_RSS_BOUND, "non-reader");
}

/// 8. A client revoked after it was selected: its connection is closed within seconds and its
/// update is not in the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_revoked_mid_round_is_cut_off_and_its_update_not_applied() {
    let shape = small();
    let mut serve = Serve::start(&config("", shape, 4, 3, 90_000), [1, 2, 3, 90]);
    let attacker = serve.transport(ATTACKER_IP);
    let fleet = spawn_fleet(&serve, 1..=3);
    let (mut p, task) =
        check_in_until_task(&attacker, 90, serve.token(90), Duration::from_secs(60)).await.unwrap();
    tokio::task::block_in_place(|| serve.revoke(90));
    let within = Duration::from_secs(5) + SLACK;
    let closed = tokio::time::timeout(within, p.conn.connection().closed()).await;
    // Its update, sent anyway (on its connection if that is still open).
    let answer = match &closed {
        Ok(_) => None,
        Err(_) => {
            let _ = p.send(&update_for(&task, honest_update(90, shape), 1.0)).await;
            Some(p.next(Duration::from_secs(10)).await)
        }
    };
    eprintln!("revoked client: closed {closed:?}, update answered {answer:?}");
    assert!(
        closed.is_ok(),
        "the revoked client was still connected {within:?} later; its update got {answer:?}"
    );
    let honest = join_fleet(fleet).await;
    assert_honest_only(&serve, task.round, &honest).await;
    serve.assert_memory_under(SMALL_RSS_BOUND, "revocation");
}

/// 9. An honest client's upload replayed from other connections: unauthenticated (closed, not
/// applied), after a refused check-in claiming a selected client that has not reported yet
/// (refused and closed, nothing applied), and from an authenticated client that was not
/// selected (rejected `NotSelected`). The update counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_upload_is_counted_at_most_once() {
    let shape = small();
    let mut serve = Serve::start(&config("", shape, 3, 3, 60_000), [1, 2, 3, 95]);
    let honest_t = serve.transport(HONEST_IP);
    let attacker = serve.transport(ATTACKER_IP);
    let within = Duration::from_secs(60);
    let (c1, c2, c3) = tokio::join!(
        check_in_until_task(&honest_t, 1, serve.token(1), within),
        check_in_until_task(&honest_t, 2, serve.token(2), within),
        check_in_until_task(&honest_t, 3, serve.token(3), within),
    );
    let ((mut p1, t1), (mut p2, t2), (mut p3, t3)) = (c1.unwrap(), c2.unwrap(), c3.unwrap());
    let u1 = honest_update(1, shape);
    let replay = Peer::frame(&update_for(&t1, u1.clone(), 1.0));
    p1.send_bytes(&replay).await.unwrap();
    assert!(matches!(
        p1.next(Duration::from_secs(30)).await,
        Next::Message(CoordinatorMessage::Receipt { .. })
    ));

    // Unauthenticated: the replayed frame is the first thing sent.
    let mut a = Peer::connect(&attacker).await.unwrap();
    a.send_bytes(&replay).await.unwrap();
    let unauthenticated = a.drain(CHECKIN_TIMEOUT + SLACK).await;
    // A refused check-in claiming client 2 (selected, not reported yet), the replay right behind.
    let mut b = Peer::connect(&attacker).await.unwrap();
    b.send(&check_in(2, b"stk1.forged".to_vec())).await.unwrap();
    b.send_bytes(&replay).await.unwrap();
    let claimed = b.drain(CHECKIN_TIMEOUT + SLACK).await;
    // Authenticated but not selected (checks in after selection closed).
    let mut c = Peer::connect(&attacker).await.unwrap();
    c.send(&check_in(95, serve.token(95))).await.unwrap();
    let first = c.next(Duration::from_secs(30)).await;
    c.send_bytes(&replay).await.unwrap();
    let second = c.next(Duration::from_secs(30)).await;

    assert_attacker("replay on an unauthenticated connection", &unauthenticated, &[]);
    assert_attacker("replay after a refused check-in claiming client 2", &claimed, &[refusal()]);
    assert!(matches!(first, Next::Message(CoordinatorMessage::ComeBackAt(_))), "{first:?}");
    assert_eq!(
        second,
        Next::Message(CoordinatorMessage::Rejection { round: t1.round, reason: RejectReason::NotSelected })
    );

    let u2 = honest_update(2, shape);
    report(&mut p2, &t2, u2.clone()).await.unwrap_or_else(|e| panic!("client 2 after the replays: {e}"));
    let u3 = honest_update(3, shape);
    report(&mut p3, &t3, u3.clone()).await.unwrap();
    let reported = [(1, t1, u1), (2, t2, u2), (3, t3, u3)]
        .into_iter()
        .map(|(client, task, u)| Reported { client, task, delta: dense(&u, shape) })
        .collect::<Vec<_>>();
    assert_honest_only(&serve, reported[0].task.round, &reported).await;
    serve.assert_memory_under(SMALL_RSS_BOUND, "replay");
}

/// 10. Garbage: random UDP datagrams of random sizes at the QUIC port (some shaped like QUIC v1
/// Initials), and garbage bytes on established streams before check-in. The coordinator stays
/// up, closes the garbage streams, sends them nothing but a version negotiation, and the round
/// commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_and_streams_do_not_hurt() {
    let shape = small();
    let mut serve = Serve::start(&config("", shape, 4, 4, 60_000), 1..=4);
    let server = serve.quic;
    let flood = tokio::task::spawn_blocking(move || {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut g = Garbage::new(7);
        for k in 0..20_000u64 {
            let len = 1 + (g.next_u64() % 1500) as usize;
            let mut d = g.bytes(len);
            if k % 10 == 0 {
                // Shaped like a v1 Initial: long header, version 1, 8-byte ids, 1200 bytes.
                d = g.bytes(1200);
                d[0] = 0xc0 | (d[0] & 0x0f);
                d[1..5].copy_from_slice(&[0, 0, 0, 1]);
                d[5] = 8;
                d[14] = 8;
            }
            let _ = socket.send_to(&d, server);
            if k % 200 == 199 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });
    let fleet = spawn_fleet(&serve, 1..=4);
    let attacker = serve.transport(ATTACKER_IP);
    let mut streams = Vec::new();
    for seed in 0..8u64 {
        let mut bytes = Garbage::new(100 + seed).bytes(4096);
        match seed {
            // A plausible small header, then garbage.
            6 => bytes[..4].copy_from_slice(&1000u32.to_le_bytes()),
            // A header announcing 3 MB (within max_frame_bytes), body never complete.
            7 => bytes[..4].copy_from_slice(&3_000_000u32.to_le_bytes()),
            _ => {}
        }
        let mut p = Peer::connect(&attacker).await.unwrap();
        p.send_bytes(&bytes).await.unwrap();
        streams.push(tokio::spawn(async move { (seed, p.drain(CHECKIN_TIMEOUT + SLACK).await) }));
    }
    flood.await.unwrap();
    for s in streams {
        let (seed, (got, closed)) = s.await.unwrap();
        assert!(
            got.iter().all(|g| g.starts_with("VersionNegotiation")),
            "garbage stream {seed} received {got:?}"
        );
        assert!(closed.is_some(), "garbage stream {seed} still open after {:?}", CHECKIN_TIMEOUT + SLACK);
    }
    let honest = join_fleet(fleet).await;
    assert_honest_only(&serve, honest[0].task.round, &honest).await;
    serve.assert_memory_under(SMALL_RSS_BOUND, "garbage");
}
