//! The control plane of the real service over loopback (QUIC for the SDK clients, HTTP for the
//! operator): every endpoint refuses without the token and writes no audit row then; pause holds
//! the schedule (and survives a restart), resume and "start a round now" move it; export gives
//! the checkpoint byte for byte; rollback serves an earlier checkpoint as a new version while the
//! ledger keeps what was spent; reload and drain act; every action is in the audit table. A
//! restart continues the schedule's round count and restores the server optimizer's state.

mod common;

use common::*;
use starling_coordinator::service::control::read_export;
use starling_coordinator::service::server;
use starling_coordinator::store::Store;
use starling_proto::ids::ModelVersion;
use starling_sdk::transport::quic::QuicTransport;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn config_text(extra_round: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
rate_per_second = 50
rate_burst = 50
[model]
rows = 40
row_len = 4
[round]
target_participants = 3
min_reports = 3
over_selection = 1.0
selection_pool = 3
selection_timeout_ms = 3000
report_timeout_ms = 10000
interval_ms = 100
require_charging = false
require_unmetered = false
require_idle = false
retry_after_ms = 50
retry_window_ms = 50
{extra_round}
[strategy]
kind = "fedadam"
server_learning_rate = 0.05
[privacy]
mode = "central"
clip_norm = 1.0
noise_multiplier = 1.0
epsilon_budget = 1000.0
delta = 1e-3
[evaluation]
every_rounds = 0
"#
    )
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

/// Three SDK clients that take part in rounds until `stop`.
fn fleet(
    running: &server::Running,
    dir: &std::path::Path,
    tokens: &[Vec<u8>],
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinSet<()> {
    let coordinator = endpoint_for(running.quic_addr, &ca_pem(dir), "localhost");
    let transport = QuicTransport::with_endpoint(client_endpoint(), &coordinator).unwrap();
    let mut set = tokio::task::JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        let client = sdk_client(i as u64 + 1, token.clone(), 40, 4, transport.clone());
        let stop = stop.clone();
        set.spawn(keep_taking_part(client, stop, Duration::from_millis(200)));
    }
    set
}

