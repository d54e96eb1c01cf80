//! Load test of the coordinator over QUIC on loopback: sessions per second and the coordinator's
//! peak memory.
//!
//! Run with:
//! ```text
//! cargo build --release -p starling-coordinator --bins --examples
//! target/release/examples/quic_load --clients 1000 --rounds 4
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

use anyhow::{Context, bail};
use bytes::Bytes;
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
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROWS: u32 = 3125;
const ROW_LEN: u32 = 32;

struct Args {
    clients: usize,
    rounds: usize,
    bin: std::path::PathBuf,
    endpoints: usize,
}

fn args() -> anyhow::Result<Args> {
    let exe = std::env::current_exe()?;
    let mut a = Args {
        clients: 1000,
        rounds: 4,
        bin: exe.parent().and_then(|p| p.parent()).context("target dir")?.join("starling"),
        endpoints: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().context("missing value")?;
        match k.as_str() {
            "--clients" => a.clients = v.parse()?,
            "--rounds" => a.rounds = v.parse()?,
            "--bin" => a.bin = v.into(),
            "--endpoints" => a.endpoints = v.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    Ok(a)
}

fn client_endpoint() -> anyhow::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
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
"#,
        min = n * 9 / 10
    );
    let path = dir.path().join("starling.toml");
    std::fs::write(&path, config)?;
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

    let mut child = std::process::Command::new(&args.bin)
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", args.bin.display()))?;
    let mut lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let addr = loop {
        let line = lines.next().context("serve exited")??;
        if let Some(a) = line.strip_prefix("quic listening on ") {
            break a.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let ca_pem = std::fs::read(dir.path().join("tls/ca.pem"))?;
    let coordinator = CoordinatorEndpoint { address: addr, server_name: "localhost".into(), ca_pem };
    let transports: Vec<QuicTransport> = (0..args.endpoints.max(1))
        .map(|_| Ok(QuicTransport::with_endpoint(client_endpoint()?, &coordinator)?))
        .collect::<anyhow::Result<_>>()?;
    println!(
        "coordinator pid {} at {}; {n} clients, {} rounds, model {ROWS}x{ROW_LEN}",
        child.id(),
        coordinator.address,
        args.rounds
    );

    let tokens = Arc::new(tokens);
    let mut have: Vec<Option<ModelVersion>> = vec![None; n];
    let mut results = Vec::new();
    for round in 0..args.rounds {
        let start = Instant::now();
        let cpu_before = cpu_seconds(child.id());
        let mut set = tokio::task::JoinSet::new();
        for (i, have) in have.iter().enumerate() {
            let (transport, tokens, have) = (transports[i % transports.len()].clone(), tokens.clone(), *have);
            set.spawn(async move {
                loop {
                    match session(&transport, i as u64 + 1, &tokens[i], have, (i + round * 7919) as u64).await
                    {
                        Ok(Some(r)) => return (i, Ok(r)),
                        Ok(None) => tokio::time::sleep(Duration::from_millis(30)).await,
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
        let cpu = cpu_seconds(child.id()) - cpu_before;
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
    let peak = vm_hwm(child.id()).unwrap_or(0);
    println!("coordinator peak RSS (VmHWM): {:.1} MiB", peak as f64 / (1 << 20) as f64);
    println!(
        "sessions/s: first round (full models) {:.0}; later rounds (patches) mean {:.0}",
        results.first().copied().unwrap_or(0.0),
        if results.len() > 1 { results[1..].iter().sum::<f64>() / (results.len() - 1) as f64 } else { 0.0 }
    );
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}
