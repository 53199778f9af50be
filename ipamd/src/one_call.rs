//! Connections that carry one call, answered without the HTTP/2 server.
//!
//! A plugin connects, makes one unary call and closes (`hostnic_cni::grpc`), and says so with
//! the [`ONE_CALL`] header. It writes the whole call at once: the preface, its SETTINGS and
//! WINDOW_UPDATE, the request HEADERS and DATA. When the first read of a connection holds
//! exactly such a call, it is answered here, in one write: this side's SETTINGS and the
//! acknowledgement of the client's, the response HEADERS, DATA and trailers, and a GOAWAY that
//! admits no further stream. The call goes through the same services ([`Routes`]) as every
//! other, so its handling, log line and metrics are the ones the HTTP/2 server would give it;
//! what is skipped is that server's connection and stream tasks, which cost an exec'd ADD more
//! time than the rest of the exchange (BENCHMARKS.md, "Plugin exec path").
//!
//! Every other first read (another client, a call that did not arrive in one piece, any frame
//! a one-call client does not send) goes to the HTTP/2 server unchanged, the bytes read so far
//! replayed first ([`Replayed`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hostnic_cni::grpc::{frame, put_frame, word, INITIAL_WINDOW, MAX_FRAME, ONE_CALL, PREFACE};
use hostnic_cni::hpack;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::body::Body;
use tonic::codegen::{http, Bytes};
use tonic::service::Routes;
use tonic::transport::server::{Connected, UdsConnectInfo};
use tonic::Status;
use tower::ServiceExt;

/// The most a first read takes. A call that does not fit is not a one-call client's.
pub const FIRST_READ: usize = 16 << 10;

/// The windows a one-call client must open before it may be answered in one write: room for
/// the largest answer a tonic client would take (its default message limit).
const MIN_WINDOW: i64 = 4 << 20;

/// How long an answered connection is kept for its client to read the answer and close.
const LINGER: Duration = Duration::from_secs(5);

/// The stream a one-call client's call is on: the first a client may open.
const STREAM: u32 = 1;

/// A one-call client's call, as the services take it: the request HEADERS and DATA. The
/// connection's peer credentials are added when it is served.
#[derive(Debug)]
pub struct Call {
    request: http::Request<Bytes>,
    /// The largest frame the client takes.
    max_frame: usize,
}

/// What a connection's first read is: a whole call of a one-call client, or anything else.
pub fn first_read(bytes: &[u8]) -> Option<Call> {
    let mut rest = bytes.strip_prefix(PREFACE)?;
    let mut stream_window = INITIAL_WINDOW;
    let mut connection_window = INITIAL_WINDOW;
    let mut max_frame = MAX_FRAME;
    let mut head: Option<http::request::Builder> = None;
    let mut body = Vec::new();
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags, stream) = (rest[3], rest[4], word(rest, 5) & 0x7fff_ffff);
        let payload = rest.get(9..9 + len)?;
        rest = &rest[9 + len..];
        match (kind, stream) {
            (frame::SETTINGS, 0) if flags == 0 && len % 6 == 0 => {
                for setting in payload.chunks(6) {
                    let value = word(setting, 2);
                    match u16::from_be_bytes([setting[0], setting[1]]) {
                        frame::SETTINGS_INITIAL_WINDOW_SIZE if value <= 0x7fff_ffff => {
                            stream_window = i64::from(value)
                        }
                        frame::SETTINGS_INITIAL_WINDOW_SIZE => return None,
                        frame::SETTINGS_MAX_FRAME_SIZE if (1 << 14..1 << 24).contains(&value) => {
                            max_frame = usize::try_from(value).ok()?
                        }
                        frame::SETTINGS_MAX_FRAME_SIZE => return None,
                        _ => {}
                    }
                }
            }
            (frame::WINDOW_UPDATE, 0) if len == 4 => {
                connection_window += i64::from(word(payload, 0) & 0x7fff_ffff)
            }
            (frame::HEADERS, STREAM) if head.is_none() && flags == frame::END_HEADERS => {
                head = Some(request_head(payload)?);
            }
            (frame::DATA, STREAM) if head.is_some() && flags & frame::PADDED == 0 => {
                body.extend_from_slice(payload);
                if flags & frame::END_STREAM != 0 {
                    let whole =
                        rest.is_empty() && stream_window.min(connection_window) >= MIN_WINDOW;
                    let request = head?.body(Bytes::from(body)).ok()?;
                    return whole.then_some(Call { request, max_frame });
                }
            }
            _ => return None,
        }
    }
    None
}

