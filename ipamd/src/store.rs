//! The connection to etcd: TLS and credentials, per-request timeouts, and retries with bounded
//! backoff on transport errors and leaderless periods.
//!
//! Retrying a transaction whose outcome is unknown (a timeout after the server committed it) is
//! safe only because every write of the allocator is a compare-and-swap that recognises its own
//! earlier success; see `allocator`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    AlarmAction, AlarmType, Certificate, Client, ConnectOptions, GetOptions, GetResponse, Identity,
    KeyValue, KvClient, ResponseHeader, TlsOptions, Txn, TxnResponse,
};
use tonic::Code;

use crate::error::{IpamError, Result};
use crate::group_commit::{Answer, Committer};
use crate::metrics::TxnResult;

/// How to reach etcd, resolved from the daemon's flags, environment and config file (`config`).
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub endpoints: Vec<String>,
    /// Every key lives under this prefix.
    pub prefix: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<TlsFiles>,
    /// Deadline of one etcd request.
    pub request_timeout: Duration,
    /// How long an operation keeps retrying transport errors and leaderless periods.
    pub retry_timeout: Duration,
}

/// PEM files for TLS to etcd (kube-ipam: `etcdTrustedCAFileFile`, `etcdCertFile`, `etcdKeyFile`).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

pub const DEFAULT_PREFIX: &str = "/hostnic/ipam/v1";

impl StoreConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        StoreConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            username: None,
            password: None,
            tls: None,
            request_timeout: Duration::from_millis(1000),
            retry_timeout: Duration::from_millis(2200),
        }
    }

    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }
}

/// A cheap-to-clone handle on the etcd client.
#[derive(Clone)]
pub struct Store {
    client: Client,
    /// The client's key-value part, for transactions and reads: one channel to clone per
    /// request rather than the whole client's.
    kv: KvClient,
    /// The same connection options but [`LOAD_READ_TIMEOUT`], for the reads of a load.
    loader: KvClient,
    retry_timeout: Duration,
    /// The highest revision any answer of etcd has shown this process: a lower bound of etcd's
    /// revision now. See [`Store::seen_revision`].
    seen_revision: Arc<AtomicI64>,
    /// Requests sent by this store and its clones (`Store::retry_on`), each attempt once.
    requests_sent: Arc<AtomicU64>,
    /// Where [`Store::txn_grouped`] sends its transactions; None in the committer's own copy.
    committer: Option<Committer>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("retry_timeout", &self.retry_timeout)
            .finish()
    }
}

fn read_pem(what: &str, path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| IpamError::Etcd {
        op: format!("reading {what} {}", path.display()),
        reason: e.to_string(),
    })
}

/// How long one read of a load may take. etcd 3.4 walks the whole range of a limited read to
/// count it, and the first read of a large prefix walks every key: most of a second over a
/// million keys on a busy member. Under the request timeout such a read would fail the load,
/// which would start over and might never finish.
const LOAD_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A client with `config`'s endpoints, credentials and TLS, and `timeout` per request. The
/// connection itself is lazy.
async fn connect_with(config: &StoreConfig, timeout: Duration) -> Result<Client> {
    let mut options = ConnectOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(config.request_timeout)
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        // A member cut off from the leader answers nothing rather than stale data, and
        // ends our watch so that it is re-established on a member that has a leader.
        .with_require_leader(true);
    if let (Some(user), Some(password)) = (&config.username, &config.password) {
        options = options.with_user(user.clone(), password.clone());
    }
    if let Some(tls) = &config.tls {
        let mut tls_options = TlsOptions::new();
        if let Some(ca) = &tls.ca {
            tls_options = tls_options.ca_certificate(Certificate::from_pem(read_pem("CA", ca)?));
        }
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            tls_options = tls_options.identity(Identity::from_pem(
                read_pem("cert", cert)?,
                read_pem("key", key)?,
            ));
        }
        options = options.with_tls(tls_options);
    }
    Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|e| store_error(format!("connect to {}", config.endpoints.join(",")), e))
}

