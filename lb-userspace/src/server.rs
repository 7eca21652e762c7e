//! The control API: HTTP/JSON on a unix socket (root only, mode 0600; no
//! TCP control port). Each handler forwards its request to the state owner
//! and waits for the answer.

use std::{
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
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
/// (nobody listening) is replaced; a live one means another daemon runs;
/// anything else at the path (a file, a directory) is an error, left alone.
/// The returned guard removes the socket file when dropped, and the
/// directory too if this call created it and it is empty by then.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketGuard)> {
    let mut created_dir = None;
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            created_dir = Some(dir.to_path_buf());
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", dir.display()))?;
        }
    }
    // From here on, an early return removes what this call made.
    let mut guard = SocketGuard {
        path: None,
        created_dir,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // Only a socket is ever replaced: a mistyped --socket naming a
        // regular file (a configuration, say) must not delete it.
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it (choose another --socket)",
                path.display()
            );
        }
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
    guard.path = Some(path.to_path_buf());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok((listener, guard))
}

/// What `bind` made on disk: the socket file, and the directory if `bind`
/// created it. Dropping the guard removes them (the directory only if it
/// is empty: something else may have been put there since).
#[derive(Debug)]
pub struct SocketGuard {
    path: Option<PathBuf>,
    created_dir: Option<PathBuf>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
        if let Some(dir) = &self.created_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Serves the API until the task is dropped.
pub async fn serve(listener: UnixListener, tx: Tx, path: PathBuf) {
    if let Err(e) = axum::serve(listener, router(tx)).await {
        tracing::error!("control socket {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed at the end.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("xdplb-server-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn a_directory_bind_made_goes_with_the_socket() {
        let scratch = Scratch::new("made");
        let dir = scratch.0.join("run");
        let path = dir.join("xdplb.sock");
        let (_listener, guard) = bind(&path).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());
        drop(guard);
        assert!(!path.exists(), "socket left behind");
        assert!(!dir.exists(), "directory bind created left behind");
    }

    #[tokio::test]
    async fn an_existing_directory_stays_and_so_does_what_else_is_in_it() {
        let scratch = Scratch::new("existing");
        let path = scratch.0.join("xdplb.sock");
        let (_listener, guard) = bind(&path).unwrap();
        drop(guard);
        assert!(!path.exists(), "socket left behind");
        assert!(
            scratch.0.is_dir(),
            "a directory bind did not make was removed"
        );

        // A directory bind made but that holds something else by exit stays.
        let dir = scratch.0.join("run");
        let path = dir.join("xdplb.sock");
        let (_listener, guard) = bind(&path).unwrap();
        std::fs::write(dir.join("other"), b"x").unwrap();
        drop(guard);
        assert!(!path.exists(), "socket left behind");
        assert!(dir.join("other").exists(), "another file was removed");
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_and_kept_a_stale_one_replaced() {
        let scratch = Scratch::new("live");
        let path = scratch.0.join("xdplb.sock");
        let (first, first_guard) = bind(&path).unwrap();
        let err = bind(&path).unwrap_err().to_string();
        assert!(
            err.contains("another xdplb daemon is listening on"),
            "unexpected error: {err}"
        );
        // The refused bind must not remove the running daemon's socket.
        assert!(path.exists(), "the live socket was removed");
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());

        // A daemon killed with -9 leaves its socket file, nobody listening:
        // stale, replaced.
        drop(first);
        std::mem::forget(first_guard);
        let (_second, second_guard) = bind(&path).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        drop(second_guard);
        assert!(!path.exists());
    }

    /// A mistyped --socket naming a file or a directory: refused, and what
    /// is there stays as it was.
    #[tokio::test]
    async fn a_path_that_is_not_a_socket_is_refused_and_kept() {
        let scratch = Scratch::new("notsock");
        let file = scratch.0.join("xdplb.yaml");
        std::fs::write(&file, "interface: eth0\n").unwrap();
        let err = bind(&file).unwrap_err().to_string();
        assert!(
            err.contains("xdplb.yaml exists and is not a socket; refusing to replace it"),
            "unexpected error: {err}"
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "interface: eth0\n");

        let dir = scratch.0.join("sub");
        std::fs::create_dir(&dir).unwrap();
        let err = bind(&dir).unwrap_err().to_string();
        assert!(err.contains("is not a socket"), "unexpected error: {err}");
        assert!(dir.is_dir());
    }
}
