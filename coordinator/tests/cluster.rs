//! Several `starling serve` processes on one PostgreSQL (`STARLING_TEST_PG`; `.ci/run` starts a
//! throwaway server): every node serves its own clients over QUIC, the leader combines the
//! nodes' partial aggregates and commits.
//!
//! - For the same updates, three nodes commit the model a single node commits (DP off).
//! - `kill -9` of the leader at three phases of a round (selection, collection, combining):
//!   another node leads within 10 s, the next round commits, the ledger holds exactly the
//!   committed rounds, no round id is reused and no model version is lost.
//! - A leader whose database connection is cut stops leading before the new leader starts.
//!
//! Without `STARLING_TEST_PG` the tests print SKIPPED (and fail under `CI=true`).

mod common;

use common::*;
use starling_coordinator::service::config::ServiceConfig;
use starling_coordinator::service::server;
use starling_coordinator::store::Store;
use starling_proto::encoding::EncodedUpdate;
use starling_proto::ids::{ClientId, ModelVersion};
use starling_proto::message::{ClientMessage, ClientUpdate, CoordinatorMessage, LocalMetrics};
use starling_sdk::transport::quic::QuicTransport;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn pg() -> Option<String> {
    match std::env::var("STARLING_TEST_PG") {
        Ok(url) => Some(url),
        Err(_) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "STARLING_TEST_PG is not set under CI=true (.ci/run starts PostgreSQL)"
            );
            println!("SKIPPED: STARLING_TEST_PG is not set");
            None
        }
    }
}

/// A fresh schema on the test server; returns a connection string whose search path is it.
async fn fresh_schema(base: &str) -> String {
    let schema = format!("cluster_{}_{:x}", std::process::id(), rand::random::<u64>());
    let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
    format!("{base} options='-c search_path={schema}'")
}

fn with_port(conn: &str, port: u16) -> String {
    conn.split(' ')
        .map(|kv| if kv.starts_with("port=") { format!("port={port}") } else { kv.to_string() })
        .collect::<Vec<_>>()
        .join(" ")
}

fn port_of(conn: &str) -> u16 {
    conn.split(' ').find_map(|kv| kv.strip_prefix("port=")).and_then(|p| p.parse().ok()).unwrap_or(5432)
}

fn free_ports() -> (u16, u16) {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (udp.local_addr().unwrap().port(), tcp.local_addr().unwrap().port())
}

const ROUND: &str = r#"
[model]
rows = 60
row_len = 4
[round]
target_participants = 9
min_reports = 2
over_selection = 1.0
selection_timeout_ms = 1500
report_timeout_ms = 4000
interval_ms = 400
require_charging = false
require_unmetered = false
require_idle = false
learning_rate = 0.5
retry_after_ms = 100
retry_window_ms = 200
"#;

fn privacy(dp: bool) -> &'static str {
    if dp {
        "[privacy]\nmode = \"central\"\nclip_norm = 1.0\nnoise_multiplier = 0.5\nepsilon_budget = 1000000.0\n"
    } else {
        "[privacy]\nmode = \"off\"\n"
    }
}

struct NodeProc {
    name: String,
    config: PathBuf,
    quic: SocketAddr,
    admin: SocketAddr,
    child: Option<Child>,
}

