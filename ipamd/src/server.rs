//! Serving the plugin protocol on a unix socket that only root can put in place.
//!
//! The plugin runs as root and sends the pod's details to whatever answers at the socket path,
//! so the path must not be replaceable by anyone else:
//! - the socket's directory is owned by root and writable by nobody else, and every directory
//!   above it is owned by root and writable by nobody else unless sticky (like `/tmp`, where
//!   others may add entries but not rename ours); missing directories are created 0755
//!   whatever the umask;
//! - one daemon per socket: an exclusive `flock` on `<socket>.lock` is held for the daemon's
//!   life, taken before the socket is touched. A second daemon waits for it (a rolling update
//!   that starts the new daemon before the old one stops), then takes over;
//! - only a socket is ever removed at the path, and a stopping daemon removes it only while it
//!   is still the one it bound.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hostnic_proto::v1::ipam_server::IpamServer;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::service::Routes;

use crate::allocator::Allocator;
use crate::config::DEFAULT_SOCKET_WAIT;
use crate::one_call;
use crate::service::IpamService;

/// How long shutdown waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How long the daemon waits before it accepts again after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// How often a waiting daemon tries the lock again.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// Mode of the directories the daemon creates: others may reach the socket, not replace it.
const DIR_MODE: u32 = 0o755;

/// Why the daemon will not serve on a socket path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("creating socket directory {path} (mode 0755): {source}")]
    CreateDirectory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("inspecting {path}: {source}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "refusing to serve from socket directory {socket_dir}: {path} (mode {mode:04o}, owner uid \
         {uid}) {problem}, so another user could put their own socket in the daemon's place; make \
         it owned by root and writable only by root (chown root {path} && chmod go-w {path}) or \
         choose another --socket"
    )]
    UnsafeDirectory {
        socket_dir: PathBuf,
        path: PathBuf,
        mode: u32,
        uid: u32,
        problem: &'static str,
    },
    #[error(
        "{path} exists and is {kind}, not a socket: hostnic-ipamd only ever replaces a stale \
         socket; remove it yourself or choose another --socket"
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("opening lock file {path}: {source}")]
    OpenLock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("locking {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another hostnic-ipamd ({holder}) holds {lock} and serves {socket}; {waited}: stop that \
         daemon, or give this one another --socket"
    )]
    Busy {
        lock: PathBuf,
        socket: PathBuf,
        holder: String,
        waited: String,
    },
}

/// The exclusive right to serve one socket path, for as long as this value lives: the open
/// lock file, locked. Dropping it releases the lock.
#[derive(Debug)]
pub struct SocketLock {
    /// Never read: held open for the lock's life, since closing it releases the `flock`.
    _file: File,
    lock_path: PathBuf,
    socket: PathBuf,
}

