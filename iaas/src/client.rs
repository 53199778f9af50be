//! The async client: signs each request (GET, as the Go SDK and hostnic do), paces calls
//! under the account's rate, retries what the API says may succeed later, decodes
//! `ret_code`/`message` into [`Error`], pages `Describe*` actions past 100 rows and waits on
//! jobs. Cheap to clone and usable from many tasks at once.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::time::Instant;

use crate::config::{Config, ConfigError, Protocol};
use crate::error::{code, Error};
use crate::limit::{jitter_unit, RetryPolicy, TokenBucket, DEFAULT_CALLS_PER_HOUR};
use crate::sign::{self, Params, SignatureMethod};
use crate::timefmt;
use crate::types::{
    action, AccessKey, CreateNics, Job, JobStatus, Nic, NicFilter, NicIp, Vxnet, PAGE_LIMIT,
};

/// The largest answer read (a full page of 100 rows is far smaller).
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// How the client paces, retries and waits. `Default` is the API's documented rate and the
/// SDK's retry count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientOptions {
    /// The account's API rate (default 2,000 calls an hour).
    pub calls_per_hour: u32,
    /// Calls that may go at once before the rate applies (default 20).
    pub burst: u32,
    /// Retries of retryable failures. `Client::from_config` sets `max_attempts` from the
    /// config's `connection_retries`.
    pub retry: RetryPolicy,
    /// The limit on one request, from connecting to the end of the answer (default 60 s).
    pub request_timeout: Duration,
    /// How often [`Client::wait_job`] asks about the job (default 2 s).
    pub job_poll_interval: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            calls_per_hour: DEFAULT_CALLS_PER_HOUR,
            burst: 20,
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(60),
            job_poll_interval: Duration::from_secs(2),
        }
    }
}

/// What one request to the API came to, as a [`CallObserver`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// `ret_code` 0.
    Ok,
    /// A non-zero `ret_code`.
    RetCode(u32),
    /// No answer (connecting, sending or reading failed or timed out).
    Transport,
    /// An answer that is not what the API sends (status, content type, JSON).
    Unreadable,
}

impl CallResult {
    /// The result of one attempt that ended in `outcome`.
    pub fn of(outcome: &Result<Value, Error>) -> Self {
        match outcome {
            Ok(_) => CallResult::Ok,
            Err(Error::Api { code, .. }) => CallResult::RetCode(*code),
            Err(Error::Transport { .. }) => CallResult::Transport,
            Err(_) => CallResult::Unreadable,
        }
    }

    /// A short label for metrics: the `ret_code` (`"0"`, `"5100"`), `"transport_error"` or
    /// `"unreadable_answer"`.
    pub fn label(self) -> String {
        match self {
            CallResult::Ok => "0".to_string(),
            CallResult::RetCode(code) => code.to_string(),
            CallResult::Transport => "transport_error".to_string(),
            CallResult::Unreadable => "unreadable_answer".to_string(),
        }
    }
}

/// Told of every request the client sends (each attempt of a retried call), with the action
/// and its result: how a caller counts API calls without this crate knowing its metrics.
pub type CallObserver = Arc<dyn Fn(&str, CallResult) + Send + Sync>;

type HttpClient = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

struct Inner {
    config: Config,
    options: ClientOptions,
    http: HttpClient,
    bucket: Mutex<TokenBucket>,
    observer: OnceLock<CallObserver>,
}

/// A QingCloud IaaS API client.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("config", &self.inner.config)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// A request ready to send: what signing produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    /// `GET`.
    pub method: &'static str,
    /// The path signed and requested (the config's `uri`).
    pub path: String,
    /// The query: canonical parameters, then `&signature=…`.
    pub query: String,
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn put_list(params: &mut Params, name: &str, items: &[String]) {
    for (i, item) in items.iter().enumerate() {
        params.insert(format!("{name}.{}", i + 1), item.clone());
    }
}