impl Store {
    /// Builds the client. The connection itself is lazy: an unreachable etcd shows up as
    /// `Unavailable` on the first request, not here.
    pub async fn connect(config: &StoreConfig) -> Result<Store> {
        let client = connect_with(config, config.request_timeout).await?;
        let store = Store {
            kv: client.kv_client(),
            client,
            loader: connect_with(config, LOAD_READ_TIMEOUT).await?.kv_client(),
            retry_timeout: config.retry_timeout,
            seen_revision: Arc::new(AtomicI64::new(0)),
            requests_sent: Arc::new(AtomicU64::new(0)),
            committer: None,
        };
        Ok(Store {
            committer: Some(Committer::start(store.clone())),
            ..store
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// A revision that etcd had reached before this call: every answer (transactions, reads,
    /// watch messages) raises it. A request that notes it when it arrives knows that anything
    /// written after its arrival has a higher revision.
    pub fn seen_revision(&self) -> i64 {
        self.seen_revision.load(Ordering::Acquire)
    }

    /// How many requests this store and its clones have sent to etcd (reads, transactions and
    /// lease calls; each retry again; a group of transactions once), watches aside.
    pub fn requests_sent(&self) -> u64 {
        self.requests_sent.load(Ordering::Relaxed)
    }

    /// Records the revision of an answer from etcd.
    pub fn saw(&self, header: Option<&ResponseHeader>) {
        if let Some(h) = header {
            self.seen_revision.fetch_max(h.revision(), Ordering::AcqRel);
        }
    }

    /// Fails when etcd has raised an alarm that refuses writes (`NOSPACE`: the database reached
    /// its quota; `CORRUPT`): every ADD would fail until an operator clears it.
    pub async fn check_alarms(&self) -> Result<()> {
        let resp = self
            .retry("list etcd alarms", |mut c| async move {
                c.alarm(AlarmAction::Get, AlarmType::None, None).await
            })
            .await?;
        match resp.alarms().first() {
            None => Ok(()),
            Some(alarm) => Err(IpamError::StoreFull {
                op: "status".into(),
                reason: format!(
                    "etcd member {:x} raised alarm {}",
                    alarm.member_id(),
                    // etcd's own name, as `etcdctl alarm list` shows it.
                    alarm.alarm().as_str_name()
                ),
            }),
        }
    }

    /// Grants a lease that expires after `ttl`.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<i64> {
        let seconds = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let resp = self
            .retry("grant a lease", |mut c| async move {
                c.lease_grant(seconds, None).await
            })
            .await?;
        Ok(resp.id())
    }

    /// Runs `call` until it succeeds, fails for good, or the retry budget is spent.
    pub async fn retry<T, F, Fut>(&self, op: &str, call: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.retry_on(&self.client, self.retry_timeout, op, call)
            .await
    }

    /// [`Store::retry`] with `client` (the whole client or a part of it) and a budget of
    /// `budget`.
    async fn retry_on<C: Clone, T, F, Fut>(
        &self,
        client: &C,
        budget: Duration,
        op: &str,
        mut call: F,
    ) -> Result<T>
    where
        F: FnMut(C) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + budget;
        let mut delay = Duration::from_millis(20);
        loop {
            // No attempt may outlive the budget: callers promise an answer within it.
            let remaining = deadline.saturating_duration_since(Instant::now());
            self.requests_sent.fetch_add(1, Ordering::Relaxed);
            let attempt = tokio::time::timeout(remaining, call(client.clone()))
                .await
                .unwrap_or_else(|_| {
                    Err(etcd_client::Error::GRpcStatus(
                        tonic::Status::deadline_exceeded(format!(
                            "no answer within the {budget:?} retry budget"
                        )),
                    ))
                });
            match attempt {
                Ok(v) => return Ok(v),
                Err(e) if is_transient(&e) && Instant::now() + delay < deadline => {
                    tracing::debug!(op, error = %e, "etcd request failed, retrying");
                    crate::metrics::etcd_retry();
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(300));
                }
                Err(e) => return Err(store_error(op.to_string(), e)),
            }
        }
    }

    pub async fn txn(&self, op: &str, txn: Txn) -> Result<TxnResponse> {
        let started = Instant::now();
        let resp = self
            .send(op, txn)
            .await
            .inspect_err(|_| crate::metrics::etcd_txn(TxnResult::Failed, started.elapsed()))?;
        crate::metrics::etcd_txn(TxnResult::of(&resp), started.elapsed());
        Ok(resp)
    }

