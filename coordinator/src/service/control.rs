//! The control plane: what an operator can do to a running coordinator, over the admin
//! endpoint, each action authenticated with the admin bearer token and written to the store's
//! `audit` table (who, when, what, the outcome) before it is answered.
//!
//! | method and path | action |
//! |---|---|
//! | `POST /admin/pause` | no round starts by itself (a running round finishes); survives restarts |
//! | `POST /admin/resume` | the schedule goes on |
//! | `POST /admin/round` | starts a round now (also while paused) |
//! | `POST /admin/rollback?version=N` | serves checkpoint N again, as the next version (between rounds); the ledger keeps what was spent |
//! | `POST /admin/reload` | reloads token revocations now and closes connections whose credential is no longer valid |
//! | `POST /admin/drain` | refuses new connections and starts no round; stop the process once the running round ended |
//! | `GET /admin/model[?version=N][&format=json]` | exports a checkpoint (the newest by default), see [`export_binary`] |
//! | `GET /admin/audit[?limit=N]` | the newest audit rows |
//! | `GET /history[?limit=N]` | the newest rounds with their figures, and the evaluations |
//!
//! "Who" is the admin token (the one credential the endpoint knows), the peer's address, and the
//! operator name the client claims in `X-Starling-Operator` (`starling admin` sends the user
//! name); the claimed name is recorded as claimed, not authenticated. Requests without the token
//! get `401` and are not written to the audit table (they are counted in
//! `starling_admin_unauthorized_total`), so that nobody can fill the disk with them.

use axum::Router;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use starling_proto::ids::ModelVersion;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::admin::{Telemetry, authorized};
use super::driver::{CoordinatorHandle, DriverError};
use super::tokens::{TokenAuthority, unix_now_s};
use super::unix_ms;
use crate::store::{Checkpoint, Store, StoreError};

/// Magic of the binary model export (`starling admin export`).
pub const MODEL_MAGIC: &[u8; 8] = b"STMODEL1";

/// What the control plane acts on.
#[derive(Clone)]
pub struct Control {
    /// The driver.
    pub handle: CoordinatorHandle,
    /// A connection to the service's store (audit rows, switches, exports).
    pub store: Arc<Mutex<Store>>,
    /// The token authority whose revocations `reload` refreshes.
    pub authority: Arc<TokenAuthority>,
    /// The admin bearer token.
    pub token: Arc<str>,
    /// The model family, for exports.
    pub family: String,
    /// The telemetry (unauthorized requests are counted there).
    pub telemetry: Arc<Telemetry>,
    /// This node's view of its cluster, when it is one node of several: actions on the schedule
    /// and the model are the leader's.
    pub cluster: Option<Arc<Mutex<crate::cluster::node::ClusterView>>>,
}

