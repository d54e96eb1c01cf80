//! Crash recovery of the real `starling serve` process: it is killed with SIGKILL while a round
//! is running, restarted on the same store, and the next round commits. The store stays
//! consistent: every committed round, and only those, is in the privacy ledger; the served
//! checkpoint is the last committed one; the interrupted round is recorded `abandoned`; round ids
//! are never reused.

mod common;

use common::*;
use starling_coordinator::store::Store;
use starling_proto::ids::ModelVersion;
use starling_sdk::transport::quic::QuicTransport;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn free_ports() -> (u16, u16) {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (udp.local_addr().unwrap().port(), tcp.local_addr().unwrap().port())
}

/// Starts `starling serve` and waits for it to report its QUIC address.
fn serve(config: &Path) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_starling"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("quic listening on") => break,
            Some(Ok(_)) => continue,
            other => panic!("starling serve exited before listening: {other:?}"),
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

/// Rounds as `(id, state)`, read through a second connection to the live database.
fn rounds(db: &Path) -> Vec<(u64, String)> {
    match Store::open(db).and_then(|s| s.rounds()) {
        Ok(r) => r.into_iter().map(|r| (r.round.0, r.state)).collect(),
        Err(_) => Vec::new(),
    }
}

fn committed(rounds: &[(u64, String)]) -> Vec<u64> {
    rounds.iter().filter(|(_, s)| s == "committed").map(|(r, _)| *r).collect()
}

async fn poll_until(db: &Path, what: &str, f: impl Fn(&[(u64, String)]) -> bool) -> Vec<(u64, String)> {
    let guard = tokio::time::timeout(Duration::from_secs(240), async {
        loop {
            let r = rounds(db);
            if f(&r) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    guard.await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_round_the_coordinator_resumes_consistently() {
    let dir = tempfile::tempdir().unwrap();
    let (udp, tcp) = free_ports();
    let config_text = format!(
        r#"
[server]
listen = "127.0.0.1:{udp}"
admin_listen = "127.0.0.1:{tcp}"
rate_per_second = 50
rate_burst = 50
[model]
rows = 100
row_len = 8
[round]
target_participants = 8
min_reports = 4
over_selection = 1.25
selection_pool = 10
selection_timeout_ms = 3000
report_timeout_ms = 5000
interval_ms = 300
require_charging = false
require_unmetered = false
require_idle = false
learning_rate = 0.5
retry_after_ms = 100
retry_window_ms = 200
[privacy]
mode = "central"
clip_norm = 1.0
noise_multiplier = 0.5
epsilon_budget = 1000000.0
"#
    );
    let path = service_dir(dir.path(), &config_text);
    let config = load(&path);
    let db = config.storage.path.clone();
    let tokens: Vec<Vec<u8>> = (1..=10).map(|id| issue(&config, id, 3600).1).collect();

    let mut child = serve(&path);
    let coordinator =
        endpoint_for(format!("127.0.0.1:{udp}").parse().unwrap(), &ca_pem(dir.path()), "localhost");
    let transport = QuicTransport::with_endpoint(client_endpoint(), &coordinator).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut fleet = tokio::task::JoinSet::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let client = sdk_client(i as u64 + 1, token, 100, 8, transport.clone());
        let stop = stop.clone();
        fleet.spawn(keep_taking_part(client, stop, Duration::from_millis(500)));
    }

    // Kill -9 once a round has committed and the next one is under way.
    let before = poll_until(&db, "a commit followed by a running round", |r| {
        let c = committed(r);
        !c.is_empty() && r.iter().any(|(id, s)| s == "started" && *id > *c.last().unwrap())
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let interrupted = before.iter().rev().find(|(_, s)| s == "started").unwrap().0;
    let committed_before = committed(&rounds(&db)).len();

    // Restart on the same store; the next round commits.
    let mut child = serve(&path);
    let after =
        poll_until(&db, "a commit after the restart", |r| committed(r).len() > committed_before).await;
    stop.store(true, Ordering::Relaxed);
    child.kill().unwrap();
    child.wait().unwrap();
    fleet.abort_all();

    let store = Store::open(&db).unwrap();
    let all = store.rounds().unwrap();
    let state = |id: u64| all.iter().find(|r| r.round.0 == id).map(|r| r.state.clone());
    // The kill may land a hair after the commit transaction; either way nothing is half-done.
    let s = state(interrupted).unwrap();
    assert!(s == "abandoned" || s == "committed", "interrupted round is {s}");
    let ids: Vec<u64> = all.iter().map(|r| r.round.0).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "round ids never reused: {ids:?}");
    let committed_ids = committed(&after);
    assert!(*committed_ids.last().unwrap() > interrupted, "a round after the crash committed");
    let committed_now: Vec<u64> = all.iter().filter(|r| r.state == "committed").map(|r| r.round.0).collect();
    let ledger: Vec<u64> = store.ledger_entries().unwrap().iter().map(|e| e.round).collect();
    assert_eq!(ledger, committed_now, "ε is charged for exactly the committed rounds");
    let latest = store.latest_checkpoint().unwrap().unwrap();
    assert_eq!(latest.version, ModelVersion(committed_now.len() as u64), "one version per commit");
    assert_eq!(latest.round.0, *committed_now.last().unwrap());
    for r in all.iter().filter(|r| r.state == "committed") {
        assert_eq!(r.result_version.unwrap().0, r.base_version.0 + 1, "{r:?}");
    }
}