    /// `txn`, committed together with the other transactions waiting at the same moment (see
    /// `group_commit`); `keys` are all the keys it compares, reads or writes. Its answer is the
    /// one it would have got alone.
    pub async fn txn_grouped(&self, op: &str, txn: Txn, keys: Vec<String>) -> Result<Answer> {
        match &self.committer {
            Some(committer) => committer.txn(op, txn, keys).await,
            None => Answer::alone(self, op, txn).await,
        }
    }

    /// Sends `txn` (retried as [`Store::retry`] does), unrecorded in the metrics.
    pub(crate) async fn send(&self, op: &str, txn: Txn) -> Result<TxnResponse> {
        let resp = self
            .retry_on(&self.kv, self.retry_timeout, op, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        self.saw(resp.header());
        Ok(resp)
    }

    pub async fn get(
        &self,
        op: &str,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<GetResponse> {
        let resp = self
            .retry_on(&self.kv, self.retry_timeout, op, |mut c| {
                let options = options.clone();
                let key = key.to_string();
                async move { c.get(key, options).await }
            })
            .await?;
        self.saw(resp.header());
        Ok(resp)
    }

    /// Every key under `prefix` at one revision, in key order, within the retry budget (it
    /// serves requests). Returns the revision and the key-values.
    pub async fn load_prefix(&self, prefix: &str) -> Result<(i64, Vec<KeyValue>)> {
        let mut out = Vec::new();
        let reader = Reader {
            client: &self.kv,
            budget: self.retry_timeout,
        };
        let range = (prefix.as_bytes(), prefix_end(prefix.as_bytes()));
        let revision = self
            .pages(
                reader,
                (range.0, &range.1),
                PAGE,
                |_, _| false,
                |kvs| out.extend(kvs),
            )
            .await?;
        Ok((revision, out))
    }

    /// Reads every key under `prefix` at one revision, in pages of at most `page_size` keys so
    /// that a large pool neither exceeds the gRPC message limit nor is held whole: `page` gets
    /// each page in turn, in key order. A range for which `keys_only(start, end)` holds is read
    /// without its values. Returns the revision.
    ///
    /// etcd (3.4) walks the whole range of a limited read to count it, so every read is kept to
    /// a range bounded by the last key read ([`ranges_after`]): each key is walked about once
    /// per level of the key trie that holds more than a page, not once per page.
    ///
    /// For background work (the pool load, the node GC): each read may take up to
    /// [`LOAD_READ_TIMEOUT`], far past the retry budget of a request.
    pub async fn for_each_page(
        &self,
        prefix: &str,
        page_size: i64,
        keys_only: impl Fn(&[u8], &[u8]) -> bool,
        page: impl FnMut(Vec<KeyValue>),
    ) -> Result<i64> {
        let end = prefix_end(prefix.as_bytes());
        self.for_each_page_in((prefix.as_bytes(), &end), page_size, keys_only, page)
            .await
    }

    /// [`Store::for_each_page`] over the key range `[start, end)`.
    pub async fn for_each_page_in(
        &self,
        range: (&[u8], &[u8]),
        page_size: i64,
        keys_only: impl Fn(&[u8], &[u8]) -> bool,
        page: impl FnMut(Vec<KeyValue>),
    ) -> Result<i64> {
        let reader = Reader {
            client: &self.loader,
            budget: LOAD_READ_TIMEOUT + self.retry_timeout,
        };
        self.pages(reader, range, page_size, keys_only, page).await
    }

    /// The keys of `[start, end)` at one revision, page by page, through `reader`.
    async fn pages(
        &self,
        reader: Reader<'_>,
        (start, end): (&[u8], &[u8]),
        page_size: i64,
        keys_only: impl Fn(&[u8], &[u8]) -> bool,
        mut page: impl FnMut(Vec<KeyValue>),
    ) -> Result<i64> {
        let op = format!("load {}", String::from_utf8_lossy(start));
        let mut revision = 0;
        // Ranges still to read, the next on top.
        let mut ranges = vec![(start.to_vec(), end.to_vec())];
        while let Some((start, end)) = ranges.pop() {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(page_size);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            if keys_only(&start, &end) {
                options = options.with_keys_only();
            }
            let mut resp = self
                .retry_on(reader.client, reader.budget, &op, |mut c| {
                    let (key, options) = (start.clone(), options.clone());
                    async move { c.get(key, Some(options)).await }
                })
                .await?;
            if revision == 0 {
                self.saw(resp.header());
                revision = resp.header().map(|h| h.revision()).unwrap_or_default();
            }
            let kvs = resp.take_kvs();
            if let Some(last) = kvs.last().filter(|_| resp.more()) {
                ranges.extend(ranges_after(last.key(), &end).into_iter().rev());
            }
            page(kvs);
        }
        Ok(revision)
    }
}

/// The client and the retry budget the reads of [`Store::pages`] use.
#[derive(Clone, Copy)]
struct Reader<'a> {
    client: &'a KvClient,
    budget: Duration,
}

/// Keys per read of [`Store::load_prefix`].
pub const PAGE: i64 = 5000;

/// The range `[last + \0, end)` split into consecutive ranges at the end of each prefix of
/// `last` that falls inside it, longest prefix first: the keys under `last` itself, then those
/// under each shorter prefix, then the rest.
pub fn ranges_after(last: &[u8], end: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut from = last.to_vec();
    from.push(0);
    let mut ranges = Vec::new();
    for len in (1..=last.len()).rev() {
        let bound = prefix_end(&last[..len]);
        if from < bound && bound.as_slice() < end {
            ranges.push((std::mem::replace(&mut from, bound.clone()), bound));
        }
    }
    ranges.push((from, end.to_vec()));
    ranges
}

/// A failed etcd operation: `Unavailable` (the caller may try again later) when the error is
/// transient, `StoreFull` when etcd refuses writes for want of space, `Etcd` otherwise.
fn store_error(op: String, source: etcd_client::Error) -> IpamError {
    if is_transient(&source) {
        IpamError::Unavailable {
            op,
            reason: describe(&source),
        }
    } else if let Some(reason) = out_of_space(&source) {
        IpamError::StoreFull { op, reason }
    } else {
        IpamError::Etcd {
            op,
            reason: describe(&source),
        }
    }
}

/// What an etcd error says, in words: a status's message and its causes (the transport
/// error, the OS error), each once. tonic's own text for a status is a debug dump of its
/// fields, which is no message for an operator or a runtime.
pub fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let message = match status.message() {
                "" => status.code().description().to_string(),
                message => message.to_string(),
            };
            hostnic_cni::error::with_causes(message, std::error::Error::source(status))
        }
        other => hostnic_cni::error::error_chain(other),
    }
}

