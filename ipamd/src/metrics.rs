//! The daemon's Prometheus metrics: counters and latency histograms that the request path, the
//! etcd client, the pool watch and the GCs update with one call each, and the text exposition
//! format (version 0.0.4) that `/metrics` serves (see `http`).
//!
//! The registry is process-wide, like the daemon it describes. The pool gauges are not kept
//! here: they are read from the allocator's cache at each scrape ([`Scrape::pools`]), so they
//! cannot drift from what the allocator hands out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use crate::blocks::Usage;

/// Bucket bounds (seconds) of the latency histograms: from a cached answer (well under a
/// millisecond) to the retry budget of an etcd request that waits out a leader election.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// CNI requests served, by verb and gRPC result code.
pub const REQUESTS: &str = "hostnic_ipamd_requests_total";
/// Time to answer a CNI request, by verb and gRPC result code.
pub const REQUEST_DURATION: &str = "hostnic_ipamd_request_duration_seconds";
/// Time of an etcd transaction, retries included, by result.
pub const ETCD_TXN_DURATION: &str = "hostnic_ipamd_etcd_transaction_duration_seconds";
/// etcd requests sent again after a transient error.
pub const ETCD_RETRIES: &str = "hostnic_ipamd_etcd_retries_total";
/// etcd transactions sent nested in one request with others (`group_commit`).
pub const ETCD_GROUPED: &str = "hostnic_ipamd_etcd_grouped_transactions_total";
/// Reloads of the pool cache after its etcd watch ended.
pub const WATCH_RELOADS: &str = "hostnic_ipamd_pool_watch_reloads_total";
/// Changes the pool cache's etcd watch delivered.
pub const WATCH_EVENTS: &str = "hostnic_ipamd_pool_watch_events_total";
/// Attachments released by a garbage collector, by collector and reason.
pub const GC_RELEASED: &str = "hostnic_ipamd_gc_released_total";
/// QingCloud API requests (each attempt of a retried call), by action and result.
pub const QINGCLOUD_API_CALLS: &str = "hostnic_ipamd_qingcloud_api_calls_total";

/// The families the daemon always exposes, with their help text; the pool gauges are added by
/// [`Scrape::render`].
const FAMILIES: &[(&str, Type, &str)] = &[
    (
        REQUESTS,
        Type::Counter,
        "CNI requests served, by verb and gRPC result code (InvalidArgument: CNI 7, Unavailable: CNI 11).",
    ),
    (
        REQUEST_DURATION,
        Type::Histogram,
        "Time to answer a CNI request, by verb and gRPC result code.",
    ),
    (
        ETCD_TXN_DURATION,
        Type::Histogram,
        "Time of an etcd transaction including retries, by result (committed, refused: a compare failed, failed).",
    ),
    (
        ETCD_RETRIES,
        Type::Counter,
        "etcd requests sent again after a transient error (no leader, unreachable member, timeout).",
    ),
    (
        ETCD_GROUPED,
        Type::Counter,
        "etcd transactions (ADD commits, releases) sent nested in one request with others that waited at the same moment; each still commits or fails alone.",
    ),
    (
        WATCH_RELOADS,
        Type::Counter,
        "Reloads of the pool cache from etcd after its watch ended or fell behind a compaction.",
    ),
    (
        WATCH_EVENTS,
        Type::Counter,
        "Changes the pool cache's etcd watch delivered: the pool index, pool definitions, block claims, and the addresses of the blocks this node follows.",
    ),
    (
        GC_RELEASED,
        Type::Counter,
        "Attachments (for sticky: StatefulSet pod identities) released by a garbage collector, by collector (cni, netns, pod, node, sticky, takeover) and reason.",
    ),
    (
        QINGCLOUD_API_CALLS,
        Type::Counter,
        "QingCloud API requests (each attempt of a retried call), by action and result (the ret_code, 0 for success; transport_error: no answer; unreadable_answer).",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Counter,
    Gauge,
    Histogram,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
            Type::Histogram => "histogram",
        }
    }
}

