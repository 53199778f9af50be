//! One unary gRPC call to the node daemon over its unix socket: connect, send the request, read
//! the answer, close. Blocking I/O on one thread and no async runtime: a plugin is exec'd for
//! this one call, and an HTTP/2 stack built for long-lived connections (a runtime, a connection
//! task, a request buffer) cost it more CPU than the call itself.
//!
//! The exchange, [gRPC over HTTP/2] with prior knowledge:
//! 1. [`connect`]: the socket, within a timeout, and only to a listener running as root.
//! 2. One write: the connection preface, this side's SETTINGS (no push; windows large enough
//!    that the answer never waits for a WINDOW_UPDATE), the request HEADERS (HPACK literals,
//!    with [`ONE_CALL`]), and as much of the length-prefixed message as the server's initial
//!    windows allow.
//! 3. Reads until the response stream ends, answering SETTINGS and PING, sending the rest of a
//!    large request as WINDOW_UPDATEs open the windows; `grpc-status` and `grpc-message` (from
//!    the trailers, or a trailers-only response) decide the outcome.
//!
//! Failures are [`CallFailure`]s: nothing received before the connection broke, a GOAWAY
//! that excludes the stream or a REFUSED_STREAM is [`ConnectFailure::Dropped`] (the daemon
//! did not serve the call); a break after that is [`CallFailure::Broken`]; no answer within the
//! deadline is `DeadlineExceeded`; a status the daemon sent is [`CallFailure::Status`].
//!
//! [gRPC over HTTP/2]: https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use prost::Message;
use tonic::{Code, Status};

use crate::error::error_chain;
use crate::hpack;

/// Why a call to the daemon did not succeed.
#[derive(Debug)]
pub enum CallFailure {
    /// No connection was made: see [`ConnectFailure`].
    Connect(ConnectFailure),
    /// The connection broke during the call, after the daemon had started serving it: the
    /// daemon died, restarted, closed or reset it, or broke HTTP/2. The text says which, each
    /// cause once. Never the daemon's answer.
    Broken(String),
    /// The call ended with a status: the daemon's, or the one for an expired deadline.
    Status(tonic::Status),
}

/// Why the plugin did not connect to the daemon's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing at the path (`ENOENT`, `ENOTDIR`): the daemon is not running.
    NoSocket,
    /// A socket file nobody listens on (`ECONNREFUSED`): the daemon stopped without removing
    /// it, or is starting.
    Refused,
    /// `EACCES`/`EPERM`: the socket is 0600 root, so the plugin is not running as root.
    PermissionDenied,
    /// The file failed [`crate::plugin::check_socket`], or the process listening on it is not
    /// root ([`connect`]): the reason names its kind or owner.
    Untrusted(String),
    /// No connection within the connect timeout.
    TimedOut,
    /// The connection was reset, aborted or closed before the daemon served it (`ECONNRESET`,
    /// `ECONNABORTED`, `EPIPE`, or a GOAWAY or REFUSED_STREAM that leaves the call unserved): a
    /// daemon that stops drops the connections it has not accepted.
    Dropped,
    /// Anything else: the cause chain, each cause once.
    Other(String),
}

impl ConnectFailure {
    /// The failure for an I/O error from `stat` or `connect` on the socket.
    pub fn from_io(err: &std::io::Error) -> Self {
        match err.kind() {
            ErrorKind::NotFound | ErrorKind::NotADirectory => ConnectFailure::NoSocket,
            ErrorKind::ConnectionRefused => ConnectFailure::Refused,
            ErrorKind::PermissionDenied => ConnectFailure::PermissionDenied,
            ErrorKind::TimedOut => ConnectFailure::TimedOut,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                ConnectFailure::Dropped
            }
            _ => ConnectFailure::Other(error_chain(err)),
        }
    }
}

impl CallFailure {
    /// Whether the daemon may be restarting: no socket, a socket nobody listens on, or a
    /// connection that broke before the answer (a daemon stopping drops connections it has not
    /// accepted yet). Trying again is safe for every command: ADD, DEL, CHECK and GC are
    /// idempotent for their attachment, so a call the old daemon did carry out is answered the
    /// same by the new one.
    pub fn daemon_may_be_restarting(&self) -> bool {
        matches!(
            self,
            CallFailure::Connect(
                ConnectFailure::NoSocket | ConnectFailure::Refused | ConnectFailure::Dropped
            ) | CallFailure::Broken(_)
        )
    }
}

