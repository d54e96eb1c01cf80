//! `starling serve` and `starling init`: the pieces of the service wired together.
//!
//! Start-up ([`start`]):
//! 1. open the store and [`recover`](crate::store::StoreBackend::recover): rounds left `started` by a
//!    crash are recorded `abandoned` (their clients get `Late`/`WrongRound` rejections and retry),
//!    the newest committed checkpoint is served, and round ids continue above every id ever used;
//!    on a fresh store the seeded initial model is stored as version 0;
//! 2. replay the privacy ledger into the DP strategy (what was spent stays spent); a store whose
//!    ledger holds DP rounds is refused with `privacy.mode = "off"` unless
//!    `privacy.allow_release_without_dp` says the operator means it;
//! 3. build the engine — its RNG (selection, Poisson sampling) reseeded with 256 bits from the
//!    operating system, never from the config's `model.seed`, and told N, the enrolled population
//!    from the token registry — install the token authenticator, and spawn the driver with the
//!    persistence hook;
//! 4. bind the QUIC endpoint and the admin endpoint.
//!
//! The persistence hook runs in the driver task, in event order, before the driver handles its
//! next input:
//! - `Started` → the round is recorded `started` (durable) before any client can be sent its task;
//! - `Committed` → ledger entry + checkpoint + `committed`, in one fsynced transaction. The engine
//!   ships the new model only with the *next* round's tasks, which come after this returned. If it
//!   fails, the driver halts scheduling and the model is never released;
//! - `Evaluated` (a federated-evaluation round) → ledger entry (under central DP) + figures +
//!   `evaluated`, in one fsynced transaction, before the figures reach `/status`, `/metrics` or
//!   any subscriber; if it fails, the driver halts scheduling and the figures are never shown;
//! - `Failed` → the round is recorded `failed`.
//!
//! So after a `kill -9` at any point: the ledger holds every round whose model anyone could have
//! received (ε is never under-counted; a round committed to disk but not yet shipped is counted
//! though unreleased — over-counting is the safe side), the served model is the last committed
//! one, and the interrupted round is cleanly failed.