/// etcd's answer when its database reached `--quota-backend-bytes` (alarm NOSPACE).
fn out_of_space(e: &etcd_client::Error) -> Option<String> {
    match e {
        etcd_client::Error::GRpcStatus(status)
            if status.code() == Code::ResourceExhausted
                && status.message().contains("database space exceeded") =>
        {
            Some(status.message().to_string())
        }
        _ => None,
    }
}

/// The end of the key range that holds every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Errors after which the same request may succeed: the endpoint is down, there is no leader,
/// the request timed out, or etcd sheds load ("too many requests").
pub fn is_transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Aborted
                    | Code::Cancelled
                    | Code::Unknown
            ) || (status.code() == Code::ResourceExhausted
                && status.message().contains("too many requests"))
        }
        etcd_client::Error::WatchError(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }

    #[test]
    fn the_ranges_after_a_key_are_bounded_by_its_prefixes() {
        let bounds: [&[u8]; 13] = [
            b"/p/a/10.0.3.17\0",
            b"/p/a/10.0.3.18",
            b"/p/a/10.0.3.2",
            b"/p/a/10.0.3/",
            b"/p/a/10.0.4",
            b"/p/a/10.0/",
            b"/p/a/10.1",
            b"/p/a/10/",
            b"/p/a/11",
            b"/p/a/2",
            b"/p/a0",
            b"/p/b",
            b"/p0",
        ];
        let expected: Vec<(Vec<u8>, Vec<u8>)> = bounds
            .windows(2)
            .map(|w| (w[0].to_vec(), w[1].to_vec()))
            .collect();
        assert_eq!(
            ranges_after(b"/p/a/10.0.3.17", b"/p0"),
            expected,
            "the end of every prefix of the key below the end bounds a range, longest first"
        );
    }

    #[test]
    fn the_ranges_after_a_key_cover_the_rest_exactly_in_order() {
        let cases: [(&[u8], &[u8]); 5] = [
            (b"/p/a/10.0.3.17", b"/p0"),
            (b"/p/a/10.0.3.17", b"/p/a/10.0.3.2"),
            (b"/p/\xff\xffz", b"/p0"),
            (b"/p/x", b"/p/x\0\0"),
            (b"\xff\xff", b"\xff\xff\xff"),
        ];
        // Keys around every boundary: each must fall in exactly one range iff it is in
        // [last + \0, end).
        let probes = |ranges: &[(Vec<u8>, Vec<u8>)], last: &[u8]| {
            let mut keys = vec![last.to_vec()];
            for (from, end) in ranges {
                for bound in [from, end] {
                    keys.push(bound.clone());
                    let mut after = bound.clone();
                    after.push(0);
                    keys.push(after);
                    keys.push(bound[..bound.len() - 1].to_vec());
                }
            }
            keys
        };
        for (last, end) in cases {
            let ranges = ranges_after(last, end);
            let mut first = last.to_vec();
            first.push(0);
            assert_eq!(ranges[0].0, first, "starts just after {last:?}");
            assert_eq!(ranges.last().expect("one range at least").1, end);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].1, pair[1].0, "consecutive: {ranges:?}");
            }
            for (from, to) in &ranges {
                assert!(from < to, "no empty range: {ranges:?}");
            }
            for key in probes(&ranges, last) {
                let inside = key > last.to_vec() && key.as_slice() < end;
                let holders = ranges
                    .iter()
                    .filter(|(from, to)| from <= &key && &key < to)
                    .count();
                assert_eq!(holders, usize::from(inside), "{key:?} in {ranges:?}");
            }
        }
    }

    fn grpc(code: Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, message))
    }

    #[test]
    fn etcd_shedding_load_is_transient_and_a_full_quota_is_not() {
        // etcd's own texts (etcdserver/api/v3rpc/rpctypes).
        let busy = grpc(Code::ResourceExhausted, "etcdserver: too many requests");
        assert!(is_transient(&busy));
        assert!(matches!(
            store_error("txn".into(), busy),
            IpamError::Unavailable { .. }
        ));

        let full = grpc(
            Code::ResourceExhausted,
            "etcdserver: mvcc: database space exceeded",
        );
        assert!(!is_transient(&full));
        match store_error("txn".into(), full) {
            IpamError::StoreFull { op, reason } => {
                assert_eq!(op, "txn");
                assert!(reason.contains("database space exceeded"), "{reason}");
            }
            other => panic!("expected StoreFull, got {other}"),
        }

        // Another exhausted resource is neither.
        let big = grpc(
            Code::ResourceExhausted,
            "grpc: received message larger than max",
        );
        assert!(!is_transient(&big));
        assert!(matches!(
            store_error("txn".into(), big),
            IpamError::Etcd { .. }
        ));
    }

    #[test]
    fn an_etcd_error_is_described_in_words_each_cause_once() {
        let cases = [
            (
                etcd_client::Error::GRpcStatus(tonic::Status::unavailable("etcdserver: no leader")),
                "etcdserver: no leader",
            ),
            (
                etcd_client::Error::GRpcStatus(tonic::Status::unavailable("")),
                "The service is currently unavailable",
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(describe(&error), expected);
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_described_without_debug_dumps() {
        // Port 1 on loopback: nothing listens there, so the connection is refused at once.
        let store = Store::connect(&StoreConfig {
            retry_timeout: Duration::from_millis(100),
            ..StoreConfig::new(vec!["http://127.0.0.1:1".into()])
        })
        .await
        .expect("the client connects lazily");
        let err = store.get("probe", "/k", None).await.expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("Connection refused"), "{text}");
        for dump in ["Os {", "ConnectError(", "source:", "Transport,"] {
            assert!(!text.contains(dump), "{dump:?} in {text}");
        }
        assert_eq!(
            text.matches("Connection refused").count(),
            1,
            "the cause is stated once: {text}"
        );
        assert!(
            std::error::Error::source(&err).is_none(),
            "and not again as a source"
        );
    }
}
