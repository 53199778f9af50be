//! Connections that carry one call, answered without the HTTP/2 server.
//!
//! A plugin connects, makes one unary call and closes (`hostnic_cni::grpc`), and says so with
//! the [`ONE_CALL`] field. It writes the whole call at once: the preface, its SETTINGS and
//! WINDOW_UPDATE, the request HEADERS and DATA. When the first read of a connection holds
//! exactly such a call, it is answered here, in one write: this side's SETTINGS and the
//! acknowledgement of the client's, the response HEADERS, DATA and trailers, and a GOAWAY that
//! admits no further stream. The call goes through the same services ([`Routes`]) as every
//! other, so its handling, log line and metrics are the ones the HTTP/2 server would give it;
//! what is skipped is that server's connection and stream tasks (BENCHMARKS.md, "Plugin exec
//! path").
//!
//! Every other first read (another client, a call that did not arrive in one piece, any frame
//! or field a one-call client does not send) goes to the HTTP/2 server unchanged, the bytes
//! read so far replayed first ([`Replayed`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hostnic_cni::grpc::{
    frame, put_frame, word, Frames, INITIAL_WINDOW, MAX_FRAME, MAX_WINDOW, ONE_CALL, PREFACE,
    STREAM,
};
use hostnic_cni::hpack;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tonic::body::Body;
use tonic::codegen::{http, Bytes};
use tonic::service::Routes;
use tonic::transport::server::{Connected, UdsConnectInfo};
use tonic::Status;
use tower::ServiceExt;

/// The most a first read takes. A call that does not fit is not a one-call client's.
pub const FIRST_READ: usize = 16 << 10;

/// The windows a one-call client must open before it is answered here: room for any answer a
/// tonic client would take (its default message limit).
const MIN_WINDOW: i64 = 4 << 20;

/// How long writing the answer may take: a client that does not read it is not waited for.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A one-call client's call, as the services take it: the request HEADERS and DATA. The
/// connection's peer credentials are added when it is served.
#[derive(Debug)]
pub struct Call {
    request: http::Request<Bytes>,
    /// The largest frame the client takes.
    max_frame: usize,
    /// The most DATA the client's windows take.
    window: i64,
}

/// What a connection's first read is: a whole call of a one-call client, or None for
/// anything else. The client preface must be followed by exactly one SETTINGS frame, then
/// WINDOW_UPDATEs of the connection, the call's HEADERS in one frame and its DATA, the last
/// frame ending the stream and the read.
pub fn first_read(bytes: &[u8]) -> Option<Call> {
    let mut frames = Frames::new(bytes.strip_prefix(PREFACE)?);
    let (settings, payload) = frames.next()?;
    if (settings.kind, settings.flags, settings.stream) != (frame::SETTINGS, 0, 0)
        || payload.len() % 6 != 0
    {
        return None;
    }
    let mut stream_window = INITIAL_WINDOW;
    let mut max_frame = MAX_FRAME;
    for setting in payload.chunks(6) {
        let value = word(setting, 2);
        match u16::from_be_bytes([setting[0], setting[1]]) {
            frame::SETTINGS_ENABLE_PUSH if value > 1 => return None,
            frame::SETTINGS_INITIAL_WINDOW_SIZE if value > MAX_WINDOW => return None,
            frame::SETTINGS_INITIAL_WINDOW_SIZE => stream_window = i64::from(value),
            frame::SETTINGS_MAX_FRAME_SIZE if !(1 << 14..1 << 24).contains(&value) => return None,
            frame::SETTINGS_MAX_FRAME_SIZE => max_frame = usize::try_from(value).ok()?,
            _ => {}
        }
    }
    let mut connection_window = INITIAL_WINDOW;
    let mut head: Option<http::request::Builder> = None;
    let mut body = Vec::new();
    for (h, payload) in frames.by_ref() {
        match (h.kind, h.stream) {
            (frame::WINDOW_UPDATE, 0) if h.len == 4 && head.is_none() => {
                let increment = i64::from(word(payload, 0) & MAX_WINDOW);
                connection_window += increment;
                if increment == 0 || connection_window > i64::from(MAX_WINDOW) {
                    return None;
                }
            }
            (frame::HEADERS, STREAM) if head.is_none() && h.flags == frame::END_HEADERS => {
                head = Some(request_head(payload)?);
            }
            (frame::DATA, STREAM) if head.is_some() && h.flags & frame::PADDED == 0 => {
                body.extend_from_slice(payload);
                if h.flags & frame::END_STREAM != 0 {
                    let window = stream_window.min(connection_window);
                    if !frames.rest().is_empty() || window < MIN_WINDOW {
                        return None;
                    }
                    let request = head?.body(Bytes::from(body)).ok()?;
                    return Some(Call {
                        request,
                        max_frame,
                        window,
                    });
                }
            }
            _ => return None,
        }
    }
    None
}