/// The request a one-call client's header block describes: a POST with a path and the
/// [`ONE_CALL`] field. None for any other block, which the HTTP/2 server is left to refuse.
fn request_head(block: &[u8]) -> Option<http::request::Builder> {
    let fields = hpack::Decoder::default().decode(block).ok()?;
    let mut head = http::Request::builder().version(http::Version::HTTP_2);
    let (mut post, mut path, mut one_call) = (false, false, false);
    for (name, value) in &fields {
        match name.as_slice() {
            b":method" => post = value == b"POST",
            b":path" => {
                head = head.uri(std::str::from_utf8(value).ok()?);
                path = true;
            }
            b":scheme" | b":authority" => {}
            name if name.starts_with(b":") => return None,
            name => {
                one_call |= name == ONE_CALL.0.as_bytes() && value == ONE_CALL.1.as_bytes();
                head = head.header(name, value.as_slice());
            }
        }
    }
    (post && path && one_call).then(|| head.method(http::Method::POST))
}

/// Serves `call`, which `stream`'s first read held, and answers it in one write; returns the
/// connection once answered (see [`linger`]). The call is dropped, as the HTTP/2 server drops
/// it, if the client goes away first, and ends with the status tonic's server gives when its
/// `grpc-timeout` passes.
pub async fn answer(mut stream: UnixStream, call: Call, routes: Routes) -> Option<UnixStream> {
    let Call {
        mut request,
        max_frame,
    } = call;
    request.extensions_mut().insert(UdsConnectInfo {
        peer_addr: stream.peer_addr().ok().map(Arc::new),
        peer_cred: stream.peer_cred().ok(),
    });
    let timeout = request
        .headers()
        .get("grpc-timeout")
        .and_then(|v| grpc_timeout(v.to_str().ok()?));
    let served = async {
        let response = routes
            .oneshot(request.map(|b| Body::new(Full::new(b))))
            .await;
        let (head, body) = match response {
            Ok(response) => response.into_parts(),
            Err(never) => match never {},
        };
        match body.collect().await {
            Ok(collected) => (head, collected.trailers().cloned(), collected.to_bytes()),
            Err(status) => status_answer(status),
        }
    };
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let (head, trailers, data) = tokio::select! {
        answer = served => answer,
        () = deadline => status_answer(Status::cancelled("Timeout expired")),
        () = closed(&stream) => return None,
    };
    let out = frames(&head, trailers.as_ref(), &data, max_frame);
    let written = tokio::io::AsyncWriteExt::write_all(&mut stream, &out).await;
    written.is_ok().then_some(stream)
}

/// Keeps an answered connection until its client has read the answer and closed it, for at
/// most [`LINGER`].
pub async fn linger(stream: UnixStream) {
    let _ = tokio::time::timeout(LINGER, closed(&stream)).await;
}

/// A status as the services answer it: trailers only.
fn status_answer(status: Status) -> (http::response::Parts, Option<http::HeaderMap>, Bytes) {
    let (head, ()) = status.into_http::<()>().into_parts();
    (head, None, Bytes::new())
}

/// Completes when the client has closed the connection (or broken it). What it sends until
/// then is not read: a one-call client sends nothing after its call.
async fn closed(stream: &UnixStream) {
    let mut scratch = [0u8; 512];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut scratch) {
            Ok(0) => return,
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return,
            _ => {}
        }
    }
}

/// The whole answer: this side's SETTINGS and the acknowledgement of the client's, the
/// response's header block, its DATA in frames the client takes, the trailers (or an empty
/// DATA frame ending the stream), and a GOAWAY after the call's stream. A response without
/// DATA or trailers is trailers-only: one header block that ends the stream.
fn frames(
    head: &http::response::Parts,
    trailers: Option<&http::HeaderMap>,
    data: &[u8],
    max_frame: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + data.len());
    put_frame(&mut out, frame::SETTINGS, 0, 0, &[]);
    put_frame(&mut out, frame::SETTINGS, frame::ACK, 0, &[]);
    let status = [(":status", head.status.as_str())];
    let trailers_only = data.is_empty() && trailers.is_none();
    put_block(&mut out, &status, &head.headers, trailers_only, max_frame);
    if !trailers_only {
        for chunk in data.chunks(max_frame) {
            put_frame(&mut out, frame::DATA, 0, STREAM, chunk);
        }
        match trailers {
            Some(trailers) => put_block(&mut out, &[], trailers, true, max_frame),
            None => put_frame(&mut out, frame::DATA, frame::END_STREAM, STREAM, &[]),
        }
    }
    let mut goaway = STREAM.to_be_bytes().to_vec();
    goaway.extend_from_slice(&frame::NO_ERROR.to_be_bytes());
    put_frame(&mut out, frame::GOAWAY, 0, 0, &goaway);
    out
}

