//! The daemon's log on stderr: `--log-format text` (one human-readable line per event, the
//! request's span fields in front) or `json` (one JSON object per line, for a log pipeline).
//! Either way a CNI request logs one line of outcome (see `service`): its verb, network,
//! container id, ifname, pod, addresses, duration and result.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `TIME LEVEL span{fields}: message fields`, coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the event's fields at the top
    /// level (`message` among them) and the request's fields under `span`.
    Json,
}

/// Installs the global subscriber: events at `RUST_LOG`'s levels (default `info`) to stderr in
/// `format`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            // Colour codes only for a terminal, not in a file or a pod's log.
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