impl SocketLock {
    /// Makes the socket's directory safe (creating it if needed), then takes the lock, waiting
    /// up to `wait` for another daemon holding it to stop. Cancel-safe: dropping the future
    /// stops the wait.
    pub async fn acquire(socket: &Path, wait: Duration) -> Result<SocketLock, SocketError> {
        let dir = socket_dir(socket);
        prepare_directory(&dir)?;
        // Fail at once, before any wait, on a path that can never be served.
        stale_socket(socket)?;
        let lock_path = sibling(socket, "lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|source| SocketError::OpenLock {
                path: lock_path.clone(),
                source,
            })?;
        let start = Instant::now();
        let mut told = false;
        while !try_lock_exclusive(&file).map_err(|source| SocketError::Lock {
            path: lock_path.clone(),
            source,
        })? {
            let holder = lock_holder(&lock_path);
            if start.elapsed() >= wait {
                return Err(SocketError::Busy {
                    lock: lock_path,
                    socket: socket.to_path_buf(),
                    holder,
                    waited: if wait.is_zero() {
                        "not waiting for it (--socket-wait-seconds 0)".to_owned()
                    } else {
                        format!("it did not stop within {wait:?}")
                    },
                });
            }
            if !told {
                tracing::warn!(
                    lock = %lock_path.display(),
                    socket = %socket.display(),
                    holder,
                    wait_seconds = wait.as_secs(),
                    "another hostnic-ipamd holds the socket's lock: waiting for it to stop"
                );
                told = true;
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
        if told {
            tracing::info!(waited = ?start.elapsed(), "the other hostnic-ipamd stopped: taking over");
        }
        // Who holds the lock, for the message of a daemon that waits for it. Best-effort.
        let pid = format!("{}\n", std::process::id());
        if let Err(e) = file
            .set_len(0)
            .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
        {
            tracing::debug!(lock = %lock_path.display(), error = %e, "could not record our PID");
        }
        Ok(SocketLock {
            _file: file,
            lock_path,
            socket: socket.to_path_buf(),
        })
    }

    /// The socket path this lock guards.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The lock file, `<socket>.lock`. It stays when the daemon stops: removing it would let a
    /// waiting daemon and a new one lock two different files.
    pub fn lock_path(&self) -> &Path {
        &self.lock_path
    }
}

/// Serves until `shutdown` completes, then removes the socket if it is still ours. Waits up to
/// [`DEFAULT_SOCKET_WAIT`] for another daemon on the same socket to stop first; see
/// [`serve_locked`] to choose the wait.
pub async fn serve(
    allocator: Arc<Allocator>,
    gc_grace: Duration,
    socket: &Path,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let lock = tokio::select! {
        lock = SocketLock::acquire(socket, DEFAULT_SOCKET_WAIT) => lock?,
        () = &mut shutdown => {
            tracing::info!(socket = %socket.display(), "stopped while waiting for the socket");
            return Ok(());
        }
    };
    serve_locked(lock, allocator, gc_grace, shutdown).await
}

/// Serves on the socket `lock` guards until `shutdown` completes; removes the socket if it is
/// still the one bound here, then releases the lock.
pub async fn serve_locked(
    lock: SocketLock,
    allocator: Arc<Allocator>,
    gc_grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_service(lock, IpamService::new(allocator, gc_grace), shutdown).await
}

/// [`serve_locked`] with a service built by the caller (with a pod cache, see
/// [`IpamService::with_pods`]).
pub async fn serve_service(
    lock: SocketLock,
    service: IpamService,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_with_nics(lock, service, None, shutdown).await
}

/// [`serve_service`], and the `Nics` service of QingCloud mode on the same socket when given.
/// A connection whose first read is a plugin's whole call is answered by [`one_call`]; every
/// other goes to tonic's HTTP/2 server.
pub async fn serve_with_nics(
    lock: SocketLock,
    service: IpamService,
    nics: Option<crate::nics::service::NicService>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let socket = lock.socket.clone();
    let (listener, bound) = bind(&socket)?;
    tracing::info!(socket = %socket.display(), node = service.node(), kubernetes = service.has_pods(), "serving");
    let mut routes = Routes::new(IpamServer::new(service));
    if let Some(nics) = nics {
        routes = routes.add_service(hostnic_proto::nics_v1::nics_server::NicsServer::new(nics));
    }
    // As tonic's server prepares the routes it is given.
    let routes = routes.prepare();
    let (stop, stopping) = watch::channel(false);
    // Connections for the HTTP/2 server. It stops when every sender has gone: the accept
    // loop's when it stops, a routed connection's once it is sent or answered here.
    let (to_server, incoming) = mpsc::channel(64);
    // Held by the accept loop and by each connection until it is answered or sent on: `recv`
    // ends once all have gone.
    let (answering, mut answered) = mpsc::channel::<()>(1);
    let accepting = tokio::spawn(accept(
        listener,
        routes.clone(),
        to_server,
        answering,
        stopping,
    ));
    let server = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            ReceiverStream::new(incoming).map(Ok::<_, io::Error>),
            std::future::pending(),
        );
    let served = async {
        let result = server.await;
        // The server also ends on its own error: the accept loop must stop then too.
        let _ = stop.send(true);
        let _ = accepting.await;
        answered.recv().await;
        result
    };
    // Requests in flight get a grace period; a client that keeps its connection open does not
    // hold the daemon up beyond it.
    let grace = async {
        shutdown.await;
        let _ = stop.send(true);
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        r = served => r.context("serving gRPC"),
        () = grace => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing");
            Ok(())
        }
    };
    remove_if_ours(&socket, bound);
    // Only now may another daemon bind the path.
    drop(lock);
    result
}

/// Accepts connections until `stopping` turns true, each routed by its first read.
async fn accept(
    listener: UnixListener,
    routes: Routes,
    to_server: mpsc::Sender<one_call::Replayed>,
    answering: mpsc::Sender<()>,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: try again shortly rather than spin.
                    tracing::debug!(error = %e, "accepting a connection");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            () = stopped(&mut stopping) => return,
        };
        tokio::spawn(route(
            stream,
            routes.clone(),
            to_server.clone(),
            answering.clone(),
            stopping.clone(),
        ));
    }
}

