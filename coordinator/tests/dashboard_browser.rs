//! The dashboard in a real browser: headless Chromium (driven by playwright-core under Node)
//! loads `/` from the running service with the admin token, shows the status, and — without
//! being reloaded — shows a round that committed after the page loaded. The page asks no other
//! host for anything.
//!
//! Needs Chromium, Node and playwright-core (`.ci/run` installs them:
//! `npm install --prefix ~/.cache/starling-tools/node playwright-core`); prints SKIPPED without
//! them, or fails under `CI=true`. `STARLING_NODE_MODULES` points at another `node_modules`.

mod common;

use common::*;
use starling_coordinator::service::server;
use starling_sdk::RoundError;
use starling_sdk::transport::quic::QuicTransport;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const CONFIG: &str = r#"
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
[privacy]
mode = "central"
clip_norm = 1.0
noise_multiplier = 1.0
epsilon_budget = 1000.0
delta = 1e-3
[evaluation]
every_rounds = 1
"#;

fn node_modules() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("STARLING_NODE_MODULES") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("HOME").ok()?;
    let p = PathBuf::from(home).join(".cache/starling-tools/node/node_modules");
    p.join("playwright-core").exists().then_some(p)
}

fn chromium() -> Option<PathBuf> {
    std::env::var("STARLING_CHROMIUM").ok().map(PathBuf::from).or_else(|| {
        ["/usr/bin/chromium", "/usr/bin/chromium-browser"].iter().map(PathBuf::from).find(|p| p.exists())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_round_that_committed_after_it_loaded() {
    let have_node = Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    let (Some(modules), Some(browser), true) = (node_modules(), chromium(), have_node) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "node, playwright-core or chromium missing under CI=true (see .ci/run)"
        );
        println!("SKIPPED: node, playwright-core or chromium missing (see the module docs)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = service_dir(dir.path(), CONFIG);
    let config = load(&path);
    let tokens: Vec<Vec<u8>> = (1..=3).map(|id| issue(&config, id, 3600).1).collect();
    let admin = std::fs::read_to_string(dir.path().join("secrets/admin.token")).unwrap().trim().to_owned();
    let running = server::start(&config).await.unwrap();

    // Three SDK clients train; after the first commit the schedule is paused, so that the next
    // round starts only when the test says (after the page loaded).
    let coordinator = endpoint_for(running.quic_addr, &ca_pem(dir.path()), "localhost");
    let transport = QuicTransport::with_endpoint(client_endpoint(), &coordinator).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut fleet = tokio::task::JoinSet::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let client = sdk_client(i as u64 + 1, token, 40, 4, transport.clone());
        let stop = stop.clone();
        fleet.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Err(RoundError::ComeBackLater { after }) = client.run_round().await {
                    tokio::time::sleep(after.min(Duration::from_millis(200))).await;
                }
            }
        });
    }
    let mut handle = running.handle.clone();
    tokio::time::timeout(Duration::from_secs(120), async {
        while handle.status().rounds_committed < 1 {
            handle.status_changed().await.unwrap();
        }
    })
    .await
    .expect("a first round commits");
    assert_eq!(http(running.admin_addr, "POST", "/admin/pause", Some(&admin)).await.0, 200);
    tokio::time::timeout(Duration::from_secs(60), async {
        while handle.status().round.is_some() {
            handle.status_changed().await.unwrap();
        }
    })
    .await
    .unwrap();

    // ES modules resolve packages from the script's own folders (not NODE_PATH): run a copy of
    // the script beside a link to the node_modules.
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.mjs");
    let script = dir.path().join("dashboard.mjs");
    std::fs::copy(&source, &script).unwrap();
    std::os::unix::fs::symlink(&modules, dir.path().join("node_modules")).unwrap();
    let shot = dir.path().join("dashboard.png");
    let mut node = Command::new("node")
        .arg(&script)
        .arg(format!("http://{}/", running.admin_addr))
        .arg(&admin)
        .arg(&shot)
        .env("NODE_PATH", &modules)
        .env("STARLING_CHROMIUM", &browser)
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = node.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let loaded: u64 = match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
        Ok(Some(line)) if line.starts_with("LOADED ") => line[7..].trim().parse().unwrap(),
        other => {
            let out = node.wait_with_output().unwrap();
            panic!("the page did not load ({other:?}): {}", String::from_utf8_lossy(&out.stderr));
        }
    };
    let committed_at_load = running.handle.status().rounds_committed;
    assert_eq!(loaded, committed_at_load, "the page shows the service's count");

    // Now a round commits; the page must show it by itself.
    assert_eq!(http(running.admin_addr, "POST", "/admin/round", Some(&admin)).await.0, 200);
    let line = tokio::time::timeout(Duration::from_secs(90), rx.recv()).await.ok().flatten();
    let status = node.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    fleet.abort_all();
    let new_round = running.handle.status();
    running.shutdown().await;
    let line = line.unwrap_or_else(|| panic!("the page never showed the new round ({status})"));
    let seen: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert!(status.success(), "{seen}");
    assert!(seen["after"].as_u64().unwrap() > loaded, "{seen}");
    let rows: Vec<u64> = seen["rows"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let newest = rows.iter().max().copied().unwrap_or(0);
    assert!(rows.len() as u64 > loaded, "every committed round is listed: {seen}");
    assert!(new_round.rounds_committed > committed_at_load && newest > 1, "{seen} {new_round:?}");
    assert!(seen["bars"].as_u64().unwrap() >= 2, "the chart draws the rounds: {seen}");
    assert_eq!(seen["external"], serde_json::json!([]), "the page asked another host: {seen}");
    assert_eq!(seen["errors"], serde_json::json!([]), "script errors: {seen}");
    assert!(
        !seen["address"].as_str().unwrap().contains("token="),
        "the token is kept out of the address bar"
    );
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "a screenshot was taken");
}
