//! An app embedding the Starling SDK, the way a small desktop app would.
//!
//! The process also runs an in-process coordinator (the real round engine behind the service
//! driver) and 60 peer devices (real SDK clients with synthetic users' histories) so that there is
//! a global model worth personalizing. Then the app's own user records a handful of events, sees
//! non-personal recommendations, takes part in one round, and sees personal ones; the example
//! prints what the user's privacy report and data export say, and the process's peak memory.
//!
//! Run with: `cargo run --release --example embed_sdk` (matrix factorisation) or
//! `cargo run --release --example embed_sdk -- --model two-tower` (the context-aware two-tower model).

use anyhow::Context as _;
use starling_coordinator::service::driver::{self, CoordinatorHandle, DriverConfig};
use starling_models::data::events::{Context, DeviceClass, Event};
use starling_models::data::synthetic::{Population, SyntheticConfig};
use starling_models::family::ModelDef;
use starling_proto::ids::{ClientId, ModelVersion, RoundId};
use starling_proto::message::{DeviceConditions, TrainingPlan};
use starling_proto::round::{Orchestrator, OrchestratorConfig, RoundConfig, RoundEvent};
use starling_proto::strategy::Federated;
use starling_proto::update::ModelShape;
use starling_sdk::transport::memory::{self, MemoryTransport};
use starling_sdk::{Client, ClientConfig, Consent, ModelSpec, Recommendations, Storage};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ITEMS: u32 = 300;
const DIM: u32 = 16;
const PEERS: u64 = 60;
const WARM_UP_ROUNDS: u32 = 60;
const APP_USER: u64 = 977;
const PLUGGED_IN: DeviceConditions =
    DeviceConditions { charging: true, unmetered: true, idle: true, battery_percent: 95 };

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A user's synthetic history, moved to the last few days (the SDK refuses events outside its
/// retention period and events from the future).
fn recent(mut events: Vec<Event>) -> Vec<Event> {
    let now = now_ms();
    let n = events.len() as i64;
    for (k, e) in events.iter_mut().enumerate() {
        e.at_ms = now - (n - k as i64) * 60_000;
    }
    events
}

/// The model family from `--model mf|two-tower` (default: matrix factorisation).
fn model_spec() -> anyhow::Result<ModelSpec> {
    let args: Vec<String> = std::env::args().collect();
    let name =
        args.iter().position(|a| a == "--model").and_then(|k| args.get(k + 1)).map_or("mf", |s| s.as_str());
    match name {
        "mf" | "bpr-mf" => Ok(ModelSpec::mf(ITEMS, DIM)),
        "two-tower" => Ok(ModelSpec::two_tower(ITEMS, DIM)),
        other => anyhow::bail!("unknown --model {other:?} (mf, two-tower)"),
    }
}

fn coordinator(
    participants: usize,
    spec: &ModelSpec,
) -> anyhow::Result<(CoordinatorHandle, MemoryTransport)> {
    let def = ModelDef::from_name(&spec.family, spec.items, spec.dim, spec.item_bias)?;
    let shape: ModelShape = def.shape()?;
    let config = OrchestratorConfig {
        model_family: def.name().into(),
        shape,
        round: RoundConfig {
            target_participants: participants,
            over_selection: 1.0,
            min_reports: participants / 2,
            selection_pool: Some(participants),
            selection_timeout: Duration::from_secs(10),
            report_timeout: Duration::from_secs(30),
            retry_after: Duration::ZERO,
            retry_window: Duration::ZERO,
            plan: TrainingPlan {
                epochs: 2,
                learning_rate: 0.5,
                private_learning_rate: 0.2,
                clip_norm: Some(2.0),
                ..TrainingPlan::default()
            },
            ..RoundConfig::default()
        },
        history: 4,
        rng_seed: 11,
    };
    // N(0, 0.1²)-like deterministic initialisation (the two-tower model's own, which starts its
    // user-tower projection as the identity on the private vector).
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let model: Vec<f32> = match def.mf_layout() {
        Some(_) => (0..shape.len())
            .map(|_| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.35
            })
            .collect(),
        None => def.init_global(11, 0.1)?,
    };
    let engine = Orchestrator::new(
        config,
        Box::new(Federated::fedavg_row_aware()),
        model,
        ModelVersion(1),
        RoundId(1),
    )?;
    let handle = driver::spawn(engine, DriverConfig::default(), |e: &RoundEvent| {
        if let RoundEvent::Failed { round, reason, .. } = e {
            eprintln!("round {} failed: {reason}", round.0);
        }
        Ok(())
    });
    let (transport, listener) = memory::network(256);
    tokio::spawn(driver::serve_memory(listener, handle.clone()));
    Ok((handle, transport))
}

fn device_config(id: u64, storage: Storage, spec: &ModelSpec) -> ClientConfig {
    let mut c = ClientConfig::new(ClientId(id), b"demo-token".to_vec(), spec.clone(), storage);
    c.seed = Some(id);
    c
}

async fn round(handle: &CoordinatorHandle, clients: &[Client<MemoryTransport>]) -> anyhow::Result<usize> {
    handle.start_round().await?;
    let mut joined = tokio::task::JoinSet::new();
    for c in clients {
        let c = c.clone();
        joined.spawn(async move { c.run_round().await });
    }
    let mut accepted = 0;
    while let Some(r) = joined.join_next().await {
        accepted += usize::from(r?.map(|r| r.accepted()).unwrap_or(false));
    }
    Ok(accepted)
}

