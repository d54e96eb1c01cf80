//! The driver's security rules on the in-process transport, on tokio's paused (virtual) clock:
//! a connection speaks for a client only once its credential verified; a refused check-in is
//! answered and closed and never displaces the client's live connection; revocation takes effect
//! mid-round; per-peer deadlines and frame limits hold; and storage failures never let an
//! unrecorded round or model out.

use bytes::Bytes;
use starling_coordinator::service::driver::{self, CoordinatorHandle, DriverConfig, DriverError};
use starling_proto::codec::{Codec, FrameBuffer, Inbound, PROTOCOL_VERSION};
use starling_proto::encoding::EncodedUpdate;
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::*;
use starling_proto::round::{FailReason, Orchestrator, OrchestratorConfig, RoundConfig, RoundEvent};
use starling_proto::strategy::Federated;
use starling_proto::update::ModelShape;
use starling_sdk::transport::memory::{self, MemoryConnection, MemoryTransport};
use starling_sdk::transport::{Connection, Transport};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn shape() -> ModelShape {
    ModelShape::new(16, 4).unwrap()
}

fn engine(target: usize) -> Orchestrator {
    let config = OrchestratorConfig {
        model_family: "bpr-mf".into(),
        shape: shape(),
        round: RoundConfig {
            target_participants: target,
            min_reports: target,
            over_selection: 1.0,
            selection_pool: Some(target),
            selection_timeout: Duration::from_secs(30),
            report_timeout: Duration::from_secs(60),
            eligibility: starling_proto::round::Eligibility::any(),
            retry_after: Duration::from_secs(5),
            ..RoundConfig::default()
        },
        history: 1,
        rng_seed: 1,
    };
    Orchestrator::new(config, Box::new(Federated::fedavg()), vec![0.0; 64], ModelVersion(0), RoundId(1))
        .unwrap()
}

/// Valid credentials are `tok-<client id>`, unless the client is in the revoked set.
#[derive(Clone, Default)]
struct Tokens(Arc<Mutex<HashSet<u64>>>);

impl Tokens {
    fn revoke(&self, client: u64) {
        self.0.lock().unwrap().insert(client);
    }
}

impl driver::Authenticator for Tokens {
    fn verify(&self, client: ClientId, credential: &[u8]) -> Result<(), String> {
        if credential != format!("tok-{}", client.0).as_bytes() {
            return Err("bad token".into());
        }
        if self.0.lock().unwrap().contains(&client.0) {
            return Err("revoked".into());
        }
        Ok(())
    }
}

type Events = Arc<Mutex<Vec<RoundEvent>>>;

/// A driver whose hook records events and fails on the event kinds in `fail_on`.
fn driver(
    target: usize,
    fail_on: &'static [&'static str],
) -> (CoordinatorHandle, MemoryTransport, Tokens, Events) {
    let events: Events = Arc::default();
    let sink = events.clone();
    let tokens = Tokens::default();
    let config = DriverConfig {
        checkin_timeout: Duration::from_secs(5),
        frame_timeout: Duration::from_secs(10),
        unauthenticated_max_frame_bytes: 4096,
        max_frame_bytes: 1 << 20,
        ..DriverConfig::default()
    };
    let handle = driver::spawn_with_auth(
        engine(target),
        config,
        move |e: &RoundEvent| {
            sink.lock().unwrap().push(e.clone());
            let kind = match e {
                RoundEvent::Started { .. } => "started",
                RoundEvent::Committed(_) => "committed",
                _ => "other",
            };
            if fail_on.contains(&kind) { Err(format!("disk full while recording {kind}")) } else { Ok(()) }
        },
        Arc::new(tokens.clone()),
    );
    let (transport, listener) = memory::network(64);
    tokio::spawn(driver::serve_memory(listener, handle.clone()));
    (handle, transport, tokens, events)
}

/// A raw protocol peer.
struct Peer {
    conn: MemoryConnection,
    frames: FrameBuffer,
    codec: Codec,
}