use super::admin::{AdminState, Telemetry};
use super::config::{ConfigError, ServiceConfig};
use super::driver::{self, CoordinatorHandle, DriverConfig};
use super::quic::{self, QuicError, QuicLimits, QuicStats};
use super::tls::{self, LocalPki, TlsError};
use super::tokens::{SecretError, TokenAuthority, unix_now_s};
use super::unix_ms;
use crate::store::{EvaluationRecord, RoundCommit, RoundFigures, Store, StoreError};
use starling_proto::dp::{LedgerEntry, Mechanism, NoiseMultiplier, PrivacyLedger, SamplingRate};
use starling_proto::ids::ModelVersion;
use starling_proto::message::{Refusal, RejectReason, TaskKind};
use starling_proto::round::{RoundEvent, RoundStats};
use starling_proto::update::ModelShape;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Certificates or keys could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Quic(#[from] QuicError),
    /// The store could not be opened or recovered.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The token secret is unusable.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// A file could not be read or the admin port bound.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The stored model does not fit the configured model.
    #[error("the store's model v{version} has shape {stored:?}, the configuration says {configured:?}")]
    ShapeMismatch {
        /// The stored version.
        version: u64,
        /// Its shape.
        stored: ModelShape,
        /// The configured shape.
        configured: ModelShape,
    },
    /// The round engine refused the configuration or the stored model.
    #[error("round engine: {0}")]
    Engine(#[from] starling_proto::round::ConfigError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// A running service.
#[derive(Debug)]
pub struct Running {
    /// The bound QUIC address.
    pub quic_addr: SocketAddr,
    /// The bound admin address.
    pub admin_addr: SocketAddr,
    /// The UDP receive buffer the kernel granted.
    pub recv_buffer_bytes: usize,
    /// The driver.
    pub handle: CoordinatorHandle,
    /// The telemetry.
    pub telemetry: Arc<Telemetry>,
    /// Accept-loop counters.
    pub quic_stats: Arc<QuicStats>,
    endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops: aborts the running round (recorded `failed`), closes every connection.
    pub async fn shutdown(self) {
        self.handle.shutdown().await;
        self.endpoint.close(quinn::VarInt::from_u32(0), b"coordinator shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(3), self.endpoint.wait_idle()).await;
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Starts the service described by `config` (see the module docs). Must run in a tokio runtime.
pub async fn start(config: &ServiceConfig) -> Result<Running, ServeError> {
    let telemetry = Arc::new(Telemetry::new());
    // 1–2. The store and the engine, on the blocking pool (the PostgreSQL client must never
    // block an async worker thread). A single node recovers the store (unfinished rounds are
    // recorded abandoned, an empty store is seeded with the initial model); a cluster node
    // starts as a follower and only reads it: the node that takes the lease recovers.
    let cluster = config.cluster.enabled;
    let cfg = config.clone();
    let (store, built, saved) = blocking(move || {
        let mut store = Store::open_config(&cfg.storage)?;
        if cluster {
            // A follower records no round: its store refuses every round, checkpoint and ledger
            // write (a fence no lease row matches). The leader's role gets its own store, fenced
            // with its term.
            store.set_fence(Some(crate::store::Fence {
                population: cfg.cluster.population.clone(),
                holder: String::new(),
                epoch: -1,
            }))?;
        }
        let built = super::cluster::build_engine(&cfg, &mut store, !cluster)?;
        let saved = Saved {
            revocations: store.revocations()?,
            evaluations: store.evaluations(super::admin::EVALUATION_HISTORY)?,
        };
        Ok::<_, ServeError>((store, built, saved))
    })
    .await?;
    tracing::info!(store = %store.describe(), cluster, "store opened");
    let super::cluster::Built {
        engine,
        ledger,
        schedule,
        version,
        abandoned,
        restored_from,
        restore_error,
        population,
    } = built;
    if !abandoned.is_empty() {
        tracing::warn!(rounds = ?abandoned, "rounds interrupted by a restart were recorded as abandoned");
        for r in &abandoned {
            telemetry.failure("round", format!("{r} abandoned: coordinator restarted mid-round"));
        }
    }
    match (restored_from, &restore_error) {
        (Some(v), _) => {
            tracing::info!(version = v, "strategy state restored from the checkpoint");
            telemetry.update_status(|s| s.strategy_state_restored_from = Some(v));
        }
        (None, Some(e)) => {
            tracing::warn!(version = version.0, error = %e, "strategy state not restored; the strategy starts afresh");
            telemetry.failure("storage", format!("strategy state of v{} not restored: {e}", version.0));
        }
        (None, None) => {}
    }
    if schedule.paused && !cluster {
        tracing::warn!("the schedule is paused (by an operator); `starling admin resume` resumes it");
    }
    for record in saved.evaluations {
        telemetry.evaluation(record, false);
    }
    // 3. Tokens, engine, driver.
    let secret = std::fs::read_to_string(&config.server.token_secret_file)
        .map_err(io(format!("reading {}", config.server.token_secret_file.display())))?;
    let authority = Arc::new(TokenAuthority::from_secret_file_text(&secret)?);
    let (tokens, clients) = saved.revocations;
    authority.reload_revocations(tokens, clients);
    let admin_token = std::fs::read_to_string(&config.server.admin_token_file)
        .map_err(io(format!("reading {}", config.server.admin_token_file.display())))?;
    let admin_token: Arc<str> = admin_token.trim().into();
    // Credentials are verified by the driver, before a connection is bound to the client it
    // names (the engine's own authenticator is left accepting: the driver never lets an
    // unverified check-in through).
    let auth = Arc::new(TokenAuth { authority: authority.clone(), telemetry: telemetry.clone() });
    let central = config.central_dp();
    let budget = config.budget()?;
    telemetry.update_status(|s| {
        s.model_version = version.0;
        s.rounds_abandoned_at_start = abandoned.iter().map(|r| r.0).collect();
        // What was spent stays visible in every mode (it was spent, whatever runs now).
        s.epsilon_spent = ledger.status().epsilon_spent;
        s.epsilon_budget = central.then(|| budget.epsilon.get());
        s.delta = (central || !ledger.entries().is_empty()).then(|| budget.delta.get());
        s.privacy_mode = config.privacy.mode.clone();
        s.secure_aggregation = config.secure_aggregation.enabled;
        s.population = Some(population);
    });
    telemetry.model_version.set(version.0 as i64);
    let shape = config.shape()?;
    let persist =
        Persist { store, ledger, shape, keep: config.storage.keep_checkpoints, telemetry: telemetry.clone() };
    // A cluster node's hook also tells the node task about rounds and shares.
    let (cluster_tx, cluster_rx) = tokio::sync::mpsc::unbounded_channel();
    let hook: Box<dyn driver::EventHook> = if cluster {
        Box::new(super::cluster::ClusterHook { inner: persist, events: cluster_tx.clone() })
    } else {
        Box::new(persist)
    };
    let s = &config.server;
    let ms = Duration::from_millis;
    let driver_config = DriverConfig {
        max_connections: s.max_connections as usize,
        max_frame_bytes: config.upload_frame_bytes()?,
        unauthenticated_max_frame_bytes: s.unauthenticated_max_frame_bytes,
        checkin_timeout: ms(s.checkin_timeout_ms),
        frame_timeout: ms(s.frame_timeout_ms),
        send_timeout: ms(s.send_timeout_ms),
        // A client legitimately stays silent while it waits for selection and while it trains:
        // the driver's silence limit covers both deadlines (QUIC keep-alives and the QUIC idle
        // timeout below detect dead peers sooner).
        idle_timeout: Duration::from_millis(
            s.idle_timeout_ms
                .saturating_add(config.round.selection_timeout_ms)
                .saturating_add(config.round.report_timeout_ms),
        ),
        max_messages_per_sec: s.rate_burst.max(s.rate_per_second),
        // A cluster node starts as a follower: only the leader's role has a schedule.
        schedule: (!cluster).then_some(schedule),
        ..DriverConfig::default()
    };
    let handle = driver::spawn_with_auth(engine, driver_config, hook, auth);

    // 4. Endpoints.
    let limits = QuicLimits {
        max_connections: s.max_connections as usize,
        max_connections_per_ip: s.max_connections_per_ip as usize,
        max_concurrent_handshakes: s.max_concurrent_handshakes as usize,
        retry_above_handshakes: s.retry_above_handshakes as usize,
        handshake_timeout: ms(s.handshake_timeout_ms),
        checkin_timeout: ms(s.checkin_timeout_ms),
        max_concurrent_streams: s.max_concurrent_streams,
        idle_timeout: Duration::from_millis(s.idle_timeout_ms),
        recv_buffer_bytes: s.recv_buffer_bytes,
        ..QuicLimits::default()
    };
    let (certs, key) = tls::load_cert_and_key(&s.cert, &s.key)?;
    let (endpoint, granted) = quic::bind(s.listen, quic::server_config(certs, key, &limits)?, &limits)?;
    let quic_addr = endpoint.local_addr().map_err(io("reading the QUIC address"))?;
    let quic_stats = Arc::new(QuicStats::default());
    let mut tasks =
        vec![tokio::spawn(quic::serve(endpoint.clone(), handle.clone(), limits, quic_stats.clone()))];

    let listener = tokio::net::TcpListener::bind(s.admin_listen)
        .await
        .map_err(io(format!("binding the admin endpoint {}", s.admin_listen)))?;
    let admin_addr = listener.local_addr().map_err(io("reading the admin address"))?;
    // A cluster node: the node task (discovery, lease, rounds and shares in PostgreSQL).
    let cluster_view = if cluster {
        let view = Arc::new(std::sync::Mutex::new(crate::cluster::node::ClusterView::default()));
        let mut node_config = config.clone();
        if node_config.cluster.node.is_empty() {
            node_config.cluster.node = default_node_name(quic_addr);
        }
        let c = &node_config.cluster;
        let pg = postgres_config(&node_config.storage)?;
        let settings = crate::cluster::node::NodeConfig {
            lease: crate::cluster::lease::LeaseConfig {
                population: c.population.clone(),
                node: c.node.clone(),
                ttl: ms(c.lease_ttl_ms),
                margin: ms(c.lease_margin_ms),
            },
            heartbeat: ms(c.heartbeat_ms),
            tick: ms(c.tick_ms),
            join_window: ms(config.round.selection_timeout_ms),
            // A live follower joins within a tick or two; give it a few heartbeats at most.
            join_wait: ms(config
                .round
                .selection_timeout_ms
                .min(c.heartbeat_ms.saturating_mul(3).max(c.tick_ms * 5))),
            share_deadline: ms(config
                .round
                .selection_timeout_ms
                .saturating_add(config.round.report_timeout_ms)
                .saturating_add(c.share_grace_ms)),
            db_timeout: ms(c.db_timeout_ms),
            quic_addr: if c.advertise.is_empty() { quic_addr.to_string() } else { c.advertise.clone() },
            admin_addr: admin_addr.to_string(),
            max_share_bytes: shape.len().saturating_mul(24).saturating_add(1 << 20),
        };
        tracing::info!(node = %c.node, population = %c.population, "cluster: starting as a follower");
        let cfg = node_config.clone();
        let reader = blocking(move || Store::open_config(&cfg.storage)).await?;
        let roles = Arc::new(super::cluster::Roles {
            config: node_config,
            telemetry: telemetry.clone(),
            reader: std::sync::Mutex::new(reader),
        });
        let bytes: crate::cluster::node::ByteCounters = {
            let handle = handle.clone();
            Arc::new(move || handle.bytes())
        };
        let (node_handle, node_view) = (handle.clone(), view.clone());
        tasks.push(tokio::spawn(async move {
            let run = crate::cluster::node::run(
                pg,
                settings,
                node_handle,
                roles,
                cluster_tx,
                cluster_rx,
                node_view,
                bytes,
            );
            if let Err(e) = run.await {
                tracing::error!(error = %e, "cluster: the node task stopped; this node no longer follows or leads");
            }
        }));
        Some(view)
    } else {
        drop((cluster_tx, cluster_rx));
        None
    };
    let refresh = {
        let (handle, stats, view) = (handle.clone(), quic_stats.clone(), cluster_view.clone());
        Arc::new(move |t: &Telemetry| {
            let d = handle.status();
            t.connections.set(d.connections as i64);
            let accepted = stats.accepted.load(Ordering::Relaxed);
            t.quic_accepted.inc_by(accepted.saturating_sub(t.quic_accepted.get()));
            t.update_status(|s| {
                s.phase = format!("{:?}", d.phase);
                s.current_round = d.round.map(|r| r.0);
                s.model_version = d.model_version.0;
                s.rounds_committed = d.rounds_committed;
                s.rounds_failed = d.rounds_failed;
                s.rounds_evaluated = d.rounds_evaluated;
                s.connections = d.connections;
                s.halted = d.halted.clone();
                s.paused = d.paused;
                s.draining = d.draining;
                (s.bytes_received, s.bytes_sent) = handle.bytes();
                s.cluster = view.as_ref().map(|v| v.lock().unwrap_or_else(|p| p.into_inner()).clone());
            });
        })
    };
    let storage = config.storage.clone();
    let control_store = blocking(move || Store::open_config(&storage)).await?;
    let control = super::control::Control {
        handle: handle.clone(),
        store: Arc::new(std::sync::Mutex::new(control_store)),
        authority: authority.clone(),
        token: admin_token.clone(),
        family: config.model.family.clone(),
        telemetry: telemetry.clone(),
        cluster: cluster_view.clone(),
    };
    let app = super::admin::router(AdminState { telemetry: telemetry.clone(), token: admin_token, refresh })
        .merge(super::control::router(control));
    let admin_tls = if s.admin_tls {
        let (certs, key) = tls::load_cert_and_key(&s.cert, &s.key)?;
        let config = super::admin_tls::server_config(certs, key).map_err(|e| ServeError::Io {
            what: "admin TLS configuration".into(),
            source: std::io::Error::other(e),
        })?;
        Some(config)
    } else {
        None
    };
    tasks.push(tokio::spawn(async move {
        use axum::serve::ListenerExt;
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let served = match admin_tls {
            Some(config) => match super::admin_tls::TlsListener::new(listener, config) {
                Ok(tls) => axum::serve(tls.tap_io(|_| {}), app).await,
                Err(e) => Err(e),
            },
            None => axum::serve(listener, app).await,
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "admin endpoint failed");
        }
    }));
    // Revocations made with `starling token revoke` while running take effect within 2 s: the
    // set is reloaded (off the async threads) and every bound connection is verified again, so a
    // revoked or expired client's connections are closed and it drops out of the running round.
    let storage = config.storage.clone();
    let reader = Arc::new(std::sync::Mutex::new(blocking(move || Store::open_config(&storage)).await?));
    {
        let handle = handle.clone();
        let telemetry_for_reload = telemetry.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let reader = reader.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    let store = reader.lock().unwrap_or_else(|e| e.into_inner());
                    Ok::<_, StoreError>((store.revocations()?, store.enrolled_population(unix_now_s())?))
                })
                .await;
                match loaded {
                    Ok(Ok(((tokens, clients), population))) => {
                        authority.reload_revocations(tokens, clients);
                        if handle.set_population(population).await.is_err() {
                            break;
                        }
                        telemetry_for_reload.update_status(|s| s.population = Some(population));
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot reload token revocations"),
                    Err(e) => tracing::warn!(error = %e, "revocation reload panicked"),
                }
                match handle.reverify().await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(closed = n, "closed connections whose credential is no longer valid")
                    }
                    Err(_) => break,
                }
            }
        }));
    }
    Ok(Running {
        quic_addr,
        admin_addr,
        recv_buffer_bytes: granted,
        handle,
        telemetry,
        quic_stats,
        endpoint,
        tasks,
    })
}

