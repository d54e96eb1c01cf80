//! The coordinator service over real QUIC on loopback: 50 SDK clients complete three rounds
//! under central DP; bad input of every kind is refused with its reason while the round goes on;
//! the SDK reports certificate and token problems clearly.

mod common;

use common::*;
use starling_coordinator::service::server;
use starling_coordinator::store::Store;
use starling_proto::codec::{Inbound, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use starling_proto::encoding::EncodedUpdate;
use starling_proto::ids::{ClientId, ModelVersion};
use starling_proto::message::{
    ClientMessage, ClientUpdate, CoordinatorMessage, LocalMetrics, Refusal, RejectReason, Task,
};
use starling_proto::session::SessionOutcome;
use starling_proto::update::ModelShape;
use starling_sdk::RoundError;
use starling_sdk::transport::TransportError;
use starling_sdk::transport::quic::QuicTransport;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

const FLEET_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
rate_per_second = 50
rate_burst = 50
[model]
rows = 200
row_len = 8
[round]
target_participants = 40
min_reports = 20
over_selection = 1.25
selection_pool = 50
selection_timeout_ms = 3000
report_timeout_ms = 10000
interval_ms = 50
require_charging = false
require_unmetered = false
require_idle = false
learning_rate = 0.5
retry_after_ms = 100
retry_window_ms = 200
[privacy]
mode = "central"
clip_norm = 1.0
noise_multiplier = 0.3
epsilon_budget = 1000000.0
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sdk_clients_complete_three_rounds_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let path = service_dir(dir.path(), FLEET_CONFIG);
    let config = load(&path);
    let tokens: Vec<Vec<u8>> = (1..=50).map(|id| issue(&config, id, 3600).1).collect();
    let running = server::start(&config).await.unwrap();
    let coordinator = endpoint_for(running.quic_addr, &ca_pem(dir.path()), "localhost");

    // One UDP socket for the whole fleet (the transport is cloned per client).
    let transport = QuicTransport::with_endpoint(client_endpoint(), &coordinator).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let mut fleet = tokio::task::JoinSet::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let client = sdk_client(i as u64 + 1, token, 200, 8, transport.clone());
        let (stop, accepted) = (stop.clone(), accepted.clone());
        fleet.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.run_round().await {
                    Ok(r) if r.accepted() => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => assert!(
                        matches!(
                            r.session.outcome,
                            SessionOutcome::ComeBackAt { .. } | SessionOutcome::Aborted { .. }
                        ),
                        "unexpected outcome {:?}",
                        r.session.outcome
                    ),
                    Err(RoundError::ComeBackLater { after }) => {
                        tokio::time::sleep(after.min(Duration::from_millis(500))).await
                    }
                    Err(e) => panic!("client {i}: {e}"),
                }
            }
        });
    }
    let mut handle = running.handle.clone();
    let guard = tokio::time::timeout(Duration::from_secs(240), async {
        while handle.status().rounds_committed < 3 {
            handle.status_changed().await.unwrap();
        }
    });
    guard.await.expect("three rounds commit");
    stop.store(true, Ordering::Relaxed);
    let status = running.telemetry.status();
    assert!(status.epsilon_spent > 0.0, "{status:?}");
    assert!(running.quic_stats.accepted.load(Ordering::Relaxed) >= 60);
    running.shutdown().await;
    fleet.abort_all();

    let store = Store::open(&config.storage.path).unwrap();
    let rounds = store.rounds().unwrap();
    let committed: Vec<u64> = rounds.iter().filter(|r| r.state == "committed").map(|r| r.round.0).collect();
    assert!(committed.len() >= 3, "{rounds:?}");
    let ledger: Vec<u64> = store.ledger_entries().unwrap().iter().map(|e| e.round).collect();
    assert_eq!(ledger, committed, "every committed round, and only those, is in the ledger");
    let latest = store.latest_checkpoint().unwrap().unwrap();
    assert_eq!(latest.version, ModelVersion(committed.len() as u64));
    assert_eq!(latest.model.len(), 1600);
    assert_ne!(latest.model, config.initial_model().unwrap(), "the global model changed");
    assert!(accepted.load(Ordering::Relaxed) >= 60, "at least 20 reports in each of 3 rounds");
}

const SMALL_CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[model]
rows = 20
row_len = 4
[round]
target_participants = 3
min_reports = 1
over_selection = 1.0
selection_pool = 3
selection_timeout_ms = 60000
report_timeout_ms = 60000
interval_ms = 50
require_charging = false
require_unmetered = false
require_idle = false
[privacy]
mode = "off"
"#;