/// Completes once the daemon stops (or the sender is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// Reads a connection's first bytes: a one-call client's whole call is answered here, any
/// other connection goes to the HTTP/2 server with those bytes. A connection that has sent
/// nothing when the daemon stops is closed unserved.
async fn route(
    stream: UnixStream,
    routes: Routes,
    to_server: mpsc::Sender<one_call::Replayed>,
    answering: mpsc::Sender<()>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut first = vec![0u8; one_call::FIRST_READ];
    let n = loop {
        tokio::select! {
            ready = stream.readable() => if ready.is_err() { return },
            () = stopped(&mut stopping) => return,
        }
        match stream.try_read(&mut first) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    };
    if n == 0 {
        return;
    }
    match one_call::first_read(&first[..n]) {
        Some(call) => {
            drop(to_server);
            one_call::answer(stream, call, routes).await;
        }
        None => {
            drop(answering);
            let _ = to_server
                .send(one_call::Replayed::new(&first[..n], stream))
                .await;
        }
    }
}

/// Identity of a bound socket file: its device, inode and change time. The inode number alone
/// does not tell: a file created after ours was removed may be given the same one.
type SocketFile = (u64, u64, i64, i64);

fn socket_file(meta: &std::fs::Metadata) -> SocketFile {
    (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
}

/// Binds under a temporary name, sets 0600 and renames it into place, so that nobody ever
/// connects to a socket with the default mode and a stale socket is replaced atomically.
fn bind(socket: &Path) -> anyhow::Result<(UnixListener, SocketFile)> {
    if stale_socket(socket)? {
        tracing::info!(socket = %socket.display(), "replacing a stale socket (its daemon is gone: it held no lock)");
    }
    let staging = sibling(socket, "binding");
    if stale_socket(&staging)? {
        std::fs::remove_file(&staging)
            .with_context(|| format!("removing stale {}", staging.display()))?;
    }
    let listener =
        UnixListener::bind(&staging).with_context(|| format!("binding {}", staging.display()))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", staging.display()))?;
    std::fs::rename(&staging, socket)
        .with_context(|| format!("moving {} to {}", staging.display(), socket.display()))?;
    // After the rename, which sets the change time.
    let meta = std::fs::symlink_metadata(socket)
        .with_context(|| format!("inspecting {}", socket.display()))?;
    Ok((listener, socket_file(&meta)))
}

/// Removes `socket` if it is still the socket bound here; anything else at the path belongs to
/// someone else and stays.
fn remove_if_ours(socket: &Path, bound: SocketFile) {
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if socket_file(&meta) == bound => {
            if let Err(e) = std::fs::remove_file(socket) {
                tracing::warn!(socket = %socket.display(), error = %e, "could not remove socket");
            }
        }
        Ok(_) => tracing::warn!(
            socket = %socket.display(),
            "the socket was replaced by another process: left in place"
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::warn!(socket = %socket.display(), "the socket was already removed");
        }
        Err(e) => {
            tracing::warn!(socket = %socket.display(), error = %e, "could not inspect socket")
        }
    }
}

/// True if a socket is at `path` (to be replaced), false if nothing is; an error if anything
/// else is: a regular file, a directory or a symlink there is not ours to delete.
fn stale_socket(path: &Path) -> Result<bool, SocketError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(true),
        Ok(meta) => Err(SocketError::NotASocket {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(SocketError::Inspect {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "not a socket"
    }
}

/// The directory holding `socket` (`.` for a bare file name).
fn socket_dir(socket: &Path) -> PathBuf {
    match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `<socket>.<suffix>`, beside the socket.
fn sibling(socket: &Path, suffix: &str) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// Creates the missing directories of `dir` with mode 0755 (set explicitly: the umask does not
/// apply), then checks `dir` and every directory above it.
fn prepare_directory(dir: &Path) -> Result<(), SocketError> {
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(d) = cursor {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d);
        cursor = d.parent();
    }
    for d in missing.into_iter().rev() {
        let created = std::fs::DirBuilder::new().mode(DIR_MODE).create(d);
        match created {
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(DIR_MODE))
                .map_err(|source| SocketError::CreateDirectory {
                    path: d.to_path_buf(),
                    source,
                })?,
            // Made by someone else meanwhile: checked below like any existing directory.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(SocketError::CreateDirectory {
                    path: d.to_path_buf(),
                    source,
                })
            }
        }
    }
    check_directories(dir)
}

/// Checks the canonical `dir` and each directory above it (symbolic links resolved: a link in
/// a root-only directory cannot be changed by anyone else).
fn check_directories(dir: &Path) -> Result<(), SocketError> {
    let canonical = std::fs::canonicalize(dir).map_err(|source| SocketError::Inspect {
        path: dir.to_path_buf(),
        source,
    })?;
    for (i, path) in canonical.ancestors().enumerate() {
        let meta = std::fs::metadata(path).map_err(|source| SocketError::Inspect {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
                kind: kind_of(meta.file_type()),
            });
        }
        if let Some(problem) = directory_problem(meta.mode(), meta.uid(), i == 0) {
            return Err(SocketError::UnsafeDirectory {
                socket_dir: dir.to_path_buf(),
                path: path.to_path_buf(),
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                problem,
            });
        }
    }
    Ok(())
}