/// This node's name when `[cluster] node` is not set: the host name and the QUIC port.
fn default_node_name(quic: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "starling".into());
    format!("{host}:{}", quic.port())
}

/// The cluster node task's connection settings: `[storage] postgres`, with the password file.
fn postgres_config(storage: &super::config::StorageSection) -> Result<tokio_postgres::Config, ServeError> {
    let text = storage.postgres.as_deref().unwrap_or_default();
    let mut config: tokio_postgres::Config = text.parse().map_err(|e| ServeError::Io {
        what: "storage.postgres".into(),
        source: std::io::Error::other(format!("{e}")),
    })?;
    if let Some(file) = &storage.postgres_password_file {
        let password = std::fs::read_to_string(file).map_err(io(format!("reading {}", file.display())))?;
        config.password(password.trim());
    }
    Ok(config)
}

/// What start-up reads from the store besides the engine.
struct Saved {
    revocations: (Vec<u64>, Vec<u64>),
    evaluations: Vec<EvaluationRecord>,
}

/// Runs store work on the blocking pool (never on an async worker thread: see
/// [`crate::store::PgStore`]).
async fn blocking<T: Send + 'static, E: Into<ServeError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ServeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServeError::Io {
            what: "store task".into(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(Into::into)
}

/// Runs `f` off the async threads when called on one (the driver calls
/// [`install_checkpoint`](driver::EventHook::install_checkpoint) from its task): on a scoped
/// thread, waiting for it. Elsewhere (the blocking pool, a plain thread) it runs `f` in place.
fn off_async<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(f).join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    } else {
        f()
    }
}

