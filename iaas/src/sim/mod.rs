//! A local simulator of the QingCloud IaaS API, faithful to the wire protocol: GET (or POST
//! form) on `/iaas` and `/iaas/`, signature version 1 checked against the path and method
//! actually used (1200 on a mismatch or an unknown key), `time_stamp` within a window (1300),
//! always HTTP 200 with `application/json`. Behind it, [`cloud::Cloud`]: the NIC state machine,
//! asynchronous attach/detach jobs, the per-instance NIC limit and per-vxnet address space.
//! An account-wide API rate answers 2500 past its limit. Faults are injected at run time,
//! through [`Simulator`]'s methods or the admin endpoint on the same listener:
//!
//! - `POST /_sim/faults` with a JSON [`Control`]: faults to add (`{"action": "DescribeNics",
//!   "effect": {"error": {"ret_code": 5100}}, "times": 2}`, `"effect": "drop"` to close the
//!   connection without an answer), `job_duration_ms`, `fail_next_jobs`, `calls_per_hour`,
//!   `stopped_instances`/`running_instances`;
//! - `DELETE /_sim/faults`: remove every fault not yet used up;
//! - `GET /_sim/calls`: calls received by action (`{"DescribeNics": 3}`), for tests that count
//!   retries.

pub mod auth;
pub mod cloud;
pub mod links;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{Config, Protocol, SecretKey};
use crate::error::code;
use crate::limit::{TokenBucket, DEFAULT_CALLS_PER_HOUR};
use crate::sign::{self, Params};
use crate::timefmt;
use crate::types::{Job, Nic};
pub use cloud::{ApiError, NicEvent, VxnetSpec};
use cloud::{Cloud, CloudSpec};
use links::Links;

/// The largest POST body read.
const MAX_BODY_BYTES: usize = 1 << 20;

/// What the simulator starts with.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The one access key it knows.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: SecretKey,
    /// The zone requests must name.
    pub zone: String,
    /// The user owning the key and everything (`usr-…`).
    pub owner: String,
    /// Running instances.
    pub instances: Vec<String>,
    /// Vxnets.
    pub vxnets: Vec<VxnetSpec>,
    /// How far `time_stamp` may be from the simulator's clock (default 60 s, as documented).
    pub time_window: Duration,
    /// The account's API rate (default 2,000 calls an hour, all of it usable at once).
    pub calls_per_hour: u32,
    /// How long an attach or detach job takes (default 300 ms).
    pub job_duration: Duration,
    /// NICs per instance, its primary NIC included (default 64).
    pub nic_limit_per_instance: u32,
    /// Plug each attached NIC in as a real link with its MAC (root only; see [`links`]).
    pub real_links: bool,
}

impl SimConfig {
    /// A simulator for one key in `zone`, without instances or vxnets, with the defaults.
    pub fn new(access_key_id: &str, secret: SecretKey, zone: &str) -> Self {
        Self {
            access_key_id: access_key_id.to_string(),
            secret_access_key: secret,
            zone: zone.to_string(),
            owner: "usr-SimOwn01".to_string(),
            instances: Vec::new(),
            vxnets: Vec::new(),
            time_window: Duration::from_secs(60),
            calls_per_hour: DEFAULT_CALLS_PER_HOUR,
            job_duration: Duration::from_millis(300),
            nic_limit_per_instance: 64,
            real_links: false,
        }
    }
}

/// What an injected fault does to a request it matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultEffect {
    /// Answer with this `ret_code` (and message, or a default one for the code).
    Error {
        /// `ret_code`.
        ret_code: u32,
        /// `message`.
        #[serde(default)]
        message: Option<String>,
    },
    /// Close the connection without answering.
    Drop,
}

/// A fault for the next `times` requests of `action` (of any action when `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// The action it applies to.
    #[serde(default)]
    pub action: Option<String>,
    /// What it does.
    pub effect: FaultEffect,
    /// How many requests it applies to (default 1).
    #[serde(default = "one")]
    pub times: u32,
}

