//! Federated evaluation in the service over real QUIC on loopback: scripted clients train and
//! answer evaluation tasks with known figures; `/status` and `/metrics` show the figures, which
//! survive a restart; under central DP the evaluation's charge is in the durable ledger; a
//! two-tower model is served in its own shape; unsupported combinations are refused.

mod common;

use common::*;
use starling_coordinator::service::config::{ConfigError, ServiceConfig};
use starling_coordinator::service::server;
use starling_coordinator::store::Store;
use starling_proto::codec::Inbound;
use starling_proto::encoding::EncodedUpdate;
use starling_proto::ids::ClientId;
use starling_proto::message::{
    Capabilities, CheckIn, ClientMessage, ClientUpdate, CoordinatorMessage, EvalMetrics, EvalReport,
    LocalMetrics, ModelPayload, TaskKind,
};
use starling_proto::update::ModelShape;
use starling_sdk::transport::quic::QuicTransport;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn config_text(privacy: &str, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
rate_per_second = 50
rate_burst = 50
[model]
rows = 20
row_len = 4
[round]
target_participants = 3
min_reports = 3
over_selection = 1.0
selection_pool = 3
selection_timeout_ms = 3000
report_timeout_ms = 10000
interval_ms = 50
require_charging = false
require_unmetered = false
require_idle = false
retry_after_ms = 50
retry_window_ms = 50
[privacy]
{privacy}
[evaluation]
every_rounds = 1
{extra}
"#
    )
}

/// Client `i`'s evaluation figures: one case, a hit for odd ids, NDCG half the hit, loss `i`.
fn figures(id: u64) -> EvalMetrics {
    let hit = (id % 2) as f32;
    EvalMetrics { cases: 1, hits_at_10: hit, ndcg_at_10: hit * 0.5, loss: id as f32 }
}