/// Connects to `socket` within `timeout` and checks that the listener runs as root (its
/// `SO_PEERCRED`), before anything is sent: no swap of the socket file can fake that. A full
/// accept queue makes `connect` wait; `SO_SNDTIMEO` bounds the wait.
pub fn connect(socket: &Path, timeout: Duration) -> Result<UnixStream, ConnectFailure> {
    use rustix::net::{sockopt, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let io = |e: rustix::io::Errno| ConnectFailure::from_io(&std::io::Error::from(e));
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(io)?;
    let addr = SocketAddrUnix::new(socket).map_err(io)?;
    let give_up = Instant::now() + timeout;
    loop {
        let left = give_up
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
            .ok_or(ConnectFailure::TimedOut)?;
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(left)).map_err(io)?;
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            // A wait for room in the accept queue, interrupted (a stop and continue of the
            // plugin): the connection was not made, so it is tried again.
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => return Err(ConnectFailure::TimedOut),
            Err(e) => return Err(io(e)),
        }
    }
    let uid = sockopt::socket_peercred(&fd).map_err(io)?.uid;
    if !uid.is_root() {
        return Err(ConnectFailure::Untrusted(format!(
            "the process listening on the socket runs as uid {}, not root",
            uid.as_raw()
        )));
    }
    Ok(UnixStream::from(fd))
}

/// Calls `method` (`/package.Service/Method`) on the daemon at `socket` with `request`; gives up
/// after `connect_timeout` without a connection and after `deadline` without an answer. What
/// is left of the deadline once connected is sent as `grpc-timeout`.
pub fn unary<Req: Message, Reply: Message + Default>(
    socket: &Path,
    method: &str,
    request: &Req,
    connect_timeout: Duration,
    deadline: Duration,
) -> Result<Reply, CallFailure> {
    let give_up = Instant::now() + deadline;
    let mut stream = connect(socket, connect_timeout).map_err(CallFailure::Connect)?;
    let len = request.encoded_len();
    let mut message = Vec::with_capacity(5 + len);
    message.push(0); // not compressed
    message.extend_from_slice(&(len as u32).to_be_bytes());
    request
        .encode(&mut message)
        .map_err(|e| CallFailure::Status(Status::internal(format!("encoding the request: {e}"))))?;
    let mut call = Exchange::new(method, &message, deadline);
    // The daemon's deadline is what is left of the plugin's once connected.
    let mut out = call.start(remaining(give_up, deadline)?);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Once the answer is in, what the server asked for (a SETTINGS or PING acknowledgement)
        // is not sent: the connection closes.
        if let Some(answer) = call.answer() {
            return answer.and_then(|reply| {
                Reply::decode(reply.as_slice()).map_err(|e| {
                    CallFailure::Status(Status::internal(format!(
                        "the daemon's answer does not decode: {e}"
                    )))
                })
            });
        }
        write_before(&mut stream, &out, give_up, &call)?;
        out.clear();
        stream
            .set_read_timeout(Some(remaining(give_up, deadline)?))
            .map_err(|e| call.io_failure(&e))?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(call.io_failure(&e)),
        };
        if n == 0 {
            return Err(call.closed());
        }
        call.receive(&buf[..n], &mut out)?;
    }
}

