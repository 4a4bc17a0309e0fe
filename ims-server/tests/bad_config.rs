//! Start-up errors: one clear line naming the problem, non-zero exit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use common::{TestServer, BIN};

fn serve_fails(srv: &TestServer, must_contain: &[&str]) {
    use std::io::Read as _;
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&srv.config)
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A server that wrongly starts must not hang the test: kill it.
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > std::time::Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server started despite {must_contain:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut stderr = Vec::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    let out = std::process::Output {
        status,
        stdout: Vec::new(),
        stderr,
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must exit non-zero; stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("ims-server: error: "), "{err}");
    for s in must_contain {
        assert!(err.contains(s), "{s:?} missing in: {err}");
    }
}

#[test]
fn unknown_config_key() {
    let srv = TestServer::new("colour = \"blue\"\n");
    serve_fails(&srv, &["invalid config", "ims.toml", "colour"]);
}

#[test]
fn missing_config_file() {
    let mut srv = TestServer::new("");
    srv.config = srv.path("nope.toml");
    serve_fails(&srv, &["cannot read config file", "nope.toml"]);
}

#[test]
fn missing_certificate() {
    let srv = TestServer::new("");
    std::fs::remove_file(srv.path("server.pem")).unwrap();
    serve_fails(&srv, &["TLS certificate", "server.pem"]);
}

#[test]
fn garbage_key() {
    let srv = TestServer::new("");
    std::fs::write(srv.path("server.key"), "not a key").unwrap();
    serve_fails(&srv, &["TLS private key", "server.key"]);
}

#[test]
fn port_in_use() {
    let srv = TestServer::new("");
    let busy = std::net::TcpListener::bind("[::1]:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    srv.write_config("[::1]:0", &format!("[::1]:{port}"), None);
    serve_fails(
        &srv,
        &["cannot bind TLS control listener", &format!("[::1]:{port}")],
    );
    let busy_udp = std::net::UdpSocket::bind("[::1]:0").unwrap();
    let uport = busy_udp.local_addr().unwrap().port();
    srv.write_config(&format!("[::1]:{uport}"), "[::1]:0", None);
    serve_fails(
        &srv,
        &["cannot bind UDP update listener", &format!("[::1]:{uport}")],
    );
}

#[test]
fn unreadable_store() {
    let srv = TestServer::new("");
    std::fs::write(srv.path("ims.redb"), vec![0x5a; 8192]).unwrap();
    serve_fails(&srv, &["cannot open store", "ims.redb"]);
    std::fs::remove_file(srv.path("ims.redb")).unwrap();
    std::fs::create_dir(srv.path("ims.redb")).unwrap();
    serve_fails(&srv, &["cannot open store", "ims.redb"]);
}

#[test]
fn secrets_must_be_private() {
    let srv = TestServer::new("");
    std::fs::set_permissions(srv.path("token"), std::fs::Permissions::from_mode(0o644)).unwrap();
    serve_fails(&srv, &["admin token file", "token", "0644", "chmod 600"]);
    std::fs::set_permissions(srv.path("token"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::remove_file(srv.path("signing.pk8")).unwrap();
    serve_fails(&srv, &["signing key file", "signing.pk8"]);
}

#[test]
fn help_everywhere() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["keys", "--help"],
        vec!["keys", "add", "--help"],
        vec!["bindings", "list", "--help"],
        vec!["sites", "add", "--help"],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}