fn params_of(pairs: &[(&str, &str)]) -> Params {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Client {
    /// A client for `config`, with `options.retry.max_attempts` taken from the config's
    /// `connection_retries` (plus the first attempt).
    pub fn from_config(config: Config) -> Result<Self, ConfigError> {
        let mut options = ClientOptions::default();
        options.retry.max_attempts = config.connection_retries.saturating_add(1);
        Self::new(config, options)
    }

    /// A client for `config` with explicit options. Fails only when HTTPS is configured and
    /// the system has no trusted root certificates.
    pub fn new(config: Config, options: ClientOptions) -> Result<Self, ConfigError> {
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_connect_timeout(Some(config.connection_timeout));
        let provider = rustls::crypto::ring::default_provider();
        let builder = match config.protocol {
            Protocol::Https => HttpsConnectorBuilder::new()
                .with_provider_and_native_roots(provider)
                .map_err(|e| ConfigError {
                    source_name: None,
                    reason: format!(
                        "protocol https needs trusted root certificates, none could be loaded: {e}"
                    ),
                })?,
            Protocol::Http => {
                let tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                    .with_safe_default_protocol_versions()
                    .map_err(|e| ConfigError {
                        source_name: None,
                        reason: format!("TLS setup failed: {e}"),
                    })?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                HttpsConnectorBuilder::new().with_tls_config(tls)
            }
        };
        let https = builder
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https);
        let bucket = TokenBucket::new(options.calls_per_hour, options.burst, Instant::now());
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                options,
                http,
                bucket: Mutex::new(bucket),
                observer: OnceLock::new(),
            }),
        })
    }

    /// The client that tells `observer` of every attempt from now on (each try of a retried
    /// call, a connection that could not be made included). The first observer given to a
    /// client, or to any of its clones, is the one kept.
    pub fn with_call_observer(self, observer: CallObserver) -> Self {
        let _ = self.inner.observer.set(observer);
        self
    }

    /// The config the client calls with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Signs `action` with `params` as sent at `time_stamp`: adds the common parameters
    /// (`action`, `zone`, `access_key_id`, `time_stamp`, `signature_method=HmacSHA256`,
    /// `signature_version=1`; no `version`, as the Go SDK) and signs a GET of the config's
    /// `uri`.
    pub fn sign_request(&self, action: &str, params: &Params, time_stamp: &str) -> SignedRequest {
        let config = &self.inner.config;
        let mut all = params.clone();
        all.insert("action".into(), action.into());
        all.insert("zone".into(), config.zone.clone());
        all.insert("access_key_id".into(), config.access_key_id.clone());
        all.insert("time_stamp".into(), time_stamp.into());
        all.insert(
            "signature_method".into(),
            SignatureMethod::HmacSha256.as_str().into(),
        );
        all.insert("signature_version".into(), "1".into());
        let query = sign::signed_query(
            config.secret_access_key.expose(),
            SignatureMethod::HmacSha256,
            "GET",
            &config.uri,
            &all,
        );
        SignedRequest {
            method: "GET",
            path: config.uri.clone(),
            query,
        }
    }

    async fn take_token(&self) {
        loop {
            let wait = match self.inner.bucket.lock() {
                Ok(mut bucket) => bucket.take(Instant::now()),
                Err(poisoned) => poisoned.into_inner().take(Instant::now()),
            };
            match wait {
                Ok(()) => return,
                Err(wait) => {
                    tracing::debug!(wait_ms = wait.as_millis() as u64, "API rate: waiting");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn send_once(&self, action: &str, params: &Params) -> Result<Value, Error> {
        let config = &self.inner.config;
        let signed = self.sign_request(action, params, &timefmt::format_utc(timefmt::now_unix()));
        let url = format!("{}{}?{}", config.origin(), signed.path, signed.query);
        let transport = |reason: String, before_sending: bool| Error::Transport {
            action: action.to_string(),
            origin: config.origin(),
            reason,
            before_sending,
        };
        let decode = |reason: String| Error::Decode {
            action: action.to_string(),
            reason,
        };
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| decode(format!("the request URL is invalid: {e}")))?;
        let exchange = async {
            let response = self
                .inner
                .http
                .get(uri)
                .await
                .map_err(|e| transport(error_chain(&e), e.is_connect()))?;
            let status = response.status();
            let content_type = response
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| transport(format!("reading the answer: {e}"), false))?
                .to_bytes();
            Ok::<_, Error>((status, content_type, body))
        };
        let (status, content_type, body) =
            tokio::time::timeout(self.inner.options.request_timeout, exchange)
                .await
                .map_err(|_| {
                    transport(
                        format!("no answer within {:?}", self.inner.options.request_timeout),
                        false,
                    )
                })??;
        if status != hyper::StatusCode::OK {
            return Err(decode(format!("HTTP status {status}, the API answers 200")));
        }
        if !content_type.starts_with("application/json") {
            return Err(decode(format!(
                "content type {content_type:?}, the API answers application/json"
            )));
        }
        let value: Value =
            serde_json::from_slice(&body).map_err(|e| decode(format!("not JSON: {e}")))?;
        let ret_code = value
            .get("ret_code")
            .and_then(Value::as_u64)
            .ok_or_else(|| decode("no numeric ret_code".to_string()))?;
        if ret_code != 0 {
            return Err(Error::Api {
                action: action.to_string(),
                code: u32::try_from(ret_code).unwrap_or(u32::MAX),
                message: value
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            });
        }
        Ok(value)
    }

    /// Whether a failed attempt of `action` is tried again: `ret_code` 5000, 5100 and 2500
    /// always; a transport failure when the connection was never made, or when the action
    /// only reads. (A mutating request whose answer was lost may have been carried out: it
    /// is left to the caller, who can look before doing it again.)
    fn should_retry(action: &str, error: &Error) -> bool {
        match error {
            Error::Api { code, .. } => code::is_retryable(*code),
            Error::Transport { before_sending, .. } => {
                *before_sending || action::is_read_only(action)
            }
            _ => false,
        }
    }

    /// Calls `action` with `params` (common parameters are added) and returns the answer's
    /// JSON, after retries. The raw building block of the typed actions.
    pub async fn call(&self, action: &str, params: &Params) -> Result<Value, Error> {
        let policy = self.inner.options.retry;
        let mut attempt = 1;
        loop {
            self.take_token().await;
            tracing::debug!(action, attempt, "QingCloud API call");
            let outcome = self.send_once(action, params).await;
            if let Some(observer) = self.inner.observer.get() {
                observer(action, CallResult::of(&outcome));
            }
            match outcome {
                Ok(value) => return Ok(value),
                Err(e) if attempt < policy.max_attempts && Self::should_retry(action, &e) => {
                    let wait = policy.delay(attempt, jitter_unit());
                    tracing::warn!(
                        action,
                        attempt,
                        wait_ms = wait.as_millis() as u64,
                        error = %e,
                        "QingCloud API call failed, retrying"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn decode_field<T: DeserializeOwned>(
        action: &str,
        value: &Value,
        field: &str,
    ) -> Result<T, Error> {
        let item = value.get(field).cloned().unwrap_or(Value::Null);
        serde_json::from_value(item).map_err(|e| Error::Decode {
            action: action.to_string(),
            reason: format!("field {field}: {e}"),
        })
    }

    /// Every row of a `Describe*` action: pages of 100 by `offset` until `total_count`.
    async fn describe_all<T: DeserializeOwned>(
        &self,
        action: &str,
        params: &Params,
        set: &str,
    ) -> Result<Vec<T>, Error> {
        let mut rows = Vec::new();
        let mut params = params.clone();
        params.insert("limit".into(), PAGE_LIMIT.to_string());
        loop {
            params.insert("offset".into(), rows.len().to_string());
            let page = self.call(action, &params).await?;
            let items: Vec<T> = Self::decode_field(action, &page, set)?;
            let total = page.get("total_count").and_then(Value::as_u64);
            let got = items.len();
            rows.extend(items);
            match total {
                Some(total) if got > 0 && (rows.len() as u64) < total => continue,
                _ => return Ok(rows),
            }
        }
    }

    fn require_items(action: &str, what: &str, items: &[String]) -> Result<(), Error> {
        if items.is_empty() {
            return Err(Error::InvalidRequest {
                action: action.to_string(),
                reason: format!("no {what} given"),
            });
        }
        Ok(())
    }

    /// `DescribeAccessKeys` of the given key ids (hostnic checks its own key at start and
    /// reads the `owner`).
    pub async fn describe_access_keys(&self, ids: &[String]) -> Result<Vec<AccessKey>, Error> {
        let mut params = Params::new();
        put_list(&mut params, "access_keys", ids);
        self.describe_all(action::DESCRIBE_ACCESS_KEYS, &params, "access_key_set")
            .await
    }

    /// `CreateNics`: new NICs in a vxnet, `available`. With `private_ips`, one NIC per
    /// address and `count` is their number.
    pub async fn create_nics(&self, request: &CreateNics) -> Result<Vec<NicIp>, Error> {
        let act = action::CREATE_NICS;
        if request.vxnet.is_empty() {
            return Err(Error::InvalidRequest {
                action: act.into(),
                reason: "no vxnet given".into(),
            });
        }
        let count = if request.private_ips.is_empty() {
            request.count
        } else {
            u32::try_from(request.private_ips.len()).unwrap_or(u32::MAX)
        };
        if !(1..=252).contains(&count) {
            return Err(Error::InvalidRequest {
                action: act.into(),
                reason: format!("count {count} is not from 1 to 252"),
            });
        }
        let mut params = params_of(&[("vxnet", &request.vxnet)]);
        params.insert("count".into(), count.to_string());
        if let Some(name) = &request.nic_name {
            params.insert("nic_name".into(), name.clone());
        }
        let ips: Vec<String> = request
            .private_ips
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        put_list(&mut params, "private_ips", &ips);
        if request.disable_ip {
            params.insert("disable_ip".into(), "1".into());
        }
        let answer = self.call(act, &params).await?;
        Self::decode_field(act, &answer, "nics")
    }

    fn job_id(action: &str, answer: &Value) -> Result<String, Error> {
        answer
            .get("job_id")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty())
            .map(str::to_string)
            .ok_or_else(|| Error::Decode {
                action: action.to_string(),
                reason: "no job_id".into(),
            })
    }

    /// `AttachNics`: attach available NICs to a running instance; returns the job id.
    pub async fn attach_nics(&self, instance: &str, nics: &[String]) -> Result<String, Error> {
        let act = action::ATTACH_NICS;
        Self::require_items(act, "NICs", nics)?;
        let mut params = params_of(&[("instance", instance)]);
        put_list(&mut params, "nics", nics);
        let answer = self.call(act, &params).await?;
        Self::job_id(act, &answer)
    }

    /// `DetachNics`: detach in-use NICs; returns the job id.
    pub async fn detach_nics(&self, nics: &[String]) -> Result<String, Error> {
        let act = action::DETACH_NICS;
        Self::require_items(act, "NICs", nics)?;
        let mut params = Params::new();
        put_list(&mut params, "nics", nics);
        let answer = self.call(act, &params).await?;
        Self::job_id(act, &answer)
    }

    /// `DeleteNics`: delete available NICs.
    pub async fn delete_nics(&self, nics: &[String]) -> Result<(), Error> {
        let act = action::DELETE_NICS;
        Self::require_items(act, "NICs", nics)?;
        let mut params = Params::new();
        put_list(&mut params, "nics", nics);
        self.call(act, &params).await.map(drop)
    }

    /// `DescribeNics`: every NIC the filter selects, all pages.
    pub async fn describe_nics(&self, filter: &NicFilter) -> Result<Vec<Nic>, Error> {
        let mut params = Params::new();
        put_list(&mut params, "nics", &filter.nics);
        put_list(&mut params, "vxnets", &filter.vxnets);
        put_list(&mut params, "instances", &filter.instances);
        if let Some(name) = &filter.nic_name {
            params.insert("nic_name".into(), name.clone());
        }
        if let Some(status) = filter.status {
            params.insert("status".into(), status.as_str().into());
        }
        self.describe_all(action::DESCRIBE_NICS, &params, "nic_set")
            .await
    }

    /// `DescribeVxnets` of the given ids (all of the account's when empty), all pages.
    pub async fn describe_vxnets(&self, ids: &[String]) -> Result<Vec<Vxnet>, Error> {
        let mut params = Params::new();
        put_list(&mut params, "vxnets", ids);
        self.describe_all(action::DESCRIBE_VXNETS, &params, "vxnet_set")
            .await
    }

    /// `DescribeJobs` of the given ids, all pages.
    pub async fn describe_jobs(&self, ids: &[String]) -> Result<Vec<Job>, Error> {
        let mut params = params_of(&[("verbose", "0")]);
        put_list(&mut params, "jobs", ids);
        self.describe_all(action::DESCRIBE_JOBS, &params, "job_set")
            .await
    }

    /// Waits until job `job_id` is `successful` (its row is returned), polling every
    /// `job_poll_interval`. A `failed` or `done with failure` job is [`Error::JobFailed`];
    /// not done within `timeout`, [`Error::JobTimeout`]; unknown, [`Error::JobNotFound`]. A
    /// retryable failure of `DescribeJobs` only means "ask again"; any other ends the wait.
    pub async fn wait_job(&self, job_id: &str, timeout: Duration) -> Result<Job, Error> {
        let start = Instant::now();
        let deadline = start + timeout;
        let interval = self.inner.options.job_poll_interval;
        let mut last = "unknown".to_string();
        loop {
            match self.describe_jobs(&[job_id.to_string()]).await {
                Ok(jobs) => {
                    let job = jobs
                        .into_iter()
                        .find(|j| j.job_id == job_id)
                        .ok_or_else(|| Error::JobNotFound {
                            job_id: job_id.to_string(),
                        })?;
                    match job.status {
                        JobStatus::Successful => return Ok(job),
                        JobStatus::Failed | JobStatus::DoneWithFailure => {
                            return Err(Error::JobFailed {
                                job_id: job.job_id,
                                job_action: job.job_action,
                                status: job.status.as_str().to_string(),
                            })
                        }
                        status => last = status.as_str().to_string(),
                    }
                }
                Err(e) if e.code() == Some(code::RESOURCE_NOT_FOUND) => {
                    return Err(Error::JobNotFound {
                        job_id: job_id.to_string(),
                    })
                }
                Err(e) if e.is_retryable() => {
                    tracing::debug!(job_id, error = %e, "DescribeJobs failed, asking again");
                }
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::JobTimeout {
                    job_id: job_id.to_string(),
                    waited: start.elapsed(),
                    status: last,
                });
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_result_is_labelled_by_its_ret_code_or_its_failure() {
        let api = |code| Error::Api {
            action: "DescribeNics".into(),
            code,
            message: String::new(),
        };
        let cases = [
            (Ok(Value::Null), "0"),
            (Err(api(5100)), "5100"),
            (Err(api(2100)), "2100"),
            (
                Err(Error::Transport {
                    action: "AttachNics".into(),
                    origin: "http://127.0.0.1:1".into(),
                    reason: "refused".into(),
                    before_sending: true,
                }),
                "transport_error",
            ),
            (
                Err(Error::Decode {
                    action: "DescribeJobs".into(),
                    reason: "not JSON".into(),
                }),
                "unreadable_answer",
            ),
        ];
        for (outcome, label) in cases {
            assert_eq!(CallResult::of(&outcome).label(), label, "{outcome:?}");
        }
    }
}