/// The persistence hook. See the module docs.
pub(super) struct Persist {
    pub(super) store: Store,
    pub(super) ledger: PrivacyLedger,
    pub(super) shape: ModelShape,
    pub(super) keep: u32,
    pub(super) telemetry: Arc<Telemetry>,
}

/// Verifies enrollment tokens for the driver, counting failures by reason.
struct TokenAuth {
    authority: Arc<TokenAuthority>,
    telemetry: Arc<Telemetry>,
}

impl driver::Authenticator for TokenAuth {
    fn verify(&self, client: starling_proto::ids::ClientId, credential: &[u8]) -> Result<(), String> {
        self.authority.verify(client, credential, unix_now_s()).map(|_| ()).map_err(|e| {
            self.telemetry.auth_failures.get_or_create(&[("reason", e.label())]).inc();
            self.telemetry.failure("auth", format!("{client}: {e}"));
            e.to_string()
        })
    }
}

impl driver::EventHook for Persist {
    fn install_checkpoint(
        &mut self,
        version: ModelVersion,
        source: ModelVersion,
    ) -> Result<(Vec<f32>, Option<starling_proto::strategy::StrategyState>), String> {
        let (store, keep) = (&mut self.store, self.keep);
        let c = off_async(move || store.install_checkpoint(version, source, unix_ms(), keep))
            .map_err(|e| e.to_string())?;
        if c.shape != self.shape {
            return Err(format!(
                "checkpoint v{} has shape {:?}, the service {:?}",
                source.0, c.shape, self.shape
            ));
        }
        let limit = self.shape.len().saturating_mul(16).saturating_add(1 << 20);
        let state = match &c.strategy_state {
            Some(bytes) => starling_proto::codec::decode_strategy_state(bytes, limit).ok(),
            None => None,
        };
        self.telemetry.model_version.set(version.0 as i64);
        self.telemetry.update_status(|s| s.model_version = version.0);
        tracing::warn!(
            source = source.0,
            version = version.0,
            "rolled back: checkpoint served again as a new version"
        );
        Ok((c.model, state))
    }