/// Writes all of `bytes`, each write bounded by the time left before `give_up`.
fn write_before(
    stream: &mut UnixStream,
    mut bytes: &[u8],
    give_up: Instant,
    call: &Exchange,
) -> Result<(), CallFailure> {
    while !bytes.is_empty() {
        stream
            .set_write_timeout(Some(remaining(give_up, call.deadline)?))
            .map_err(|e| call.io_failure(&e))?;
        match stream.write(bytes) {
            Ok(0) => return Err(call.closed()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(call.io_failure(&e)),
        }
    }
    Ok(())
}

fn remaining(give_up: Instant, deadline: Duration) -> Result<Duration, CallFailure> {
    match give_up.checked_duration_since(Instant::now()) {
        Some(left) if !left.is_zero() => Ok(left),
        _ => Err(no_reply(deadline)),
    }
}

fn no_reply(deadline: Duration) -> CallFailure {
    CallFailure::Status(Status::deadline_exceeded(format!(
        "no reply within {} s",
        deadline.as_secs()
    )))
}

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The request field by which a client says that its connection carries this one call, so
/// that the daemon may answer it in one write that ends with a GOAWAY (`hostnic-ipamd`'s
/// `one_call`).
pub const ONE_CALL: (&str, &str) = ("hostnic-one-call", "1");
/// The one stream of the connection: the first a client may open.
pub const STREAM: u32 = 1;
/// HTTP/2's initial window and the smallest maximum frame size a peer may set.
pub const INITIAL_WINDOW: i64 = 65_535;
pub const MAX_FRAME: usize = 16_384;
/// The largest window HTTP/2 allows. This side opens its windows to it, so the answer never
/// waits for one.
pub const MAX_WINDOW: u32 = 0x7fff_ffff;
/// The most this side reads: an answer's messages (tonic's default limit) and one header block.
const MAX_ANSWER: usize = 4 << 20;
const MAX_HEADER_BLOCK: usize = 64 << 10;

/// Frame types, flags, settings and error codes (RFC 9113, 6 and 7).
pub mod frame {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;

    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;

    pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
    pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

    pub const NO_ERROR: u32 = 0x0;
    pub const REFUSED_STREAM: u32 = 0x7;
}

/// A call's first write up to its DATA: the preface, this side's SETTINGS (no push, the
/// largest stream window), a WINDOW_UPDATE to the largest connection window, and `fields` in
/// one HEADERS frame on the call's stream.
pub fn opening(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(PREFACE);
    let mut settings = Vec::with_capacity(12);
    for (id, value) in [
        (frame::SETTINGS_ENABLE_PUSH, 0),
        (frame::SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW),
    ] {
        settings.extend_from_slice(&id.to_be_bytes());
        settings.extend_from_slice(&value.to_be_bytes());
    }
    put_frame(&mut out, frame::SETTINGS, 0, 0, &settings);
    let increment = MAX_WINDOW - INITIAL_WINDOW as u32;
    put_frame(
        &mut out,
        frame::WINDOW_UPDATE,
        0,
        0,
        &increment.to_be_bytes(),
    );
    let mut block = Vec::with_capacity(128);
    hpack::encode(fields, &mut block);
    put_frame(&mut out, frame::HEADERS, frame::END_HEADERS, STREAM, &block);
    out
}

/// The big-endian 32-bit word at `at` in a payload whose length was checked.
pub fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// A frame's 9-byte header (RFC 9113, 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// The payload's length.
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    /// The stream, without the reserved bit.
    pub stream: u32,
}

impl FrameHead {
    /// The header at the start of `bytes`, if all nine bytes are there.
    pub fn parse(bytes: &[u8]) -> Option<FrameHead> {
        let head = bytes.get(..9)?;
        Some(FrameHead {
            len: usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]),
            kind: head[3],
            flags: head[4],
            stream: word(head, 5) & 0x7fff_ffff,
        })
    }
}

/// The whole frames at the start of some bytes, in order, each as its header and payload. Ends
/// at the first frame that is not all there; [`Frames::rest`] is what is left.
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    rest: &'a [u8],
}

impl<'a> Frames<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Frames { rest: bytes }
    }

    /// The bytes after the frames returned so far.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = (FrameHead, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let head = FrameHead::parse(self.rest)?;
        let payload = self.rest.get(9..9 + head.len)?;
        self.rest = &self.rest[9 + head.len..];
        Some((head, payload))
    }
}

/// Appends one frame: its 9-byte header, then `payload`.
pub fn put_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// The client side of one call's HTTP/2 connection, without the socket: bytes in, bytes out.
#[derive(Debug)]
struct Exchange<'a> {
    method: &'a str,
    deadline: Duration,
    /// The length-prefixed request message not sent yet.
    unsent: &'a [u8],
    /// What the server's flow control lets this side send now.
    connection_window: i64,
    stream_window: i64,
    peer_initial_window: i64,
    decoder: hpack::Decoder,
    /// Bytes received and not yet parsed into a frame.
    pending: Vec<u8>,
    received_any: bool,
    /// A header block waiting for its CONTINUATION frames, and whether it ends the stream.
    block: Option<(Vec<u8>, bool)>,
    headers: Option<Vec<hpack::Field>>,
    body: Vec<u8>,
    outcome: Option<Result<Vec<u8>, CallFailure>>,
}

impl<'a> Exchange<'a> {
    fn new(method: &'a str, message: &'a [u8], deadline: Duration) -> Self {
        Exchange {
            method,
            deadline,
            unsent: message,
            connection_window: INITIAL_WINDOW,
            stream_window: INITIAL_WINDOW,
            peer_initial_window: INITIAL_WINDOW,
            decoder: hpack::Decoder::default(),
            pending: Vec::new(),
            received_any: false,
            block: None,
            headers: None,
            body: Vec::new(),
            outcome: None,
        }
    }

    /// Everything the client sends before it reads; `timeout` goes to the daemon as
    /// `grpc-timeout`.
    fn start(&mut self, timeout: Duration) -> Vec<u8> {
        let timeout = format!("{}m", timeout.as_millis().clamp(1, 99_999_999));
        let mut out = opening(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", self.method),
            (":authority", "hostnic-ipamd"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", &timeout),
            ONE_CALL,
        ]);
        self.send_data(&mut out);
        out
    }