impl Control {
    /// Refuses an action only the leader may take, naming the leader.
    fn leader_only(&self) -> Result<(), Refused> {
        let Some(view) = &self.cluster else { return Ok(()) };
        let v = view.lock().unwrap_or_else(|p| p.into_inner());
        if v.leader {
            return Ok(());
        }
        let leader = v.current_leader.clone();
        let admin =
            leader.as_ref().and_then(|l| v.nodes.iter().find(|n| &n.node == l)).map(|n| n.admin_addr.clone());
        Err(Refused(
            StatusCode::CONFLICT,
            match (leader, admin) {
                (Some(l), Some(a)) => {
                    format!("this node is not the cluster's leader: send it to {l} (admin {a})")
                }
                (Some(l), None) => format!("this node is not the cluster's leader: send it to {l}"),
                _ => "this node is not the cluster's leader, and no node leads right now".into(),
            },
        ))
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// The control plane's routes (merged into the admin router).
pub fn router(control: Control) -> Router {
    Router::new()
        .route("/admin/pause", post(pause))
        .route("/admin/resume", post(resume))
        .route("/admin/round", post(start_round))
        .route("/admin/rollback", post(rollback))
        .route("/admin/reload", post(reload))
        .route("/admin/drain", post(drain))
        .route("/admin/model", get(export))
        .route("/admin/audit", get(audit))
        .route("/history", get(history))
        .with_state(control)
}

/// A refused or failed action: its status and message.
struct Refused(StatusCode, String);

impl From<DriverError> for Refused {
    fn from(e: DriverError) -> Self {
        let code = match e {
            DriverError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::CONFLICT,
        };
        Refused(code, e.to_string())
    }
}

impl From<StoreError> for Refused {
    fn from(e: StoreError) -> Self {
        Refused(StatusCode::INTERNAL_SERVER_ERROR, format!("storage: {e}"))
    }
}

fn actor(headers: &HeaderMap, peer: SocketAddr) -> String {
    let claimed = headers
        .get("x-starling-operator")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().filter(|c| !c.is_control()).take(64).collect::<String>());
    match claimed {
        Some(name) if !name.is_empty() => format!("admin-token from {peer} (operator {name:?}, claimed)"),
        _ => format!("admin-token from {peer}"),
    }
}

/// Runs a blocking store operation off the async threads.
async fn with_store<T: Send + 'static>(
    c: &Control,
    f: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Refused> {
    let store = c.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s)
    })
    .await
    .map_err(|e| Refused(StatusCode::INTERNAL_SERVER_ERROR, format!("store task failed: {e}")))?
    .map_err(Refused::from)
}

/// Authenticates, runs `act`, writes the audit row (the action's outcome included), answers.
async fn audited<F, Fut>(
    c: Control,
    headers: HeaderMap,
    peer: SocketAddr,
    action: &'static str,
    detail: serde_json::Value,
    act: F,
) -> Response
where
    F: FnOnce(Control) -> Fut,
    Fut: std::future::Future<Output = Result<serde_json::Value, Refused>>,
{
    if !authorized(&headers, &c.token) {
        c.telemetry.admin_unauthorized.inc();
        return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
    }
    let who = actor(&headers, peer);
    let result = act(c.clone()).await;
    let outcome = match &result {
        Ok(_) => "ok".to_owned(),
        Err(Refused(code, why)) => format!("refused ({}): {why}", code.as_u16()),
    };
    let (at, detail_text) = (unix_ms(), detail.to_string());
    let logged = with_store(&c, move |s| s.record_audit(at, &who, action, &detail_text, &outcome)).await;
    tracing::info!(action, ok = result.is_ok(), "control-plane action");
    if let Err(Refused(_, why)) = logged {
        // The action happened but is not on record: say so loudly rather than pretend.
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the action was not recorded in the audit table: {why}\n"),
        )
            .into_response();
    }
    match result {
        Ok(body) => axum::Json(body).into_response(),
        Err(Refused(code, why)) => (code, format!("{why}\n")).into_response(),
    }
}

type Peer = ConnectInfo<SocketAddr>;

async fn pause(State(c): State<Control>, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    audited(c, headers, peer, "pause", serde_json::json!({}), |c| set_paused(c, true)).await
}

async fn resume(State(c): State<Control>, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    audited(c, headers, peer, "resume", serde_json::json!({}), |c| set_paused(c, false)).await
}

async fn set_paused(c: Control, paused: bool) -> Result<serde_json::Value, Refused> {
    // Durable first: a restart right after the answer keeps the operator's choice.
    with_store(&c, move |s| s.set_service_state("paused", if paused { "true" } else { "false" })).await?;
    c.handle.set_paused(paused).await?;
    Ok(serde_json::json!({ "paused": paused }))
}

async fn start_round(State(c): State<Control>, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    audited(c, headers, peer, "start_round", serde_json::json!({}), |c| async move {
        c.leader_only()?;
        let round = c.handle.start_round().await?;
        Ok(serde_json::json!({ "round": round.0 }))
    })
    .await
}

#[derive(Deserialize)]
struct VersionQuery {
    version: Option<u64>,
    format: Option<String>,
    limit: Option<usize>,
}