    fn blocking(&self, event: &RoundEvent) -> bool {
        matches!(
            event,
            RoundEvent::Started { .. }
                | RoundEvent::Committed(_)
                | RoundEvent::Evaluated(_)
                | RoundEvent::Failed { .. }
        )
    }

    fn on_event(&mut self, event: &RoundEvent) -> Result<(), String> {
        let t = &self.telemetry;
        match event {
            RoundEvent::Started { round, version, kind } => {
                t.update_status(|s| {
                    s.participants_selected = 0;
                    s.participants_reported = 0;
                });
                self.store.begin_round(*round, *version, *kind == TaskKind::Evaluate, unix_ms()).map_err(
                    |e| {
                        t.failure("storage", e.to_string());
                        e.to_string()
                    },
                )?;
            }
            RoundEvent::SelectionClosed { selected, .. } => {
                t.update_status(|s| s.participants_selected = *selected)
            }
            RoundEvent::UpdateAccepted { .. } => {
                t.updates_accepted.inc();
                t.update_status(|s| s.participants_reported += 1);
            }
            RoundEvent::UpdateRejected { round, client, reason } => {
                t.updates_rejected.get_or_create(&[("reason", reject_label(reason))]).inc();
                t.failure("update", format!("{round} {client}: {reason:?}"));
            }
            RoundEvent::CheckInRefused { client, reason } => {
                t.check_ins_refused.get_or_create(&[("reason", refusal_label(reason))]).inc();
                if !matches!(reason, Refusal::Unauthenticated) {
                    t.failure("check_in", format!("{client}: {reason:?}"));
                }
            }
            RoundEvent::Committed(c) => {
                let entry = match c.privacy {
                    Some(p) => Some(ledger_entry(c.round.0, p)?),
                    None => None,
                };
                let state = starling_proto::codec::encode_strategy_state(&c.strategy_state);
                let commit = RoundCommit {
                    round: c.round,
                    version: c.version,
                    shape: self.shape,
                    model: &c.model,
                    ledger: entry.as_ref(),
                    strategy_state: Some(&state),
                    figures: figures(&c.stats),
                };
                let began = std::time::Instant::now();
                self.store.commit_round(&commit, unix_ms(), self.keep).map_err(|e| {
                    t.failure("storage", format!("{}: {e}; the model is not released", c.round));
                    e.to_string()
                })?;
                let commit_time = began.elapsed();
                t.store_commit_seconds.observe(commit_time.as_secs_f64());
                if let Some(entry) = entry {
                    self.ledger.record(entry);
                }
                let spent = self.ledger.status().epsilon_spent;
                t.rounds.get_or_create(&[("outcome", "committed")]).inc();
                t.model_version.set(c.version.0 as i64);
                t.epsilon_spent.set(spent);
                t.update_status(|s| {
                    s.model_version = c.version.0;
                    s.epsilon_spent = spent;
                });
                tracing::info!(
                    round = c.round.0,
                    version = c.version.0,
                    reported = c.stats.reported,
                    epsilon = spent,
                    commit_ms = commit_time.as_secs_f64() * 1e3,
                    "round committed"
                );
            }
            RoundEvent::Evaluated(e) => {
                let entry = match e.privacy {
                    Some(p) => Some(ledger_entry(e.round.0, p)?),
                    None => None,
                };
                let m = &e.metrics;
                let record = EvaluationRecord {
                    round: e.round.0,
                    version: e.version.0,
                    hr_at_10: m.hr_at_10,
                    ndcg_at_10: m.ndcg_at_10,
                    loss: m.loss,
                    reports: m.reports as u64,
                    cases: m.cases,
                    noised: m.noise_std.is_some(),
                    noise_std: m.noise_std,
                    at: unix_ms(),
                };
                self.store.record_evaluation(&record, entry.as_ref(), &figures(&e.stats)).map_err(|err| {
                    t.failure("storage", format!("{}: {err}; the evaluation is not released", e.round));
                    err.to_string()
                })?;
                if let Some(entry) = entry {
                    self.ledger.record(entry);
                }
                let spent = self.ledger.status().epsilon_spent;
                t.rounds.get_or_create(&[("outcome", "evaluated")]).inc();
                t.epsilon_spent.set(spent);
                t.update_status(|s| s.epsilon_spent = spent);
                tracing::info!(
                    round = e.round.0,
                    version = e.version.0,
                    reports = m.reports,
                    hr_at_10 = m.hr_at_10,
                    ndcg_at_10 = m.ndcg_at_10,
                    loss = m.loss,
                    epsilon = spent,
                    "evaluation round released"
                );
                t.evaluation(record, true);
            }
            RoundEvent::Failed { round, reason, stats } => {
                t.rounds.get_or_create(&[("outcome", "failed")]).inc();
                t.failure("round", format!("{round}: {reason}"));
                tracing::info!(round = round.0, %reason, "round failed");
                self.store
                    .fail_round(*round, &reason.to_string(), &figures(stats), unix_ms())
                    .map_err(|e| e.to_string())?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// A round's participation figures, as the store keeps them.
fn figures(s: &RoundStats) -> RoundFigures {
    RoundFigures {
        selected: s.selected as u64,
        reported: s.reported as u64,
        dropped: s.dropped as u64,
        unfinished: s.unfinished as u64,
        rejected: s.rejected as u64,
    }
}

/// 256 bits from the operating system's CSPRNG.
pub(super) fn os_seed() -> Result<[u8; 32], ServeError> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut seed).map_err(|_| ServeError::Io {
        what: "drawing a seed from the operating system".into(),
        source: std::io::Error::other("ring::rand failed"),
    })?;
    Ok(seed)
}

fn ledger_entry(round: u64, p: starling_proto::strategy::PrivacyCharge) -> Result<LedgerEntry, String> {
    Ok(LedgerEntry {
        round,
        mechanism: Mechanism {
            q: SamplingRate::new(p.sampling_rate).map_err(|e| e.to_string())?,
            sigma: NoiseMultiplier::new(p.noise_multiplier).map_err(|e| e.to_string())?,
            steps: u64::from(p.steps),
        },
    })
}

fn reject_label(r: &RejectReason) -> &'static str {
    match r {
        RejectReason::Late => "late",
        RejectReason::Duplicate => "duplicate",
        RejectReason::StaleVersion { .. } => "stale_version",
        RejectReason::WrongRound => "wrong_round",
        RejectReason::NotSelected => "not_selected",
        RejectReason::Malformed(_) => "malformed",
        RejectReason::InvalidWeight => "invalid_weight",
        RejectReason::Refused(_) => "refused",
        _ => "other",
    }
}

fn refusal_label(r: &Refusal) -> &'static str {
    match r {
        Refusal::UnsupportedVersion { .. } => "unsupported_version",
        Refusal::Unauthenticated => "unauthenticated",
        Refusal::WrongModelFamily { .. } => "wrong_model_family",
        Refusal::NotEligible => "not_eligible",
        Refusal::IncompatibleCapabilities => "incompatible_capabilities",
        Refusal::BudgetExhausted => "budget_exhausted",
        Refusal::AlreadyCheckedIn => "already_checked_in",
        Refusal::ShuttingDown => "shutting_down",
        _ => "other",
    }
}