    /// Appends DATA frames for as much of the request as the windows allow.
    fn send_data(&mut self, out: &mut Vec<u8>) {
        while !self.unsent.is_empty() {
            let window = self.connection_window.min(self.stream_window);
            let n = self.unsent.len().min(MAX_FRAME).min(window.max(0) as usize);
            if n == 0 {
                return;
            }
            let (chunk, rest) = self.unsent.split_at(n);
            let flags = if rest.is_empty() {
                frame::END_STREAM
            } else {
                0
            };
            put_frame(out, frame::DATA, flags, STREAM, chunk);
            self.unsent = rest;
            self.connection_window -= n as i64;
            self.stream_window -= n as i64;
        }
    }

    /// The call's outcome once the response stream has ended or failed.
    fn answer(&mut self) -> Option<Result<Vec<u8>, CallFailure>> {
        self.outcome.take()
    }

    /// Parses `bytes` from the server; what must be sent back goes to `out`.
    fn receive(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), CallFailure> {
        self.received_any = true;
        // Taken out while its frames are handled, which need `self`.
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(bytes);
        let mut at = 0;
        while self.outcome.is_none() {
            let Some(FrameHead {
                len,
                kind,
                flags,
                stream,
            }) = FrameHead::parse(&pending[at..])
            else {
                break;
            };
            if len > MAX_FRAME {
                return Err(protocol_error(&format!(
                    "a frame of {len} bytes, above the {MAX_FRAME} this side allows"
                )));
            }
            if pending.len() - at - 9 < len {
                break;
            }
            let payload = &pending[at + 9..at + 9 + len];
            at += 9 + len;
            self.on_frame(kind, flags, stream, payload, out)?;
        }
        pending.drain(..at);
        self.pending = pending;
        self.send_data(out);
        Ok(())
    }

