//! Load test of the coordinator over QUIC on loopback: sessions per second and the coordinator's
//! peak memory.
//!
//! Run with:
//! ```text
//! cargo build --release -p starling-coordinator --bins --examples
//! target/release/examples/quic_load --clients 1000 --rounds 4
//! target/release/examples/quic_load --clients 1000 --rounds 3 --hostile 1000
//! ```
//!
//! It runs `starling init` into a temporary directory, starts the real `starling serve` binary
//! (next to this example in the target directory) on a 100,000-parameter model (3125 × 32), and
//! drives `--clients` concurrent protocol clients in this process. A session is: QUIC + TLS
//! handshake, check-in with a signed token, the task with the model (full the first time, a patch
//! of the changed rows afterwards), a row-sparse update of 20 rows drawn from the 256 most popular
//! items, the receipt. Clients do not train (the device's training is not the coordinator's
//! cost). Each round runs with every client at once; sessions/s = accepted sessions / time from
//! the round's first connect to its last receipt. The coordinator's peak RSS is its `VmHWM`.
//! Client and coordinator share the machine's cores.
//!
//! `--nodes N --postgres CONN` runs N `starling serve` nodes of one cluster instead (on a fresh
//! schema of the PostgreSQL database `CONN`, a libpq-style string), spreads the clients over them
//! round-robin, and reports the nodes' CPU together and each node's peak RSS:
//! ```text
//! target/release/examples/quic_load --clients 1000 --rounds 4 --nodes 3 \
//!     --postgres "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
//! ```
//!
//! `--hostile N` first opens N hostile connections, from source addresses 127.0.1.x (32 per
//! address, one UDP socket each), that complete the QUIC handshake and then never check in;
//! each one reconnects as soon as the coordinator closes it, so that N are held (or being
//! re-established) throughout the measured rounds. The honest clients' sessions/s are then
//! measured with them held, and the report says how many were actually open during the rounds.
//! The generated configuration raises `max_connections_per_ip` (when this build knows the key)
//! so the honest clients, which share a few sockets on 127.0.0.x, are not capped.

use anyhow::{Context, bail};
use bytes::Bytes;
use starling_coordinator::service::config::ServiceConfig;
use starling_coordinator::service::server;
use starling_coordinator::service::tokens::{TokenAuthority, TokenClaims, unix_now_s};
use starling_proto::codec::{Codec, FrameBuffer, Inbound};
use starling_proto::encoding::EncodedUpdate;
use starling_proto::ids::{ClientId, ModelVersion};
use starling_proto::message::{
    Capabilities, CheckIn, ClientMessage, ClientUpdate, CoordinatorMessage, DeviceConditions, LocalMetrics,
    ModelPayload,
};
use starling_proto::update::ModelShape;
use starling_sdk::config::CoordinatorEndpoint;
use starling_sdk::transport::quic::{QuicConnection, QuicTransport};
use starling_sdk::transport::{Connection, Transport};
use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const ROWS: u32 = 3125;
const ROW_LEN: u32 = 32;

struct Args {
    clients: usize,
    rounds: usize,
    bin: std::path::PathBuf,
    endpoints: usize,
    hostile: usize,
    /// Cluster nodes (0: one node on SQLite, no cluster).
    nodes: usize,
    postgres: Option<String>,
}

fn args() -> anyhow::Result<Args> {
    let exe = std::env::current_exe()?;
    let mut a = Args {
        clients: 1000,
        rounds: 4,
        bin: exe.parent().and_then(|p| p.parent()).context("target dir")?.join("starling"),
        endpoints: 4,
        hostile: 0,
        nodes: 0,
        postgres: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().context("missing value")?;
        match k.as_str() {
            "--clients" => a.clients = v.parse()?,
            "--rounds" => a.rounds = v.parse()?,
            "--bin" => a.bin = v.into(),
            "--endpoints" => a.endpoints = v.parse()?,
            "--hostile" => a.hostile = v.parse()?,
            "--nodes" => a.nodes = v.parse()?,
            "--postgres" => a.postgres = Some(v),
            other => bail!("unknown option {other}"),
        }
    }
    if a.nodes > 0 && a.postgres.is_none() {
        bail!("--nodes needs --postgres");
    }
    if a.nodes > 0 && a.hostile > 0 {
        bail!("--hostile runs against one node");
    }
    Ok(a)
}