/// The request a one-call client's header block describes: a POST with a scheme and a path,
/// pseudo-header fields first and once each, lower-case names, no connection-specific field
/// and no `content-length`, and the [`ONE_CALL`] field. None for any other block, which the
/// HTTP/2 server is left to judge.
fn request_head(block: &[u8]) -> Option<http::request::Builder> {
    let fields = hpack::Decoder::default().decode(block).ok()?;
    let mut head = http::Request::builder().version(http::Version::HTTP_2);
    let mut method = None;
    let (mut scheme, mut path, mut regular, mut one_call) = (false, false, false, false);
    for (name, value) in &fields {
        if name.iter().any(u8::is_ascii_uppercase) {
            return None;
        }
        match name.as_slice() {
            _ if name.starts_with(b":") && regular => return None,
            b":method" if method.is_none() => method = Some(value == b"POST"),
            b":scheme" if !scheme => scheme = true,
            b":path" if !path => {
                head = head.uri(std::str::from_utf8(value).ok()?);
                path = true;
            }
            b":authority" => {}
            b"te" if value != b"trailers" => return None,
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" | b"content-length" => return None,
            name if name.starts_with(b":") => return None,
            name => {
                regular = true;
                one_call |= name == ONE_CALL.0.as_bytes() && value == ONE_CALL.1.as_bytes();
                head = head.header(name, value.as_slice());
            }
        }
    }
    (method == Some(true) && scheme && path && one_call).then(|| head.method(http::Method::POST))
}

/// Serves `call`, which `stream`'s first read held, and answers it in one write. The call is
/// dropped, as the HTTP/2 server drops it, if the client goes away first: a one-call client
/// closes the connection when its deadline passes, which it also sent as `grpc-timeout`.
pub async fn answer(mut stream: UnixStream, call: Call, routes: Routes) {
    let Call {
        mut request,
        max_frame,
        window,
    } = call;
    request.extensions_mut().insert(stream.connect_info());
    let served = async {
        let response = routes
            .oneshot(request.map(|b| Body::new(Full::new(b))))
            .await;
        let (head, body) = match response {
            Ok(response) => response.into_parts(),
            Err(never) => match never {},
        };
        match body.collect().await {
            Ok(collected) => {
                let trailers = collected.trailers().cloned();
                let data = collected.to_bytes();
                if data.len() as i64 > window {
                    return status_answer(Status::resource_exhausted(format!(
                        "an answer of {} bytes, more than the client's windows take ({window})",
                        data.len()
                    )));
                }
                (head, trailers, data)
            }
            Err(status) => status_answer(status),
        }
    };
    let (head, trailers, data) = tokio::select! {
        answer = served => answer,
        () = closed(&stream) => return,
    };
    let out = frames(&head, trailers.as_ref(), &data, max_frame);
    // Closed at once when written: the client reads what is queued before it sees the end.
    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&out)).await;
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

