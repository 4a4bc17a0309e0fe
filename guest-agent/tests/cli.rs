//! The `guest-agent` binary's command line: help, config errors, status
//! without a daemon. (Also makes `cargo test` build the binary that the
//! netns tests in `tests/` run.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_guest-agent");

fn run(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn help_lists_subcommands() {
    let (ok, out, _) = run(&["--help"]);
    assert!(ok);
    for s in ["run", "status", "check-config"] {
        assert!(out.contains(s), "{out}");
    }
    let (ok, out, _) = run(&["run", "--help"]);
    assert!(ok);
    assert!(out.contains("--config"), "{out}");
}

fn write_config(dir: &std::path::Path, key_mode: u32) -> std::path::PathBuf {
    let key = dir.join("agent.key");
    std::fs::write(&key, "7:AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(key_mode)).unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "hoa = \"2001:db8:ff::1\"\n[ims]\nupdate_addr = \"[2001:db8::53]:7341\"\nkey_file = \"{}\"\npublic_key = \"11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\"\n[[interfaces]]\nname = \"eth0\"\nrole = \"primary\"\n",
            key.display()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn check_config_accepts_good_and_names_problems() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 0o600);
    let (ok, out, err) = run(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("ok"));

    let cfg = write_config(dir.path(), 0o644);
    let (ok, _, err) = run(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("chmod 600"), "{err}");

    let (ok, _, err) = run(&["check-config", "--config", "/nonexistent/agent.toml"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/agent.toml"), "{err}");

    std::fs::write(
        dir.path().join("bad.toml"),
        "hoa = \"2001:db8::1\"\nbogus = 1\n",
    )
    .unwrap();
    let (ok, _, err) = run(&[
        "check-config",
        "--config",
        dir.path().join("bad.toml").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn status_without_daemon_fails_clearly() {
    let (ok, _, err) = run(&["status", "--socket", "/nonexistent/m6a.sock"]);
    assert!(!ok);
    assert!(err.contains("is guest-agent running?"), "{err}");
}