fn one() -> u32 {
    1
}

impl Fault {
    /// `ret_code` for the next `times` calls of `action`.
    pub fn error(action: &str, ret_code: u32, times: u32) -> Self {
        Self {
            action: Some(action.to_string()),
            effect: FaultEffect::Error {
                ret_code,
                message: None,
            },
            times,
        }
    }

    /// Dropped connections for the next `times` calls of `action`.
    pub fn drop_connection(action: &str, times: u32) -> Self {
        Self {
            action: Some(action.to_string()),
            effect: FaultEffect::Drop,
            times,
        }
    }
}

/// The admin endpoint's request body; every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// Faults to add.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// How long the next jobs take.
    #[serde(default)]
    pub job_duration_ms: Option<u64>,
    /// How many of the next jobs fail.
    #[serde(default)]
    pub fail_next_jobs: Option<u32>,
    /// A new API rate (the bucket starts full).
    #[serde(default)]
    pub calls_per_hour: Option<u32>,
    /// Instances to stop.
    #[serde(default)]
    pub stopped_instances: Vec<String>,
    /// Instances to start.
    #[serde(default)]
    pub running_instances: Vec<String>,
}

struct Shared {
    config: SimConfig,
    cloud: Mutex<Cloud>,
    faults: Mutex<Vec<Fault>>,
    calls: Mutex<BTreeMap<String, u64>>,
    bucket: Mutex<TokenBucket>,
    links: Option<tokio::sync::mpsc::UnboundedSender<NicEvent>>,
}

impl Shared {
    /// Passes the attachment changes a step of the cloud made on to the link task.
    fn dispatch(&self, events: Vec<NicEvent>) {
        for event in events {
            tracing::debug!(?event, "NIC attachment changed");
            if let Some(links) = &self.links {
                let _ = links.send(event);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running simulator; dropping it stops it.
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    links: Option<Links>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .field("zone", &self.shared.config.zone)
            .finish_non_exhaustive()
    }
}

/// Returned by the request handler to close the connection without an answer.
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by an injected fault")
    }
}

impl std::error::Error for DropConnection {}

type Answer = Response<Full<Bytes>>;

fn json_answer(status: StatusCode, value: &Value) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn api_error(e: &ApiError) -> Answer {
    json_answer(
        StatusCode::OK,
        &json!({ "ret_code": e.code, "message": e.message }),
    )
}

fn default_message(ret_code: u32) -> &'static str {
    match ret_code {
        code::MALFORMED => "InvalidParameter, injected fault",
        code::AUTH_FAILURE => "AuthFailure, signature not matched",
        code::MESSAGE_EXPIRED => "MessageExpired, injected fault",
        code::PERMISSION_DENIED => "PermissionDenied, injected fault, please try later",
        code::RESOURCE_NOT_FOUND => "ResourceNotFound, injected fault",
        code::QUOTA_EXCEEDED => {
            "QuotaExceeded, too many API requests in a short time, please try later"
        }
        code::INTERNAL_ERROR => "InternalError, injected fault",
        code::SERVER_BUSY => "ServerBusy, server is busy, please try later",
        _ => "injected fault",
    }
}