/// A header block of `first` and then `fields` on the call's stream: a HEADERS frame, and as
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
    let mut chunks: Vec<&[u8]> = block.chunks(max_frame).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let (kind, mut flags) = match i {
            0 if end_stream => (frame::HEADERS, frame::END_STREAM),
            0 => (frame::HEADERS, 0),
            _ => (frame::CONTINUATION, 0),
        };
        if i == last {
            flags |= frame::END_HEADERS;
        }
        put_frame(out, kind, flags, STREAM, chunk);
    }
}

/// A connection for the HTTP/2 server: what its first read took is read again first.
#[derive(Debug)]
pub struct Replayed {
    first: Bytes,
    stream: UnixStream,
}

impl Replayed {
    pub fn new(first: &[u8], stream: UnixStream) -> Self {
        Replayed {
            first: Bytes::copy_from_slice(first),
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
    use hostnic_cni::grpc::opening;

    /// A first write as a one-call client makes it (`hostnic_cni::grpc`): the opening with
    /// `fields`, and `body` in one DATA frame that ends the stream.
    fn first_write(fields: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
        let mut out = opening(fields);
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
        assert!(first_read(&whole).is_some());
        // Where the opening's frames end: SETTINGS, then the WINDOW_UPDATE.
        let frame_end = |at: usize| {
            at + 9
                + hostnic_cni::grpc::FrameHead::parse(&whole[at..])
                    .unwrap()
                    .len
        };
        let settings_end = frame_end(PREFACE.len());
        let update_end = frame_end(settings_end);
        assert_eq!(whole[settings_end + 3], frame::WINDOW_UPDATE);
        assert_eq!(whole[update_end + 3], frame::HEADERS);
        let data_at = frame_end(update_end);
        assert_eq!(whole[data_at + 3], frame::DATA);
        // Something after the call: a PING, or a second stream.
        let mut more = whole.clone();
        put_frame(&mut more, frame::PING, 0, 0, &[0; 8]);
        assert!(first_read(&more).is_none());
        // The default windows: the answer might have to wait for a WINDOW_UPDATE.
        let mut small = PREFACE.to_vec();
        put_frame(&mut small, frame::SETTINGS, 0, 0, &[]);
        small.extend_from_slice(&whole[update_end..]);
        assert!(first_read(&small).is_none());
        // A header block that needs CONTINUATION, and padded DATA.
        let mut block = Vec::new();
        hpack::encode(CALL, &mut block);
        let mut split = whole[..update_end].to_vec();
        put_frame(&mut split, frame::HEADERS, 0, 1, &block[..10]);
        put_frame(
            &mut split,
            frame::CONTINUATION,
            frame::END_HEADERS,
            1,
            &block[10..],
        );
        split.extend_from_slice(&whole[data_at..]);
        assert!(first_read(&split).is_none());
        let mut padded = whole.clone();
        padded[data_at + 4] |= frame::PADDED;
        assert!(first_read(&padded).is_none());
        // A second SETTINGS, which would need a second acknowledgement; a zero increment.
        let mut twice = whole[..settings_end].to_vec();
        twice.extend_from_slice(&whole[PREFACE.len()..]);
        assert!(first_read(&twice).is_none());
        let mut zero = whole.clone();
        zero[settings_end + 9..update_end].fill(0);
        assert!(first_read(&zero).is_none());
        // Not HTTP/2 at all.
        assert!(first_read(b"GET / HTTP/1.1\r\n\r\n").is_none());
    }

    type Field = (&'static str, &'static str);

    #[test]
    fn a_header_block_the_http2_server_would_judge_is_left_to_it() {
        let with = |change: &dyn Fn(&mut Vec<Field>)| {
            let mut fields = CALL.to_vec();
            change(&mut fields);
            first_read(&first_write(&fields, b"\0\0\0\0\0"))
        };
        assert!(
            with(&|_| {}).is_some(),
            "the unchanged call is a one-call client's"
        );
        assert!(with(&|f| f.push(("Content-Type", "application/grpc"))).is_none());
        assert!(
            with(&|f| f.push((":path", "/x"))).is_none(),
            "a pseudo field after the others"
        );
        assert!(with(&|f| f.retain(|(n, _)| *n != ":scheme")).is_none());
        assert!(with(&|f| f.push(("content-length", "5"))).is_none());
        assert!(with(&|f| f.push(("connection", "close"))).is_none());
        assert!(with(&|f| f.push(("te", "gzip"))).is_none());
        let get_then_post = |f: &mut Vec<Field>| f.insert(0, (":method", "GET"));
        assert!(with(&get_then_post).is_none(), "two methods");
    }

    /// A frame as (type, flags, stream, payload).
    type Parsed = (u8, u8, u32, Vec<u8>);

    /// The frames of `bytes`.
    fn parse_frames(bytes: &[u8]) -> Vec<Parsed> {
        let mut frames = Frames::new(bytes);
        let out = frames
            .by_ref()
            .map(|(h, payload)| (h.kind, h.flags, h.stream, payload.to_vec()))
            .collect();
        assert!(frames.rest().is_empty(), "a partial frame");
        out
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

    /// A service that answers every call with a body of as many bytes as it holds.
    #[derive(Clone)]
    struct Answers(usize);

    impl tonic::server::NamedService for Answers {
        const NAME: &'static str = "hostnic.ipam.v1.Ipam";
    }

    impl tower::Service<http::Request<Body>> for Answers {
        type Response = http::Response<Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(Body::new(Full::new(Bytes::from(vec![0u8; self.0]))))
                .unwrap();
            std::future::ready(Ok(response))
        }
    }

    /// What a one-call client reads back when its call, with windows that take `window`
    /// bytes, is answered with a body of `len` bytes.
    async fn answered(len: usize, window: i64) -> Vec<Parsed> {
        use tokio::io::AsyncReadExt;
        let mut call = first_read(&first_write(CALL, b"\0\0\0\0\0")).unwrap();
        call.window = window;
        let (server, mut client) = UnixStream::pair().unwrap();
        let routes = Routes::new(Answers(len)).prepare();
        let answering = tokio::spawn(answer(server, call, routes));
        let mut read = Vec::new();
        client.read_to_end(&mut read).await.unwrap();
        answering.await.unwrap();
        parse_frames(&read)
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_clients_windows_is_refused_not_sent() {
        let data_len = |frames: &[Parsed]| -> usize {
            frames
                .iter()
                .filter(|f| f.0 == frame::DATA)
                .map(|f| f.3.len())
                .sum()
        };
        let fits = answered(105, 105).await;
        assert_eq!(data_len(&fits), 105, "the whole message: {fits:?}");

        let refused = answered(105, 104).await;
        assert_eq!(data_len(&refused), 0, "no DATA beyond the windows");
        let (_, flags, _, block) = refused
            .iter()
            .find(|f| f.0 == frame::HEADERS)
            .expect("a header block");
        assert_eq!(
            flags & frame::END_STREAM,
            frame::END_STREAM,
            "trailers only"
        );
        let fields = hpack::Decoder::default().decode(block).unwrap();
        assert!(
            fields.contains(&(b"grpc-status".to_vec(), b"8".to_vec())),
            "RESOURCE_EXHAUSTED: {fields:?}"
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
        // An empty block still ends the stream, in one HEADERS frame.
        let mut empty = Vec::new();
        put_block(&mut empty, &[], &http::HeaderMap::new(), true, MAX_FRAME);
        let flags = frame::END_STREAM | frame::END_HEADERS;
        assert_eq!(parse_frames(&empty), [(frame::HEADERS, flags, 1, vec![])]);
        let block = [frames[2].3.clone(), frames[3].3.clone()].concat();
        let fields = hpack::Decoder::default().decode(&block).unwrap();
        assert!(
            fields.contains(&(b"grpc-status".to_vec(), b"5".to_vec())),
            "{fields:?}"
        );
    }
}