impl Peer {
    async fn connect(t: &MemoryTransport) -> Peer {
        Peer {
            conn: t.connect().await.unwrap(),
            frames: FrameBuffer::new(Codec::default()),
            codec: Codec::default(),
        }
    }

    async fn send(&mut self, m: &ClientMessage) {
        let _ = self.conn.send(Bytes::from(self.codec.encode_client(m).unwrap())).await;
    }

    /// The next message, or `None` once the coordinator closed the connection.
    async fn next(&mut self) -> Option<CoordinatorMessage> {
        loop {
            if let Some(Inbound::Message { message, .. }) = self.frames.next_coordinator().unwrap() {
                return Some(message);
            }
            match tokio::time::timeout(Duration::from_secs(600), self.conn.recv()).await {
                Ok(Ok(Some(bytes))) => self.frames.push(&bytes),
                Ok(_) => return None,
                Err(_) => panic!("no answer from the coordinator"),
            }
        }
    }

    /// Every message until the coordinator closes.
    async fn until_closed(&mut self) -> Vec<CoordinatorMessage> {
        let mut all = Vec::new();
        while let Some(m) = self.next().await {
            all.push(m);
        }
        all
    }
}

fn check_in(client: u64, credential: &str) -> ClientMessage {
    ClientMessage::CheckIn(CheckIn {
        client: ClientId(client),
        credential: credential.as_bytes().to_vec(),
        sdk_version: "test".into(),
        model_family: "bpr-mf".into(),
        have_version: None,
        conditions: DeviceConditions::default(),
        capabilities: Capabilities::default(),
    })
}

fn update(round: RoundId, value: f32) -> ClientMessage {
    ClientMessage::Update(ClientUpdate {
        round,
        base_version: ModelVersion(0),
        update: EncodedUpdate::RowSparse { shape: shape(), rows: vec![2], values: vec![value; 4] },
        weight: 1.0,
        metrics: LocalMetrics::default(),
    })
}

fn is_task(m: &CoordinatorMessage) -> bool {
    matches!(m, CoordinatorMessage::Task(_))
}

