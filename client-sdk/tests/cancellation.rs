//! Withdrawing training consent or calling `forget()` while the device trains cancels the round
//! before anything more is sent: the coordinator never receives the update (at most a withdrawal),
//! and nothing of it is charged or counted. A deliberately slow trainer (the device's train hook
//! sleeps) holds the round in its training step while the user acts.

use starling_models::data::events::{Context, DeviceClass, Event, EventKind};
use starling_proto::codec::{Codec, FrameBuffer, Inbound};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::{
    ClientMessage, CoordinatorMessage, DeviceConditions, ModelPayload, Task, TrainingPlan, WithdrawReason,
};
use starling_proto::session::SessionOutcome;
use starling_proto::update::ModelShape;
use starling_sdk::blocking::BlockingClient;
use starling_sdk::client::SchedulerConfig;
use starling_sdk::config::ParticipationPolicy;
use starling_sdk::transport::Connection;
use starling_sdk::transport::memory::{self, MemoryListener};
use starling_sdk::{Client, ClientConfig, Clock, Consent, ModelSpec, Storage};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

const ITEMS: u32 = 40;
const DIM: u32 = 8;
const NOW: i64 = 1_780_000_000_000;
const ALL_IN: Consent = Consent { personalization: true, training: true };
const GOOD: DeviceConditions =
    DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 80 };

fn config(storage: Storage) -> ClientConfig {
    let mut c = ClientConfig::new(ClientId(1), b"token".to_vec(), ModelSpec::mf(ITEMS, DIM), storage);
    c.seed = Some(1);
    c.clock = Clock::manual(NOW);
    c.participation = ParticipationPolicy::always();
    c
}

fn task() -> Task {
    let values: Arc<[f32]> = (0..ITEMS * DIM).map(|k| ((k % 17) as f32 - 8.0) / 40.0).collect();
    Task {
        round: RoundId(1),
        model_version: ModelVersion(1),
        model: ModelPayload::Full { shape: ModelShape::new(ITEMS, DIM).unwrap(), values },
        plan: TrainingPlan { clip_norm: Some(1.0), learning_rate: 0.5, ..TrainingPlan::default() },
        report_within_ms: 600_000,
        secure: None,
        kind: starling_proto::message::TaskKind::Train,
    }
}

fn purchases() -> Vec<Event> {
    (0..6u32)
        .map(|k| {
            let at_ms = NOW - 3_600_000 + i64::from(k) * 1000;
            Event {
                item: k * 3,
                at_ms,
                kind: EventKind::Purchase,
                context: Context::at(at_ms / 1000, DeviceClass::Phone),
            }
        })
        .collect()
}

/// A coordinator that answers the check-in with a task and records every message the client
/// sends until the client closes the connection.
async fn coordinator(mut listener: MemoryListener) -> Vec<ClientMessage> {
    let mut conn = listener.accept().await.expect("the client connects");
    let codec = Codec::default();
    let mut frames = FrameBuffer::new(codec);
    let mut got = Vec::new();
    while let Ok(Some(bytes)) = conn.recv().await {
        frames.push(&bytes);
        while let Ok(Some(Inbound::Message { message, .. })) = frames.next_client() {
            if matches!(message, ClientMessage::CheckIn(_)) {
                let task = codec.encode_coordinator(&CoordinatorMessage::Task(task())).unwrap();
                let _ = conn.send(task.into()).await;
            }
            got.push(message);
        }
    }
    got
}

/// Makes the device's training step signal `started` and then take `delay`.
fn slow_trainer(delay: Duration) -> (starling_sdk::device::TrainHook, mpsc::Receiver<RoundId>) {
    let (tx, rx) = mpsc::channel();
    let hook = Box::new(move |round| {
        let _ = tx.send(round);
        std::thread::sleep(delay);
    });
    (hook, rx)
}

