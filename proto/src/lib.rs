//! The gRPC contract between the CNI plugins and `hostnic-ipamd`, and a unix-socket connector
//! for the daemon's own tonic clients. See `proto/ipam.proto`.

#![allow(missing_debug_implementations)] // generated code
#![allow(clippy::unwrap_used)] // generated code

pub mod v1 {
    tonic::include_proto!("hostnic.ipam.v1");
}

/// The `Nics` service of `proto/nics.proto`: QingCloud NICs leased to the `hostnic` plugin.
pub mod nics_v1 {
    tonic::include_proto!("hostnic.nics.v1");
}

/// Where the daemon listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/hostnic/ipamd.sock";

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to the daemon's unix socket within `connect_timeout`, for the daemon's own clients
/// (its tests, benches and operator tools; the plugins make their one call with
/// `hostnic_cni::grpc`). Fails at once (no retry) if nothing listens there. Calls carry their
/// own deadlines (`Request::set_timeout`).
pub async fn connect(
    socket: &Path,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.to_path_buf();
    // The URI is required by the HTTP/2 layer but never resolved: the connector below dials
    // the socket.
    Endpoint::from_static("http://hostnic-ipamd.local")
        .connect_timeout(connect_timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}