/// Label names and values of one series, in the order given.
type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, PartialEq)]
struct Histogram {
    /// Observations at or below each of [`LATENCY_BUCKETS`] (not cumulative).
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: vec![0; LATENCY_BUCKETS.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, seconds: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&le| seconds <= le) {
            self.buckets[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }
}

/// Counters and histograms by family and labels.
#[derive(Debug, Default)]
pub struct Registry {
    counters: Mutex<BTreeMap<(&'static str, Labels), u64>>,
    histograms: Mutex<BTreeMap<(&'static str, Labels), Histogram>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Adds `n` to a counter.
    pub fn add(&self, family: &'static str, labels: Labels, n: u64) {
        *lock(&self.counters).entry((family, labels)).or_default() += n;
    }

    /// Records one observation of a latency histogram.
    pub fn observe(&self, family: &'static str, labels: Labels, elapsed: Duration) {
        lock(&self.histograms)
            .entry((family, labels))
            .or_insert_with(Histogram::new)
            .observe(elapsed.as_secs_f64());
    }

    /// The value of a counter (0 when it never moved).
    pub fn counter(&self, family: &'static str, labels: &[(&'static str, &str)]) -> u64 {
        let labels: Labels = labels.iter().map(|(k, v)| (*k, (*v).to_string())).collect();
        lock(&self.counters)
            .get(&(family, labels))
            .copied()
            .unwrap_or(0)
    }

    /// Everything in the text exposition format, followed by the pool gauges of `pools`.
    pub fn render(&self, pools: &[PoolGauges]) -> String {
        let counters = lock(&self.counters).clone();
        let histograms = lock(&self.histograms).clone();
        let mut out = String::new();
        for &(family, kind, help) in FAMILIES {
            header(&mut out, family, kind, help);
            match kind {
                Type::Counter => {
                    let mut any = false;
                    for ((_, labels), value) in of_family(&counters, family) {
                        sample(&mut out, family, "", labels, &value.to_string());
                        any = true;
                    }
                    // A counter without labels is shown from the start, at 0, so that a
                    // rate over it is defined before its first increase.
                    if !any && !family_has_labels(family) {
                        sample(&mut out, family, "", &[], "0");
                    }
                }
                Type::Histogram => {
                    for ((_, labels), h) in of_family(&histograms, family) {
                        render_histogram(&mut out, family, labels, h);
                    }
                }
                Type::Gauge => {}
            }
        }
        render_pools(&mut out, pools);
        out
    }
}

/// This node's NIC pool (QingCloud mode), read from its etcd records at each scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NicGauges {
    /// Created, attach job not yet done or link not yet seen.
    pub attaching: usize,
    /// Attached and ready in the warm pool.
    pub ready: usize,
    /// Leased to a pod.
    pub leased: usize,
    /// The pool's bound (`maxNic`).
    pub max: u32,
}

fn render_nics(out: &mut String, nics: &NicGauges) {
    let family = "hostnic_ipamd_nics";
    header(
        out,
        family,
        Type::Gauge,
        "This node's QingCloud NICs by state (attaching, ready: the warm pool, leased: a pod's).",
    );
    for (state, n) in [
        ("attaching", nics.attaching),
        ("ready", nics.ready),
        ("leased", nics.leased),
    ] {
        sample(out, family, "", &[("state", state.into())], &n.to_string());
    }
    let family = "hostnic_ipamd_nics_max";
    header(
        out,
        family,
        Type::Gauge,
        "The most QingCloud NICs this node's pool may hold (maxNic).",
    );
    sample(out, family, "", &[], &nics.max.to_string());
}

/// The series of one family, in a map ordered by (family, labels).
fn of_family<'a, V>(
    map: &'a BTreeMap<(&'static str, Labels), V>,
    family: &'static str,
) -> impl Iterator<Item = (&'a (&'static str, Labels), &'a V)> {
    map.range((family, Vec::new())..)
        .take_while(move |((f, _), _)| *f == family)
}

fn family_has_labels(family: &str) -> bool {
    family != ETCD_RETRIES
        && family != ETCD_GROUPED
        && family != WATCH_RELOADS
        && family != WATCH_EVENTS
}

fn header(out: &mut String, family: &str, kind: Type, help: &str) {
    let _ = writeln!(out, "# HELP {family} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {family} {}", kind.name());
}

