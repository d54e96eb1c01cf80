//! Real SDK clients (async and blocking) against the coordinator's driver over the in-process
//! transport: a round commits, conditions changing mid-session withdraw cleanly, and "come back
//! at" keeps a client from reconnecting early.

use starling_coordinator::service::driver::{self, CoordinatorHandle, DriverConfig};
use starling_models::data::events::{Context, DeviceClass, Event, EventKind};
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::{DeviceConditions, TrainingPlan, WithdrawReason};
use starling_proto::round::{Orchestrator, OrchestratorConfig, RoundConfig, RoundEvent};
use starling_proto::session::SessionOutcome;
use starling_proto::strategy::Federated;
use starling_proto::update::ModelShape;
use starling_sdk::blocking::BlockingClient;
use starling_sdk::transport::memory::{self, MemoryTransport};
use starling_sdk::{Client, ClientConfig, Consent, ModelSpec, RoundError, Storage};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ITEMS: u32 = 60;
const DIM: u32 = 8;
const GOOD: DeviceConditions =
    DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 90 };
const ALL_IN: Consent = Consent { personalization: true, training: true };

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn coordinator(
    target: usize,
    min: usize,
    selection: Duration,
) -> (CoordinatorHandle, MemoryTransport, Arc<Mutex<Vec<RoundEvent>>>) {
    let shape = ModelShape::new(ITEMS, DIM).unwrap();
    let config = OrchestratorConfig {
        model_family: "bpr-mf".into(),
        shape,
        round: RoundConfig {
            target_participants: target,
            min_reports: min,
            selection_timeout: selection,
            report_timeout: Duration::from_secs(20),
            retry_after: Duration::from_secs(3600),
            retry_window: Duration::from_secs(60),
            plan: TrainingPlan { clip_norm: Some(1.0), learning_rate: 0.5, ..TrainingPlan::default() },
            ..RoundConfig::default()
        },
        history: 2,
        rng_seed: 7,
    };
    let model: Vec<f32> = (0..shape.len()).map(|k| ((k % 13) as f32 - 6.0) / 50.0).collect();
    let engine =
        Orchestrator::new(config, Box::new(Federated::fedavg()), model, ModelVersion(1), RoundId(1)).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let handle = driver::spawn(engine, DriverConfig::default(), move |e: &RoundEvent| {
        sink.lock().unwrap().push(e.clone());
        Ok(())
    });
    let (transport, listener) = memory::network(64);
    tokio::spawn(driver::serve_memory(listener, handle.clone()));
    (handle, transport, events)
}

fn client_config(id: u64) -> ClientConfig {
    let mut c =
        ClientConfig::new(ClientId(id), b"token".to_vec(), ModelSpec::mf(ITEMS, DIM), Storage::InMemory);
    c.seed = Some(id);
    c
}

fn history(id: u64) -> Vec<Event> {
    let now = now_ms();
    (0..6)
        .map(|k| Event {
            item: ((id * 7 + k * 3) % u64::from(ITEMS)) as u32,
            at_ms: now - 60_000 + k as i64,
            kind: EventKind::Purchase,
            context: Context::at(now / 1000, DeviceClass::Phone),
        })
        .collect()
}

fn new_client(id: u64, transport: &MemoryTransport) -> Client<MemoryTransport> {
    let client = Client::open(client_config(id), transport.clone()).unwrap();
    client.set_consent(ALL_IN).unwrap();
    client.record_batch(&history(id)).unwrap();
    client.set_conditions(GOOD);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_and_blocking_clients_complete_a_round_in_process() {
    let (handle, transport, events) = coordinator(5, 4, Duration::from_millis(400));
    let round = handle.start_round().await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for id in 1..=4 {
        let client = new_client(id, &transport);
        tasks.spawn(async move { (client.run_round().await, client) });
    }
    // A host without an async runtime: the blocking facade on its own thread.
    let t = transport.clone();
    let blocking = std::thread::spawn(move || {
        let c = BlockingClient::open(client_config(5), t).unwrap();
        c.set_consent(ALL_IN).unwrap();
        c.record_batch(&history(5)).unwrap();
        c.set_conditions(GOOD);
        let before = c.recommend(5, None);
        let report = c.run_round().unwrap();
        (report, before, c.recommend(5, None), c.privacy_report().unwrap())
    });
    let mut clients = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (report, client) = joined.unwrap();
        let report = report.unwrap();
        assert_eq!(report.session.outcome, SessionOutcome::Accepted { round });
        clients.push(client);
    }
    let (report, before, after, privacy) =
        tokio::task::spawn_blocking(move || blocking.join().unwrap()).await.unwrap();
    assert!(report.accepted());
    assert_eq!(before.source, starling_sdk::Source::Catalogue, "no model before the first round");
    assert_eq!(after.source, starling_sdk::Source::Personal, "personal after training");
    assert_eq!((privacy.updates_sent, privacy.rounds_accepted), (1, 1));
    assert!(privacy.bytes_sent > 0 && privacy.bytes_received > privacy.bytes_sent);

    let mut status = handle.clone();
    while status.status().rounds_committed < 1 {
        status.status_changed().await.unwrap();
    }
    let committed = events.lock().unwrap().iter().find_map(|e| match e {
        RoundEvent::Committed(c) => Some(c.clone()),
        _ => None,
    });
    let committed = committed.expect("committed event reached the hook");
    assert_eq!(committed.stats.reported, 5);
    assert_eq!(handle.status().model_version, ModelVersion(2));
    for c in &clients {
        assert_eq!(c.privacy_report().unwrap().rounds, vec![round.0]);
    }
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_changing_while_waiting_withdraw_the_session_cleanly() {
    // Selection stays open for a minute, so the client is waiting when its conditions change.
    let (handle, transport, _) = coordinator(5, 5, Duration::from_secs(60));
    handle.start_round().await.unwrap();
    let client = new_client(1, &transport);
    let c = client.clone();
    let running = tokio::spawn(async move { c.run_round().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    client.set_conditions(DeviceConditions { charging: false, ..GOOD });
    let report = tokio::time::timeout(Duration::from_secs(10), running).await.unwrap().unwrap().unwrap();
    assert_eq!(
        report.session.outcome,
        SessionOutcome::Withdrawn { reason: WithdrawReason::ConditionsChanged }
    );
    assert!(!report.session.sent_update);
    // And a new round is refused locally, without connecting, while the device is unplugged.
    let attempts = transport.connect_attempts();
    assert!(matches!(client.run_round().await, Err(RoundError::NotAllowed(_))));
    assert_eq!(transport.connect_attempts(), attempts);
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn come_back_at_is_honoured_without_reconnecting() {
    let (handle, transport, _) = coordinator(5, 4, Duration::from_secs(60));
    // No round running: the coordinator asks the client to come back in an hour or so.
    let client = new_client(1, &transport);
    let report = client.run_round().await.unwrap();
    assert!(
        matches!(report.session.outcome, SessionOutcome::ComeBackAt { .. }),
        "{:?}",
        report.session.outcome
    );
    let attempts = transport.connect_attempts();
    match client.run_round().await {
        Err(RoundError::ComeBackLater { after }) => assert!(after > Duration::from_secs(3000)),
        other => panic!("expected ComeBackLater, got {other:?}"),
    }
    assert_eq!(transport.connect_attempts(), attempts, "no connection before the time asked for");
    handle.shutdown().await;
}