async fn rollback(
    State(c): State<Control>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Query(q): Query<VersionQuery>,
) -> Response {
    let detail = serde_json::json!({ "version": q.version });
    audited(c, headers, peer, "rollback", detail, |c| async move {
        c.leader_only()?;
        let Some(source) = q.version else {
            return Err(Refused(StatusCode::BAD_REQUEST, "rollback needs ?version=N".into()));
        };
        let new = c.handle.install_checkpoint(ModelVersion(source)).await?;
        Ok(serde_json::json!({ "rolled_back_to": source, "served_as": new.0 }))
    })
    .await
}

async fn reload(State(c): State<Control>, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    audited(c, headers, peer, "reload", serde_json::json!({}), |c| async move {
        let ((tokens, clients), population) =
            with_store(&c, |s| Ok((s.revocations()?, s.enrolled_population(unix_now_s())?))).await?;
        let (revoked_tokens, revoked_clients) = (tokens.len(), clients.len());
        c.authority.reload_revocations(tokens, clients);
        c.handle.set_population(population).await?;
        let closed = c.handle.reverify().await?;
        Ok(serde_json::json!({
            "revoked_tokens": revoked_tokens,
            "revoked_clients": revoked_clients,
            "population": population,
            "connections_closed": closed,
        }))
    })
    .await
}

async fn drain(State(c): State<Control>, ConnectInfo(peer): Peer, headers: HeaderMap) -> Response {
    audited(c, headers, peer, "drain", serde_json::json!({}), |c| async move {
        c.handle.drain().await?;
        let s = c.handle.status();
        Ok(serde_json::json!({ "draining": true, "round_running": s.round.map(|r| r.0) }))
    })
    .await
}

async fn export(
    State(c): State<Control>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Query(q): Query<VersionQuery>,
) -> Response {
    let json = q.format.as_deref() == Some("json");
    if let Some(f) = q.format.as_deref().filter(|f| *f != "json" && *f != "bin") {
        let f = f.to_owned();
        return audited(c, headers, peer, "export", serde_json::json!({ "format": f }), |_| async move {
            Err(Refused(StatusCode::BAD_REQUEST, "format is bin (default) or json".into()))
        })
        .await;
    }
    let detail = serde_json::json!({ "version": q.version, "format": if json { "json" } else { "bin" } });
    let family = c.family.clone();
    let mut exported: Option<Checkpoint> = None;
    let slot = &mut exported;
    let response = audited(c, headers, peer, "export", detail, |c| async move {
        let wanted = q.version;
        let checkpoint = with_store(&c, move |s| match wanted {
            Some(v) => s.checkpoint(ModelVersion(v)),
            None => s.latest_checkpoint(),
        })
        .await?;
        let Some(checkpoint) = checkpoint else {
            return Err(Refused(StatusCode::NOT_FOUND, "no such checkpoint is kept".into()));
        };
        let head = serde_json::json!({ "version": checkpoint.version.0 });
        *slot = Some(checkpoint);
        Ok(head)
    })
    .await;
    let Some(checkpoint) = exported else { return response };
    if !response.status().is_success() {
        return response;
    }
    if json {
        axum::Json(serde_json::json!({
            "format": "starling.model/1",
            "version": checkpoint.version.0,
            "family": family,
            "rows": checkpoint.shape.rows,
            "row_len": checkpoint.shape.row_len,
            "values": checkpoint.model,
        }))
        .into_response()
    } else {
        (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (
                    header::HeaderName::from_static("x-starling-model-version"),
                    checkpoint.version.0.to_string(),
                ),
            ],
            export_binary(&checkpoint, &family),
        )
            .into_response()
    }
}

