//! The workspace's binaries, for tests of another package.
//!
//! Cargo builds a package's own binaries before its integration tests run (`CARGO_BIN_EXE_*`),
//! but not another package's: `cargo test -p hostnic-e2e` runs whatever `target/debug` holds,
//! which may predate the sources by any number of edits. [`workspace_binary`] refuses a binary
//! that is not the build of this checkout's current sources, using the dep-info file cargo
//! writes beside it (`target/debug/<name>.d`: every source file the binary was built from,
//! path dependencies included).
//!
//! It checks rather than builds: the `cargo test` that runs the test still holds the build
//! directory's lock, so a `cargo build` started from a test would wait for it forever.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context as _};

/// The root of the workspace this testkit was compiled in.
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    // tests/testkit -> the workspace root.
    let root = manifest.parent().and_then(Path::parent).unwrap_or(manifest);
    root.canonicalize().unwrap_or_else(|_| root.to_owned())
}

/// `target/<profile>/<name>` beside the running test executable (`target/<profile>/deps/...`),
/// once checked to be built from this workspace's current sources.
///
/// Fails, saying to run `cargo build --workspace`, when the binary is missing, was built from
/// another checkout, or is older than a source file it was built from.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("{} is not in target/<profile>/deps", exe.display()))?;
    let bin = dir.join(name);
    if !bin.is_file() {
        bail!(
            "{} does not exist: run `cargo build --workspace` (`cargo test -p <package>` builds \
             only that package's binaries)",
            bin.display()
        );
    }
    check_fresh(&bin, &workspace_root())?;
    Ok(bin)
}

/// Fails unless every source file listed in `bin`'s dep-info (`<bin>.d`) exists, lies in
/// `root` (or is generated in the target directory) and is not newer than `bin`.
pub fn check_fresh(bin: &Path, root: &Path) -> anyhow::Result<()> {
    let stale = |why: String| {
        anyhow!(
            "stale binary {}: {why}; run `cargo build --workspace` (`cargo test -p <package>` \
             does not rebuild other packages' binaries)",
            bin.display()
        )
    };
    let built = modified(bin)?;
    let dep_info = bin.with_extension("d");
    let text = fs::read_to_string(&dep_info).map_err(|e| {
        stale(format!(
            "cannot read its dep-info {} ({e})",
            dep_info.display()
        ))
    })?;
    let sources = dep_info_sources(&text)
        .ok_or_else(|| stale(format!("{} lists no sources", dep_info.display())))?;
    // Generated sources (build-script output) live in the target directory, wherever it is.
    let target = bin
        .parent()
        .and_then(Path::parent)
        .map(|t| t.canonicalize().unwrap_or_else(|_| t.to_owned()));
    // ... or where the target directory was when the binary was built.
    let target_named_in_dep_info = text
        .split_once(": ")
        .map(|(out, _)| PathBuf::from(out.trim().replace("\\ ", " ")));
    for source in &sources {
        let generated = target.as_ref().is_some_and(|t| source.starts_with(t))
            || target_named_in_dep_info
                .as_ref()
                .and_then(|out| out.parent().and_then(Path::parent))
                .is_some_and(|t| source.starts_with(t));
        if generated {
            continue;
        }
        if !source.starts_with(root) {
            return Err(stale(format!(
                "it was built from {}, which is not in this workspace ({})",
                source.display(),
                root.display()
            )));
        }
        let changed = modified(source)
            .map_err(|e| stale(format!("its source {} is gone ({e:#})", source.display())))?;
        if changed > built {
            return Err(stale(format!(
                "{} changed after it was built",
                source.display()
            )));
        }
    }
    Ok(())
}

fn modified(path: &Path) -> anyhow::Result<SystemTime> {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading the mtime of {}", path.display()))
}

