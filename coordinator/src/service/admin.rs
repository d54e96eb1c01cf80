//! The admin HTTP endpoint and the service's telemetry.
//!
//! Routes on a separate TCP port; all but the dashboard page require
//! `Authorization: Bearer <admin token>` (compared in constant time; a missing or wrong token
//! gets `401`):
//! - `GET /`: the dashboard, a self-contained page that reads the routes below with the token the
//!   operator gives it (it carries no data itself);
//! - `GET /status`: JSON — phase, current round, participants of the current round, model
//!   version, rounds committed and failed, ε spent and budget, open connections, the most
//!   recent failures (bounded list), and `evaluation`: the last federated-evaluation round's
//!   figures and the last [`EVALUATION_HISTORY`] of them;
//! - `GET /metrics`: Prometheus text format (prometheus-client).
//!
//! [`Telemetry`] is the shared sink the event hook, the authenticator and the QUIC accept loop
//! write to; it holds only counters and a bounded list, never per-client state.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// Failures kept for `/status`.
pub const RECENT_FAILURES: usize = 32;

/// Evaluation rounds kept in `/status` (`evaluation.history`).
pub const EVALUATION_HISTORY: usize = 20;

/// `/status`'s `evaluation` object.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EvaluationStatus {
    /// The newest released evaluation round.
    pub last: Option<crate::store::EvaluationRecord>,
    /// The newest [`EVALUATION_HISTORY`] of them, oldest first (persisted: survives restarts).
    pub history: Vec<crate::store::EvaluationRecord>,
}

type Label = [(&'static str, &'static str); 1];

/// One recent failure.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FailureRecord {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// `round`, `auth`, `update`, `check_in`, `storage`, `connection`.
    pub kind: &'static str,
    /// What happened.
    pub detail: String,
}

/// What `/status` reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StatusSnapshot {
    /// The engine's phase.
    pub phase: String,
    /// The running round.
    pub current_round: Option<u64>,
    /// Clients selected for the running round.
    pub participants_selected: usize,
    /// Updates accepted in the running round.
    pub participants_reported: usize,
    /// The model version served.
    pub model_version: u64,
    /// Rounds committed since the process started.
    pub rounds_committed: u64,
    /// Rounds failed since the process started.
    pub rounds_failed: u64,
    /// Federated-evaluation rounds released since the process started.
    pub rounds_evaluated: u64,
    /// Rounds found unfinished at start-up and recorded `abandoned`.
    pub rounds_abandoned_at_start: Vec<u64>,
    /// ε spent so far (all rounds ever committed, from the durable ledger).
    pub epsilon_spent: f64,
    /// The ε budget (`null` without central DP).
    pub epsilon_budget: Option<f64>,
    /// δ of the budget (also shown when DP is off now but the ledger holds earlier DP rounds).
    pub delta: Option<f64>,
    /// `privacy.mode`: `central`, `local` or `off`.
    pub privacy_mode: String,
    /// Whether rounds run secure aggregation (`[secure_aggregation] enabled`): the coordinator
    /// sees only sums; under `central` the devices add the noise.
    pub secure_aggregation: bool,
    /// N, the enrolled devices (unrevoked, unexpired token) central DP samples from.
    pub population: Option<u64>,
    /// Open client streams.
    pub connections: usize,
    /// Why no more rounds are started, if so.
    pub halted: Option<String>,
    /// The schedule is paused by an operator (`starling admin pause`): rounds start only on
    /// command.
    pub paused: bool,
    /// The node is draining (`starling admin drain`): new connections are refused.
    pub draining: bool,
    /// The checkpoint version whose strategy state (server-optimizer moments, an adaptive clip
    /// norm) was restored at start-up, if one was.
    pub strategy_state_restored_from: Option<u64>,
    /// The most recent failures, newest last.
    pub recent_failures: Vec<FailureRecord>,
    /// Federated evaluation: the newest figures and their history.
    pub evaluation: EvaluationStatus,
    /// Bytes of frames received from clients since the process started.
    pub bytes_received: u64,
    /// Bytes of frames sent to clients since the process started.
    pub bytes_sent: u64,
    /// The cluster this node belongs to (`[cluster] enabled`): its role, the leader, the live
    /// nodes with their connections and bytes.
    pub cluster: Option<crate::cluster::node::ClusterView>,
}