/// Why `starling init` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// A file exists and `force` was not given.
    #[error("{0} already exists (use --force to overwrite)")]
    Exists(PathBuf),
    /// Writing failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The files `starling init` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitReport {
    /// `DIR/starling.toml`.
    pub config: PathBuf,
    /// The CA certificate clients must trust.
    pub ca_cert: PathBuf,
    /// The admin token file.
    pub admin_token: PathBuf,
}

/// Writes a commented `starling.toml`, a local CA and a server certificate for `names`, the
/// admin token and the token-signing secret into `dir`. Keys and secrets are written `0600`.
pub fn init(dir: &Path, names: &[&str], force: bool) -> Result<InitReport, InitError> {
    let pki = LocalPki::generate(names)?;
    let admin_token = {
        use base64::Engine;
        let mut raw = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).map_err(|_| {
            InitError::Write { path: dir.into(), source: std::io::Error::other("no system RNG") }
        })?;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    };
    let files: [(&str, String, bool); 7] = [
        ("starling.toml", super::config::TEMPLATE.to_string(), false),
        ("tls/ca.pem", pki.ca_cert_pem, false),
        ("tls/ca.key", pki.ca_key_pem, true),
        ("tls/server.pem", pki.server_cert_pem, false),
        ("tls/server.key", pki.server_key_pem, true),
        ("secrets/admin.token", format!("{admin_token}\n"), true),
        ("secrets/token.key", format!("{}\n", TokenAuthority::generate_secret_text()), true),
    ];
    if !force && let Some((name, ..)) = files.iter().find(|(name, ..)| dir.join(name).exists()) {
        return Err(InitError::Exists(dir.join(name)));
    }
    for (name, content, secret) in &files {
        let path = dir.join(name);
        write_file(&path, content.as_bytes(), *secret).map_err(|source| InitError::Write { path, source })?;
    }
    Ok(InitReport {
        config: dir.join("starling.toml"),
        ca_cert: dir.join("tls/ca.pem"),
        admin_token: dir.join("secrets/admin.token"),
    })
}

fn write_file(path: &Path, content: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = options.open(path)?;
    f.write_all(content)?;
    f.sync_all()
}
