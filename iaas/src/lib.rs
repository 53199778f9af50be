//! QingCloud IaaS API: a client for the NIC actions a node daemon needs, and a faithful local
//! simulator of the same API (`qingcloud-sim`) to test it against.
//!
//! - [`config`]: the SDK's `config.yaml` (hostnic's `qcsecret`), the secret kept out of every
//!   log line, `Debug` output and error;
//! - [`sign`]: signature version 1 (canonical query, HMAC-SHA256/SHA1), pure;
//! - [`timefmt`]: the API's UTC time stamps, pure;
//! - [`limit`]: the token bucket under the account's API rate and the retry backoff, pure;
//! - [`types`]: typed requests and answers of the actions;
//! - [`error`]: `ret_code`/`message` as a typed error, and which errors are retryable;
//! - [`client`]: the async client: signing, paging, retries, rate, waiting on jobs;
//! - [`sim`]: the simulator: wire protocol, signature and time checks, NIC state machine,
//!   asynchronous jobs, limits, fault injection.

pub mod client;
pub mod config;
pub mod error;
pub mod limit;
pub mod sign;
pub mod sim;
pub mod timefmt;
pub mod types;

pub use client::{CallObserver, CallResult, Client, ClientOptions};
pub use config::{Config, ConfigError, SecretKey};
pub use error::Error;