/// A header block of `first` and then `fields` on the call's stream, in a HEADERS frame and as
/// many CONTINUATION frames as `max_frame` needs.
fn put_block(
    out: &mut Vec<u8>,
    first: &[(&str, &str)],
    fields: &http::HeaderMap,
    end_stream: bool,
    max_frame: usize,
) {
    let mut listed: Vec<(&str, &str)> = first.to_vec();
    // Values that are not visible ASCII (never sent by the services) are left out.
    listed.extend(
        fields
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
    );
    let mut block = Vec::with_capacity(128);
    hpack::encode(&listed, &mut block);
    let mut chunks = block.chunks(max_frame).peekable();
    let mut kind = frame::HEADERS;
    let mut flags = if end_stream { frame::END_STREAM } else { 0 };
    while let Some(chunk) = chunks.next() {
        if chunks.peek().is_none() {
            flags |= frame::END_HEADERS;
        }
        put_frame(out, kind, flags, STREAM, chunk);
        (kind, flags) = (frame::CONTINUATION, 0);
    }
}

/// gRPC's `grpc-timeout`: at most eight digits and a unit.
fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A connection for the HTTP/2 server: what its first read took is read again first.
#[derive(Debug)]
pub struct Replayed {
    first: Bytes,
    stream: UnixStream,
}

impl Replayed {
    pub fn new(first: Vec<u8>, stream: UnixStream) -> Self {
        Replayed {
            first: Bytes::from(first),
            stream,
        }
    }
}

impl Connected for Replayed {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.first.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.first.len().min(buf.remaining());
        buf.put_slice(&self.first.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    /// A first write as a one-call client makes it: the preface, SETTINGS that open the stream
    /// window, a WINDOW_UPDATE that opens the connection's, HEADERS with `fields`, and `body`
    /// in one DATA frame that ends the stream.
    fn first_write(fields: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        let mut settings = frame::SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
        settings.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
        put_frame(&mut out, frame::SETTINGS, 0, 0, &settings);
        let increment = 0x7fff_ffff - INITIAL_WINDOW as u32;
        put_frame(
            &mut out,
            frame::WINDOW_UPDATE,
            0,
            0,
            &increment.to_be_bytes(),
        );
        let mut block = Vec::new();
        hpack::encode(fields, &mut block);
        put_frame(&mut out, frame::HEADERS, frame::END_HEADERS, 1, &block);
        put_frame(&mut out, frame::DATA, frame::END_STREAM, 1, body);
        out
    }

    const CALL: &[(&str, &str)] = &[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/hostnic.ipam.v1.Ipam/Allocate"),
        (":authority", "hostnic-ipamd"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", "2999m"),
        ONE_CALL,
    ];

    #[test]
    fn a_one_call_clients_whole_call_is_read_as_its_request() {
        let call = first_read(&first_write(CALL, b"\0\0\0\0\x02ab")).unwrap();
        let request = &call.request;
        assert_eq!(request.method(), http::Method::POST);
        assert_eq!(request.uri().path(), "/hostnic.ipam.v1.Ipam/Allocate");
        assert_eq!(request.headers()["grpc-timeout"], "2999m");
        assert_eq!(request.body().as_ref(), b"\0\0\0\0\x02ab");
        assert_eq!(call.max_frame, MAX_FRAME);
    }

    #[test]
    fn a_call_split_over_reads_or_without_the_one_call_field_is_the_servers() {
        let whole = first_write(CALL, b"\0\0\0\0\x02ab");
        for cut in 0..whole.len() {
            assert!(first_read(&whole[..cut]).is_none(), "cut at {cut}");
        }
        let tonic_like: Vec<_> = CALL.iter().copied().filter(|f| *f != ONE_CALL).collect();
        assert!(first_read(&first_write(&tonic_like, b"\0\0\0\0\0")).is_none());
        let get: Vec<_> = CALL
            .iter()
            .map(|&(n, v)| if n == ":method" { (n, "GET") } else { (n, v) })
            .collect();
        assert!(first_read(&first_write(&get, b"\0\0\0\0\0")).is_none());
    }

    #[test]
    fn any_frame_a_one_call_client_does_not_send_leaves_the_connection_to_the_server() {
        let whole = first_write(CALL, b"\0\0\0\0\0");
        // Something after the call: a PING, or a second stream.
        let mut more = whole.clone();
        put_frame(&mut more, frame::PING, 0, 0, &[0; 8]);
        assert!(first_read(&more).is_none());
        // The default windows: the answer might have to wait for a WINDOW_UPDATE.
        let mut small = PREFACE.to_vec();
        put_frame(&mut small, frame::SETTINGS, 0, 0, &[]);
        small.extend_from_slice(&whole[PREFACE.len() + 9 + 6 + 9 + 4..]);
        assert!(first_read(&small).is_none());
        // A header block that needs CONTINUATION, and padded DATA.
        let mut block = Vec::new();
        hpack::encode(CALL, &mut block);
        let mut split = PREFACE.to_vec();
        split.extend_from_slice(&whole[PREFACE.len()..PREFACE.len() + 9 + 6 + 9 + 4]);
        put_frame(&mut split, frame::HEADERS, 0, 1, &block[..10]);
        put_frame(
            &mut split,
            frame::CONTINUATION,
            frame::END_HEADERS,
            1,
            &block[10..],
        );
        put_frame(&mut split, frame::DATA, frame::END_STREAM, 1, b"\0\0\0\0\0");
        assert!(first_read(&split).is_none());
        let mut padded = whole.clone();
        let data_flags = padded.len() - 5 - 9 + 4;
        padded[data_flags] |= frame::PADDED;
        assert!(first_read(&padded).is_none());
        // Not HTTP/2 at all.
        assert!(first_read(b"GET / HTTP/1.1\r\n\r\n").is_none());
    }

    /// The frames of `bytes` as (type, flags, stream, payload).
    fn parse_frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            frames.push((
                bytes[3],
                bytes[4],
                word(bytes, 5),
                bytes[9..9 + len].to_vec(),
            ));
            bytes = &bytes[9 + len..];
        }
        frames
    }