impl NodeProc {
    fn start(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_starling"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", std::env::var("STARLING_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(if std::env::var("STARLING_TEST_LOG").is_ok() { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("quic listening on") => break,
                Some(Ok(_)) => continue,
                other => panic!("{}: starling serve exited before listening: {other:?}", self.name),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` node configurations in one service directory (shared TLS, token key and admin token).
fn cluster_dir(dir: &Path, pg: &str, n: usize, dp: bool, db_via: &[Option<u16>]) -> Vec<NodeProc> {
    cluster_dir_with(dir, pg, n, dp, db_via, "")
}

/// [`cluster_dir`] with `extra` TOML sections appended to every node's configuration.
fn cluster_dir_with(
    dir: &Path,
    pg: &str,
    n: usize,
    dp: bool,
    db_via: &[Option<u16>],
    extra: &str,
) -> Vec<NodeProc> {
    service_dir(dir, "");
    (0..n)
        .map(|i| {
            let (udp, tcp) = free_ports();
            let name = format!("n{}", i + 1);
            let url = match db_via.get(i).copied().flatten() {
                Some(port) => with_port(pg, port),
                None => pg.to_string(),
            };
            let text = format!(
                "[server]\nlisten = \"127.0.0.1:{udp}\"\nadmin_listen = \"127.0.0.1:{tcp}\"\nrate_per_second = 50\nrate_burst = 50\n\
                 {ROUND}{}\n[storage]\npostgres = \"{}\"\n\
                 [cluster]\nenabled = true\nnode = \"{name}\"\npopulation = \"test\"\nlease_ttl_ms = 2000\n\
                 lease_margin_ms = 700\nheartbeat_ms = 300\ntick_ms = 100\nshare_grace_ms = 1500\ndb_timeout_ms = 1000\n{extra}",
                privacy(dp),
                url.replace('\\', "\\\\").replace('"', "\\\"")
            );
            let config = dir.join(format!("{name}.toml"));
            std::fs::write(&config, text).unwrap();
            NodeProc {
                name,
                config,
                quic: format!("127.0.0.1:{udp}").parse().unwrap(),
                admin: format!("127.0.0.1:{tcp}").parse().unwrap(),
                child: None,
            }
        })
        .collect()
}

fn load_node(node: &NodeProc) -> ServiceConfig {
    load(&node.config)
}

/// Issues tokens into the cluster's store (PostgreSQL).
fn tokens(config: &ServiceConfig, ids: impl Iterator<Item = u64>) -> Vec<(u64, Vec<u8>)> {
    use starling_coordinator::service::tokens::{TokenAuthority, TokenClaims, unix_now_s};
    let authority = TokenAuthority::from_secret_file_text(
        &std::fs::read_to_string(&config.server.token_secret_file).unwrap(),
    )
    .unwrap();
    let mut store = bp(|| Store::open_config(&config.storage).unwrap());
    bp(|| {
        ids.map(|id| {
            let expires = unix_now_s() + 3600;
            let token_id = store.record_token(ClientId(id), expires, 0).unwrap();
            (
                id,
                authority
                    .issue(TokenClaims { token_id, client: ClientId(id), expires_unix_s: expires })
                    .into_bytes(),
            )
        })
        .collect()
    })
}

async fn status(node: &NodeProc, token: &str) -> Option<serde_json::Value> {
    let (code, body) =
        tokio::time::timeout(Duration::from_secs(2), http(node.admin, "GET", "/status", Some(token)))
            .await
            .ok()?;
    (code == 200).then(|| serde_json::from_slice(&body).ok()).flatten()
}

fn admin_token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("secrets/admin.token")).unwrap().trim().to_string()
}

async fn wait_for<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Which node leads, by the nodes' own statuses.
async fn leader(nodes: &[NodeProc], token: &str) -> Option<usize> {
    for (i, n) in nodes.iter().enumerate() {
        if n.child.is_none() {
            continue;
        }
        if let Some(s) = status(n, token).await
            && s["cluster"]["leader"].as_bool() == Some(true)
        {
            return Some(i);
        }
    }
    None
}

/// The PostgreSQL store's client blocks on its own runtime: never on an async worker thread.
fn bp<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn store_of(config: &ServiceConfig) -> Store {
    bp(|| Store::open_config(&config.storage).unwrap())
}

fn committed_rounds(store: &Store) -> Vec<u64> {
    bp(|| store.rounds().unwrap().iter().filter(|r| r.state == "committed").map(|r| r.round.0).collect())
}

/// A raw client that checks in until it gets a task, then sends `update(task)`.
async fn raw_participant(
    transport: QuicTransport,
    id: u64,
    credential: Vec<u8>,
    shape: starling_proto::update::ModelShape,
) {
    let mut raw = Raw::connect(&transport).await;
    loop {
        raw.send(&check_in(id, credential.clone())).await;
        match raw.message().await {
            CoordinatorMessage::Task(task) => {
                let values: Vec<f32> =
                    (0..shape.len() as u64).map(|i| ((id * 7 + i * 3) % 11) as f32 * 0.05 - 0.25).collect();
                raw.send(&ClientMessage::Update(ClientUpdate {
                    round: task.round,
                    base_version: task.model_version,
                    update: EncodedUpdate::Dense { shape, values },
                    weight: 1.0 + id as f32,
                    metrics: LocalMetrics::default(),
                }))
                .await;
                match raw.message().await {
                    CoordinatorMessage::Receipt { .. } => return,
                    other => panic!("client {id}: expected a receipt, got {other:?}"),
                }
            }
            CoordinatorMessage::ComeBackAt(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("client {id}: unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_commit_the_model_one_node_commits_for_the_same_updates() {
    let Some(base) = pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pg = fresh_schema(&base).await;
    let mut nodes = cluster_dir(dir.path(), &pg, 3, false, &[]);
    let config = load_node(&nodes[0]);
    let shape = config.shape().unwrap();
    let creds = tokens(&config, 1..=9);
    for n in &mut nodes {
        n.start();
    }
    let token = admin_token(dir.path());
    wait_for("a leader", Duration::from_secs(20), async || leader(&nodes, &token).await).await;
    let ca = ca_pem(dir.path());
    let mut clients = tokio::task::JoinSet::new();
    for (i, (id, cred)) in creds.iter().cloned().enumerate() {
        let node = &nodes[i % 3];
        let t = QuicTransport::with_endpoint(client_endpoint(), &endpoint_for(node.quic, &ca, "localhost"))
            .unwrap();
        clients.spawn(raw_participant(t, id, cred, shape));
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = clients.join_next().await {
            r.unwrap();
        }
    })
    .await
    .expect("every client's update was accepted");
    let store = store_of(&config);
    let v1 = wait_for("v1 committed", Duration::from_secs(30), async || {
        bp(|| store.checkpoint(ModelVersion(1)).unwrap())
    })
    .await;
    let first = bp(|| store.rounds().unwrap().into_iter().find(|r| r.state == "committed").unwrap());
    for n in &mut nodes {
        n.kill();
    }

    // The same nine updates on one node (SQLite, no cluster).
    let single_dir = tempfile::tempdir().unwrap();
    let (udp, tcp) = free_ports();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{udp}\"\nadmin_listen = \"127.0.0.1:{tcp}\"\nrate_per_second = 50\nrate_burst = 50\n{ROUND}{}",
        privacy(false)
    );
    let path = service_dir(single_dir.path(), &text);
    let single = load(&path);
    let creds: Vec<_> = (1..=9u64).map(|id| (id, issue(&single, id, 3600).1)).collect();
    let running = server::start(&single).await.unwrap();
    let ca = ca_pem(single_dir.path());
    let mut clients = tokio::task::JoinSet::new();
    for (id, cred) in creds {
        let t = QuicTransport::with_endpoint(
            client_endpoint(),
            &endpoint_for(running.quic_addr, &ca, "localhost"),
        )
        .unwrap();
        clients.spawn(raw_participant(t, id, cred, shape));
    }
    while let Some(r) = clients.join_next().await {
        r.unwrap();
    }
    let alone = wait_for("the single node's v1", Duration::from_secs(30), async || {
        Store::open_config(&single.storage).unwrap().checkpoint(ModelVersion(1)).unwrap()
    })
    .await;
    running.shutdown().await;

    assert_eq!(
        first.figures.as_ref().unwrap().reported,
        9,
        "every node's clients were in the round: {first:?}"
    );
    let worst = v1.model.iter().zip(&alone.model).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-6, "three nodes committed another model than one node (max difference {worst})");
    assert!(v1.model.iter().zip(&config.initial_model().unwrap()).any(|(a, b)| a != b), "the model moved");
}

/// A device that takes `delay` to train: it checks in, and answers each task after `delay`,
/// until `stop` (reconnecting while its node is down). It keeps its node's round collecting.
async fn slow_participant(
    transport: QuicTransport,
    id: u64,
    credential: Vec<u8>,
    shape: starling_proto::update::ModelShape,
    delay: Duration,
    stop: Arc<AtomicBool>,
) {
    use starling_proto::codec::Inbound;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut raw) = Raw::try_connect(&transport).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if raw.try_send(&check_in(id, credential.clone())).await.is_err() {
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            let message = match raw.next().await {
                Ok(Inbound::Message { message, .. }) => message,
                _ => break,
            };
            let sent = match message {
                CoordinatorMessage::Task(task) => {
                    tokio::time::sleep(delay).await;
                    let values: Vec<f32> =
                        (0..shape.len() as u64).map(|i| ((id + i) % 5) as f32 * 0.01).collect();
                    raw.try_send(&ClientMessage::Update(ClientUpdate {
                        round: task.round,
                        base_version: task.model_version,
                        update: EncodedUpdate::Dense { shape, values },
                        weight: 1.0,
                        metrics: LocalMetrics::default(),
                    }))
                    .await
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    raw.try_send(&check_in(id, credential.clone())).await
                }
            };
            if sent.is_err() {
                break;
            }
        }
    }
}

/// Per node: two SDK devices running rounds and one slow device, until told to stop.
fn fleet(
    nodes: &[NodeProc],
    creds: Vec<(u64, Vec<u8>)>,
    ca: &[u8],
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinSet<()> {
    let mut fleet = tokio::task::JoinSet::new();
    let shape = load_node(&nodes[0]).shape().unwrap();
    for (i, (id, cred)) in creds.into_iter().enumerate() {
        let node = i % nodes.len();
        let t =
            QuicTransport::with_endpoint(client_endpoint(), &endpoint_for(nodes[node].quic, ca, "localhost"))
                .unwrap();
        let stop = stop.clone();
        if i / nodes.len() == 0 {
            // Node k's slow device takes 1.5 + 0.8·k s: a leader that is not the slowest node
            // waits for the others' shares (the combining phase lasts).
            let delay = Duration::from_millis(1_500 + 800 * node as u64);
            fleet.spawn(slow_participant(t, id, cred, shape, delay, stop));
            continue;
        }
        let client = sdk_client(id, cred, 60, 4, t);
        fleet.spawn(keep_taking_part(client, stop, Duration::from_millis(300)));
    }
    fleet
}

/// The store's invariants after failovers: the ledger holds exactly the committed rounds, ids
/// only grow, and every committed round made exactly the next version.
fn check_invariants(store: &Store) -> Vec<u64> {
    bp(|| invariants(store))
}

fn invariants(store: &Store) -> Vec<u64> {
    let all = store.rounds().unwrap();
    let ids: Vec<u64> = all.iter().map(|r| r.round.0).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "round ids reused: {ids:?}");
    let committed: Vec<u64> = all.iter().filter(|r| r.state == "committed").map(|r| r.round.0).collect();
    let ledger: Vec<u64> = store.ledger_entries().unwrap().iter().map(|e| e.round).collect();
    assert_eq!(ledger, committed, "ε is charged for exactly the committed rounds");
    let versions: Vec<u64> =
        all.iter().filter(|r| r.state == "committed").map(|r| r.result_version.unwrap().0).collect();
    let want: Vec<u64> = (1..=versions.len() as u64).collect();
    assert_eq!(versions, want, "one new version per commit, none lost");
    let latest = store.latest_checkpoint().unwrap().unwrap();
    assert_eq!(latest.version.0, versions.len() as u64);
    // Only the newest round may be unfinished (it is running, or its leader was just killed):
    // every earlier one was finished or recorded abandoned by the node that took over.
    let unfinished: Vec<u64> = all.iter().filter(|r| r.state == "started").map(|r| r.round.0).collect();
    assert!(
        unfinished.is_empty() || unfinished == [*ids.last().unwrap()],
        "rounds left started after a takeover: {unfinished:?} of {ids:?}"
    );
    committed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_at_three_phases_hands_over_without_losing_or_double_charging() {
    let Some(base) = pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pg = fresh_schema(&base).await;
    let mut nodes = cluster_dir(dir.path(), &pg, 3, true, &[]);
    let config = load_node(&nodes[0]);
    let creds = tokens(&config, 1..=9);
    for n in &mut nodes {
        n.start();
    }
    let token = admin_token(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let mut devices = fleet(&nodes, creds, &ca_pem(dir.path()), stop.clone());
    let store = store_of(&config);
    wait_for("a first commit", Duration::from_secs(60), async || {
        (!committed_rounds(&store).is_empty()).then_some(())
    })
    .await;

    let kills: usize =
        std::env::var("STARLING_FAILOVER_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let phases = ["Selecting", "Collecting", "Combining"];
    let mut failovers = Vec::new();
    for k in 0..kills {
        let phase = phases[k % phases.len()];
        let l = wait_for("a leader", Duration::from_secs(20), async || leader(&nodes, &token).await).await;
        // Kill it in `phase` (Combining is short: after 30 s of trying, any running round will do).
        let tried = Instant::now();
        let seen = wait_for(phase, Duration::from_secs(90), async || {
            let s = status(&nodes[l], &token).await?;
            let p = s["phase"].as_str()?.to_string();
            (p == phase || (tried.elapsed() > Duration::from_secs(30) && s["current_round"].is_u64()))
                .then_some(p)
        })
        .await;
        let before = committed_rounds(&store);
        nodes[l].kill();
        let killed_at = Instant::now();
        let (next, _) = wait_for("another leader", Duration::from_secs(10), async || {
            let n = leader(&nodes, &token).await?;
            Some((n, ()))
        })
        .await;
        let took = killed_at.elapsed();
        assert_ne!(next, l);
        failovers.push(took);
        println!("kill {} in {seen}: node {} led after {took:?}", k + 1, nodes[next].name);
        wait_for("a commit by the new leader", Duration::from_secs(60), async || {
            let now = committed_rounds(&store);
            (now.len() > before.len()).then_some(())
        })
        .await;
        check_invariants(&store);
        nodes[l].start();
    }
    stop.store(true, Ordering::Relaxed);
    devices.abort_all();
    for n in &mut nodes {
        n.kill();
    }
    let committed = check_invariants(&store);
    let abandoned = bp(|| store.rounds().unwrap().iter().filter(|r| r.state == "abandoned").count());
    println!("failover times: {:?}; committed rounds {}; abandoned {abandoned}", failovers, committed.len());
    assert!(failovers.iter().all(|t| *t < Duration::from_secs(10)));
}

/// A TCP relay to PostgreSQL that the test can cut.
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(pg_port: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let c = cut.clone();
        let task = tokio::spawn(async move {
            let mut pipes = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { break };
                        if c.load(Ordering::Relaxed) {
                            continue;
                        }
                        pipes.spawn(async move {
                            if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", pg_port)).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                            }
                        });
                    }
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {
                        if c.load(Ordering::Relaxed) {
                            pipes.abort_all();
                        }
                    }
                }
            }
        });
        Relay { port, cut, task }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_database_stops_leading_before_another_node_starts() {
    let Some(base) = pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pg = fresh_schema(&base).await;
    let relay = Relay::start(port_of(&pg)).await;
    let mut nodes = cluster_dir(dir.path(), &pg, 2, true, &[Some(relay.port), None]);
    let config = load_node(&nodes[1]);
    let creds = tokens(&config, 1..=6);
    let token = admin_token(dir.path());
    nodes[0].start();
    wait_for("node 1 to lead", Duration::from_secs(20), async || {
        (leader(&nodes, &token).await == Some(0)).then_some(())
    })
    .await;
    nodes[1].start();
    let stop = Arc::new(AtomicBool::new(false));
    let mut devices = fleet(&nodes, creds, &ca_pem(dir.path()), stop.clone());
    let store = store_of(&config);
    wait_for("a first commit", Duration::from_secs(60), async || {
        (!committed_rounds(&store).is_empty()).then_some(())
    })
    .await;

    relay.cut.store(true, Ordering::Relaxed);
    let (stopped, since) = wait_for("node 2 to take over", Duration::from_secs(20), async || {
        let b = status(&nodes[1], &token).await?;
        let since = b["cluster"]["leading_since_ms"].as_i64()?;
        let a = status(&nodes[0], &token).await?;
        let stopped = a["cluster"]["stopped_leading_ms"].as_i64();
        Some((stopped, since))
    })
    .await;
    let stopped = stopped.expect("the cut-off leader records when it stopped leading");
    assert!(
        stopped < since,
        "the old leader stopped at {stopped}, the new one started at {since}: they overlapped"
    );
    let a = status(&nodes[0], &token).await.unwrap();
    assert_eq!(a["cluster"]["leader"].as_bool(), Some(false));
    println!("gap between the old leader stopping and the new one starting: {} ms", since - stopped);
    let before = committed_rounds(&store).len();
    wait_for("a commit by the new leader", Duration::from_secs(60), async || {
        (committed_rounds(&store).len() > before).then_some(())
    })
    .await;
    // The cut heals: the old leader reconnects and follows the new one (it serves its model).
    relay.cut.store(false, Ordering::Relaxed);
    let newest = bp(|| store.latest_checkpoint().unwrap().unwrap().version.0);
    wait_for("the old leader to follow again", Duration::from_secs(30), async || {
        let a = status(&nodes[0], &token).await?;
        (a["model_version"].as_u64()? >= newest && a["cluster"]["db_error"].is_null()).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    devices.abort_all();
    for n in &mut nodes {
        n.kill();
    }
    relay.task.abort();
    check_invariants(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_aggregation_runs_per_node_and_the_leader_combines_the_sums() {
    let Some(base) = pg() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pg = fresh_schema(&base).await;
    // Ten devices, five per node; every device is sampled (q = 1), so each node's SecAgg cohort
    // is its five devices, above the threshold of three.
    let secure = "[secure_aggregation]\nenabled = true\nneighbours = 4\nthreshold = 3\n";
    let mut nodes = cluster_dir_with(dir.path(), &pg, 2, true, &[], secure);
    let config = load_node(&nodes[0]);
    assert!(config.secure_aggregation.enabled);
    let creds = tokens(&config, 1..=10);
    for n in &mut nodes {
        n.start();
    }
    let token = admin_token(dir.path());
    wait_for("a leader", Duration::from_secs(20), async || leader(&nodes, &token).await).await;
    let ca = ca_pem(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let mut devices = tokio::task::JoinSet::new();
    for (i, (id, cred)) in creds.into_iter().enumerate() {
        let t = QuicTransport::with_endpoint(
            client_endpoint(),
            &endpoint_for(nodes[i % 2].quic, &ca, "localhost"),
        )
        .unwrap();
        let client = sdk_client(id, cred, 60, 4, t);
        let stop = stop.clone();
        devices.spawn(keep_taking_part(client, stop, Duration::from_millis(300)));
    }
    let store = store_of(&config);
    // A round whose reports exceed one node's five devices took both nodes' secure sums.
    let both = wait_for("a secure round with both nodes' devices", Duration::from_secs(120), async || {
        bp(|| {
            store
                .rounds()
                .unwrap()
                .into_iter()
                .find(|r| r.state == "committed" && r.figures.as_ref().is_some_and(|f| f.reported > 5))
        })
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    devices.abort_all();
    for n in &mut nodes {
        n.kill();
    }
    println!("secure round {} committed with {:?}", both.round.0, both.figures);
    check_invariants(&store);
    assert!(bp(|| store.ledger_entries().unwrap().iter().any(|e| e.round == both.round.0)), "it was charged");
}
