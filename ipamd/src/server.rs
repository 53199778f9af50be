//! Serving the plugin protocol on a unix socket: mode 0600, stale socket replaced, socket
//! removed on shutdown.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use hostnic_proto::v1::ipam_server::IpamServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::allocator::Allocator;
use crate::service::IpamService;

/// How long shutdown waits for requests in flight.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves until `shutdown` completes, then removes the socket.
pub async fn serve(
    allocator: Arc<Allocator>,
    gc_grace: std::time::Duration,
    socket: &Path,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => tracing::info!(socket = %socket.display(), "removed stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", socket.display()))
        }
    }
    // Bound under a temporary name and renamed once it is 0600: nobody ever connects to a
    // socket with the default mode.
    let staging = socket.with_extension("binding");
    let _ = std::fs::remove_file(&staging);
    let listener =
        UnixListener::bind(&staging).with_context(|| format!("binding {}", staging.display()))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", staging.display()))?;
    std::fs::rename(&staging, socket)
        .with_context(|| format!("moving {} to {}", staging.display(), socket.display()))?;
    tracing::info!(socket = %socket.display(), node = allocator.node(), "serving");
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = stopping.send(());
    };
    let server = tonic::transport::Server::builder()
        .add_service(IpamServer::new(IpamService::new(allocator, gc_grace)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal);
    // Requests in flight get a grace period; a client that keeps its connection open does not
    // hold the daemon up beyond it.
    let grace = async {
        if stopped.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        r = server => r.context("serving gRPC"),
        () = grace => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing");
            Ok(())
        }
    };
    if let Err(e) = std::fs::remove_file(socket) {
        tracing::warn!(socket = %socket.display(), error = %e, "could not remove socket");
    }
    result
}