fn sample(out: &mut String, family: &str, suffix: &str, labels: &[(&str, String)], value: &str) {
    out.push_str(family);
    out.push_str(suffix);
    if !labels.is_empty() {
        out.push('{');
        for (i, (name, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{name}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

fn render_histogram(out: &mut String, family: &str, labels: &Labels, h: &Histogram) {
    let mut cumulative = 0;
    for (le, n) in LATENCY_BUCKETS.iter().zip(&h.buckets) {
        cumulative += n;
        let mut with_le = labels.clone();
        with_le.push(("le", format_float(*le)));
        sample(out, family, "_bucket", &with_le, &cumulative.to_string());
    }
    let mut inf = labels.clone();
    inf.push(("le", "+Inf".to_string()));
    sample(out, family, "_bucket", &inf, &h.count.to_string());
    sample(out, family, "_sum", labels, &format_float(h.sum));
    sample(out, family, "_count", labels, &h.count.to_string());
}

/// One pool's gauges: its subnet and its usage as this node's cache sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolGauges {
    pub subnet: String,
    pub usage: Usage,
}

/// A pool gauge: its family, its help, and how it is read from a pool's usage.
type Gauge = (&'static str, &'static str, fn(&Usage) -> u128);

fn render_pools(out: &mut String, pools: &[PoolGauges]) {
    let gauges: [Gauge; 3] = [
        (
            "hostnic_ipamd_pool_size",
            "Addresses of the pool that dynamic allocation may hand out.",
            |u| u.size,
        ),
        (
            "hostnic_ipamd_pool_held",
            "Addresses held by an attachment (dynamic, fixed and sticky) in the blocks of the pool this node follows: its own, and all once it borrows. `hostnic-ipamd usage` counts the whole pool.",
            |u| u.held,
        ),
        (
            "hostnic_ipamd_pool_free",
            "Addresses of the pool that dynamic allocation may still hand out, as far as this node knows: free in the blocks it follows and in unclaimed blocks; another node's block it does not follow counts as not free.",
            |u| u.free,
        ),
    ];
    for (family, help, value) in gauges {
        header(out, family, Type::Gauge, help);
        for p in pools {
            let labels = vec![("pool", p.subnet.clone())];
            sample(out, family, "", &labels, &value(&p.usage).to_string());
        }
    }
    let family = "hostnic_ipamd_pool_blocks";
    header(
        out,
        family,
        Type::Gauge,
        "Blocks of the pool claimed by each node.",
    );
    for p in pools {
        for (node, n) in &p.usage.blocks {
            let labels = vec![("pool", p.subnet.clone()), ("node", node.clone())];
            sample(out, family, "", &labels, &n.to_string());
        }
    }
}

/// A float as Prometheus reads it (`0.005`, `1`, `2.5`).
fn format_float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A label value: backslash, double quote and line feed escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Help text: backslash and line feed escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', r"\\").replace('\n', r"\n")
}

/// The daemon's registry.
static METRICS: LazyLock<Registry> = LazyLock::new(Registry::default);

/// The daemon's registry, for the scrape and for tests of this process.
pub fn registry() -> &'static Registry {
    &METRICS
}

/// Counts one CNI request (`verb`: allocate, release, check, gc, status) and its latency.
pub fn request(verb: &'static str, code: tonic::Code, elapsed: Duration) {
    let labels = vec![("verb", verb.to_string()), ("code", code_name(code))];
    METRICS.add(REQUESTS, labels.clone(), 1);
    METRICS.observe(REQUEST_DURATION, labels, elapsed);
}

/// The name of a gRPC code as the metrics and the request log show it (`Ok`, `Unavailable`).
pub fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

/// The outcome of an etcd transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnResult {
    /// Its compares held and its writes were applied.
    Committed,
    /// A compare failed: nothing was written (another writer got there first, or a retry of
    /// a transaction that had committed).
    Refused,
    /// No answer within the retry budget, or an error.
    Failed,
}

impl TxnResult {
    /// The outcome etcd answered.
    pub fn of(response: &etcd_client::TxnResponse) -> TxnResult {
        if response.succeeded() {
            TxnResult::Committed
        } else {
            TxnResult::Refused
        }
    }
}