async fn wait_committed(running: &server::Running, at_least: u64, within: Duration) {
    let mut handle = running.handle.clone();
    tokio::time::timeout(within, async {
        while handle.status().rounds_committed < at_least {
            handle.status_changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{at_least} rounds did not commit: {:?}", running.handle.status()));
}

const ACTIONS: [(&str, &str); 9] = [
    ("POST", "/admin/pause"),
    ("POST", "/admin/resume"),
    ("POST", "/admin/round"),
    ("POST", "/admin/rollback?version=0"),
    ("POST", "/admin/reload"),
    ("POST", "/admin/drain"),
    ("GET", "/admin/model"),
    ("GET", "/admin/audit"),
    ("GET", "/history"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_pauses_exports_rolls_back_and_audits_and_refuses_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = service_dir(dir.path(), &config_text(""));
    let config = load(&path);
    let tokens: Vec<Vec<u8>> = (1..=3).map(|id| issue(&config, id, 3600).1).collect();
    let admin = std::fs::read_to_string(dir.path().join("secrets/admin.token")).unwrap();
    let admin = admin.trim();
    let running = server::start(&config).await.unwrap();
    let addr = running.admin_addr;

    // No token, a wrong one: 401 everywhere, nothing acted on, nothing in the audit table.
    for (method, path) in ACTIONS {
        assert_eq!(http(addr, method, path, None).await.0, 401, "{method} {path} without a token");
        assert_eq!(
            http(addr, method, path, Some("wrong")).await.0,
            401,
            "{method} {path} with a wrong token"
        );
    }
    assert!(!running.handle.status().draining && !running.handle.status().paused);
    assert!(Store::open(&config.storage.path).unwrap().audit(100).unwrap().is_empty());
    let metrics = String::from_utf8(http(addr, "GET", "/metrics", Some(admin)).await.1).unwrap();
    assert!(metrics.contains("starling_admin_unauthorized_total 18"), "{metrics}");

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = fleet(&running, dir.path(), &tokens, stop.clone());
    wait_committed(&running, 2, Duration::from_secs(120)).await;

    // Pause: the round running finishes, then nothing starts by itself.
    let (code, body) = http(addr, "POST", "/admin/pause", Some(admin)).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let mut handle = running.handle.clone();
    tokio::time::timeout(Duration::from_secs(60), async {
        while handle.status().round.is_some() {
            handle.status_changed().await.unwrap();
        }
    })
    .await
    .expect("the running round ends");
    let held = running.handle.status().rounds_committed + running.handle.status().rounds_failed;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = running.handle.status();
    assert_eq!(s.rounds_committed + s.rounds_failed, held, "a round started while paused");
    assert!(s.paused && s.round.is_none());
    let status = json(&http(addr, "GET", "/status", Some(admin)).await.1);
    assert_eq!(status["paused"], true, "{status}");

    // Export the newest checkpoint: the bytes are the store's checkpoint.
    let (code, bytes) = http(addr, "GET", "/admin/model", Some(admin)).await;
    assert_eq!(code, 200);
    let (version, rows, row_len, family, values) = read_export(&bytes).unwrap();
    let stored = Store::open(&config.storage.path).unwrap().latest_checkpoint().unwrap().unwrap();
    assert_eq!((version, rows, row_len, family.as_str()), (stored.version.0, 40, 4, "bpr-mf"));
    assert_eq!(values, stored.model);
    assert!(stored.strategy_state.is_some(), "the checkpoint carries the optimizer's state");
    let (code, body) = http(addr, "GET", "/admin/model?format=json&version=1", Some(admin)).await;
    assert_eq!(code, 200);
    let v1 = json(&body);
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["values"].as_array().unwrap().len(), 160);
    assert_eq!(http(addr, "GET", "/admin/model?version=999", Some(admin)).await.0, 404);

    // Roll back to v1: served as a new version; the ledger keeps what was spent.
    let spent = json(&http(addr, "GET", "/status", Some(admin)).await.1)["epsilon_spent"].as_f64().unwrap();
    let ledger_rows = Store::open(&config.storage.path).unwrap().ledger_entries().unwrap().len();
    let before = running.handle.status().model_version;
    let (code, body) = http(addr, "POST", "/admin/rollback?version=1", Some(admin)).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let rolled = json(&body);
    assert_eq!(rolled["served_as"], before.0 + 1, "{rolled}");
    assert_eq!(running.handle.status().model_version, ModelVersion(before.0 + 1));
    let store = Store::open(&config.storage.path).unwrap();
    let served = store.checkpoint(ModelVersion(before.0 + 1)).unwrap().unwrap();
    let first = store.checkpoint(ModelVersion(1)).unwrap().unwrap();
    assert_eq!(served.model, first.model);
    assert_eq!(served.strategy_state, first.strategy_state, "the optimizer state goes back with it");
    assert_eq!(store.ledger_entries().unwrap().len(), ledger_rows, "a rollback refunds nothing");
    let after = json(&http(addr, "GET", "/status", Some(admin)).await.1);
    assert_eq!(after["epsilon_spent"].as_f64().unwrap(), spent);
    assert_eq!(after["model_version"], before.0 + 1);
    assert_eq!(http(addr, "POST", "/admin/rollback?version=999", Some(admin)).await.0, 409);

    // Start a round now, while paused: it commits on top of the rolled-back model.
    let (code, body) = http(addr, "POST", "/admin/round", Some(admin)).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let committed = running.handle.status().rounds_committed;
    wait_committed(&running, committed + 1, Duration::from_secs(60)).await;
    assert_eq!(
        running.handle.status().model_version,
        ModelVersion(before.0 + 2),
        "no version lost or reused"
    );
    // A rollback is refused while a round runs; resume lets the schedule go on.
    let (code, _) = http(addr, "POST", "/admin/resume", Some(admin)).await;
    assert_eq!(code, 200);
    let committed = running.handle.status().rounds_committed;
    wait_committed(&running, committed + 1, Duration::from_secs(60)).await;

    // Reload: revoke client 3 in the store; the reload closes its connection at once.
    let (code, body) = http(addr, "POST", "/admin/reload", Some(admin)).await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["revoked_tokens"], 0);

    // History: the rounds with their figures.
    let history = json(&http(addr, "GET", "/history?limit=100", Some(admin)).await.1);
    let rounds = history["rounds"].as_array().unwrap();
    assert!(rounds.iter().filter(|r| r["state"] == "committed").count() >= 4, "{history}");
    assert!(rounds.iter().any(|r| r["figures"]["reported"].as_u64().unwrap_or(0) >= 3), "{history}");

    // Drain: new connections are refused.
    let (code, _) = http(addr, "POST", "/admin/drain", Some(admin)).await;
    assert_eq!(code, 200);
    assert!(running.handle.status().draining);
    stop.store(true, Ordering::Relaxed);
    clients.abort_all();

    // Every action is in the audit table, with who and the outcome.
    let audit = json(&http(addr, "GET", "/admin/audit?limit=100", Some(admin)).await.1);
    let rows = audit["audit"].as_array().unwrap();
    let actions: Vec<&str> = rows.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "pause",
            "export",
            "export",
            "export",
            "rollback",
            "rollback",
            "start_round",
            "resume",
            "reload",
            "drain"
        ],
        "{audit}"
    );
    assert!(rows.iter().all(|r| r["actor"].as_str().unwrap().contains("test-operator")));
    assert!(rows.iter().all(|r| r["at_ms"].as_i64().unwrap() > 0));
    assert_eq!(rows[3]["outcome"].as_str().unwrap().split(' ').next(), Some("refused"), "export of v999");
    assert!(rows[5]["outcome"].as_str().unwrap().starts_with("refused (409)"), "{audit}");
    assert_eq!(rows[4]["outcome"], "ok");
    running.shutdown().await;
}