impl Simulator {
    /// Binds `listen` and serves until dropped.
    pub async fn start(listen: SocketAddr, config: SimConfig) -> std::io::Result<Self> {
        let links = if config.real_links {
            Some(Links::start().map_err(std::io::Error::other)?)
        } else {
            None
        };
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u16(addr.port());
            h.finish()
        };
        let mut cloud = Cloud::new(
            CloudSpec {
                zone: config.zone.clone(),
                owner: config.owner.clone(),
                access_key_id: config.access_key_id.clone(),
                instances: config.instances.clone(),
                vxnets: config.vxnets.clone(),
                nic_limit_per_instance: config.nic_limit_per_instance,
            },
            seed,
            timefmt::now_unix(),
        );
        cloud.job_duration = config.job_duration;
        let bucket = TokenBucket::new(config.calls_per_hour, config.calls_per_hour, Instant::now());
        let shared = Arc::new(Shared {
            config,
            cloud: Mutex::new(cloud),
            faults: Mutex::new(Vec::new()),
            calls: Mutex::new(BTreeMap::new()),
            bucket: Mutex::new(bucket),
            links: links.as_ref().map(Links::sender),
        });
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), stopped));
        let ticker = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                loop {
                    tick.tick().await;
                    let events = {
                        let mut cloud = lock(&shared.cloud);
                        cloud.advance(Instant::now(), timefmt::now_unix());
                        cloud.take_events()
                    };
                    shared.dispatch(events);
                }
            })
        };
        Ok(Self {
            addr,
            shared,
            tasks: vec![accept, ticker],
            links,
            stop,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client config that reaches this simulator with its key, over HTTP, path `/iaas`.
    pub fn client_config(&self) -> Config {
        let c = &self.shared.config;
        let mut config = Config::new(&c.access_key_id, c.secret_access_key.clone(), &c.zone);
        config.protocol = Protocol::Http;
        config.host = self.addr.ip().to_string();
        config.port = self.addr.port();
        config
    }

    /// Applies a [`Control`], as `POST /_sim/faults` does.
    pub fn control(&self, control: Control) {
        apply_control(&self.shared, control);
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        lock(&self.shared.faults).push(fault);
    }

    /// Removes every fault not yet used up.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Calls received for `action`, faulty and refused ones included.
    pub fn calls(&self, action: &str) -> u64 {
        lock(&self.shared.calls).get(action).copied().unwrap_or(0)
    }

    /// Every NIC, as `DescribeNics` would list it.
    pub fn nics(&self) -> Vec<Nic> {
        lock(&self.shared.cloud).nics()
    }

    /// Every job.
    pub fn jobs(&self) -> Vec<Job> {
        lock(&self.shared.cloud).jobs()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        // Closes the connections still open.
        let _ = self.stop.send(true);
        // Deletes the links still plugged in.
        drop(self.links.take());
    }
}

fn apply_control(shared: &Shared, control: Control) {
    lock(&shared.faults).extend(control.faults);
    let mut cloud = lock(&shared.cloud);
    if let Some(ms) = control.job_duration_ms {
        cloud.job_duration = Duration::from_millis(ms);
    }
    if let Some(n) = control.fail_next_jobs {
        cloud.fail_next_jobs = n;
    }
    for i in &control.stopped_instances {
        cloud.set_running(i, false);
    }
    for i in &control.running_instances {
        cloud.set_running(i, true);
    }
    if let Some(rate) = control.calls_per_hour {
        *lock(&shared.bucket) = TokenBucket::new(rate, rate, Instant::now());
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = stopped.wait_for(|stop| *stop) => {}
            }
        });
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Answer, DropConnection> {
    let path = req.uri().path().to_string();
    if path.starts_with("/_sim/") {
        return Ok(admin(&shared, req).await);
    }
    if path != "/iaas" && path != "/iaas/" {
        return Ok(json_answer(
            StatusCode::NOT_FOUND,
            &json!({ "message": format!("no API at {path}: use /iaas or /iaas/") }),
        ));
    }
    let method = req.method().clone();
    let text = match method {
        Method::GET => req.uri().query().unwrap_or("").to_string(),
        Method::POST => match Limited::new(req.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
        {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            Err(e) => {
                return Ok(api_error(&ApiError::new(
                    code::MALFORMED,
                    format!("InvalidParameter, unreadable body: {e}"),
                )))
            }
        },
        _ => {
            return Ok(json_answer(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({ "message": "use GET or POST" }),
            ))
        }
    };
    match serve_api(&shared, method.as_str(), &path, &text) {
        Ok(value) => Ok(json_answer(StatusCode::OK, &value)),
        Err(Refusal::Api(e)) => Ok(api_error(&e)),
        Err(Refusal::Drop) => Err(DropConnection),
    }
}

enum Refusal {
    Api(ApiError),
    Drop,
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

/// One API request, from its form-encoded parameters to its answer.
fn serve_api(shared: &Shared, method: &str, path: &str, text: &str) -> Result<Value, Refusal> {
    let pairs = sign::form_decode(text)
        .map_err(|e| ApiError::new(code::MALFORMED, format!("InvalidParameter, {e}")))?;
    let mut params = Params::new();
    for (name, value) in pairs {
        if params.contains_key(&name) {
            return Err(ApiError::new(
                code::MALFORMED,
                format!("InvalidParameter, parameter [{name}] is given twice"),
            )
            .into());
        }
        params.insert(name, value);
    }
    let action = params.get("action").cloned().unwrap_or_default();
    *lock(&shared.calls).entry(action.clone()).or_default() += 1;
    let fault = {
        let mut faults = lock(&shared.faults);
        let found = faults
            .iter_mut()
            .find(|f| f.times > 0 && f.action.as_ref().is_none_or(|a| *a == action));
        let effect = found.map(|f| {
            f.times -= 1;
            f.effect.clone()
        });
        faults.retain(|f| f.times > 0);
        effect
    };
    match fault {
        Some(FaultEffect::Drop) => return Err(Refusal::Drop),
        Some(FaultEffect::Error { ret_code, message }) => {
            let message = message.unwrap_or_else(|| default_message(ret_code).to_string());
            return Err(ApiError::new(ret_code, message).into());
        }
        None => {}
    }
    let config = &shared.config;
    auth::verify_signature(
        method,
        path,
        &params,
        &config.access_key_id,
        &config.secret_access_key,
    )?;
    let now_unix = timefmt::now_unix();
    auth::verify_time(&params, now_unix, config.time_window)?;
    if action.is_empty() {
        return Err(ApiError::new(
            code::MALFORMED,
            "InvalidParameter, parameter [action] is required",
        )
        .into());
    }
    match params.get("zone") {
        Some(zone) if *zone == config.zone => {}
        Some(zone) => {
            return Err(ApiError::new(
                code::MALFORMED,
                format!(
                    "InvalidParameter, zone [{zone}] is not served here (only [{}])",
                    config.zone
                ),
            )
            .into())
        }
        None => {
            return Err(ApiError::new(
                code::MALFORMED,
                "InvalidParameter, parameter [zone] is required",
            )
            .into())
        }
    }
    if lock(&shared.bucket).take(Instant::now()).is_err() {
        return Err(
            ApiError::new(code::QUOTA_EXCEEDED, default_message(code::QUOTA_EXCEEDED)).into(),
        );
    }
    let (answer, events) = {
        let mut cloud = lock(&shared.cloud);
        let answer = cloud.handle(&action, &params, Instant::now(), now_unix);
        (answer, cloud.take_events())
    };
    shared.dispatch(events);
    Ok(answer?)
}

async fn admin(shared: &Shared, req: Request<Incoming>) -> Answer {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/_sim/calls") => {
            let calls = lock(&shared.calls).clone();
            json_answer(StatusCode::OK, &json!(calls))
        }
        (Method::DELETE, "/_sim/faults") => {
            lock(&shared.faults).clear();
            json_answer(StatusCode::OK, &json!({}))
        }
        (Method::POST, "/_sim/faults") => {
            let body = match Limited::new(req.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
            {
                Ok(body) => body.to_bytes(),
                Err(e) => {
                    return json_answer(
                        StatusCode::BAD_REQUEST,
                        &json!({ "message": format!("unreadable body: {e}") }),
                    )
                }
            };
            match serde_json::from_slice::<Control>(&body) {
                Ok(control) => {
                    apply_control(shared, control);
                    json_answer(StatusCode::OK, &json!({}))
                }
                Err(e) => json_answer(
                    StatusCode::BAD_REQUEST,
                    &json!({ "message": format!("not a control object: {e}") }),
                ),
            }
        }
        _ => json_answer(
            StatusCode::NOT_FOUND,
            &json!({ "message": format!("no admin endpoint {} {path}", req.method()) }),
        ),
    }
}
