//! systemd readiness, environment overrides and graceful SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, BIN};

/// Kills the server if the test fails before it exits.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn sd_notify_ready_env_overrides_and_sigterm() {
    let srv = TestServer::new("");
    // No metrics in the file; the environment adds them.
    srv.write_config("[::1]:0", "[::1]:0", None);
    let sock_path = srv.path("notify.sock");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut guard = Guard(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&srv.config)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("IMS_METRICS_LISTEN", "[::1]:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut guard.0;
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("READY=1 within 20 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("READY=1"), "{msg}");
    // Ready means every socket is bound: the ready file says where.
    let ready: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(srv.path("ready.json")).unwrap()).unwrap();
    assert!(
        ready["metrics"].as_str().is_some(),
        "IMS_METRICS_LISTEN ignored: {ready}"
    );
    let control: std::net::SocketAddr = ready["control"].as_str().unwrap().parse().unwrap();
    std::net::TcpStream::connect(control).unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "SIGTERM ignored");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
}