    fn on_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CallFailure> {
        if self.block.is_some() && kind != frame::CONTINUATION {
            return Err(protocol_error("a header block was interrupted"));
        }
        let length_ok = match kind {
            frame::RST_STREAM | frame::WINDOW_UPDATE => payload.len() == 4,
            frame::PING => payload.len() == 8,
            frame::SETTINGS => payload.len().is_multiple_of(6),
            frame::GOAWAY => payload.len() >= 8,
            _ => true,
        };
        if !length_ok {
            return Err(protocol_error(&format!(
                "a frame of type {kind} with a {}-byte payload",
                payload.len()
            )));
        }
        match kind {
            frame::SETTINGS if flags & frame::ACK == 0 => {
                for setting in payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([setting[0], setting[1]]);
                    let value = word(setting, 2);
                    if id == frame::SETTINGS_INITIAL_WINDOW_SIZE {
                        if value > MAX_WINDOW {
                            return Err(protocol_error("an initial window above 2^31-1"));
                        }
                        self.stream_window += i64::from(value) - self.peer_initial_window;
                        self.peer_initial_window = i64::from(value);
                    }
                }
                put_frame(out, frame::SETTINGS, frame::ACK, 0, &[]);
            }
            frame::PING if flags & frame::ACK == 0 => {
                put_frame(out, frame::PING, frame::ACK, 0, payload);
            }
            frame::WINDOW_UPDATE => {
                let increment = i64::from(word(payload, 0) & 0x7fff_ffff);
                if increment == 0 {
                    return Err(protocol_error("a WINDOW_UPDATE of 0"));
                }
                if stream == 0 {
                    self.connection_window += increment;
                } else if stream == STREAM {
                    self.stream_window += increment;
                }
            }
            frame::GOAWAY => {
                let (last, code) = (word(payload, 0) & 0x7fff_ffff, word(payload, 4));
                if code != frame::NO_ERROR {
                    self.outcome = Some(Err(CallFailure::Broken(format!(
                        "the daemon closed the connection (HTTP/2 error {code})"
                    ))));
                } else if last < STREAM {
                    self.outcome = Some(Err(CallFailure::Connect(ConnectFailure::Dropped)));
                }
                // Otherwise the stream is still served (a graceful shutdown); the answer, or
                // the close, follows.
            }
            frame::RST_STREAM if stream == STREAM => {
                let code = word(payload, 0);
                self.outcome = Some(Err(if code == frame::REFUSED_STREAM {
                    CallFailure::Connect(ConnectFailure::Dropped)
                } else {
                    CallFailure::Broken(format!("the daemon reset the call (HTTP/2 error {code})"))
                }));
            }
            frame::DATA if stream == STREAM => {
                self.body.extend_from_slice(unpadded(flags, payload)?);
                if self.body.len() > MAX_ANSWER {
                    return Err(protocol_error("an answer above 4 MiB"));
                }
                if flags & frame::END_STREAM != 0 {
                    self.finish();
                }
            }
            frame::HEADERS if stream == STREAM => {
                let mut fragment = unpadded(flags, payload)?;
                if flags & frame::PRIORITY != 0 {
                    fragment = fragment
                        .get(5..)
                        .ok_or_else(|| protocol_error("a HEADERS frame is too short"))?;
                }
                self.block = Some((fragment.to_vec(), flags & frame::END_STREAM != 0));
                if flags & frame::END_HEADERS != 0 {
                    self.end_block()?;
                }
            }
            frame::CONTINUATION if stream == STREAM => {
                let (block, _) = self
                    .block
                    .as_mut()
                    .ok_or_else(|| protocol_error("a CONTINUATION frame without HEADERS"))?;
                block.extend_from_slice(payload);
                if block.len() > MAX_HEADER_BLOCK {
                    return Err(protocol_error("a header block above 64 KiB"));
                }
                if flags & frame::END_HEADERS != 0 {
                    self.end_block()?;
                }
            }
            // A header block on another stream (a push, which this side disabled) would have to be
            // decoded to keep the HPACK table in step: the server broke the protocol.
            frame::HEADERS | frame::CONTINUATION | frame::PUSH_PROMISE => {
                return Err(protocol_error(
                    "a header block on a stream this side did not open",
                ));
            }
            // SETTINGS and PING acknowledgements, other frames for other streams, unknown types.
            _ => {}
        }
        Ok(())
    }

    fn end_block(&mut self) -> Result<(), CallFailure> {
        let Some((block, ends_stream)) = self.block.take() else {
            return Ok(());
        };
        let fields = self
            .decoder
            .decode(&block)
            .map_err(|e| protocol_error(&e.to_string()))?;
        match &mut self.headers {
            // Trailers: kept after the headers, where grpc-status is looked up.
            Some(headers) => headers.extend(fields),
            None => self.headers = Some(fields),
        }
        if ends_stream {
            self.finish();
        }
        Ok(())
    }

    /// The response stream has ended: its status, and the message when the status is OK.
    fn finish(&mut self) {
        let headers = self.headers.take().unwrap_or_default();
        let field = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name.as_bytes())
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let http = field(":status").unwrap_or_default();
        let outcome = if http != "200" {
            Err(Status::new(
                http_code(&http),
                format!("the daemon answered HTTP status {http}"),
            ))
        } else {
            match field("grpc-status").map(|s| s.parse::<i32>()) {
                Some(Ok(0)) => message_of(&self.body),
                Some(Ok(code)) => Err(Status::new(
                    Code::from(code),
                    percent_decode(&field("grpc-message").unwrap_or_default()),
                )),
                Some(Err(_)) | None => Err(Status::unknown(
                    "the daemon's answer has no valid grpc-status",
                )),
            }
        };
        self.outcome = Some(outcome.map_err(CallFailure::Status));
    }

    /// The failure for an I/O error on the socket.
    fn io_failure(&self, err: &std::io::Error) -> CallFailure {
        match err.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => no_reply(self.deadline),
            _ if !self.received_any => CallFailure::Connect(ConnectFailure::from_io(err)),
            _ => CallFailure::Broken(error_chain(err)),
        }
    }

    /// The failure for the server closing the connection before the answer.
    fn closed(&self) -> CallFailure {
        if self.received_any {
            CallFailure::Broken("the daemon closed the connection before it answered".to_owned())
        } else {
            CallFailure::Connect(ConnectFailure::Dropped)
        }
    }
}

fn protocol_error(what: &str) -> CallFailure {
    CallFailure::Broken(format!("HTTP/2 protocol error: {what}"))
}

/// A DATA or HEADERS payload without its padding.
fn unpadded(flags: u8, payload: &[u8]) -> Result<&[u8], CallFailure> {
    if flags & frame::PADDED == 0 {
        return Ok(payload);
    }
    let (&pad, rest) = payload
        .split_first()
        .ok_or_else(|| protocol_error("a padded frame is empty"))?;
    rest.len()
        .checked_sub(usize::from(pad))
        .map(|len| &rest[..len])
        .ok_or_else(|| protocol_error("padding longer than the frame"))
}

/// The one length-prefixed message of a unary answer.
fn message_of(body: &[u8]) -> Result<Vec<u8>, Status> {
    let Some((prefix, rest)) = body.split_first_chunk::<5>() else {
        return Err(Status::internal("the daemon's answer has no message"));
    };
    if prefix[0] != 0 {
        return Err(Status::internal("the daemon's answer is compressed"));
    }
    let len = word(prefix, 1) as usize;
    if rest.len() != len {
        return Err(Status::internal(format!(
            "the daemon's answer is {} bytes, its prefix says {len}",
            rest.len()
        )));
    }
    Ok(rest.to_vec())
}