/// Records the latency of one etcd transaction, its retries included.
pub fn etcd_txn(result: TxnResult, elapsed: Duration) {
    let result = match result {
        TxnResult::Committed => "committed",
        TxnResult::Refused => "refused",
        TxnResult::Failed => "failed",
    };
    METRICS.observe(ETCD_TXN_DURATION, vec![("result", result.into())], elapsed);
}

/// Counts one etcd request sent again after a transient error.
pub fn etcd_retry() {
    METRICS.add(ETCD_RETRIES, Vec::new(), 1);
}

/// Counts `members` transactions sent nested in one request.
pub fn etcd_grouped(members: usize) {
    METRICS.add(ETCD_GROUPED, Vec::new(), members as u64);
}

/// Counts one reload of the pool cache after its watch ended.
pub fn watch_reload() {
    METRICS.add(WATCH_RELOADS, Vec::new(), 1);
}

/// Counts `events` changes delivered by the pool watch.
pub fn watch_events(events: usize) {
    if events > 0 {
        METRICS.add(WATCH_EVENTS, Vec::new(), events as u64);
    }
}

/// Counts `released` attachments released by garbage collector `gc` for `reason`.
pub fn gc_released(gc: &'static str, reason: &'static str, released: usize) {
    if released > 0 {
        METRICS.add(
            GC_RELEASED,
            vec![("gc", gc.into()), ("reason", reason.into())],
            released as u64,
        );
    }
}

/// Counts one QingCloud API request of `action` that came to `result` (a ret_code, or
/// `transport_error`, `unreadable_answer`).
pub fn qingcloud_call(action: &str, result: String) {
    METRICS.add(
        QINGCLOUD_API_CALLS,
        vec![("action", action.to_string()), ("result", result)],
        1,
    );
}

/// What one scrape shows besides the registry.
#[derive(Debug, Default)]
pub struct Scrape {
    pub pools: Vec<PoolGauges>,
    /// In QingCloud mode, when its records could be read.
    pub nics: Option<NicGauges>,
}