/// Waits until `n` rounds have ended (committed or failed) and none is running.
async fn wait_ended(running: &server::Running, n: u64, within: Duration) {
    let mut handle = running.handle.clone();
    tokio::time::timeout(within, async {
        loop {
            let s = handle.status();
            if s.rounds_committed + s.rounds_failed >= n && s.round.is_none() {
                return;
            }
            handle.status_changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{n} rounds did not end: {:?}", running.handle.status()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_continues_the_schedule_count_the_pause_and_the_optimizer_state() {
    const MAX_ROUNDS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let path = service_dir(dir.path(), &config_text(&format!("max_rounds = {MAX_ROUNDS}")));
    let config = load(&path);
    let tokens: Vec<Vec<u8>> = (1..=3).map(|id| issue(&config, id, 3600).1).collect();
    let admin = std::fs::read_to_string(dir.path().join("secrets/admin.token")).unwrap();
    let admin = admin.trim().to_owned();

    // First life: a round commits, then the operator pauses and the process stops.
    let running = server::start(&config).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = fleet(&running, dir.path(), &tokens, stop.clone());
    wait_committed(&running, 1, Duration::from_secs(120)).await;
    assert_eq!(http(running.admin_addr, "POST", "/admin/pause", Some(&admin)).await.0, 200);
    wait_ended(&running, 1, Duration::from_secs(60)).await;
    stop.store(true, Ordering::Relaxed);
    clients.abort_all();
    running.shutdown().await;
    let store = Store::open(&config.storage.path).unwrap();
    let first_life = store.rounds().unwrap().iter().filter(|r| r.kind == "train").count();
    assert!(first_life < MAX_ROUNDS, "paused before the schedule ran out ({first_life} rounds)");
    let saved = store.latest_checkpoint().unwrap().unwrap();
    let state =
        starling_proto::codec::decode_strategy_state(saved.strategy_state.as_deref().unwrap(), 1 << 24)
            .unwrap();
    assert_eq!(state.label("optimizer.kind"), Some("adam"));
    assert_eq!(state.vector("optimizer.m").unwrap().len(), 160, "the moments are checkpointed");
    drop(store);

    // Second life: still paused, with the optimizer's state restored; once resumed, only what
    // remains of max_rounds runs.
    let running = server::start(&config).await.unwrap();
    let status = json(&http(running.admin_addr, "GET", "/status", Some(&admin)).await.1);
    assert_eq!(status["paused"], true, "the pause survived the restart: {status}");
    assert_eq!(
        status["strategy_state_restored_from"], saved.version.0,
        "the optimizer's moments were restored: {status}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = fleet(&running, dir.path(), &tokens, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = running.handle.status();
    assert_eq!(s.rounds_committed + s.rounds_failed, 0, "nothing ran while paused");
    assert_eq!(http(running.admin_addr, "POST", "/admin/resume", Some(&admin)).await.0, 200);
    let remaining = (MAX_ROUNDS - first_life) as u64;
    wait_ended(&running, remaining, Duration::from_secs(180)).await;
    // The schedule is done: nothing more starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    clients.abort_all();
    let s = running.handle.status();
    running.shutdown().await;
    assert_eq!(s.rounds_committed + s.rounds_failed, remaining, "only what remained ran ({s:?})");
    let store = Store::open(&config.storage.path).unwrap();
    let trained = store.rounds().unwrap().iter().filter(|r| r.kind == "train").count();
    assert_eq!(trained, MAX_ROUNDS, "max_rounds counts across the restart ({s:?})");
}

/// `starling serve --log-format json` writes one JSON object per line; `starling admin` drives
/// the control plane of that process (status, pause, export, audit).
#[test]
fn json_logs_and_the_admin_cli_against_the_real_binary() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let path = service_dir(dir.path(), &config_text(""));
    let log = dir.path().join("serve.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["serve", "--log-format", "json", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let admin = loop {
        let line = lines.next().expect("serve printed its addresses").unwrap();
        if let Some(a) = line.strip_prefix("admin listening on ") {
            break a.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_starling"))
            .args(["admin", "--config"])
            .arg(&path)
            .args(["--url", &format!("http://{admin}"), "--operator", "cli-test"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, status, err) = cli(&["status"]);
    assert!(ok, "{err}");
    assert_eq!(json(status.as_bytes())["paused"], false);
    let (ok, out, err) = cli(&["pause"]);
    assert!(ok && out.contains("\"paused\":true"), "{out}{err}");
    let file = dir.path().join("model.bin");
    let (ok, _, err) = cli(&["export", "--out", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (version, rows, row_len, _, values) = read_export(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!((version, rows, row_len, values.len()), (0, 40, 4, 160));
    let (ok, _, err) = cli(&["rollback", "--version", "77"]);
    assert!(!ok && err.contains("409"), "a refused action fails the command: {err}");
    let (ok, out, _) = cli(&["audit"]);
    assert!(ok);
    let audit = json(out.as_bytes());
    let actions: Vec<&str> =
        audit["audit"].as_array().unwrap().iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["pause", "export", "rollback"]);
    assert!(audit["audit"][0]["actor"].as_str().unwrap().contains("cli-test"));
    // A wrong token: refused, nothing recorded.
    let bad = dir.path().join("bad.token");
    std::fs::write(&bad, "nope").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["admin", "--url", &format!("http://{admin}"), "--token-file", bad.to_str().unwrap(), "resume"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("401"));
    child.kill().unwrap();
    let _ = child.wait();

    let text = std::fs::read_to_string(&log).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    assert!(!records.is_empty());
    for r in &records {
        assert!(r["timestamp"].is_string() && r["level"].is_string() && r["target"].is_string(), "{r}");
        assert!(r["fields"]["message"].is_string(), "{r}");
    }
    assert!(
        records
            .iter()
            .any(|r| r["fields"]["message"] == "control-plane action" && r["fields"]["action"] == "pause"),
        "{text}"
    );
}

/// `admin_tls = true`: the admin endpoint speaks only TLS 1.3, with the service's certificate;
/// `starling admin` trusts the service's CA (and only it).
#[test]
fn the_admin_endpoint_over_tls_refuses_plain_http_and_trusts_only_its_ca() {
    use std::io::{BufRead, Read, Write};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let text = config_text("")
        .replace("admin_listen = \"127.0.0.1:0\"", "admin_listen = \"127.0.0.1:0\"\nadmin_tls = true");
    let path = service_dir(dir.path(), &text);
    let mut child = Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let admin: SocketAddr = loop {
        let line = lines.next().expect("serve printed its addresses").unwrap();
        if let Some(a) = line.strip_prefix("admin listening on ") {
            break a.trim().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let token = std::fs::read_to_string(dir.path().join("secrets/admin.token")).unwrap();

    // Plain HTTP gets no HTTP answer (the server wants a TLS handshake and hangs up).
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(
        format!("GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n", token.trim())
            .as_bytes(),
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"), "plain HTTP was served");

    let cli = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_starling"))
            .args(["admin", "--config"])
            .arg(&path)
            .args(["--url", &format!("https://{admin}")])
            .args(extra)
            .arg("status")
            .output()
            .unwrap()
    };
    // The service's CA (found beside the configuration): served.
    let out = cli(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out.stdout)["paused"], false);
    // Another CA: the certificate is refused, nothing is sent.
    let other = tempfile::tempdir().unwrap();
    server::init(other.path(), &["localhost", "127.0.0.1"], false).unwrap();
    let out = cli(&["--ca", other.path().join("tls/ca.pem").to_str().unwrap()]);
    assert!(!out.status.success(), "a foreign CA was trusted");
    child.kill().unwrap();
    let _ = child.wait();
}
