//! What a call can fail with: the API's `ret_code`/`message`, a transport failure, an
//! unreadable answer, a job that failed or did not finish. Messages name the action and never
//! carry a secret (the client never formats one, and the API does not echo it).

use std::time::Duration;

/// The `ret_code`s the client and the simulator act on (docs `error_code.md`).
pub mod code {
    /// A required parameter is missing or a value is malformed.
    pub const MALFORMED: u32 = 1100;
    /// Unknown action (request method) or a wrong parameter value.
    pub const BAD_REQUEST: u32 = 1101;
    /// Unknown `access_key_id` or a signature that does not match.
    pub const AUTH_FAILURE: u32 = 1200;
    /// `time_stamp` outside the accepted window (or past `expires`).
    pub const MESSAGE_EXPIRED: u32 = 1300;
    /// Not allowed: not yours, or the resource is in a state that forbids the operation.
    pub const PERMISSION_DENIED: u32 = 1400;
    /// The resource does not exist.
    pub const RESOURCE_NOT_FOUND: u32 = 2100;
    /// Quota exceeded, including too many API calls in a short time.
    pub const QUOTA_EXCEEDED: u32 = 2500;
    /// Internal error.
    pub const INTERNAL_ERROR: u32 = 5000;
    /// Server busy; try again later.
    pub const SERVER_BUSY: u32 = 5100;

    /// Whether a `ret_code` says the same request may succeed later: 5000, 5100 and 2500.
    pub fn is_retryable(code: u32) -> bool {
        matches!(code, INTERNAL_ERROR | SERVER_BUSY | QUOTA_EXCEEDED)
    }
}

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API answered with a non-zero `ret_code`.
    #[error("QingCloud {action} failed: ret_code {code}: {message}")]
    Api {
        /// The action called.
        action: String,
        /// `ret_code`.
        code: u32,
        /// `message` (`""` when the answer had none).
        message: String,
    },
    /// No answer: connecting, sending or reading failed or timed out.
    #[error("QingCloud {action}: no answer from {origin}: {reason}")]
    Transport {
        /// The action called.
        action: String,
        /// `protocol://host:port`.
        origin: String,
        /// What failed.
        reason: String,
        /// Whether the connection could not even be made, so the request surely was not
        /// carried out.
        before_sending: bool,
    },
    /// An answer that is not what the API sends (status, content type, JSON, fields).
    #[error("QingCloud {action}: unreadable answer: {reason}")]
    Decode {
        /// The action called.
        action: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A request the client refuses to send (e.g. an empty list of NICs).
    #[error("QingCloud {action}: invalid request: {reason}")]
    InvalidRequest {
        /// The action.
        action: String,
        /// What is wrong.
        reason: String,
    },
    /// `DescribeJobs` does not know the job.
    #[error("QingCloud job {job_id} not found")]
    JobNotFound {
        /// The job.
        job_id: String,
    },
    /// The job ended with status `failed` (or `done with failure`).
    #[error("QingCloud job {job_id} ({job_action}) ended {status}")]
    JobFailed {
        /// The job.
        job_id: String,
        /// The action that started it.
        job_action: String,
        /// The final status.
        status: String,
    },
    /// The job was not done within the time given.
    #[error("QingCloud job {job_id} not done after {waited:?}: last status {status}")]
    JobTimeout {
        /// The job.
        job_id: String,
        /// How long the client waited.
        waited: Duration,
        /// The last status seen (`unknown` if none was read).
        status: String,
    },
}

impl Error {
    /// The `ret_code` of an API error.
    pub fn code(&self) -> Option<u32> {
        match self {
            Self::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the API says the resource does not exist (2100): a detach or delete of
    /// something already gone.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(code::RESOURCE_NOT_FOUND)
    }

    /// Whether trying again later may succeed: 5000, 5100, 2500, and transport failures.
    /// (Whether the client itself retries a transport failure also depends on the action.)
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Api { code, .. } => code::is_retryable(*code),
            Self::Transport { .. } => true,
            _ => false,
        }
    }
}