/// The binary model export (format 1), all integers little-endian:
///
/// ```text
/// "STMODEL1"            8 bytes
/// version               u64
/// rows, row_len         u32, u32
/// family length, name   u32, UTF-8 bytes
/// values                rows × row_len f32 (row-major: item rows first, then any dense rows)
/// crc32                 u32, CRC-32 (IEEE) of every byte before it
/// ```
pub fn export_binary(c: &Checkpoint, family: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + family.len() + c.model.len() * 4);
    out.extend_from_slice(MODEL_MAGIC);
    out.extend_from_slice(&c.version.0.to_le_bytes());
    out.extend_from_slice(&c.shape.rows.to_le_bytes());
    out.extend_from_slice(&c.shape.row_len.to_le_bytes());
    out.extend_from_slice(&(family.len() as u32).to_le_bytes());
    out.extend_from_slice(family.as_bytes());
    for v in &c.model {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Why an exported model file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a valid Starling model export: {0}")]
pub struct ExportError(String);

/// Reads [`export_binary`]'s bytes: `(version, rows, row_len, family, values)`.
pub fn read_export(bytes: &[u8]) -> Result<(u64, u32, u32, String, Vec<f32>), ExportError> {
    let bad = |s: &str| ExportError(s.to_owned());
    if bytes.len() < 8 + 8 + 4 + 4 + 4 + 4 || &bytes[..8] != MODEL_MAGIC {
        return Err(bad("wrong magic or too short"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(bad("checksum mismatch"));
    }
    let u32_at = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
    let version = u64::from_le_bytes(body[8..16].try_into().map_err(|_| bad("version"))?);
    let (rows, row_len, name_len) = (u32_at(16), u32_at(20), u32_at(24) as usize);
    let values_at = 28usize.checked_add(name_len).ok_or_else(|| bad("family length"))?;
    let family = body.get(28..values_at).ok_or_else(|| bad("family length"))?;
    let family = String::from_utf8(family.to_vec()).map_err(|_| bad("family is not UTF-8"))?;
    let n = (rows as usize).checked_mul(row_len as usize).ok_or_else(|| bad("shape"))?;
    if body.len() - values_at != n.checked_mul(4).ok_or_else(|| bad("shape"))? {
        return Err(bad("the values do not match the shape"));
    }
    let values =
        body[values_at..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok((version, rows, row_len, family, values))
}

async fn audit(State(c): State<Control>, headers: HeaderMap, Query(q): Query<VersionQuery>) -> Response {
    if !authorized(&headers, &c.token) {
        c.telemetry.admin_unauthorized.inc();
        return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
    }
    let limit = q.limit.unwrap_or(100).min(10_000);
    match with_store(&c, move |s| s.audit(limit)).await {
        Ok(rows) => axum::Json(serde_json::json!({ "audit": rows })).into_response(),
        Err(Refused(code, why)) => (code, why).into_response(),
    }
}

async fn history(State(c): State<Control>, headers: HeaderMap, Query(q): Query<VersionQuery>) -> Response {
    if !authorized(&headers, &c.token) {
        c.telemetry.admin_unauthorized.inc();
        return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
    }
    let limit = q.limit.unwrap_or(200).min(10_000);
    match with_store(&c, move |s| Ok((s.recent_rounds(limit)?, s.evaluations(limit)?))).await {
        Ok((rounds, evaluations)) => {
            axum::Json(serde_json::json!({ "rounds": rounds, "evaluations": evaluations })).into_response()
        }
        Err(Refused(code, why)) => (code, why).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_proto::ids::RoundId;
    use starling_proto::update::ModelShape;

    #[test]
    fn the_binary_export_reads_back_and_refuses_damage() {
        let c = Checkpoint {
            version: ModelVersion(7),
            round: RoundId(7),
            shape: ModelShape::new(3, 2).unwrap(),
            model: vec![1.0, -2.0, 3.5, 0.0, 1e-3, 42.0],
            strategy_state: None,
        };
        let bytes = export_binary(&c, "bpr-mf");
        assert_eq!(read_export(&bytes).unwrap(), (7, 3, 2, "bpr-mf".into(), c.model.clone()));
        for i in [0, 9, 17, 30, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(read_export(&bad).is_err(), "a flipped byte at {i} was accepted");
        }
        assert!(read_export(&bytes[..bytes.len() - 5]).is_err());
        assert!(read_export(b"STMODEL1").is_err());
    }
}