/// The gRPC code for an HTTP status other than 200, as gRPC's HTTP/2 mapping defines it.
fn http_code(status: &str) -> Code {
    match status {
        "400" => Code::Internal,
        "401" => Code::Unauthenticated,
        "403" => Code::PermissionDenied,
        "404" => Code::Unimplemented,
        "429" | "502" | "503" | "504" => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// `grpc-message` is percent-encoded (%XX for bytes outside printable ASCII and for `%`).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
pub(crate) mod tests {
    use super::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    /// The frames in `bytes` (after the preface, if it starts with one).
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut frames = Frames::new(bytes.strip_prefix(PREFACE).unwrap_or(bytes));
        let out = frames
            .by_ref()
            .map(|(h, payload)| (h.kind, h.flags, h.stream, payload.to_vec()))
            .collect();
        assert!(frames.rest().is_empty(), "a partial frame");
        out
    }

    fn headers(fields: &[(&str, &str)], flags: u8) -> Vec<u8> {
        let mut block = Vec::new();
        hpack::encode(fields, &mut block);
        let mut out = Vec::new();
        put_frame(
            &mut out,
            frame::HEADERS,
            flags | frame::END_HEADERS,
            STREAM,
            &block,
        );
        out
    }

    /// A small request, length-prefixed as sent.
    const REQUEST: &[u8] = b"\0\0\0\0\x07request";

    /// An exchange for [`REQUEST`] whose first write is made.
    fn started() -> Exchange<'static> {
        let mut exchange = Exchange::new("/m", REQUEST, DEADLINE);
        exchange.start(DEADLINE);
        exchange
    }

    fn grpc_message(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    /// What the daemon (tonic over hyper) sends for an answered call: SETTINGS, a connection
    /// WINDOW_UPDATE, response headers, the message, trailers.
    fn served(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_frame(&mut out, frame::SETTINGS, 0, 0, &[0, 4, 0, 0x10, 0, 0]);
        put_frame(
            &mut out,
            frame::WINDOW_UPDATE,
            0,
            0,
            &983_041u32.to_be_bytes(),
        );
        out.extend(headers(
            &[(":status", "200"), ("content-type", "application/grpc")],
            0,
        ));
        put_frame(&mut out, frame::DATA, 0, STREAM, &grpc_message(payload));
        out.extend(headers(&[("grpc-status", "0")], frame::END_STREAM));
        out
    }

    fn run(exchange: &mut Exchange, input: &[u8]) -> (Vec<u8>, Result<Vec<u8>, CallFailure>) {
        let mut out = Vec::new();
        if let Err(failure) = exchange.receive(input, &mut out) {
            return (out, Err(failure));
        }
        (out, exchange.answer().expect("an outcome"))
    }

    #[test]
    fn the_first_write_is_preface_settings_headers_and_the_whole_small_request() {
        let mut exchange = Exchange::new("/hostnic.ipam.v1.Ipam/Allocate", REQUEST, DEADLINE);
        let out = exchange.start(DEADLINE);
        assert!(out.starts_with(PREFACE));
        let sent = frames(&out);
        let kinds: Vec<u8> = sent.iter().map(|f| f.0).collect();
        assert_eq!(
            kinds,
            [
                frame::SETTINGS,
                frame::WINDOW_UPDATE,
                frame::HEADERS,
                frame::DATA
            ]
        );
        let fields = hpack::Decoder::default().decode(&sent[2].3).unwrap();
        let field = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name.as_bytes())
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(field(":path").unwrap(), "/hostnic.ipam.v1.Ipam/Allocate");
        assert_eq!(field("content-type").unwrap(), "application/grpc");
        assert_eq!(field("te").unwrap(), "trailers");
        assert_eq!(field("grpc-timeout").unwrap(), "10000m");
        assert_eq!(sent[3].1, frame::END_STREAM);
        assert_eq!(sent[3].3, REQUEST);
    }

    #[test]
    fn an_answer_is_the_message_and_the_servers_settings_are_acknowledged() {
        let mut exchange = started();
        let (out, answer) = run(&mut exchange, &served(b"reply"));
        assert_eq!(answer.unwrap(), b"reply");
        assert_eq!(frames(&out), [(frame::SETTINGS, frame::ACK, 0, vec![])]);
    }

    #[test]
    fn an_answer_split_at_every_byte_reads_the_same() {
        let mut exchange = started();
        let mut out = Vec::new();
        for byte in served(b"reply") {
            exchange.receive(&[byte], &mut out).unwrap();
        }
        assert_eq!(exchange.answer().unwrap().unwrap(), b"reply");
    }

    #[test]
    fn a_status_in_a_trailers_only_answer_keeps_its_code_and_decoded_message() {
        let mut exchange = started();
        let answer = headers(
            &[
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "6"),
                (
                    "grpc-message",
                    "address 10.0.0.5 is held by web-1%0A100%25 %+1",
                ),
            ],
            frame::END_STREAM,
        );
        let (_, answer) = run(&mut exchange, &answer);
        let Err(CallFailure::Status(status)) = answer else {
            panic!("{answer:?}");
        };
        assert_eq!(status.code(), Code::AlreadyExists);
        assert_eq!(
            status.message(),
            "address 10.0.0.5 is held by web-1\n100% %+1"
        );
    }

    #[test]
    fn padded_headers_with_priority_and_continuation_frames_are_read() {
        let mut exchange = started();
        let mut block = Vec::new();
        hpack::encode(
            &[
                (":status", "200"),
                ("grpc-status", "5"),
                ("grpc-message", "gone"),
            ],
            &mut block,
        );
        let (first, rest) = block.split_at(10);
        let mut payload = vec![3]; // pad length
        payload.extend_from_slice(&[0x80, 0, 0, 0, 16]); // priority
        payload.extend_from_slice(first);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = Vec::new();
        let flags = frame::PADDED | frame::PRIORITY | frame::END_STREAM;
        put_frame(&mut input, frame::HEADERS, flags, STREAM, &payload);
        put_frame(
            &mut input,
            frame::CONTINUATION,
            frame::END_HEADERS,
            STREAM,
            rest,
        );
        let (_, answer) = run(&mut exchange, &input);
        let Err(CallFailure::Status(status)) = answer else {
            panic!("{answer:?}");
        };
        assert_eq!((status.code(), status.message()), (Code::NotFound, "gone"));
    }

    #[test]
    fn a_ping_is_answered_with_its_payload() {
        let mut exchange = started();
        let mut input = Vec::new();
        put_frame(&mut input, frame::PING, 0, 0, b"12345678");
        let mut out = Vec::new();
        exchange.receive(&input, &mut out).unwrap();
        assert_eq!(
            frames(&out),
            [(frame::PING, frame::ACK, 0, b"12345678".to_vec())]
        );
        assert!(exchange.answer().is_none());
    }

    #[test]
    fn an_unserved_call_is_dropped_and_a_torn_one_broken() {
        let goaway = |last: u32| {
            let mut payload = last.to_be_bytes().to_vec();
            payload.extend_from_slice(&0u32.to_be_bytes());
            let mut f = Vec::new();
            put_frame(&mut f, frame::GOAWAY, 0, 0, &payload);
            f
        };
        let reset = |code: u32| {
            let mut f = Vec::new();
            put_frame(&mut f, frame::RST_STREAM, 0, STREAM, &code.to_be_bytes());
            f
        };
        for (input, dropped) in [
            (goaway(0), true),
            (reset(frame::REFUSED_STREAM), true),
            (reset(0x2), false),
        ] {
            let mut exchange = started();
            let (_, answer) = run(&mut exchange, &input);
            match answer {
                Err(CallFailure::Connect(ConnectFailure::Dropped)) => assert!(dropped),
                Err(CallFailure::Broken(text)) => {
                    assert!(!dropped);
                    assert_eq!(text, "the daemon reset the call (HTTP/2 error 2)");
                }
                other => panic!("{other:?}"),
            }
        }
        // A GOAWAY with an error ends the call, naming the error.
        let mut exchange = started();
        let mut input = Vec::new();
        put_frame(&mut input, frame::GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 1]);
        assert!(matches!(
            run(&mut exchange, &input).1,
            Err(CallFailure::Broken(text)) if text == "the daemon closed the connection (HTTP/2 error 1)"
        ));
        // A GOAWAY that still covers the stream lets the answer through.
        let mut exchange = started();
        let mut input = goaway(1);
        input.extend(served(b"reply"));
        assert_eq!(run(&mut exchange, &input).1.unwrap(), b"reply");
        // Closed before a byte came back: not served; after: broken.
        let fresh = Exchange::new("/m", REQUEST, DEADLINE);
        assert!(matches!(
            fresh.closed(),
            CallFailure::Connect(ConnectFailure::Dropped)
        ));
        let mut answering = started();
        answering
            .receive(&served(b"x")[..20], &mut Vec::new())
            .unwrap();
        assert!(matches!(answering.closed(), CallFailure::Broken(_)));
    }

    #[test]
    fn a_request_larger_than_the_initial_window_waits_for_window_updates() {
        let message = grpc_message(&vec![7u8; 200_000]);
        let mut exchange = Exchange::new("/m", &message, DEADLINE);
        let data = |bytes: &[u8]| -> Vec<Vec<u8>> {
            frames(bytes)
                .into_iter()
                .filter(|f| f.0 == frame::DATA)
                .map(|f| f.3)
                .collect()
        };
        let first = data(&exchange.start(DEADLINE));
        assert_eq!(first.iter().map(Vec::len).sum::<usize>(), 65_535);
        assert!(first.iter().all(|f| f.len() <= MAX_FRAME));
        // The server's 1 MB stream window opens the stream; the connection waits for its update.
        let mut out = Vec::new();
        let mut input = Vec::new();
        put_frame(&mut input, frame::SETTINGS, 0, 0, &[0, 4, 0, 0x10, 0, 0]);
        exchange.receive(&input, &mut out).unwrap();
        assert!(data(&out).is_empty());
        out.clear();
        input.clear();
        put_frame(
            &mut input,
            frame::WINDOW_UPDATE,
            0,
            0,
            &983_041u32.to_be_bytes(),
        );
        exchange.receive(&input, &mut out).unwrap();
        let rest = data(&out);
        let frames_sent = frames(&out);
        assert_eq!(frames_sent.last().unwrap().1, frame::END_STREAM);
        let all: Vec<u8> = first.into_iter().chain(rest).flatten().collect();
        assert_eq!(all, message);
    }

    #[test]
    fn an_answer_that_breaks_http2_or_grpc_is_an_error_not_a_panic() {
        let mut exchange = started();
        let mut input = Vec::new();
        put_frame(
            &mut input,
            frame::HEADERS,
            frame::END_HEADERS,
            STREAM,
            &[0x80],
        );
        assert!(matches!(
            run(&mut exchange, &input).1,
            Err(CallFailure::Broken(text)) if text.contains("header index 0")
        ));
        // A frame above the 16 KiB this side allows fails at its header, before its payload.
        let mut exchange = started();
        assert!(matches!(
            run(&mut exchange, &[0, 0x40, 0x01, frame::DATA, 0, 0, 0, 0, 1]).1,
            Err(CallFailure::Broken(text)) if text.contains("16385 bytes")
        ));
        // A reset that is not 4 bytes is an error, not ignored until the deadline.
        let mut exchange = started();
        let mut short = Vec::new();
        put_frame(&mut short, frame::RST_STREAM, 0, STREAM, &[0, 0]);
        assert!(matches!(
            run(&mut exchange, &short).1,
            Err(CallFailure::Broken(text)) if text.contains("2-byte payload")
        ));
        let mut exchange = started();
        let mut pushed = Vec::new();
        put_frame(&mut pushed, frame::HEADERS, frame::END_HEADERS, 2, &[0x88]);
        assert!(matches!(
            run(&mut exchange, &pushed).1,
            Err(CallFailure::Broken(text)) if text.contains("did not open")
        ));
        let mut exchange = started();
        let mut input = headers(&[(":status", "503")], frame::END_STREAM);
        assert!(matches!(
            run(&mut exchange, &input).1,
            Err(CallFailure::Status(s)) if s.code() == Code::Unavailable
        ));
        let mut exchange = started();
        input = headers(&[(":status", "200")], 0);
        put_frame(&mut input, frame::DATA, 0, STREAM, &[0, 0, 0, 0, 9, 1]);
        input.extend(headers(&[("grpc-status", "0")], frame::END_STREAM));
        assert!(matches!(
            run(&mut exchange, &input).1,
            Err(CallFailure::Status(s)) if s.code() == Code::Internal
        ));
    }

    /// Whether this process creates files as root (no libc call needed: a new file's owner is
    /// the creator's fsuid). A socket root did not create is refused; a listener run by another
    /// user is refused end to end in `tests/plugin.rs`.
    pub(crate) fn creates_as_root(dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let probe = dir.join("uid-probe");
        std::fs::write(&probe, b"").unwrap();
        std::fs::metadata(&probe).unwrap().uid() == 0
    }

    /// A listener whose accept queue is full (it never accepts): `connect` gives up after its
    /// timeout instead of waiting for the daemon.
    #[test]
    fn connect_gives_up_on_a_listener_that_accepts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        if !creates_as_root(dir.path()) {
            eprintln!("SKIPPED connect-timeout test: not root");
            return;
        }
        let socket = dir.path().join("full.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        // Fill the backlog (std listens with a backlog of 128; the queue holds one more).
        let mut held = Vec::new();
        let timeout = Duration::from_millis(200);
        let failure = loop {
            match connect(&socket, timeout) {
                Ok(stream) => held.push(stream),
                Err(failure) => break failure,
            }
            assert!(held.len() < 10_000, "the accept queue never filled");
        };
        assert_eq!(failure, ConnectFailure::TimedOut);
    }
}
