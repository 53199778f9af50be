//! The plugin's own log file (`ipam.logFile`, e.g. `/var/log/kube-ipam.log`, where kube-ipam
//! users look): one line appended per call, with the command, network, container id, ifname,
//! pod, result (addresses, or the error's code and message) and duration.
//!
//! Off unless configured, and then it costs one scan of stdin for the key before anything is
//! parsed. Writing it never changes the call's outcome: a file that cannot be opened or written
//! is reported on stderr and the reply is printed as it would be without it.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::env::CniArgs;
use crate::error::ErrorReply;

/// The `ipam` key naming the log file.
pub const KEY: &str = "logFile";

/// What one call did, as its log line says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallResult {
    /// Succeeded; the addresses of an ADD's result (none for the other commands).
    Ok { ips: Vec<String> },
    /// Failed with this CNI error.
    Error { code: u32, msg: String },
}

/// The log file `stdin`'s `ipam.logFile` names, if it names an absolute path. Looks for the key
/// in the raw bytes first, so that a config without it is not parsed a second time.
pub fn configured(stdin: &[u8]) -> Option<PathBuf> {
    let needle = format!("\"{KEY}\"");
    if !stdin.windows(needle.len()).any(|w| w == needle.as_bytes()) {
        return None;
    }
    let config: Value = serde_json::from_slice(stdin).ok()?;
    let path = Path::new(config.get("ipam")?.get(KEY)?.as_str()?);
    path.is_absolute().then(|| path.to_path_buf())
}

/// The result of a call from the reply it printed: an ADD's addresses (`ips[].address`), or an
/// error object's code and message.
pub fn result_of(reply: Option<&str>, failed: Option<&ErrorReply>) -> CallResult {
    if let Some(e) = failed {
        return CallResult::Error {
            code: e.code,
            msg: match &e.details {
                Some(details) => format!("{}: {details}", e.msg),
                None => e.msg.clone(),
            },
        };
    }
    let ips = reply
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .and_then(|v| {
            v.get("ips")?.as_array().map(|ips| {
                ips.iter()
                    .filter_map(|ip| Some(ip.get("address")?.as_str()?.to_owned()))
                    .collect()
            })
        })
        .unwrap_or_default();
    CallResult::Ok { ips }
}

/// The line for one call (with its newline): `TIME hostnic-ipam COMMAND key=value ...`.
/// `vars` is the process environment, `stdin` the config.
pub fn line<K, V>(
    vars: &[(K, V)],
    stdin: &[u8],
    result: &CallResult,
    at: SystemTime,
    took: Duration,
) -> String
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let var = |name: &str| {
        vars.iter()
            .find(|(k, _)| k.as_ref() == name)
            .map(|(_, v)| v.as_ref().to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let network = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| Some(v.get("name")?.as_str()?.to_owned()))
        .unwrap_or_default();
    let args = CniArgs::parse(&var("CNI_ARGS")).unwrap_or_default();
    let pod = match (args.pod_namespace, args.pod_name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name,
        _ => String::new(),
    };
    let command = match var("CNI_COMMAND") {
        c if c.is_empty() => "-".to_owned(),
        c => c,
    };
    let mut out = format!("{} hostnic-ipam {}", rfc3339(at), value(&command));
    for (key, v) in [
        ("network", network),
        ("container", var("CNI_CONTAINERID")),
        ("ifname", var("CNI_IFNAME")),
        ("pod", pod),
    ] {
        if !v.is_empty() {
            let _ = write!(out, " {key}={}", value(&v));
        }
    }
    match result {
        CallResult::Ok { ips } => {
            out.push_str(" result=ok");
            if !ips.is_empty() {
                let _ = write!(out, " ips={}", value(&ips.join(",")));
            }
        }
        CallResult::Error { code, msg } => {
            let _ = write!(out, " result=error code={code} msg={}", value(msg));
        }
    }
    let _ = writeln!(out, " duration_ms={:.3}", took.as_secs_f64() * 1000.0);
    out
}

/// Appends `line` to `path` in one write (O_APPEND: lines of concurrent calls do not
/// interleave), creating the file 0644 as kube-ipam does. The error says what failed.
pub fn append(path: &Path, line: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| format!("cannot append to the log file {}: {e}", path.display()))
}

/// A value as it is written: bare when it is a plain word, quoted and escaped (control
/// characters too, so that no value can forge a line) otherwise.
fn value(v: &str) -> String {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if plain {
        v.to_owned()
    } else {
        format!("{v:?}")
    }
}

/// `at` as an RFC 3339 UTC time with milliseconds, `2026-11-30T12:04:05.123Z`.
fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn only_an_absolute_log_file_in_ipam_is_configured() {
        let config = |ipam: &str| format!(r#"{{"cniVersion":"1.0.0","name":"n","ipam":{ipam}}}"#);
        assert_eq!(
            configured(
                config(r#"{"type":"hostnic-ipam","logFile":"/var/log/kube-ipam.log"}"#).as_bytes()
            ),
            Some(PathBuf::from("/var/log/kube-ipam.log"))
        );
        for ipam in [
            r#"{"type":"hostnic-ipam"}"#,
            r#"{"type":"hostnic-ipam","logFile":"relative.log"}"#,
            r#"{"type":"hostnic-ipam","logFile":5}"#,
        ] {
            assert_eq!(configured(config(ipam).as_bytes()), None, "{ipam}");
        }
        // The key outside `ipam` is not the plugin's.
        assert_eq!(
            configured(br#"{"name":"n","logFile":"/x.log","ipam":{"type":"t"}}"#),
            None
        );
        assert_eq!(configured(b"not json \"logFile\""), None);
    }

    #[test]
    fn a_line_names_the_call_and_its_outcome() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=apps;K8S_POD_NAME=web-0",
            ),
        ];
        let stdin = br#"{"cniVersion":"1.0.0","name":"macnet","ipam":{"type":"hostnic-ipam"}}"#;
        let reply =
            r#"{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.5/24"},{"address":"fd00::5/64"}]}"#;
        let at = UNIX_EPOCH + Duration::from_millis(1_764_504_245_123);
        let ok = line(
            &vars,
            stdin,
            &result_of(Some(reply), None),
            at,
            Duration::from_micros(3_250),
        );
        assert_eq!(
            ok,
            "2025-11-30T12:04:05.123Z hostnic-ipam ADD network=macnet container=c1 ifname=eth0 \
             pod=apps/web-0 result=ok ips=10.0.0.5/24,fd00::5/64 duration_ms=3.250\n"
        );
        let failed = ErrorReply {
            cni_version: "1.0.0".into(),
            code: 11,
            msg: "etcd \"unreachable\"\nretry".into(),
            details: None,
        };
        let err = line(
            &vars[..1],
            stdin,
            &result_of(None, Some(&failed)),
            at,
            Duration::ZERO,
        );
        assert_eq!(
            err,
            "2025-11-30T12:04:05.123Z hostnic-ipam ADD network=macnet result=error code=11 \
             msg=\"etcd \\\"unreachable\\\"\\nretry\" duration_ms=0.000\n"
        );
        assert_eq!(err.lines().count(), 1);
    }

    #[test]
    fn dates_are_the_calendars() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_422), (2025, 11, 30));
    }

    #[test]
    fn a_file_that_cannot_be_written_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir/kube-ipam.log");
        let e = append(&path, "x\n").unwrap_err();
        assert!(e.contains("no-such-dir/kube-ipam.log"), "{e}");
        let path = dir.path().join("kube-ipam.log");
        append(&path, "a\n").unwrap();
        append(&path, "b\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a\nb\n");
    }
}