/// The prerequisites of the first rule of a Makefile-style dep-info file (`out: a.rs b.rs`,
/// spaces in paths escaped as `\ `), or None if it has none.
fn dep_info_sources(text: &str) -> Option<Vec<PathBuf>> {
    let line = text.lines().find(|l| !l.trim().is_empty())?;
    let (_, deps) = line.split_once(": ")?;
    let mut sources = Vec::new();
    let mut current = String::new();
    let mut chars = deps.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => {
                current.push(' ');
                chars.next();
            }
            ' ' => {
                if !current.is_empty() {
                    sources.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        sources.push(PathBuf::from(current));
    }
    (!sources.is_empty()).then_some(sources)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dep_info_sources_unescape_spaces() {
        let got = dep_info_sources("/t/debug/x: /w/a.rs /w/my\\ dir/b.rs\n\n/w/a.rs:\n");
        assert_eq!(
            got,
            Some(vec![
                PathBuf::from("/w/a.rs"),
                PathBuf::from("/w/my dir/b.rs")
            ])
        );
        assert_eq!(dep_info_sources("/t/debug/x:\n"), None);
    }

    /// A workspace `w` with `src/main.rs` and a target dir `t/debug` holding `bin` and its
    /// dep-info, the binary written after the source.
    fn fixture() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("w");
        let source = root.join("src/main.rs");
        fs::create_dir_all(source.parent().expect("parent")).expect("mkdir");
        fs::write(&source, "fn main() {}").expect("write source");
        let bin = dir.path().join("t/debug/bin");
        fs::create_dir_all(bin.parent().expect("parent")).expect("mkdir");
        let generated = dir.path().join("t/debug/build/x/out/gen.rs");
        fs::create_dir_all(generated.parent().expect("parent")).expect("mkdir");
        fs::write(&generated, "").expect("write generated");
        let old = SystemTime::now() - Duration::from_secs(60);
        for f in [&source, &generated] {
            fs::File::options()
                .write(true)
                .open(f)
                .and_then(|f| f.set_modified(old))
                .expect("set mtime");
        }
        fs::write(&bin, "").expect("write bin");
        fs::write(
            bin.with_extension("d"),
            format!(
                "{}: {} {}\n",
                bin.display(),
                source.display(),
                generated.display()
            ),
        )
        .expect("write dep-info");
        (dir, root, source, bin)
    }

    #[test]
    fn a_binary_newer_than_its_sources_is_fresh() {
        let (_dir, root, _, bin) = fixture();
        check_fresh(&bin, &root).expect("fresh");
    }

    #[test]
    fn a_source_edited_after_the_build_makes_the_binary_stale() {
        let (_dir, root, source, bin) = fixture();
        fs::File::options()
            .write(true)
            .open(&source)
            .and_then(|f| f.set_modified(SystemTime::now() + Duration::from_secs(5)))
            .expect("touch");
        let err = check_fresh(&bin, &root).expect_err("stale").to_string();
        assert!(err.starts_with("stale binary"), "{err}");
        assert!(err.contains("main.rs changed after it was built"), "{err}");
        assert!(err.contains("cargo build --workspace"), "{err}");
    }

    #[test]
    fn a_binary_built_from_another_checkout_is_stale() {
        let (dir, _, _, bin) = fixture();
        let err = check_fresh(&bin, &dir.path().join("elsewhere"))
            .expect_err("stale")
            .to_string();
        assert!(err.contains("not in this workspace"), "{err}");
    }

    #[test]
    fn a_deleted_source_or_missing_dep_info_makes_the_binary_stale() {
        let (_dir, root, source, bin) = fixture();
        fs::remove_file(&source).expect("rm");
        let err = check_fresh(&bin, &root).expect_err("stale").to_string();
        assert!(err.contains("is gone"), "{err}");
        fs::remove_file(bin.with_extension("d")).expect("rm");
        let err = check_fresh(&bin, &root).expect_err("stale").to_string();
        assert!(err.contains("dep-info"), "{err}");
    }
}