async fn committed_model(handle: &CoordinatorHandle, events: &Events) -> Vec<f32> {
    let mut handle = handle.clone();
    while handle.status().rounds_committed + handle.status().rounds_failed == 0 {
        handle.status_changed().await.unwrap();
    }
    let events = events.lock().unwrap();
    match events.iter().find(|e| matches!(e, RoundEvent::Committed(_))) {
        Some(RoundEvent::Committed(c)) => c.model.to_vec(),
        _ => panic!("no commit: {events:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_check_in_without_a_valid_token_is_refused_closed_and_never_takes_over_the_client() {
    let (handle, net, _tokens, events) = driver(1, &[]);
    let round = handle.start_round().await.unwrap();
    // The attacker claims client 7's id first, with no token and then with a forged one.
    for forged in ["", "tok-8", "tok-7x"] {
        let mut attacker = Peer::connect(&net).await;
        attacker.send(&check_in(7, forged)).await;
        let got = attacker.until_closed().await;
        assert_eq!(got, vec![CoordinatorMessage::Refusal(Refusal::Unauthenticated)], "token {forged:?}");
    }
    // The victim checks in and is selected: the task comes to it.
    let mut victim = Peer::connect(&net).await;
    victim.send(&check_in(7, "tok-7")).await;
    let task = victim.next().await.unwrap();
    assert!(is_task(&task), "{task:?}");
    // Once the victim is training, a token-less connection claiming its id changes nothing ...
    let mut attacker = Peer::connect(&net).await;
    attacker.send(&check_in(7, "")).await;
    attacker.send(&update(round, 1000.0)).await;
    let got = attacker.until_closed().await;
    assert!(got.iter().all(|m| !is_task(m) && !matches!(m, CoordinatorMessage::Receipt { .. })), "{got:?}");
    // ... nor does an update sent before any check-in.
    let mut attacker = Peer::connect(&net).await;
    attacker.send(&update(round, 1000.0)).await;
    assert!(attacker.until_closed().await.is_empty());
    // The victim's session is intact: its update is the one aggregated.
    victim.send(&update(round, 0.5)).await;
    assert_eq!(victim.next().await, Some(CoordinatorMessage::Receipt { round }));
    let model = committed_model(&handle, &events).await;
    assert_eq!(&model[8..12], &[0.5; 4]);
    assert_eq!(handle.status().unauthenticated, 4);
    let refused =
        events.lock().unwrap().iter().filter(|e| matches!(e, RoundEvent::CheckInRefused { .. })).count();
    assert_eq!(refused, 0, "unauthenticated check-ins never reach the engine");
}

#[tokio::test(start_paused = true)]
async fn a_newer_authenticated_connection_replaces_the_older_one() {
    let (handle, net, _tokens, events) = driver(1, &[]);
    let round = handle.start_round().await.unwrap();
    let mut first = Peer::connect(&net).await;
    first.send(&check_in(3, "tok-3")).await;
    assert!(is_task(&first.next().await.unwrap()));
    let mut second = Peer::connect(&net).await;
    second.send(&check_in(3, "tok-3")).await;
    assert_eq!(first.until_closed().await, Vec::new(), "the older connection is closed");
    // The engine still has client 3 training (the check-in itself is told to come back later);
    // the newer connection reports for it.
    assert!(matches!(second.next().await, Some(CoordinatorMessage::ComeBackAt(_))));
    second.send(&update(round, 0.25)).await;
    assert_eq!(second.next().await, Some(CoordinatorMessage::Receipt { round }));
    assert_eq!(&committed_model(&handle, &events).await[8..12], &[0.25; 4]);
}

#[tokio::test(start_paused = true)]
async fn a_client_revoked_mid_round_is_disconnected_and_its_update_never_counts() {
    let (handle, net, tokens, events) = driver(2, &[]);
    let round = handle.start_round().await.unwrap();
    let mut honest = Peer::connect(&net).await;
    let mut revoked = Peer::connect(&net).await;
    let mut late = Peer::connect(&net).await;
    honest.send(&check_in(1, "tok-1")).await;
    revoked.send(&check_in(2, "tok-2")).await;
    assert!(is_task(&honest.next().await.unwrap()));
    assert!(is_task(&revoked.next().await.unwrap()));
    tokens.revoke(2);
    // The sweep the service runs after reloading revocations closes it and drops it from the round.
    assert_eq!(handle.reverify().await.unwrap(), 1);
    assert_eq!(revoked.until_closed().await, Vec::new());
    assert!(
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, RoundEvent::ClientDropped { client: ClientId(2), .. }))
    );
    // Reconnecting with the revoked token is refused.
    late.send(&check_in(2, "tok-2")).await;
    assert_eq!(late.until_closed().await, vec![CoordinatorMessage::Refusal(Refusal::Unauthenticated)]);
    honest.send(&update(round, 1.0)).await;
    assert_eq!(honest.next().await, Some(CoordinatorMessage::Receipt { round }));
    // Two were needed: the round fails rather than counting the revoked client.
    let mut h = handle.clone();
    while h.status().rounds_failed == 0 {
        h.status_changed().await.unwrap();
    }
    assert_eq!(handle.status().rounds_committed, 0);
    assert_eq!(handle.status().model_version, ModelVersion(0));
}

#[tokio::test(start_paused = true)]
async fn the_credential_is_checked_again_when_an_update_arrives() {
    let (handle, net, tokens, events) = driver(1, &[]);
    let round = handle.start_round().await.unwrap();
    let mut peer = Peer::connect(&net).await;
    peer.send(&check_in(4, "tok-4")).await;
    assert!(is_task(&peer.next().await.unwrap()));
    tokens.revoke(4); // no sweep has run yet
    peer.send(&update(round, 9.0)).await;
    assert_eq!(peer.until_closed().await, Vec::new(), "closed without a receipt");
    assert!(!events.lock().unwrap().iter().any(|e| matches!(e, RoundEvent::UpdateAccepted { .. })));
    assert_eq!(handle.status().revoked, 1);
}

