//! The control API: HTTP/JSON on a unix socket (root only, mode 0600; no
//! TCP control port). Each handler forwards its request to the state owner
//! and waits for the answer.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use axum::{
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::Value;
use tokio::{
    net::UnixListener,
    sync::{mpsc, oneshot},
};

use crate::{
    api::{ApiError, BackendAdd, BackendRef, VipAdd, WeightChange},
    daemon::{Event, Failure, Request},
};

type Tx = mpsc::UnboundedSender<Event>;

struct ApiResponse(Result<Value, Failure>);

impl IntoResponse for ApiResponse {
    fn into_response(self) -> Response {
        match self.0 {
            Ok(v) => (StatusCode::OK, Json(v)).into_response(),
            Err(f) => (
                StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                Json(ApiError { error: f.message }),
            )
                .into_response(),
        }
    }
}

async fn ask(tx: &Tx, req: Request) -> ApiResponse {
    let (reply, rx) = oneshot::channel();
    if tx.send(Event::Api(req, reply)).is_err() {
        return ApiResponse(Err(Failure {
            status: 503,
            message: "the daemon is shutting down".into(),
        }));
    }
    ApiResponse(rx.await.unwrap_or_else(|_| {
        Err(Failure {
            status: 503,
            message: "the daemon is shutting down".into(),
        })
    }))
}

#[derive(Deserialize)]
struct VipQuery {
    vip: Option<String>,
}

#[derive(Deserialize)]
struct VipDel {
    vip: String,
}

#[derive(Deserialize, Default)]
struct ReloadBody {
    #[serde(default)]
    discard_runtime_changes: bool,
}

pub fn router(tx: Tx) -> Router {
    Router::new()
        .route(
            "/v1/status",
            get(|State(tx): State<Tx>| async move { ask(&tx, Request::Status).await }),
        )
        .route(
            "/v1/stats",
            get(|State(tx): State<Tx>| async move { ask(&tx, Request::Stats).await }),
        )
        .route(
            "/v1/vips",
            get(|State(tx): State<Tx>| async move { ask(&tx, Request::Vips).await }).post(
                |State(tx): State<Tx>, Json(b): Json<VipAdd>| async move {
                    ask(&tx, Request::VipAdd(b)).await
                },
            ),
        )
        .route(
            "/v1/vips/delete",
            post(|State(tx): State<Tx>, Json(b): Json<VipDel>| async move {
                ask(&tx, Request::VipDel { vip: b.vip }).await
            }),
        )
        .route(
            "/v1/backends",
            get(
                |State(tx): State<Tx>, Query(q): Query<VipQuery>| async move {
                    ask(&tx, Request::Backends { vip: q.vip }).await
                },
            )
            .post(
                |State(tx): State<Tx>, Json(b): Json<BackendAdd>| async move {
                    ask(&tx, Request::BackendAdd(b)).await
                },
            ),
        )
        .route(
            "/v1/backends/delete",
            post(
                |State(tx): State<Tx>, Json(b): Json<BackendRef>| async move {
                    ask(&tx, Request::BackendDel(b)).await
                },
            ),
        )
        .route(
            "/v1/backends/weight",
            post(
                |State(tx): State<Tx>, Json(b): Json<WeightChange>| async move {
                    ask(&tx, Request::Weight(b)).await
                },
            ),
        )
        .route(
            "/v1/backends/drain",
            post(
                |State(tx): State<Tx>, Json(b): Json<BackendRef>| async move {
                    ask(&tx, Request::Drain(b)).await
                },
            ),
        )
        .route(
            "/v1/backends/undrain",
            post(
                |State(tx): State<Tx>, Json(b): Json<BackendRef>| async move {
                    ask(&tx, Request::Undrain(b)).await
                },
            ),
        )
        .route(
            "/v1/config",
            get(|State(tx): State<Tx>| async move { ask(&tx, Request::Config).await }),
        )
        .route(
            "/v1/reload",
            post(
                |State(tx): State<Tx>, body: Option<Json<ReloadBody>>| async move {
                    let b = body.map(|Json(b)| b).unwrap_or_default();
                    ask(
                        &tx,
                        Request::Reload {
                            discard_runtime_changes: b.discard_runtime_changes,
                        },
                    )
                    .await
                },
            ),
        )
        .with_state(tx)
}

/// Binds the control socket: its directory is created mode 0700, the socket
/// mode 0600, both owned by the daemon's user (root). A stale socket file
/// (nobody listening) is replaced; a live one means another daemon runs.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", dir.display()))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another xdplb daemon is listening on {}; stop it or use --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// Serves the API until the task is dropped.
pub async fn serve(listener: UnixListener, tx: Tx, path: PathBuf) {
    if let Err(e) = axum::serve(listener, router(tx)).await {
        tracing::error!("control socket {}: {e}", path.display());
    }
}