/// Checks in, trains (a small update) or evaluates (its known figures), and goes again, until
/// `stop`.
async fn scripted(transport: QuicTransport, id: u64, token: Vec<u8>, stop: Arc<AtomicBool>) {
    let shape = ModelShape::new(20, 4).unwrap();
    while !stop.load(Ordering::Relaxed) {
        let mut raw = Raw::connect(&transport).await;
        raw.send(&check_in(id, token.clone())).await;
        match raw.next().await {
            Ok(Inbound::Message { message: CoordinatorMessage::Task(t), .. }) => {
                let reply = match t.kind {
                    TaskKind::Evaluate => ClientMessage::Evaluation(EvalReport {
                        round: t.round,
                        base_version: t.model_version,
                        metrics: figures(id),
                    }),
                    _ => ClientMessage::Update(ClientUpdate {
                        round: t.round,
                        base_version: t.model_version,
                        update: EncodedUpdate::RowSparse {
                            shape,
                            rows: vec![id as u32],
                            values: vec![0.01; 4],
                        },
                        weight: 1.0,
                        metrics: LocalMetrics::default(),
                    }),
                };
                raw.send(&reply).await;
                let _ = raw.next().await;
            }
            _ => tokio::time::sleep(Duration::from_millis(30)).await,
        }
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str, token: &str) -> String {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
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

fn metric(text: &str, name: &str) -> f64 {
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Starts the service in `dir`, runs three scripted clients until an evaluation round released,
/// and returns the config (the service is shut down).
async fn run_until_evaluated(dir: &std::path::Path, text: &str) -> ServiceConfig {
    let path = service_dir(dir, text);
    let config = load(&path);
    let tokens: Vec<Vec<u8>> = (1..=3).map(|id| issue(&config, id, 3600).1).collect();
    let running = server::start(&config).await.unwrap();
    let coordinator = endpoint_for(running.quic_addr, &ca_pem(dir), "localhost");
    let transport = QuicTransport::with_endpoint(client_endpoint(), &coordinator).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut fleet = tokio::task::JoinSet::new();
    for (i, token) in tokens.into_iter().enumerate() {
        fleet.spawn(scripted(transport.clone(), i as u64 + 1, token, stop.clone()));
    }
    let mut handle = running.handle.clone();
    tokio::time::timeout(Duration::from_secs(120), async {
        while handle.status().rounds_evaluated < 1 {
            handle.status_changed().await.unwrap();
        }
    })
    .await
    .expect("an evaluation round releases");
    stop.store(true, Ordering::Relaxed);
    assert!(handle.status().halted.is_none(), "{:?}", handle.status());
    assert!(handle.status().rounds_committed >= 1, "training came first");

    // /status and /metrics over the admin endpoint.
    let token = std::fs::read_to_string(dir.join("secrets/admin.token")).unwrap();
    let status = http_get(running.admin_addr, "/status", token.trim()).await;
    let body: serde_json::Value = serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let last = &body["evaluation"]["last"];
    assert_eq!(last["reports"], 3, "{body}");
    assert!(last["round"].as_u64().unwrap() >= 2);
    assert!(last["at"].as_i64().unwrap() > 0);
    assert!(!body["evaluation"]["history"].as_array().unwrap().is_empty());
    let metrics = http_get(running.admin_addr, "/metrics", token.trim()).await;
    assert!(
        (metric(&metrics, "starling_eval_hr_at_10") - last["hr_at_10"].as_f64().unwrap()).abs() < 1e-9,
        "{metrics}"
    );
    assert!(
        (metric(&metrics, "starling_eval_ndcg_at_10") - last["ndcg_at_10"].as_f64().unwrap()).abs() < 1e-9,
        "{metrics}"
    );
    assert!(
        (metric(&metrics, "starling_eval_loss") - last["loss"].as_f64().unwrap()).abs() < 1e-9,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "starling_eval_reports"), 3.0);
    assert!(metric(&metrics, "starling_eval_rounds_total") >= 1.0);
    running.shutdown().await;
    fleet.abort_all();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluation_rounds_report_exact_figures_in_status_and_metrics_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = run_until_evaluated(dir.path(), &config_text("mode = \"off\"", "")).await;
    let last = {
        let running = server::start(&config).await.unwrap();
        let status = running.telemetry.status();
        running.shutdown().await;
        status.evaluation.last.expect("the figures survive a restart")
    };
    // Reports of clients 1..=3: cases 3, hits 2, NDCG 1, loss 6.
    assert!(!last.noised && last.noise_std.is_none());
    assert_eq!((last.reports, last.cases), (3, 3.0));
    assert!((last.hr_at_10 - 2.0 / 3.0).abs() < 1e-12);
    assert!((last.ndcg_at_10 - 1.0 / 3.0).abs() < 1e-12);
    assert!((last.loss - 2.0).abs() < 1e-12);
    let store = Store::open(&config.storage.path).unwrap();
    let rounds = store.rounds().unwrap();
    let evaluated: Vec<&starling_coordinator::store::RoundRecord> =
        rounds.iter().filter(|r| r.state == "evaluated").collect();
    assert!(!evaluated.is_empty(), "{rounds:?}");
    for r in evaluated {
        assert_eq!(r.result_version, Some(r.base_version), "evaluation never changes the model");
    }
    assert!(store.ledger_entries().unwrap().is_empty(), "no DP, no charge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_central_dp_the_evaluation_is_noised_and_charged_to_the_durable_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let privacy = "mode = \"central\"\nclip_norm = 1.0\nnoise_multiplier = 0.5\nepsilon_budget = 1000000.0";
    let config = run_until_evaluated(dir.path(), &config_text(privacy, "")).await;
    let store = Store::open(&config.storage.path).unwrap();
    let evaluations = store.evaluations(20).unwrap();
    let e = evaluations.first().expect("recorded");
    assert!(e.noised);
    assert_eq!(e.noise_std, Some(1.0), "sigma 0.5 times the sensitivity 2");
    assert!((0.0..=1.0).contains(&e.hr_at_10) && (0.0..=10.0).contains(&e.loss));
    let ledger: Vec<u64> = store.ledger_entries().unwrap().iter().map(|l| l.round).collect();
    let rounds = store.rounds().unwrap();
    let released: Vec<u64> = rounds
        .iter()
        .filter(|r| r.state == "committed" || r.state == "evaluated")
        .map(|r| r.round.0)
        .collect();
    assert_eq!(ledger, released, "every released round, training or evaluation, is charged");
    assert!(evaluations.iter().all(|e| ledger.contains(&e.round)));
    let charge = store.ledger_entries().unwrap().into_iter().find(|l| l.round == e.round).unwrap();
    assert_eq!(charge.mechanism.q.get(), 1.0, "three enrolled, three expected");
    assert!((charge.mechanism.sigma.get() - 0.5).abs() < 1e-3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_tower_service_serves_the_two_tower_shape_and_initialisation() {
    use starling_models::family::ModelDef;
    let dir = tempfile::tempdir().unwrap();
    let text = config_text("mode = \"off\"", "")
        .replace("rows = 20", "family = \"two-tower\"\nrows = 20")
        .replace("target_participants = 3\nmin_reports = 3", "target_participants = 1\nmin_reports = 1")
        .replace("selection_pool = 3", "selection_pool = 1");
    let path = service_dir(dir.path(), &text);
    let config = load(&path);
    let def = ModelDef::two_tower(20, 4);
    let want = def.shape().unwrap();
    assert_eq!(config.shape().unwrap(), want);
    assert!(want.rows > 20, "dense rows after the 20 item rows: {want:?}");
    let token = issue(&config, 1, 3600).1;
    let running = server::start(&config).await.unwrap();
    let coordinator = endpoint_for(running.quic_addr, &ca_pem(dir.path()), "localhost");
    let transport = QuicTransport::with_endpoint(client_endpoint(), &coordinator).unwrap();
    let mut raw = Raw::connect(&transport).await;
    raw.send(&ClientMessage::CheckIn(CheckIn {
        client: ClientId(1),
        credential: token,
        sdk_version: "raw-test".into(),
        model_family: "two-tower".into(),
        have_version: None,
        conditions: GOOD,
        capabilities: Capabilities::default(),
    }))
    .await;
    let task = loop {
        match raw.message().await {
            CoordinatorMessage::Task(t) => break t,
            CoordinatorMessage::ComeBackAt(_) => {
                raw = Raw::connect(&transport).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                raw.send(&check_in(1, issue(&config, 1, 3600).1)).await;
            }
            other => panic!("expected a task, got {other:?}"),
        }
    };
    assert_eq!(task.kind, TaskKind::Train);
    match &task.model {
        ModelPayload::Full { shape, values } => {
            assert_eq!(*shape, want);
            assert_eq!(&values[..], &def.init_global(config.model.seed, config.model.init_std).unwrap()[..]);
        }
        other => panic!("expected the full model, got {other:?}"),
    }
    running.shutdown().await;
}

#[test]
fn evaluation_is_refused_where_it_is_not_supported_and_off_there_by_default() {
    let parse = |text: &str| ServiceConfig::from_toml(text, Vec::new(), std::path::Path::new("/tmp"));
    let secure = "[secure_aggregation]\nenabled = true\nneighbours = 4\n[privacy]\nmode = \"central\"\n";
    let local = "[privacy]\nmode = \"local\"\n";
    for base in [secure, local] {
        let c = parse(base).unwrap();
        assert_eq!(c.evaluation_every(), 0, "off by default under {base}");
        let err = parse(&format!("{base}[evaluation]\nevery_rounds = 3\n")).unwrap_err();
        match err {
            ConfigError::Invalid { key, detail } => {
                assert_eq!(key, "evaluation.every_rounds");
                assert!(detail.contains("not supported"), "{detail}");
            }
            other => panic!("{other}"),
        }
        assert!(parse(&format!("{base}[evaluation]\nevery_rounds = 0\n")).is_ok());
    }
    let c = parse("").unwrap();
    assert_eq!(c.evaluation_every(), 5);
    assert_eq!(c.evaluation_target(), None);
    let c = parse("[evaluation]\nevery_rounds = 2\ntarget_participants = 7\n").unwrap();
    assert_eq!((c.evaluation_every(), c.evaluation_target()), (2, Some(7)));
}