fn show(label: &str, r: &Recommendations, future: &[u32]) {
    let items: Vec<String> = r
        .items
        .iter()
        .map(|s| if future.contains(&s.item) { format!("{}*", s.item) } else { s.item.to_string() })
        .collect();
    let hits = r.items.iter().filter(|s| future.contains(&s.item)).count();
    println!(
        "{label:<7} [{:?}] {}   ({hits} of {} are items this user goes on to like, marked *)",
        r.source,
        items.join(" "),
        r.items.len()
    );
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let population = Population::new(SyntheticConfig {
        users: 1000,
        items: ITEMS,
        max_interactions: ITEMS / 2,
        seed: 5,
        ..SyntheticConfig::default()
    })?;
    let spec = model_spec()?;
    let (handle, transport) = coordinator(PEERS as usize, &spec)?;
    println!(
        "in-process coordinator: {} model, {ITEMS} items x {DIM} dims, row-aware FedAvg; {PEERS} peer devices",
        spec.family
    );

    // Peer devices: real SDK clients with synthetic histories, in memory.
    let mut peers = Vec::new();
    for id in 0..PEERS {
        let c = Client::open(device_config(id, Storage::InMemory, &spec), transport.clone())?;
        c.set_consent(Consent { personalization: true, training: true })?;
        c.record_batch(&recent(population.user_events(id)))?;
        c.set_conditions(PLUGGED_IN);
        peers.push(c);
    }
    let started = std::time::Instant::now();
    for r in 1..=WARM_UP_ROUNDS {
        let accepted = round(&handle, &peers).await?;
        if r % 10 == 0 {
            println!(
                "warm-up round {r:>2}: {accepted} updates accepted, model v{}",
                handle.status().model_version.0
            );
        }
    }
    println!("warm-up: {WARM_UP_ROUNDS} rounds in {:.2} s", started.elapsed().as_secs_f64());

    // The app's own user: a persistent store in a directory, as an app would have.
    let dir = tempfile::tempdir()?;
    let app = Client::open(
        device_config(10_000, Storage::Dir(dir.path().to_path_buf()), &spec),
        transport.clone(),
    )?;
    // The app asks the user; here they agree to both.
    app.set_consent(Consent { personalization: true, training: true })?;
    let history = recent(population.user_events(APP_USER));
    let (now, later) = history.split_at(8.min(history.len()));
    let future: Vec<u32> =
        later.iter().filter(|e| e.kind.signal().is_some_and(|s| s > 0.0)).map(|e| e.item).collect();
    for e in now {
        app.record(*e).with_context(|| format!("recording {e:?}"))?;
    }
    println!("\napp user recorded {} events (views, clicks, purchases, skips)", now.len());
    show("before", &app.recommend(10, None), &future);

    // Unplugged: the SDK will not train.
    app.set_conditions(DeviceConditions { charging: false, ..PLUGGED_IN });
    match app.run_round().await {
        Err(e) => println!("unplugged: {e}"),
        Ok(r) => println!("unplugged: unexpectedly ran: {:?}", r.session.outcome),
    }
    app.set_conditions(PLUGGED_IN);
    // This round the app's device takes one peer's place (the coordinator wants 60 check-ins).
    let app_round = {
        let app = app.clone();
        let handle = handle.clone();
        let peers = peers[..peers.len() - 1].to_vec();
        tokio::spawn(async move {
            handle.start_round().await?;
            let mut joined = tokio::task::JoinSet::new();
            for c in peers {
                joined.spawn(async move { c.run_round().await });
            }
            let report = app.run_round().await;
            while joined.join_next().await.is_some() {}
            anyhow::Ok(report?)
        })
    };
    let report = app_round.await??;
    println!(
        "round {}: {:?}; sent {} B, received {} B",
        report.session.round.map_or(0, |r| r.0),
        report.session.outcome,
        report.session.bytes_sent,
        report.session.bytes_received
    );
    show("after", &app.recommend(10, None), &future);
    let evening = Context {
        time_of_day: 5,
        weekday: 4,
        device: DeviceClass::Tablet,
        battery: None,
        network: None,
        region: None,
    };
    let in_context = app.recommend(10, Some(evening));
    show("evening", &in_context, &future);
    if let Some(top) = in_context.items.first() {
        println!("        why {}? {:?}", top.item, top.reason);
        let similar = app.similar_items(top.item, 5)?;
        let ids: Vec<String> =
            similar.items.iter().map(|s| format!("{} ({:.2})", s.item, s.similarity)).collect();
        println!("        more like {}: {}", top.item, ids.join(", "));
    }
    // A peer that switches personalization off gets the global model's non-personal ranking.
    let newcomer = &peers[0];
    newcomer.set_consent(Consent { personalization: false, training: true })?;
    show("global", &newcomer.recommend(10, None), &future);

    let privacy = app.privacy_report()?;
    println!(
        "\nprivacy report: {} update(s) sent ({} B), rounds {:?}, mode {:?}, local epsilon {}",
        privacy.updates_sent, privacy.bytes_sent, privacy.rounds, privacy.mode, privacy.local_epsilon
    );
    let export = app.export_json()?;
    let path = dir.path().join("my-data.json");
    std::fs::write(&path, &export)?;
    let parsed = app.export()?;
    println!(
        "export: {} events, a private vector of {} values, {} contribution(s): {} bytes of JSON",
        parsed.events.len(),
        parsed.user_vector.as_ref().map_or(0, Vec::len),
        parsed.contributions.len(),
        export.len()
    );
    app.forget()?;
    println!(
        "forget(): {} events left, {:?} recommendations now",
        app.privacy_report()?.events_stored,
        app.recommend(3, None).source
    );
    handle.shutdown().await;
    if let Some(mb) = peak_rss_mb() {
        println!("\npeak RSS of the whole process (coordinator, {PEERS} peers and the app): {mb:.1} MB");
    }
    Ok(())
}