    #[test]
    fn an_answer_is_settings_their_ack_headers_data_trailers_and_goaway() {
        let (head, _) = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(())
            .unwrap()
            .into_parts();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let data = vec![7u8; MAX_FRAME + 10];
        let frames = parse_frames(&frames(&head, Some(&trailers), &data, MAX_FRAME));
        let kinds: Vec<(u8, u8, u32)> = frames.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            kinds,
            [
                (frame::SETTINGS, 0, 0),
                (frame::SETTINGS, frame::ACK, 0),
                (frame::HEADERS, frame::END_HEADERS, 1),
                (frame::DATA, 0, 1),
                (frame::DATA, 0, 1),
                (frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, 1),
                (frame::GOAWAY, 0, 0),
            ]
        );
        let mut decoder = hpack::Decoder::default();
        let fields = |d: &mut hpack::Decoder, block: &[u8]| -> Vec<(String, String)> {
            d.decode(block)
                .unwrap()
                .into_iter()
                .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                .collect()
        };
        assert_eq!(
            fields(&mut decoder, &frames[2].3),
            [
                (":status".into(), "200".into()),
                ("content-type".into(), "application/grpc".into())
            ]
        );
        assert_eq!([frames[3].3.clone(), frames[4].3.clone()].concat(), data);
        assert_eq!(
            fields(&mut decoder, &frames[5].3),
            [("grpc-status".into(), "0".into())]
        );
        assert_eq!(
            frames[6].3,
            [0, 0, 0, 1, 0, 0, 0, 0],
            "last stream 1, no error"
        );
    }

    #[test]
    fn a_status_is_answered_trailers_only_and_a_long_block_continues() {
        let message = "x".repeat(MAX_FRAME);
        let (head, trailers, data) = status_answer(Status::not_found(message));
        let frames = parse_frames(&frames(&head, trailers.as_ref(), &data, MAX_FRAME));
        let kinds: Vec<(u8, u8)> = frames.iter().map(|f| (f.0, f.1)).collect();
        assert_eq!(
            kinds,
            [
                (frame::SETTINGS, 0),
                (frame::SETTINGS, frame::ACK),
                (frame::HEADERS, frame::END_STREAM),
                (frame::CONTINUATION, frame::END_HEADERS),
                (frame::GOAWAY, 0),
            ]
        );
        let block = [frames[2].3.clone(), frames[3].3.clone()].concat();
        let fields = hpack::Decoder::default().decode(&block).unwrap();
        assert!(
            fields.contains(&(b"grpc-status".to_vec(), b"5".to_vec())),
            "{fields:?}"
        );
    }

    #[test]
    fn grpc_timeouts_are_read_in_their_units() {
        assert_eq!(grpc_timeout("2999m"), Some(Duration::from_millis(2999)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "123456789m", "10x", "-1S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad}");
        }
    }
}