fn update(task: &Task, update: EncodedUpdate) -> ClientMessage {
    ClientMessage::Update(ClientUpdate {
        round: task.round,
        base_version: task.model_version,
        update,
        weight: 1.0,
        metrics: LocalMetrics::default(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_its_reason_and_the_round_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = service_dir(dir.path(), SMALL_CONFIG);
    let config = load(&path);
    let good: Vec<Vec<u8>> = (1..=3).map(|id| issue(&config, id, 3600).1).collect();
    let expired = issue(&config, 10, -5).1;
    let (revoked_id, revoked) = issue(&config, 11, 3600);
    let for_other = issue(&config, 12, 3600).1;
    Store::open(&config.storage.path).unwrap().revoke_token(revoked_id, 0).unwrap();
    let running = server::start(&config).await.unwrap();
    let ca = ca_pem(dir.path());
    let transport =
        QuicTransport::with_endpoint(client_endpoint(), &endpoint_for(running.quic_addr, &ca, "localhost"))
            .unwrap();

    // Garbage: a length prefix far beyond the maximum frame.
    let mut raw = Raw::connect(&transport).await;
    raw.send_raw(b"\xde\xad\xbe\xef and then some garbage").await;
    let reason = raw.closed().await;
    assert!(reason.contains("invalid frame") && reason.contains("exceeds"), "{reason}");
    // Garbage: a small frame whose body is not a message.
    let mut raw = Raw::connect(&transport).await;
    let mut frame = vec![10, 0, 0, 0];
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.extend_from_slice(&[0xff; 8]);
    raw.send_raw(&frame).await;
    let reason = raw.closed().await;
    assert!(reason.contains("malformed message body"), "{reason}");
    // Oversized: a 100 MiB frame is refused from its header, before anything is buffered.
    let mut raw = Raw::connect(&transport).await;
    let mut header = (100u32 << 20).to_le_bytes().to_vec();
    header.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header.extend_from_slice(&[0u8; 1000]);
    raw.send_raw(&header).await;
    let reason = raw.closed().await;
    assert!(reason.contains("exceeds the maximum"), "{reason}");
    // A protocol version the coordinator does not speak: answered with version negotiation.
    let mut raw = Raw::connect(&transport).await;
    raw.send_raw(&[6, 0, 0, 0, 9, 0, 1, 2, 3, 4]).await;
    assert_eq!(
        raw.next().await,
        Ok(Inbound::VersionNegotiation { min: MIN_PROTOCOL_VERSION, max: PROTOCOL_VERSION })
    );
    let reason = raw.closed().await;
    assert!(reason.contains("unsupported protocol version 9"), "{reason}");

    // Expired, revoked and someone else's tokens: refused as unauthenticated.
    for (client, credential) in
        [(10, expired), (11, revoked), (13, for_other), (14, b"stk1.nonsense".to_vec())]
    {
        let mut raw = Raw::connect(&transport).await;
        raw.send(&check_in(client, credential)).await;
        assert_eq!(
            raw.message().await,
            CoordinatorMessage::Refusal(Refusal::Unauthenticated),
            "client {client}"
        );
    }
    let metrics = running.telemetry.encode_metrics();
    for reason in ["expired", "revoked", "other_client", "malformed"] {
        assert!(
            metrics.contains(&format!("starling_auth_failures_total{{reason=\"{reason}\"}} 1")),
            "{metrics}"
        );
    }

    // A round with three selected clients: NaN, wrong shape, replay.
    let mut clients = Vec::new();
    for (i, token) in good.into_iter().enumerate() {
        let mut raw = Raw::connect(&transport).await;
        raw.send(&check_in(i as u64 + 1, token)).await;
        clients.push(raw);
    }
    let mut tasks = Vec::new();
    for c in &mut clients {
        match c.message().await {
            CoordinatorMessage::Task(t) => tasks.push(t),
            other => panic!("expected a task, got {other:?}"),
        }
    }
    let shape = ModelShape::new(20, 4).unwrap();
    let good_update =
        update(&tasks[2], EncodedUpdate::RowSparse { shape, rows: vec![3], values: vec![0.1; 4] });
    clients[2].send(&good_update).await;
    assert_eq!(clients[2].message().await, CoordinatorMessage::Receipt { round: tasks[2].round });
    clients[2].send(&good_update).await;
    assert_eq!(
        clients[2].message().await,
        CoordinatorMessage::Rejection { round: tasks[2].round, reason: RejectReason::Duplicate }
    );
    let nan = update(&tasks[0], EncodedUpdate::RowSparse { shape, rows: vec![1], values: vec![f32::NAN; 4] });
    clients[0].send(&nan).await;
    assert!(matches!(
        clients[0].message().await,
        CoordinatorMessage::Rejection { reason: RejectReason::Malformed(_), .. }
    ));
    let wrong_shape = ModelShape::new(21, 4).unwrap();
    let wrong = update(&tasks[1], EncodedUpdate::Dense { shape: wrong_shape, values: vec![0.0; 84] });
    clients[1].send(&wrong).await;
    assert!(matches!(
        clients[1].message().await,
        CoordinatorMessage::Rejection { reason: RejectReason::Malformed(_), .. }
    ));
    // The round is unaffected: it commits with the one good update.
    let mut handle = running.handle.clone();
    // (The driver publishes the commit count and the new version in two steps: wait for both.)
    while handle.status().rounds_committed < 1 || handle.status().model_version < ModelVersion(1) {
        handle.status_changed().await.unwrap();
    }
    assert_eq!(handle.status().model_version, ModelVersion(1));
    assert!(handle.status().halted.is_none());
    let metrics = running.telemetry.encode_metrics();
    assert!(metrics.contains("starling_updates_rejected_total{reason=\"malformed\"} 2"), "{metrics}");
    assert!(metrics.contains("starling_updates_rejected_total{reason=\"duplicate\"} 1"), "{metrics}");

    // The SDK's view: a certificate from another CA, a wrong server name, a refused token.
    let other_ca =
        starling_coordinator::service::tls::LocalPki::generate(&["localhost"]).unwrap().ca_cert_pem;
    for (ca_pem, name) in [(other_ca.as_bytes(), "localhost"), (&ca[..], "wrong.example")] {
        let t =
            QuicTransport::with_endpoint(client_endpoint(), &endpoint_for(running.quic_addr, ca_pem, name))
                .unwrap();
        let client = sdk_client(20, b"x".to_vec(), 20, 4, t);
        match client.run_round().await {
            Err(RoundError::Transport { attempts: 1, error: TransportError::Certificate(detail) }) => {
                assert!(detail.contains("certificate"), "{detail}")
            }
            other => panic!("expected a certificate error, got {other:?}"),
        }
    }
    let client = sdk_client(21, b"stk1.forged".to_vec(), 20, 4, transport.clone());
    let report = client.run_round().await.unwrap();
    assert_eq!(report.session.outcome, SessionOutcome::Refused(Refusal::Unauthenticated));

    // Still alive and serving.
    let mut raw = Raw::connect(&transport).await;
    let fresh = issue(&config, 30, 3600).1;
    raw.send(&check_in(30, fresh)).await;
    assert!(matches!(raw.next().await, Ok(Inbound::Message { .. })));
    assert!(running.telemetry.status().recent_failures.iter().any(|f| f.kind == "auth"));
    let _ = ClientId(0);
    running.shutdown().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> String {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\n{}Connection: close\r\n\r\n",
        token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default()
    );
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoint_serves_status_and_metrics_to_the_token_holder_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = service_dir(dir.path(), SMALL_CONFIG);
    let config = load(&path);
    let running = server::start(&config).await.unwrap();
    let token = std::fs::read_to_string(dir.path().join("secrets/admin.token")).unwrap();
    let token = token.trim();
    for p in ["/status", "/metrics"] {
        assert!(http_get(running.admin_addr, p, None).await.starts_with("HTTP/1.1 401"));
        assert!(http_get(running.admin_addr, p, Some("wrong")).await.starts_with("HTTP/1.1 401"));
    }
    let status = http_get(running.admin_addr, "/status", Some(token)).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let body: serde_json::Value = serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["model_version"], 0);
    assert_eq!(body["epsilon_budget"], serde_json::Value::Null);
    assert!(body["recent_failures"].is_array());
    let metrics = http_get(running.admin_addr, "/metrics", Some(token)).await;
    assert!(metrics.contains("starling_model_version 0") && metrics.ends_with("# EOF\n"), "{metrics}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_while_running_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // One-client rounds, so the first check-in gets its task at once.
    let one = SMALL_CONFIG
        .replace("target_participants = 3", "target_participants = 1")
        .replace("selection_pool = 3", "selection_pool = 1");
    let path = service_dir(dir.path(), &one);
    let config = load(&path);
    let (token_id, token) = issue(&config, 5, 3600);
    let running = server::start(&config).await.unwrap();
    let transport = QuicTransport::with_endpoint(
        client_endpoint(),
        &endpoint_for(running.quic_addr, &ca_pem(dir.path()), "localhost"),
    )
    .unwrap();
    let mut raw = Raw::connect(&transport).await;
    raw.send(&check_in(5, token.clone())).await;
    assert!(matches!(raw.message().await, CoordinatorMessage::Task(_)), "accepted before the revocation");
    // `starling token revoke` from another process: the service picks it up within seconds.
    Store::open(&config.storage.path).unwrap().revoke_token(token_id, 0).unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let mut raw = Raw::connect(&transport).await;
            raw.send(&check_in(5, token.clone())).await;
            if raw.message().await == CoordinatorMessage::Refusal(Refusal::Unauthenticated) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    refused.await.expect("the revocation takes effect");
    // The connection that was given a task before the revocation has been closed too: by the
    // revocation sweep, or earlier by a retry above that checked in before the revocation loaded.
    let reason = tokio::time::timeout(Duration::from_secs(30), raw.closed()).await.expect("closed");
    assert!(reason.contains("credential no longer valid") || reason.contains("replaced"), "{reason}");
    assert!(running.telemetry.encode_metrics().contains("starling_auth_failures_total{reason=\"revoked\"}"));
    running.shutdown().await;
}