/// What makes a directory unsafe on the way to the socket, if anything. `holds_socket`: the
/// socket's own directory, where even a sticky bit is not enough (anyone could create the
/// socket's name before the daemon does).
fn directory_problem(mode: u32, uid: u32, holds_socket: bool) -> Option<&'static str> {
    let writable_by_others = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    if uid != 0 {
        Some("is not owned by root")
    } else if writable_by_others && holds_socket {
        Some("is writable by group or others")
    } else if writable_by_others && !sticky {
        Some("is writable by group or others without the sticky bit")
    } else {
        None
    }
}

/// Who holds the lock, as the lock file says (the PID as that daemon's PID namespace sees it).
fn lock_holder(lock: &Path) -> String {
    std::fs::read_to_string(lock)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .map_or_else(|| "PID not recorded".to_owned(), |pid| format!("PID {pid}"))
}

/// `flock(LOCK_EX | LOCK_NB)`: true when taken, false while another open file holds it. The
/// lock goes with the open file: it is released when the daemon exits, however it exits.
#[allow(unsafe_code)] // flock(2): std's File::try_lock needs Rust 1.89, newer than our MSRV
fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock only reads the descriptor, which `file` keeps open during the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_owned_directories_that_others_cannot_write_are_safe() {
        assert_eq!(directory_problem(0o40755, 0, true), None);
        assert_eq!(directory_problem(0o40700, 0, true), None);
        assert_eq!(
            directory_problem(0o40755, 1000, true),
            Some("is not owned by root")
        );
        assert_eq!(
            directory_problem(0o40775, 0, true),
            Some("is writable by group or others")
        );
        assert_eq!(
            directory_problem(0o41777, 0, true),
            Some("is writable by group or others")
        );
        // Above the socket's directory a sticky bit protects our entry, as in /tmp.
        assert_eq!(directory_problem(0o41777, 0, false), None);
        assert_eq!(
            directory_problem(0o40777, 0, false),
            Some("is writable by group or others without the sticky bit")
        );
    }

    #[test]
    fn lock_and_staging_paths_sit_beside_the_socket() {
        let s = Path::new("/run/hostnic/ipamd.sock");
        assert_eq!(
            sibling(s, "lock"),
            Path::new("/run/hostnic/ipamd.sock.lock")
        );
        assert_eq!(socket_dir(s), Path::new("/run/hostnic"));
        assert_eq!(socket_dir(Path::new("ipamd.sock")), Path::new("."));
    }

    #[test]
    fn only_a_socket_counts_as_stale() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("file");
        std::fs::write(&file, "keep").expect("write");
        let e = stale_socket(&file).expect_err("a file is not stale");
        assert!(
            e.to_string().contains("is a regular file, not a socket"),
            "{e}"
        );
        assert!(!stale_socket(&dir.path().join("absent")).expect("absent"));
        let sock = dir.path().join("sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert!(stale_socket(&sock).expect("socket"));
        let e = stale_socket(dir.path()).expect_err("a directory is not stale");
        assert!(e.to_string().contains("is a directory"), "{e}");
    }

    #[tokio::test]
    async fn a_held_lock_is_refused_naming_its_holder_and_free_again_once_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let owner = std::fs::metadata(dir.path()).expect("temp dir").uid();
        if owner != 0 {
            eprintln!("SKIPPED socket lock test: the temp dir is not root's (uid {owner})");
            return;
        }
        let socket = dir.path().join("run/ipamd.sock");
        let held = SocketLock::acquire(&socket, Duration::ZERO)
            .await
            .expect("free lock");
        assert_eq!(held.lock_path(), sibling(&socket, "lock"));
        let e = SocketLock::acquire(&socket, Duration::ZERO)
            .await
            .expect_err("held")
            .to_string();
        assert_eq!(
            e,
            format!(
                "another hostnic-ipamd (PID {}) holds {} and serves {}; not waiting for it \
                 (--socket-wait-seconds 0): stop that daemon, or give this one another --socket",
                std::process::id(),
                held.lock_path().display(),
                socket.display()
            )
        );
        let e = SocketLock::acquire(&socket, Duration::from_millis(250))
            .await
            .expect_err("still held")
            .to_string();
        assert!(e.contains("it did not stop within 250ms"), "{e}");
        drop(held);
        SocketLock::acquire(&socket, Duration::ZERO)
            .await
            .expect("free again");
    }
}