fn assert_no_update(got: &[ClientMessage]) {
    assert!(matches!(got.first(), Some(ClientMessage::CheckIn(_))), "{got:?}");
    assert!(!got.iter().any(|m| matches!(m, ClientMessage::Update(_))), "an update was sent: {got:?}");
    assert!(
        got.iter().skip(1).all(|m| matches!(
            m,
            ClientMessage::Withdraw { round: RoundId(1), reason: WithdrawReason::ConsentWithdrawn }
        )),
        "after the check-in, at most a withdrawal: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_while_training_cancels_the_upload() {
    let dir = tempfile::tempdir().unwrap();
    let (transport, listener) = memory::network(4);
    let coordinator = tokio::spawn(coordinator(listener));
    let client = Client::open(config(Storage::Dir(dir.path().to_path_buf())), transport).unwrap();
    client.set_consent(ALL_IN).unwrap();
    client.record_batch(&purchases()).unwrap();
    client.set_conditions(GOOD);
    let (hook, started) = slow_trainer(Duration::from_millis(300));
    client.with_device(|d| d.set_train_hook(Some(hook)));

    let round = tokio::spawn({
        let client = client.clone();
        async move { client.run_round().await }
    });
    let trained_round = tokio::task::spawn_blocking(move || started.recv()).await.unwrap().unwrap();
    assert_eq!(trained_round, RoundId(1), "the device is training");
    // The training step holds the device: forget waits for it, then cancels the round.
    client.forget().unwrap();

    let report = round.await.unwrap().unwrap();
    let got = coordinator.await.unwrap();
    assert_no_update(&got);
    assert!(!report.session.sent_update, "{report:?}");
    assert_eq!(
        report.session.outcome,
        SessionOutcome::Withdrawn { reason: WithdrawReason::ConsentWithdrawn }
    );
    let privacy = client.privacy_report().unwrap();
    assert_eq!((privacy.updates_sent, privacy.events_stored), (0, 0), "nothing charged, nothing kept");
    assert_eq!(privacy.bytes_sent, 0, "a session cancelled by forget stores nothing about itself");
}

#[test]
fn withdrawing_training_consent_while_training_cancels_the_upload_blocking_client_and_scheduler() {
    let net = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (transport, listener) = net.block_on(async { memory::network(4) });
    let coordinator = net.spawn(coordinator(listener));
    let client = BlockingClient::open(config(Storage::InMemory), transport.clone()).unwrap();
    client.set_consent(ALL_IN).unwrap();
    client.record_batch(&purchases()).unwrap();
    client.set_conditions(GOOD);
    let (hook, started) = slow_trainer(Duration::from_millis(300));
    client.client().with_device(|d| d.set_train_hook(Some(hook)));

    client.start_scheduler(SchedulerConfig { interval: Duration::from_secs(3600), jitter: Duration::ZERO });
    assert_eq!(started.recv().unwrap(), RoundId(1), "the scheduler's round is training");
    client.set_consent(Consent { personalization: true, training: false }).unwrap();

    let got = net.block_on(coordinator).unwrap();
    assert_no_update(&got);
    client.stop_scheduler();
    assert_eq!(transport.connect_attempts(), 1, "no new round without consent");
    let privacy = client.privacy_report().unwrap();
    assert_eq!(privacy.updates_sent, 0, "nothing was charged for the dropped update");
    assert_eq!(privacy.events_stored, 6, "personalization consent keeps the events");
}

/// The sans-IO participant honours the epoch too: a forget between two calls cancels the session
/// and drops the queued frames.
#[test]
fn a_participant_drops_its_queued_frames_when_the_device_forgets() {
    use starling_proto::time::Instant;
    use starling_sdk::device::Device;
    use starling_sdk::participant::Participant;
    let cfg = config(Storage::InMemory);
    let mut d = Device::open(&cfg).unwrap();
    d.set_consent(ALL_IN).unwrap();
    d.record_batch(&purchases(), NOW).unwrap();
    let mut p = Participant::new(&cfg, 1);
    let t0 = Instant::from_millis(0);
    p.start(t0, NOW, &d, GOOD).unwrap();
    let check_in = p.poll_transmit().unwrap();
    assert!(p.is_current(&d));
    let codec = Codec::default();
    let task = codec.encode_coordinator(&CoordinatorMessage::Task(task())).unwrap();
    p.handle_bytes(t0, &task, &mut d);
    assert!(p.is_current(&d));
    // The update is queued; the user asks to be forgotten before the host sends it.
    d.forget().unwrap();
    assert!(!p.is_current(&d), "the host's check before sending fails");
    assert!(p.check_epoch(t0, &mut d), "the session is cancelled");
    let mut frames = FrameBuffer::new(codec);
    frames.push(&check_in);
    while let Some(f) = p.poll_transmit() {
        frames.push(&f);
    }
    let mut sent = Vec::new();
    while let Ok(Some(Inbound::Message { message, .. })) = frames.next_client() {
        sent.push(message);
    }
    assert_no_update(&sent);
    assert_eq!(sent.len(), 2, "the check-in, then a withdrawal: {sent:?}");
    let report = p.poll_report().unwrap();
    assert!(!report.sent_update);
}
