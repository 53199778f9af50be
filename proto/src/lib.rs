//! The gRPC contract between the CNI plugins and `hostnic-ipamd`, and the unix-socket
//! connector both sides use. See `proto/ipam.proto`.

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

/// Connects to the daemon's unix socket within `connect_timeout`. Fails at once (no retry) if
/// nothing listens there: a plugin must answer "try again later" quickly rather than hang the
/// runtime. Calls carry their own deadlines (`Request::set_timeout`).
pub async fn connect(
    socket: &Path,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    connect_checked(socket, connect_timeout, false).await
}

/// [`connect`], and the process listening on the socket must run as root, or the connection
/// is dropped before a byte of the request is sent.
///
/// The plugin sends a pod's details and trusts the addresses it gets back, so it talks only to
/// the root daemon. Checking the socket file's owner before connecting leaves a window in which
/// a user who can write the socket's directory swaps the file; the listener's credentials
/// (`SO_PEERCRED`, taken by the kernel when the listener was set up) are read on the connection
/// itself and cannot be swapped. The failure's cause chain holds an [`UntrustedPeer`].
pub async fn connect_to_root(
    socket: &Path,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    connect_checked(socket, connect_timeout, true).await
}

/// The process listening on the daemon's socket does not run as root (see [`connect_to_root`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UntrustedPeer {
    /// The listener's uid.
    pub uid: u32,
}

impl std::fmt::Display for UntrustedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the process listening on the socket runs as uid {}, not root",
            self.uid
        )
    }
}

impl std::error::Error for UntrustedPeer {}

async fn connect_checked(
    socket: &Path,
    connect_timeout: Duration,
    require_root: bool,
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
                if require_root {
                    let uid = stream.peer_cred()?.uid();
                    if uid != 0 {
                        return Err(std::io::Error::other(UntrustedPeer { uid }));
                    }
                }
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The `UntrustedPeer` in `err`'s cause chain, if any.
    fn untrusted_peer(err: &tonic::transport::Error) -> Option<UntrustedPeer> {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(cause) = source {
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                if let Some(peer) = io.get_ref().and_then(|e| e.downcast_ref::<UntrustedPeer>()) {
                    return Some(*peer);
                }
            }
            source = cause.source();
        }
        None
    }

    #[test]
    fn connect_to_root_accepts_a_listener_running_as_root() {
        let dir = ScratchDir::new();
        let probe = dir.join("probe");
        std::fs::write(&probe, b"").unwrap();
        if std::fs::metadata(&probe).unwrap().uid() != 0 {
            eprintln!("SKIPPED connect_to_root test: not root");
            return;
        }
        let socket = dir.join("root.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        runtime()
            .block_on(connect_to_root(&socket, Duration::from_secs(1)))
            .unwrap();
    }

    /// A socket served by a process running as uid 65534 (perl, from perl-base, listening in a
    /// directory that user may write): `connect` reaches it, `connect_to_root` refuses it.
    #[test]
    fn connect_to_root_refuses_a_listener_running_as_another_user() {
        use std::os::unix::process::CommandExt;
        let dir = ScratchDir::new();
        let probe = dir.join("probe");
        std::fs::write(&probe, b"").unwrap();
        if std::fs::metadata(&probe).unwrap().uid() != 0 {
            eprintln!("SKIPPED untrusted-peer test: needs root to run a listener as uid 65534");
            return;
        }
        if !Path::new("/usr/bin/perl").exists() {
            eprintln!("SKIPPED untrusted-peer test: /usr/bin/perl is missing");
            return;
        }
        std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let socket = dir.join("planted.sock");
        let mut child = std::process::Command::new("/usr/bin/perl")
            .args([
                "-MIO::Socket::UNIX",
                "-e",
                "my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => $ARGV[0], \
                 Listen => 5) or die \"listen: $!\"; sleep 30;",
            ])
            .arg(&socket)
            .uid(65534)
            .gid(65534)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !socket.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let runtime = runtime();
        let plain = runtime.block_on(connect(&socket, Duration::from_secs(1)));
        let checked = runtime.block_on(connect_to_root(&socket, Duration::from_secs(1)));
        let _ = child.kill();
        let _ = child.wait();
        assert!(plain.is_ok(), "the listener is up: {plain:?}");
        let err = checked.unwrap_err();
        assert_eq!(untrusted_peer(&err), Some(UntrustedPeer { uid: 65534 }));
    }

    /// A fresh directory under the system temp dir, removed on drop, failed test or not (proto
    /// has no tempfile dependency).
    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "hostnic-proto-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir(&dir).unwrap();
            ScratchDir(dir)
        }
    }

    impl std::ops::Deref for ScratchDir {
        type Target = Path;

        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