/// Counters, gauges and the status the admin endpoint serves.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    /// Check-ins refused, by reason.
    pub check_ins_refused: Family<Label, Counter>,
    /// Credentials refused, by reason.
    pub auth_failures: Family<Label, Counter>,
    /// Updates accepted.
    pub updates_accepted: Counter,
    /// Updates rejected, by reason.
    pub updates_rejected: Family<Label, Counter>,
    /// Rounds ended, by outcome (`committed`, `failed`).
    pub rounds: Family<Label, Counter>,
    /// The model version served.
    pub model_version: Gauge,
    /// ε spent.
    pub epsilon_spent: Gauge<f64, AtomicU64>,
    /// QUIC handshakes completed.
    pub quic_accepted: Counter,
    /// Open client streams.
    pub connections: Gauge,
    /// The newest evaluation round's mean HR@10.
    pub eval_hr_at_10: Gauge<f64, AtomicU64>,
    /// The newest evaluation round's mean NDCG@10.
    pub eval_ndcg_at_10: Gauge<f64, AtomicU64>,
    /// The newest evaluation round's mean loss.
    pub eval_loss: Gauge<f64, AtomicU64>,
    /// The newest evaluation round's reports.
    pub eval_reports: Gauge,
    /// Evaluation rounds that released their figures since the process started.
    pub eval_rounds: Counter,
    /// Admin requests refused for a missing or wrong token.
    pub admin_unauthorized: Counter,
    /// How long a committed round's store transaction (ledger entry + checkpoint + state) took.
    pub store_commit_seconds: Histogram,
    status: Mutex<StatusSnapshot>,
    failures: Mutex<VecDeque<FailureRecord>>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// Empty telemetry with every metric registered under the `starling_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("starling");
        let t = Self {
            check_ins_refused: Family::default(),
            auth_failures: Family::default(),
            updates_accepted: Counter::default(),
            updates_rejected: Family::default(),
            rounds: Family::default(),
            model_version: Gauge::default(),
            epsilon_spent: Gauge::default(),
            quic_accepted: Counter::default(),
            connections: Gauge::default(),
            eval_hr_at_10: Gauge::default(),
            eval_ndcg_at_10: Gauge::default(),
            eval_loss: Gauge::default(),
            eval_reports: Gauge::default(),
            eval_rounds: Counter::default(),
            admin_unauthorized: Counter::default(),
            store_commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            status: Mutex::default(),
            failures: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "store_commit_seconds",
            "Duration of a committed round's store transaction (ledger, checkpoint, round state)",
            t.store_commit_seconds.clone(),
        );
        registry.register("check_ins_refused", "Check-ins refused, by reason", t.check_ins_refused.clone());
        registry.register("auth_failures", "Credentials refused, by reason", t.auth_failures.clone());
        registry.register(
            "updates_accepted",
            "Updates accepted into an aggregate",
            t.updates_accepted.clone(),
        );
        registry.register("updates_rejected", "Updates rejected, by reason", t.updates_rejected.clone());
        registry.register("rounds", "Rounds ended, by outcome", t.rounds.clone());
        registry.register(
            "admin_unauthorized",
            "Admin requests refused for a missing or wrong token",
            t.admin_unauthorized.clone(),
        );
        registry.register("model_version", "Model version served", t.model_version.clone());
        registry.register(
            "epsilon_spent",
            "Privacy budget spent (epsilon at the configured delta)",
            t.epsilon_spent.clone(),
        );
        registry.register("quic_handshakes", "QUIC handshakes completed", t.quic_accepted.clone());
        registry.register("connections", "Open client streams", t.connections.clone());
        registry.register(
            "eval_hr_at_10",
            "Newest federated evaluation: mean HR@10",
            t.eval_hr_at_10.clone(),
        );
        registry.register(
            "eval_ndcg_at_10",
            "Newest federated evaluation: mean NDCG@10",
            t.eval_ndcg_at_10.clone(),
        );
        registry.register(
            "eval_loss",
            "Newest federated evaluation: mean loss per case",
            t.eval_loss.clone(),
        );
        registry.register("eval_reports", "Newest federated evaluation: reports", t.eval_reports.clone());
        registry.register("eval_rounds", "Federated evaluation rounds released", t.eval_rounds.clone());
        Self { registry, ..t }
    }

    /// Shows a released (and recorded) evaluation round: gauges, `/status`'s `evaluation`. With
    /// `count`, the evaluation-round counter moves too (not for history replayed at start-up).
    pub fn evaluation(&self, record: crate::store::EvaluationRecord, count: bool) {
        self.eval_hr_at_10.set(record.hr_at_10);
        self.eval_ndcg_at_10.set(record.ndcg_at_10);
        self.eval_loss.set(record.loss);
        self.eval_reports.set(i64::try_from(record.reports).unwrap_or(i64::MAX));
        if count {
            self.eval_rounds.inc();
        }
        self.update_status(|s| {
            let h = &mut s.evaluation.history;
            if h.len() == EVALUATION_HISTORY {
                h.remove(0);
            }
            h.push(record.clone());
            s.evaluation.last = Some(record);
        });
    }

    /// Records a failure for `/status` (the oldest are dropped beyond [`RECENT_FAILURES`]).
    pub fn failure(&self, kind: &'static str, detail: impl Into<String>) {
        let at_ms = crate::service::unix_ms();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() == RECENT_FAILURES {
            f.pop_front();
        }
        f.push_back(FailureRecord { at_ms, kind, detail: detail.into() });
    }

    /// Updates the status snapshot.
    pub fn update_status(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The status, with the recent failures.
    pub fn status(&self) -> StatusSnapshot {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.recent_failures = self.failures.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        s
    }

    /// The metrics in Prometheus text format.
    pub fn encode_metrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// State of the admin router.
#[derive(Clone)]
pub struct AdminState {
    /// The telemetry served.
    pub telemetry: Arc<Telemetry>,
    /// The bearer token required.
    pub token: Arc<str>,
    /// Called before each `/status` to refresh live figures (e.g. from the driver's status).
    pub refresh: Arc<dyn Fn(&Telemetry) + Send + Sync>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// The admin router (`/` the dashboard, `/status`, `/metrics`).
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The operator's dashboard: one self-contained page (no external resource; the policy below
/// forbids loading any) that reads `/status` and `/history` with the token the operator gives it.
/// It carries no data itself, so it is served without the token.
pub const DASHBOARD_HTML: &str = include_str!("dashboard.html");

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
                 img-src data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        DASHBOARD_HTML,
    )
        .into_response()
}