#[tokio::test(start_paused = true)]
async fn silent_peers_oversized_frames_and_slow_frames_are_closed() {
    let (handle, net, _tokens, _events) = driver(1, &[]);
    // Says nothing: closed at the check-in deadline (5 s of virtual time).
    let mut silent = Peer::connect(&net).await;
    let t0 = tokio::time::Instant::now();
    assert!(silent.until_closed().await.is_empty());
    assert!(t0.elapsed() >= Duration::from_secs(5));
    // Sends bytes but never a valid check-in: bytes do not extend the deadline.
    let mut dribbler = Peer::connect(&net).await;
    let t0 = tokio::time::Instant::now();
    let check = Codec::default().encode_client(&check_in(5, "tok-5")).unwrap();
    // 400 ms a byte: the whole check-in would take longer than the deadline.
    assert!(check.len() as u64 * 400 > 10_000);
    for b in &check[..check.len() - 1] {
        if dribbler.conn.send(Bytes::copy_from_slice(&[*b])).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(7),
        "closed by the check-in deadline: {waited:?}"
    );
    assert!(dribbler.until_closed().await.is_empty());
    // A 64 MiB frame header before check-in: closed from the header.
    let mut big = Peer::connect(&net).await;
    let mut header = ((64u32 << 20) - 4).to_le_bytes().to_vec();
    header.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header.resize(1024, 0);
    let _ = big.conn.send(Bytes::from(header)).await;
    assert!(big.until_closed().await.is_empty());
    // An authenticated, selected client dribbling its update: closed by the frame deadline.
    let round = handle.start_round().await.unwrap();
    let mut slow = Peer::connect(&net).await;
    slow.send(&check_in(6, "tok-6")).await;
    assert!(is_task(&slow.next().await.unwrap()));
    let frame = Codec::default().encode_client(&update(round, 1.0)).unwrap();
    let _ = slow.conn.send(Bytes::copy_from_slice(&frame[..10])).await;
    let t0 = tokio::time::Instant::now();
    assert!(slow.until_closed().await.is_empty());
    assert!(t0.elapsed() >= Duration::from_secs(10) && t0.elapsed() < Duration::from_secs(60));
    assert!(handle.status().connections_dropped >= 4);
}

#[tokio::test(start_paused = true)]
async fn a_round_whose_start_was_not_recorded_is_aborted_and_no_task_leaves() {
    let (handle, net, _tokens, events) = driver(1, &["started"]);
    let round = handle.start_round().await.unwrap();
    let mut h = handle.clone();
    while h.status().halted.is_none() {
        h.status_changed().await.unwrap();
    }
    let mut peer = Peer::connect(&net).await;
    peer.send(&check_in(1, "tok-1")).await;
    let reply = peer.next().await.unwrap();
    assert!(!is_task(&reply), "{reply:?}");
    assert!(events.lock().unwrap().iter().any(|e| matches!(
        e,
        RoundEvent::Failed { round: r, reason: FailReason::Aborted(_), .. } if *r == round
    )));
    assert!(matches!(handle.start_round().await, Err(DriverError::Halted(why)) if why.contains("disk full")));
}

#[tokio::test(start_paused = true)]
async fn a_commit_that_was_not_recorded_is_reverted_and_never_reported_as_served() {
    let (handle, net, _tokens, events) = driver(1, &["committed"]);
    let round = handle.start_round().await.unwrap();
    let mut peer = Peer::connect(&net).await;
    peer.send(&check_in(1, "tok-1")).await;
    assert!(is_task(&peer.next().await.unwrap()));
    peer.send(&update(round, 2.0)).await;
    let mut h = handle.clone();
    while h.status().halted.is_none() {
        h.status_changed().await.unwrap();
    }
    let status = handle.status();
    assert_eq!(status.model_version, ModelVersion(0), "status shows the recorded version");
    assert_eq!(status.rounds_committed, 0);
    assert_eq!(status.rounds_failed, 1);
    assert!(events.lock().unwrap().iter().any(|e| matches!(e, RoundEvent::Committed(_))), "the hook saw it");
    // No further round can start, so the unrecorded model can never be shipped.
    assert!(matches!(handle.start_round().await, Err(DriverError::Halted(_))));
}
