//! `starling serve` on PostgreSQL (`[storage] postgres`, a fresh schema on the server of
//! `STARLING_TEST_PG`; `.ci/run` starts one): SDK clients over QUIC take part in rounds, the
//! rounds, the privacy ledger and the checkpoints land in PostgreSQL (no SQLite file is made),
//! and a restart on the same schema continues from the last version with round ids above every
//! earlier one; a rollback over the control plane is written there as well. Prints SKIPPED without a server (fails under `CI=true`).

mod common;

use common::*;
use starling_coordinator::service::server;
use starling_coordinator::store::Store;
use starling_proto::ids::ModelVersion;
use starling_sdk::transport::quic::QuicTransport;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn pg_url() -> Option<String> {
    let Ok(url) = std::env::var("STARLING_TEST_PG") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "STARLING_TEST_PG is not set under CI=true (.ci/run starts PostgreSQL)"
        );
        println!("SKIPPED: STARLING_TEST_PG is not set");
        return None;
    };
    Some(url)
}

/// A fresh schema, dropped at the end.
struct Schema {
    url: String,
    name: String,
}

impl Schema {
    fn new(url: &str) -> Self {
        let name = format!("serve_{}_{:x}", std::process::id(), rand::random::<u64>());
        let mut c = postgres::Client::connect(url, postgres::NoTls).expect("connect to STARLING_TEST_PG");
        c.batch_execute(&format!("CREATE SCHEMA {name}")).unwrap();
        Self { url: url.into(), name }
    }

    fn conn_str(&self) -> String {
        format!("{} options='-c search_path={}'", self.url, self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.url, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

fn config_text(conn_str: &str) -> String {
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
[storage]
postgres = "{}"
"#,
        conn_str.replace('\\', "\\\\").replace('"', "\\\"")
    )
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

/// Starts the service, runs the fleet until `rounds` more rounds committed, then (with
/// `rollback`) pauses and rolls back to that version over the control plane, and shuts down.
/// Returns the model version the service started from, and the version the rollback served.
fn serve_rounds(
    rt: &tokio::runtime::Runtime,
    config: &starling_coordinator::service::config::ServiceConfig,
    dir: &std::path::Path,
    tokens: &[Vec<u8>],
    rounds: u64,
    rollback: Option<u64>,
) -> (u64, Option<u64>) {
    rt.block_on(async {
        let running = server::start(config).await.unwrap();
        let started_from = running.handle.status().model_version.0;
        let stop = Arc::new(AtomicBool::new(false));
        let mut set = fleet(&running, dir, tokens, stop.clone());
        let mut handle = running.handle.clone();
        tokio::time::timeout(Duration::from_secs(120), async {
            while handle.status().rounds_committed < rounds {
                handle.status_changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{rounds} rounds did not commit: {:?}", running.handle.status()));
        let mut served = None;
        if let Some(version) = rollback {
            let admin = std::fs::read_to_string(dir.join("secrets/admin.token")).unwrap();
            let (addr, admin) = (running.admin_addr, Some(admin.trim()));
            let (code, body) = http(addr, "POST", "/admin/pause", admin).await;
            assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
            tokio::time::timeout(Duration::from_secs(60), async {
                while handle.status().round.is_some() {
                    handle.status_changed().await.unwrap();
                }
            })
            .await
            .expect("the running round ends");
            // The hook writes the rollback from the driver's task: off the async threads.
            let (code, body) = http(addr, "POST", &format!("/admin/rollback?version={version}"), admin).await;
            assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
            served = Some(running.handle.status().model_version.0);
        }
        stop.store(true, Ordering::Relaxed);
        running.shutdown().await;
        set.abort_all();
        while set.join_next().await.is_some() {}
        (started_from, served)
    })
}

#[test]
fn serve_on_postgresql_commits_rounds_and_a_restart_continues_above_every_round_id() {
    let Some(url) = pg_url() else { return };
    let schema = Schema::new(&url);
    let dir = tempfile::tempdir().unwrap();
    let path = service_dir(dir.path(), &config_text(&schema.conn_str()));
    let config = load(&path);
    assert_eq!(config.storage.postgres.as_deref(), Some(schema.conn_str().as_str()));
    // Enrollment as `starling token issue` does it, into PostgreSQL (outside any runtime).
    let tokens: Vec<Vec<u8>> = (1..=3).map(|id| issue(&config, id, 3600).1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    // First run: the initial model is seeded, two rounds commit.
    assert_eq!(serve_rounds(&rt, &config, dir.path(), &tokens, 2, None).0, 0);
    let store = Store::open_config(&config.storage).unwrap();
    assert!(store.describe().starts_with("postgresql "), "{}", store.describe());
    let first = store.rounds().unwrap();
    let committed: Vec<_> = first.iter().filter(|r| r.state == "committed").collect();
    assert!(committed.len() >= 2, "{first:?}");
    let latest = store.latest_checkpoint().unwrap().unwrap();
    assert_eq!(Some(latest.version), committed.last().unwrap().result_version);
    assert!(latest.strategy_state.is_some(), "fedadam's moments are stored with the checkpoint");
    let ledger = store.ledger_entries().unwrap();
    assert_eq!(
        ledger.iter().map(|e| e.round).collect::<Vec<_>>(),
        committed.iter().map(|r| r.round.0).collect::<Vec<_>>(),
        "one ledger entry per committed round, in PostgreSQL"
    );
    let max_first = first.iter().map(|r| r.round.0).max().unwrap();
    drop(store);
    assert!(!config.storage.path.exists(), "no SQLite file is made when [storage] postgres is set");

    // Restart on the same schema: it continues from the last version, with new round ids.
    let (started_from, served) = serve_rounds(&rt, &config, dir.path(), &tokens, 1, Some(1));
    assert_eq!(started_from, latest.version.0);
    let store = Store::open_config(&config.storage).unwrap();
    let all = store.rounds().unwrap();
    for r in first.iter().filter(|r| r.state == "started") {
        let now = all.iter().find(|a| a.round == r.round).unwrap();
        assert_eq!(now.state, "abandoned", "the restart recorded the interrupted round {:?}", r.round);
    }
    let later: Vec<_> = all.iter().filter(|r| r.round.0 > max_first).collect();
    assert!(later.iter().any(|r| r.state == "committed"), "{all:?}");
    assert_eq!(all.len(), first.len() + later.len(), "the earlier rounds are all still there");
    // The rollback (written by the hook, audited by the control plane) is in PostgreSQL too.
    let newest = store.latest_checkpoint().unwrap().unwrap();
    assert_eq!(Some(newest.version.0), served);
    assert!(newest.version > latest.version);
    assert_eq!(newest.model, store.checkpoint(ModelVersion(1)).unwrap().unwrap().model);
    let actions: Vec<String> = store.audit(10).unwrap().into_iter().map(|a| a.action).collect();
    assert_eq!(actions, ["pause", "rollback"]);
    assert_eq!(store.service_state("paused").unwrap().as_deref(), Some("true"));
    let ledger_after = store.ledger_entries().unwrap();
    assert!(ledger_after.len() > ledger.len());
    assert_eq!(&ledger_after[..ledger.len()], &ledger[..], "what was spent stays spent");
    assert!(ledger_after[ledger.len()..].iter().all(|e| e.round > max_first));
}