/// Whether `headers` carry `Authorization: Bearer <token>` (compared in constant time).
pub(crate) fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(given) = given.strip_prefix("Bearer ") else { return false };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    // Constant time in the token's content (the length is not secret).
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn status(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &state.token) {
        state.telemetry.admin_unauthorized.inc();
        return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
    }
    (state.refresh)(&state.telemetry);
    axum::Json(state.telemetry.status()).into_response()
}

async fn metrics(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if !authorized(&headers, &state.token) {
        state.telemetry.admin_unauthorized.inc();
        return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
    }
    (state.refresh)(&state.telemetry);
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.telemetry.encode_metrics(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_check() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "secret"));
        h.insert(header::AUTHORIZATION, "Bearer secreT".parse().unwrap());
        assert!(!authorized(&h, "secret"));
        h.insert(header::AUTHORIZATION, "Bearer secret".parse().unwrap());
        assert!(authorized(&h, "secret"));
        h.insert(header::AUTHORIZATION, "Basic secret".parse().unwrap());
        assert!(!authorized(&h, "secret"));
    }

    #[test]
    fn metrics_and_failures_are_bounded_and_encoded() {
        let t = Telemetry::new();
        t.auth_failures.get_or_create(&[("reason", "expired")]).inc();
        t.epsilon_spent.set(1.5);
        for i in 0..100 {
            t.failure("auth", format!("failure {i}"));
        }
        let s = t.status();
        assert_eq!(s.recent_failures.len(), RECENT_FAILURES);
        assert_eq!(s.recent_failures.last().unwrap().detail, "failure 99");
        let text = t.encode_metrics();
        assert!(text.contains("starling_auth_failures_total{reason=\"expired\"} 1"), "{text}");
        assert!(text.contains("starling_epsilon_spent 1.5"), "{text}");
    }
}
