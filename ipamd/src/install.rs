//! `hostnic-ipamd install-cni`: puts the plugin binaries and a network config where the
//! container runtime finds them (`/opt/cni/bin`, `/etc/cni/net.d`), as the DaemonSet's init
//! container does on every node.
//!
//! Every file is installed atomically: written under a temporary name in the target directory,
//! flushed to disk, then renamed over the old one, and the directory is flushed too. A runtime
//! that execs a plugin or reads the config while it is being replaced sees the old file or the
//! new one, never half of one. A file whose content and mode are already right is left alone.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The CNI plugins this daemon serves, installed next to the reference plugins.
pub const PLUGINS: [&str; 2] = ["hostnic-ipam", "hostnic"];
/// Where runtimes look for plugins unless configured otherwise.
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
/// Where runtimes look for network configs unless configured otherwise.
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";

const BINARY_MODE: u32 = 0o755;
const CONFIG_MODE: u32 = 0o644;

/// What to install, and where.
#[derive(Debug, Clone)]
pub struct InstallPlan {
    /// The directory holding the plugin binaries ([`PLUGINS`]).
    pub from: PathBuf,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// A network config (`.conf` or `.conflist`) to install under its own file name.
    pub conflist: Option<PathBuf>,
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    New,
    Replaced,
    Unchanged,
}

/// One installed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub path: PathBuf,
    pub change: Change,
}

impl fmt::Display for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let change = match self.change {
            Change::New => "installed",
            Change::Replaced => "replaced",
            Change::Unchanged => "unchanged",
        };
        write!(f, "{change} {}", self.path.display())
    }
}

/// Why an install stopped. Files installed before the failure stay (each is whole).
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not a CNI network config: {reason}", path.display())]
    NotAConfig { path: PathBuf, reason: String },
    #[error("cannot install {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// Installs every plugin binary, then the network config: the config last, so that a runtime
/// never finds a config whose plugin is not there yet.
pub fn install(plan: &InstallPlan) -> Result<Vec<Installed>, InstallError> {
    // Read and check everything before the first write: a bad source changes nothing.
    let binaries = PLUGINS
        .iter()
        .map(|name| read(&plan.from.join(name)).map(|content| (*name, content)))
        .collect::<Result<Vec<_>, _>>()?;
    let config = match &plan.conflist {
        Some(path) => Some((file_name(path)?, checked_config(path)?)),
        None => None,
    };
    let mut installed = Vec::new();
    for (name, content) in binaries {
        installed.push(install_file(&plan.bin_dir, name, &content, BINARY_MODE)?);
    }
    if let Some((name, content)) = config {
        installed.push(install_file(&plan.conf_dir, &name, &content, CONFIG_MODE)?);
    }
    Ok(installed)
}

fn read(path: &Path) -> Result<Vec<u8>, InstallError> {
    fs::read(path).map_err(|source| InstallError::Read {
        path: path.to_owned(),
        source,
    })
}

fn file_name(path: &Path) -> Result<String, InstallError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| InstallError::NotAConfig {
            path: path.to_owned(),
            reason: "the path names no file".to_owned(),
        })
}

/// The config's bytes, if it is a JSON object with a `name` and either `plugins` (a conflist)
/// or `type` (a single-plugin config): what a runtime needs to load it at all.
fn checked_config(path: &Path) -> Result<Vec<u8>, InstallError> {
    let content = read(path)?;
    let refuse = |reason: String| InstallError::NotAConfig {
        path: path.to_owned(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&content).map_err(|e| refuse(format!("not JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(refuse("not a JSON object".to_owned()));
    };
    if !object.get("name").is_some_and(|n| n.is_string()) {
        return Err(refuse("no \"name\"".to_owned()));
    }
    if !object.contains_key("plugins") && !object.contains_key("type") {
        return Err(refuse(
            "neither \"plugins\" (a conflist) nor \"type\" (one plugin)".to_owned(),
        ));
    }
    Ok(content)
}

/// Writes `content` as `dir/name` with `mode`, atomically, unless it is already there.
fn install_file(
    dir: &Path,
    name: &str,
    content: &[u8],
    mode: u32,
) -> Result<Installed, InstallError> {
    let path = dir.join(name);
    let write_error = |source| InstallError::Write {
        path: path.clone(),
        source,
    };
    let change = match fs::metadata(&path) {
        Ok(meta) => {
            let same_mode = meta.permissions().mode() & 0o7777 == mode;
            if same_mode && meta.is_file() && fs::read(&path).is_ok_and(|old| old == content) {
                return Ok(Installed {
                    path,
                    change: Change::Unchanged,
                });
            }
            Change::Replaced
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Change::New,
        Err(e) => return Err(write_error(e)),
    };
    fs::create_dir_all(dir).map_err(write_error)?;
    let temp = dir.join(format!(".{name}.install-{}", std::process::id()));
    let written = write_synced(&temp, content, mode).and_then(|()| fs::rename(&temp, &path));
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(write_error(e));
    }
    // The rename is durable once the directory is.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_error)?;
    Ok(Installed { path, change })
}

fn write_synced(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    // A temporary file left by an install that was killed is replaced, not appended to.
    let _ = fs::remove_file(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(content)?;
    // The umask may have narrowed the mode given at creation.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn configs_without_what_a_runtime_needs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (text, reason) in [
            ("{", "not JSON"),
            ("[]", "not a JSON object"),
            (r#"{"type": "macvlan"}"#, "no \"name\""),
            (r#"{"name": "n"}"#, "neither \"plugins\""),
        ] {
            let path = dir.path().join("10-net.conflist");
            fs::write(&path, text).unwrap();
            let err = checked_config(&path).unwrap_err().to_string();
            assert!(err.contains(reason), "{text}: {err}");
            assert!(err.contains("10-net.conflist"), "{err}");
        }
        for text in [
            r#"{"name": "n", "plugins": []}"#,
            r#"{"name": "n", "type": "macvlan"}"#,
        ] {
            let path = dir.path().join("ok.conf");
            fs::write(&path, text).unwrap();
            assert_eq!(checked_config(&path).unwrap(), text.as_bytes());
        }
    }
}