impl Scrape {
    /// The whole `/metrics` page.
    pub fn render(&self) -> String {
        let mut out = METRICS.render(&self.pools);
        if let Some(nics) = &self.nics {
            render_nics(&mut out, nics);
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    fn usage(size: u128, held: u128, free: u128, blocks: &[(&str, u64)]) -> Usage {
        Usage {
            size,
            held,
            free,
            blocks: blocks.iter().map(|(n, c)| ((*n).to_string(), *c)).collect(),
        }
    }

    #[test]
    fn counters_and_histograms_render_in_the_text_format() {
        let r = Registry::default();
        let labels = || vec![("verb", "allocate".to_string()), ("code", "Ok".to_string())];
        r.add(REQUESTS, labels(), 2);
        r.observe(REQUEST_DURATION, labels(), Duration::from_millis(3));
        r.observe(REQUEST_DURATION, labels(), Duration::from_millis(300));
        r.observe(REQUEST_DURATION, labels(), Duration::from_secs(60));
        let text = r.render(&[]);
        assert!(text.contains(
            "# TYPE hostnic_ipamd_requests_total counter\n\
             hostnic_ipamd_requests_total{verb=\"allocate\",code=\"Ok\"} 2\n"
        ));
        let bucket = |le: &str, n: u64| {
            format!(
                "hostnic_ipamd_request_duration_seconds_bucket{{verb=\"allocate\",code=\"Ok\",le=\"{le}\"}} {n}\n"
            )
        };
        // Cumulative: 3 ms is in every bucket from 5 ms on, 300 ms from 500 ms on, 60 s only
        // in +Inf.
        for (le, n) in [
            ("0.0025", 0),
            ("0.005", 1),
            ("0.25", 1),
            ("0.5", 2),
            ("10", 2),
            ("+Inf", 3),
        ] {
            assert!(text.contains(&bucket(le, n)), "{le}: {text}");
        }
        assert!(text.contains(
            "hostnic_ipamd_request_duration_seconds_count{verb=\"allocate\",code=\"Ok\"} 3\n"
        ));
        assert!(text.contains(
            "hostnic_ipamd_request_duration_seconds_sum{verb=\"allocate\",code=\"Ok\"} 60.303"
        ));
        // Unlabelled counters exist from the start.
        assert!(
            text.contains("\nhostnic_ipamd_etcd_retries_total 0\n"),
            "{text}"
        );
        assert!(text.contains("\nhostnic_ipamd_pool_watch_reloads_total 0\n"));
        assert_eq!(
            r.counter(REQUESTS, &[("verb", "allocate"), ("code", "Ok")]),
            2
        );
        assert_eq!(
            r.counter(REQUESTS, &[("verb", "release"), ("code", "Ok")]),
            0
        );
    }

    #[test]
    fn every_family_has_help_and_type_once_and_samples_only_of_its_own() {
        let r = Registry::default();
        r.add(
            GC_RELEASED,
            vec![("gc", "netns".into()), ("reason", "netns_gone".into())],
            1,
        );
        r.add(ETCD_RETRIES, Vec::new(), 4);
        let text = r.render(&[PoolGauges {
            subnet: "10.0.0.0/24".into(),
            usage: usage(253, 3, 251, &[("node-a", 2), ("node-b", 1)]),
        }]);
        for family in FAMILIES.iter().map(|f| f.0).chain([
            "hostnic_ipamd_pool_size",
            "hostnic_ipamd_pool_held",
            "hostnic_ipamd_pool_free",
            "hostnic_ipamd_pool_blocks",
        ]) {
            assert_eq!(
                text.matches(&format!("# TYPE {family} ")).count(),
                1,
                "{family}"
            );
            assert_eq!(
                text.matches(&format!("# HELP {family} ")).count(),
                1,
                "{family}"
            );
        }
        assert!(text.contains("\nhostnic_ipamd_etcd_retries_total 4\n"));
        assert!(text
            .contains("hostnic_ipamd_gc_released_total{gc=\"netns\",reason=\"netns_gone\"} 1\n"));
        assert!(text.contains("hostnic_ipamd_pool_size{pool=\"10.0.0.0/24\"} 253\n"));
        assert!(text.contains("hostnic_ipamd_pool_held{pool=\"10.0.0.0/24\"} 3\n"));
        assert!(text.contains("hostnic_ipamd_pool_free{pool=\"10.0.0.0/24\"} 251\n"));
        assert!(
            text.contains("hostnic_ipamd_pool_blocks{pool=\"10.0.0.0/24\",node=\"node-b\"} 1\n")
        );
        // Each sample follows its own family's header.
        let mut current = "";
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(current), "{line} under {current}");
            }
        }
    }

    #[test]
    fn api_calls_by_action_and_result_and_the_nic_gauges_render() {
        let r = Registry::default();
        let call = |action: &str, result: &str| {
            vec![
                ("action", action.to_string()),
                ("result", result.to_string()),
            ]
        };
        r.add(QINGCLOUD_API_CALLS, call("CreateNics", "0"), 2);
        r.add(QINGCLOUD_API_CALLS, call("CreateNics", "5100"), 1);
        let text = r.render(&[]);
        assert!(text.contains(
            "hostnic_ipamd_qingcloud_api_calls_total{action=\"CreateNics\",result=\"5100\"} 1\n"
        ));
        let mut out = String::new();
        render_nics(
            &mut out,
            &NicGauges {
                attaching: 1,
                ready: 2,
                leased: 3,
                max: 8,
            },
        );
        assert!(out.contains("# TYPE hostnic_ipamd_nics gauge\n"));
        assert!(out.contains("hostnic_ipamd_nics{state=\"attaching\"} 1\n"));
        assert!(out.contains("hostnic_ipamd_nics{state=\"ready\"} 2\n"));
        assert!(out.contains("hostnic_ipamd_nics{state=\"leased\"} 3\n"));
        assert!(out.contains("\nhostnic_ipamd_nics_max 8\n"));
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz"), "x\\\\y\\nz");
        assert_eq!(format_float(0.0005), "0.0005");
        assert_eq!(format_float(10.0), "10");
        assert_eq!(format_float(2.5), "2.5");
    }
}
