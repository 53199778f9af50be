//! `hostnic-ipamd install-cni`, the real binary: plugins and the network config land where the
//! runtime finds them with the right modes, a file is never seen half-written while it is being
//! replaced, and a bad source changes nothing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use hostnic_ipamd::install::{install, Change, InstallPlan, PLUGINS};

const BIN: &str = env!("CARGO_BIN_EXE_hostnic-ipamd");
const CONFLIST: &str = r#"{"cniVersion": "1.0.0", "name": "pods", "plugins": [{"type": "macvlan", "ipam": {"type": "hostnic-ipam", "subnet": "10.0.0.0/24"}}]}"#;

fn install_cni(args: &[&str]) -> Output {
    Command::new(BIN)
        .env_clear()
        .arg("install-cni")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {BIN}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// A source directory with a stand-in for each plugin binary, and a conflist.
fn sources(root: &Path, version: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let from = root.join("image/bin");
    fs::create_dir_all(&from).expect("creating the source directory");
    for plugin in PLUGINS {
        fs::write(
            from.join(plugin),
            format!("#!/bin/sh\necho {plugin} {version}\n"),
        )
        .expect("writing a plugin");
    }
    let conflist = root.join("10-pods.conflist");
    fs::write(&conflist, CONFLIST).expect("writing the conflist");
    (from, conflist)
}

/// Whatever was in the target directory that is not an installed file: a temporary left over.
fn leftovers(dir: &Path, installed: &[&str]) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.expect("reading a directory entry").file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| !installed.contains(&n.as_str()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn install_cni_puts_the_plugins_and_the_conflist_in_place_then_leaves_them_alone() {
    let root = tempfile::tempdir().expect("temp dir");
    let (from, conflist) = sources(root.path(), "v1");
    let bin_dir = root.path().join("opt/cni/bin");
    let conf_dir = root.path().join("etc/cni/net.d");
    let args = [
        "--bin-dir",
        bin_dir.to_str().expect("UTF-8"),
        "--conf-dir",
        conf_dir.to_str().expect("UTF-8"),
        "--conflist",
        conflist.to_str().expect("UTF-8"),
        "--from",
        from.to_str().expect("UTF-8"),
    ];

    let out = install_cni(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for plugin in PLUGINS {
        let installed = bin_dir.join(plugin);
        assert_eq!(
            fs::read(&installed).expect("reading the installed plugin"),
            fs::read(from.join(plugin)).expect("reading the source")
        );
        assert_eq!(mode(&installed), 0o755, "{}", installed.display());
        assert!(
            stdout.contains(&format!("installed {}", installed.display())),
            "{stdout}"
        );
    }
    let installed_conf = conf_dir.join("10-pods.conflist");
    assert_eq!(
        fs::read_to_string(&installed_conf).expect("reading the conflist"),
        CONFLIST
    );
    assert_eq!(mode(&installed_conf), 0o644);
    assert_eq!(leftovers(&bin_dir, &PLUGINS), Vec::<String>::new());
    assert_eq!(
        leftovers(&conf_dir, &["10-pods.conflist"]),
        Vec::<String>::new()
    );

    // Run again: nothing to do. A new image: the plugins are replaced.
    let out = install_cni(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout)
            .lines()
            .all(|l| l.starts_with("unchanged ")),
        "{}",
        text(&out.stdout)
    );
    sources(root.path(), "v2");
    let out = install_cni(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for plugin in PLUGINS {
        assert!(
            fs::read_to_string(bin_dir.join(plugin))
                .expect("reading the plugin")
                .contains("v2"),
            "{plugin} was not replaced"
        );
        assert!(
            text(&out.stdout).contains(&format!("replaced {}", bin_dir.join(plugin).display())),
            "{}",
            text(&out.stdout)
        );
    }
}

#[test]
fn a_bad_source_is_refused_naming_it_and_installs_nothing() {
    let root = tempfile::tempdir().expect("temp dir");
    let (from, _) = sources(root.path(), "v1");
    let bin_dir = root.path().join("bin");
    let conf_dir = root.path().join("net.d");
    let bad_conf = root.path().join("99-broken.conflist");
    fs::write(&bad_conf, r#"{"cniVersion": "1.0.0", "plugins": []}"#).expect("writing");
    let empty = root.path().join("empty");
    fs::create_dir_all(&empty).expect("creating a dir");

    for (from, conflist, says) in [
        (
            &from,
            &bad_conf,
            "99-broken.conflist is not a CNI network config: no \"name\"",
        ),
        (&empty, &bad_conf, "cannot read"),
    ] {
        let out = install_cni(&[
            "--bin-dir",
            bin_dir.to_str().expect("UTF-8"),
            "--conf-dir",
            conf_dir.to_str().expect("UTF-8"),
            "--conflist",
            conflist.to_str().expect("UTF-8"),
            "--from",
            from.to_str().expect("UTF-8"),
        ]);
        assert!(!out.status.success(), "{}", text(&out.stdout));
        assert!(text(&out.stderr).contains(says), "{}", text(&out.stderr));
        assert!(!bin_dir.exists(), "something was installed");
        assert!(!conf_dir.exists(), "something was installed");
    }
}

/// A runtime reading the plugin while a new one is installed reads the old file or the new one
/// whole: never a mix, never a short file.
#[test]
fn a_file_being_replaced_is_always_read_whole() {
    const SIZE: usize = 4 << 20;
    let root = tempfile::tempdir().expect("temp dir");
    let from = root.path().join("src");
    let bin_dir = root.path().join("bin");
    fs::create_dir_all(&from).expect("creating a dir");
    let versions: Vec<Vec<u8>> = [b'a', b'b'].iter().map(|&c| vec![c; SIZE]).collect();
    let plan = InstallPlan {
        from: from.clone(),
        bin_dir: bin_dir.clone(),
        conf_dir: root.path().join("net.d"),
        conflist: None,
    };
    let put = |version: &[u8]| {
        for plugin in PLUGINS {
            fs::write(from.join(plugin), version).expect("writing a source");
        }
        install(&plan).expect("installing")
    };
    put(&versions[0]);

    let installing = AtomicBool::new(true);
    let target = bin_dir.join(PLUGINS[0]);
    let (reads, torn) = thread::scope(|s| {
        let reader = s.spawn(|| {
            let (mut reads, mut torn) = (0, 0);
            while installing.load(Ordering::Relaxed) {
                let seen = fs::read(&target).expect("the plugin is always there");
                if !versions.contains(&seen) {
                    torn += 1;
                }
                reads += 1;
            }
            (reads, torn)
        });
        for round in 1..=20 {
            let installed = put(&versions[round % 2]);
            assert!(installed.iter().all(|i| i.change == Change::Replaced));
        }
        installing.store(false, Ordering::Relaxed);
        reader.join().expect("the reader panicked")
    });
    eprintln!("{reads} reads during 20 replacements, {torn} torn");
    assert!(reads > 0, "the reader never read");
    assert_eq!(torn, 0, "{torn} of {reads} reads saw a half-written file");
}