/// A fresh schema on `base`; returns a connection string whose search path is it.
async fn fresh_schema(base: &str) -> anyhow::Result<String> {
    let schema = format!("quic_load_{}_{:x}", std::process::id(), rand::random::<u32>());
    let (client, conn) = tokio_postgres::connect(base, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client.batch_execute(&format!("CREATE SCHEMA {schema}")).await?;
    Ok(format!("{base} options='-c search_path={schema}'"))
}

/// Starts `starling serve --config path`; returns the child and its QUIC address.
fn start_node(
    bin: &std::path::Path,
    path: &std::path::Path,
) -> anyhow::Result<(std::process::Child, String)> {
    let mut child = std::process::Command::new(bin)
        .args(["serve", "--config"])
        .arg(path)
        .env("RUST_LOG", std::env::var("QUIC_LOAD_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let addr = loop {
        let line = lines.next().context("serve exited")??;
        if let Some(a) = line.strip_prefix("quic listening on ") {
            break a.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok((child, addr))
}

fn client_endpoint(ip: [u8; 4]) -> anyhow::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.bind(&std::net::SocketAddr::from((ip, 0)).into())?;
    socket.set_nonblocking(true)?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )?)
}

struct Outcome {
    accepted: bool,
    finished: Instant,
    downloaded: usize,
    patch: bool,
}

async fn recv_message(
    conn: &mut QuicConnection,
    frames: &mut FrameBuffer,
) -> anyhow::Result<CoordinatorMessage> {
    loop {
        if let Some(inbound) = frames.next_coordinator()? {
            match inbound {
                Inbound::Message { message, .. } => return Ok(message),
                other => bail!("unexpected {other:?}"),
            }
        }
        match conn.recv().await? {
            Some(b) => frames.push(&b),
            None => bail!("closed"),
        }
    }
}

/// One session; `Ok(None)` when told to come back later.
async fn session(
    transport: &QuicTransport,
    id: u64,
    token: &[u8],
    have: Option<ModelVersion>,
    seed: u64,
) -> anyhow::Result<Option<(Outcome, ModelVersion)>> {
    let codec = Codec::default();
    let mut conn = transport.connect().await?;
    let mut frames = FrameBuffer::new(codec);
    let check_in = ClientMessage::CheckIn(CheckIn {
        client: ClientId(id),
        credential: token.to_vec(),
        sdk_version: "load".into(),
        model_family: "bpr-mf".into(),
        have_version: have,
        conditions: DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 90 },
        capabilities: Capabilities::default(),
    });
    conn.send(Bytes::from(codec.encode_client(&check_in)?)).await?;
    let task = match recv_message(&mut conn, &mut frames).await? {
        CoordinatorMessage::Task(t) => t,
        CoordinatorMessage::ComeBackAt(_) => {
            conn.close("session over").await;
            return Ok(None);
        }
        other => bail!("unexpected {other:?}"),
    };
    let (downloaded, patch) = match &task.model {
        ModelPayload::Full { values, .. } => (values.len() * 4, false),
        ModelPayload::Patch { values, .. } => (values.len() * 4, true),
        _ => (0, false),
    };
    let shape = ModelShape::new(ROWS, ROW_LEN)?;
    // 20 distinct rows among the 256 most popular items.
    let mut rows: Vec<u32> =
        (0..20u64).map(|k| ((seed.wrapping_mul(2654435761) + k * 97) % 256) as u32).collect();
    rows.sort_unstable();
    rows.dedup();
    let values = vec![0.001f32; rows.len() * ROW_LEN as usize];
    let update = ClientMessage::Update(ClientUpdate {
        round: task.round,
        base_version: task.model_version,
        update: EncodedUpdate::RowSparse { shape, rows, values },
        weight: 1.0,
        metrics: LocalMetrics::default(),
    });
    conn.send(Bytes::from(codec.encode_client(&update)?)).await?;
    let accepted = matches!(recv_message(&mut conn, &mut frames).await?, CoordinatorMessage::Receipt { .. });
    let finished = Instant::now();
    conn.close("session over").await;
    Ok(Some((Outcome { accepted, finished, downloaded, patch }, task.model_version)))
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn vm_hwm(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Hostile connections: handshake, then never a stream; reconnect when closed.
#[derive(Default)]
struct Hostile {
    /// Connections open now.
    held: AtomicUsize,
    /// Handshakes completed.
    connects: AtomicU64,
    /// Connection attempts that failed (refused, timed out).
    failures: AtomicU64,
    /// Held connections the coordinator closed.
    closed: AtomicU64,
}

/// Keeps one hostile connection open from `endpoint`, reconnecting whenever it is closed or
/// refused (after 50 ms), until the process ends.
async fn hold_hostile(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    server: SocketAddr,
    h: Arc<Hostile>,
) {
    loop {
        let attempt = match endpoint.connect_with(config.clone(), server, "localhost") {
            Ok(connecting) => {
                tokio::time::timeout(Duration::from_secs(30), connecting).await.ok().and_then(Result::ok)
            }
            Err(_) => None,
        };
        match attempt {
            Some(conn) => {
                h.connects.fetch_add(1, Ordering::Relaxed);
                h.held.fetch_add(1, Ordering::Relaxed);
                conn.closed().await;
                h.held.fetch_sub(1, Ordering::Relaxed);
                h.closed.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                h.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens `n` hostile connections, 32 per source address 127.0.1.x (127.0.2.x beyond 250
/// addresses), and waits (up to 60 s) until they are all held.
async fn start_hostile(n: usize, server: SocketAddr, ca_pem: &[u8]) -> anyhow::Result<Arc<Hostile>> {
    let h = Arc::new(Hostile::default());
    let config = starling_sdk::transport::quic::client_config(ca_pem)?;
    let mut endpoint = None;
    for i in 0..n {
        if i % 32 == 0 {
            let k = i / 32;
            anyhow::ensure!(k < 250 * 200, "too many hostile connections");
            endpoint = Some(client_endpoint([127, 0, 1 + (k / 250) as u8, 1 + (k % 250) as u8])?);
        }
        let endpoint = endpoint.clone().context("endpoint")?;
        tokio::spawn(hold_hostile(endpoint, config.clone(), server, h.clone()));
    }
    let start = Instant::now();
    while h.held.load(Ordering::Relaxed) < n && start.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "hostile: {} of {n} connections held after {:.1} s ({} handshakes, {} failed attempts)",
        h.held.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
        h.connects.load(Ordering::Relaxed),
        h.failures.load(Ordering::Relaxed)
    );
    Ok(h)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let dir = tempfile::tempdir()?;
    server::init(dir.path(), &["localhost"], false)?;
    let n = args.clients;
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_concurrent_handshakes = 256
idle_timeout_ms = 60000
[model]
rows = {ROWS}
row_len = {ROW_LEN}
history = 4
[round]
target_participants = {n}
min_reports = {min}
over_selection = 1.0
selection_pool = {n}
selection_timeout_ms = 120000
report_timeout_ms = 120000
interval_ms = 200
require_charging = false
require_unmetered = false
require_idle = false
retry_after_ms = 50
retry_window_ms = 50
[privacy]
mode = "off"                 # a transport load test: fixed-size rounds, no noise
"#,
        min = n * 9 / 10
    );
    // Honest clients share a few sockets on 127.0.0.1: lift the per-address cap where this
    // build has one (a build without the key refuses unknown keys).
    let capped = config.replacen(
        "[server]\n",
        &format!("[server]\nmax_connections_per_ip = {}\n", n + args.hostile + 64),
        1,
    );
    let knows_cap = ServiceConfig::from_toml(&capped, Vec::new(), dir.path()).is_ok();
    let config = if knows_cap { capped } else { config };
    let secret = std::fs::read_to_string(dir.path().join("secrets/token.key"))?;
    let authority = TokenAuthority::from_secret_file_text(&secret)?;
    let tokens: Vec<Vec<u8>> = (0..n as u64)
        .map(|i| {
            authority
                .issue(TokenClaims {
                    token_id: i + 1,
                    client: ClientId(i + 1),
                    expires_unix_s: unix_now_s() + 86_400,
                })
                .into_bytes()
        })
        .collect();

    // One node, or `--nodes` nodes of one cluster on a fresh PostgreSQL schema. Each node of a
    // cluster closes its selection once its share of the clients checked in.
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    if args.nodes == 0 {
        let path = dir.path().join("starling.toml");
        std::fs::write(&path, &config)?;
        let (child, addr) = start_node(&args.bin, &path)?;
        children.push(child);
        addrs.push(addr);
    } else {
        let pg = fresh_schema(args.postgres.as_deref().unwrap_or_default()).await?;
        for k in 0..args.nodes {
            // Client i connects to node i % nodes: each node's pool is exactly its clients.
            let per_node = (n + args.nodes - 1 - k) / args.nodes;
            let text = config
                .replace(&format!("selection_pool = {n}"), &format!("selection_pool = {per_node}"))
                + &format!(
                    "[storage]\npostgres = \"{}\"\n[cluster]\nenabled = true\nnode = \"n{k}\"\nheartbeat_ms = 300\ntick_ms = 50\n",
                    pg.replace('"', "\\\"")
                );
            let path = dir.path().join(format!("n{k}.toml"));
            std::fs::write(&path, text)?;
            let (child, addr) = start_node(&args.bin, &path)?;
            children.push(child);
            addrs.push(addr);
        }
        // Let a leader take the lease and every node's heartbeat be seen.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let pids: Vec<u32> = children.iter().map(std::process::Child::id).collect();
    let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let ca_pem = std::fs::read(dir.path().join("tls/ca.pem"))?;
    let coordinators: Vec<CoordinatorEndpoint> = addrs
        .iter()
        .map(|a| CoordinatorEndpoint {
            address: a.clone(),
            server_name: "localhost".into(),
            ca_pem: ca_pem.clone(),
        })
        .collect();
    let coordinator = coordinators[0].clone();
    // `endpoints` client sockets per node; client i uses node i % nodes.
    let transports: Vec<Vec<QuicTransport>> = coordinators
        .iter()
        .map(|c| {
            (0..args.endpoints.max(1))
                .map(|_| Ok(QuicTransport::with_endpoint(client_endpoint([127, 0, 0, 1])?, c)?))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .collect::<anyhow::Result<_>>()?;
    println!(
        "coordinator pid(s) {pids:?} at {addrs:?}; {n} clients, {} rounds, model {ROWS}x{ROW_LEN}, {} hostile connections{}",
        args.rounds,
        args.hostile,
        if knows_cap { "" } else { " (this build has no max_connections_per_ip)" }
    );
    let hostile = if args.hostile > 0 {
        let server: SocketAddr = coordinator.address.parse()?;
        let h = start_hostile(args.hostile, server, &coordinator.ca_pem).await?;
        // How many are held during the measured rounds: min and mean of 10 samples a second.
        let samples = Arc::new((AtomicUsize::new(usize::MAX), AtomicU64::new(0), AtomicU64::new(0)));
        let (h2, s2) = (h.clone(), samples.clone());
        tokio::spawn(async move {
            loop {
                let held = h2.held.load(Ordering::Relaxed);
                s2.0.fetch_min(held, Ordering::Relaxed);
                s2.1.fetch_add(held as u64, Ordering::Relaxed);
                s2.2.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Some((h, samples))
    } else {
        None
    };

    let tokens = Arc::new(tokens);
    let mut have: Vec<Option<ModelVersion>> = vec![None; n];
    let mut results = Vec::new();
    for round in 0..args.rounds {
        let start = Instant::now();
        let cpu_before = cpu(&pids);
        let mut set = tokio::task::JoinSet::new();
        for (i, have) in have.iter().enumerate() {
            let node = &transports[i % transports.len()];
            let (transport, tokens, have) =
                (node[(i / transports.len()) % node.len()].clone(), tokens.clone(), *have);
            set.spawn(async move {
                // A failed connection is retried (as the SDK does, with backoff), a few times.
                let mut attempts = 0;
                loop {
                    match session(&transport, i as u64 + 1, &tokens[i], have, (i + round * 7919) as u64).await
                    {
                        Ok(Some(r)) => return (i, Ok(r)),
                        Ok(None) => tokio::time::sleep(Duration::from_millis(30)).await,
                        Err(e) if attempts < 3 => {
                            attempts += 1;
                            eprintln!("session attempt failed, retrying: {e:#}");
                            tokio::time::sleep(Duration::from_millis(200 << attempts)).await;
                        }
                        Err(e) => return (i, Err(e)),
                    }
                }
            });
        }
        let (mut ok, mut failed, mut last, mut bytes, mut patches) = (0usize, 0usize, start, 0usize, 0usize);
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined?;
            match r {
                Ok((o, version)) => {
                    if o.accepted {
                        ok += 1;
                        last = last.max(o.finished);
                    }
                    bytes += o.downloaded;
                    patches += usize::from(o.patch);
                    have[i] = Some(version);
                }
                Err(e) => {
                    failed += 1;
                    if failed <= 3 {
                        eprintln!("session failed: {e:#}");
                    }
                }
            }
        }
        let secs = last.duration_since(start).as_secs_f64();
        let cpu = cpu(&pids) - cpu_before;
        let rate = ok as f64 / secs.max(1e-9);
        println!(
            "round {}: {ok} sessions accepted, {failed} failed, {:.2} s, {:.0} sessions/s, {} patches, {:.1} MB of model sent, coordinator CPU {:.2} s ({:.2} ms/session)",
            round + 1,
            secs,
            rate,
            patches,
            bytes as f64 / 1e6,
            cpu,
            cpu * 1e3 / ok.max(1) as f64
        );
        results.push(rate);
        // Let the round commit and the next one start.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some((h, samples)) = &hostile {
        let count = samples.2.load(Ordering::Relaxed).max(1);
        println!(
            "hostile connections held during the rounds: min {}, mean {:.0} of {}; {} handshakes, {} failed attempts, {} closed by the coordinator",
            samples.0.load(Ordering::Relaxed),
            samples.1.load(Ordering::Relaxed) as f64 / count as f64,
            args.hostile,
            h.connects.load(Ordering::Relaxed),
            h.failures.load(Ordering::Relaxed),
            h.closed.load(Ordering::Relaxed)
        );
    }
    for (k, pid) in pids.iter().enumerate() {
        let peak = vm_hwm(*pid).unwrap_or(0);
        println!("coordinator node {k} peak RSS (VmHWM): {:.1} MiB", peak as f64 / (1 << 20) as f64);
    }
    println!(
        "sessions/s: first round (full models) {:.0}; later rounds (patches) mean {:.0}",
        results.first().copied().unwrap_or(0.0),
        if results.len() > 1 { results[1..].iter().sum::<f64>() / (results.len() - 1) as f64 } else { 0.0 }
    );
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(())
}
