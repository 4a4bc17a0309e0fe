//! Test harness: a real `ims-server` process on loopback with rcgen
//! certificates, a fresh store, token and signing key in a temp dir.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ims_client::{ControlClient, TlsSettings};
use mat6_proto::update::UpdateKey;

pub const BIN: &str = env!("CARGO_BIN_EXE_ims-server");

/// Writes a CA and a server certificate for "localhost"/::1; returns the CA path.
pub fn make_pki(dir: &Path) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let srv_key = KeyPair::generate().unwrap();
    let srv_params = CertificateParams::new(vec!["localhost".into(), "::1".into()]).unwrap();
    let srv = srv_params.signed_by(&srv_key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), srv.pem()).unwrap();
    std::fs::write(dir.join("server.key"), srv_key.serialize_pem()).unwrap();
    dir.join("ca.pem")
}

#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub pid: u32,
    pub udp: SocketAddr,
    pub control: SocketAddr,
    pub metrics: Option<SocketAddr>,
}

/// A server process and its files.
#[derive(Debug)]
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub ca: PathBuf,
    pub token: String,
    pub child: Option<Child>,
    pub addrs: Option<Addrs>,
    pub extra: String,
}

impl TestServer {
    /// Prepares files; `extra` is appended to the TOML config.
    pub fn new(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = make_pki(dir.path());
        let token = ims_server::secrets::generate_admin_token(&dir.path().join("token")).unwrap();
        ims_server::secrets::generate_signing_key(&dir.path().join("signing.pk8")).unwrap();
        let s = TestServer {
            config: dir.path().join("ims.toml"),
            dir,
            ca,
            token,
            child: None,
            addrs: None,
            extra: extra.to_owned(),
        };
        s.write_config("[::1]:0", "[::1]:0", Some("[::1]:0"));
        s
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write_config(&self, udp: &str, control: &str, metrics: Option<&str>) {
        let d = self.dir.path().display();
        let mut t = format!(
            r#"udp_listen = "{udp}"
control_listen = "{control}"
store_path = "{d}/ims.redb"
tls_cert = "{d}/server.pem"
tls_key = "{d}/server.key"
admin_token_file = "{d}/token"
signing_key_file = "{d}/signing.pk8"
ready_file = "{d}/ready.json"
"#
        );
        if let Some(m) = metrics {
            t.push_str(&format!("metrics_listen = \"{m}\"\n"));
        }
        t.push_str(&self.extra);
        std::fs::write(&self.config, t).unwrap();
    }

    /// Starts the binary and waits for its ready file. The first start binds
    /// ephemeral ports; later starts reuse them (so clients keep their address).
    pub fn start(&mut self) -> Addrs {
        assert!(self.child.is_none(), "already running");
        let ready = self.path("ready.json");
        let _ = std::fs::remove_file(&ready);
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                let addrs = Addrs {
                    pid: v["pid"].as_u64().unwrap() as u32,
                    udp: v["udp"].as_str().unwrap().parse().unwrap(),
                    control: v["control"].as_str().unwrap().parse().unwrap(),
                    metrics: v["metrics"].as_str().map(|s| s.parse().unwrap()),
                };
                if self.addrs.is_none() {
                    self.write_config(
                        &addrs.udp.to_string(),
                        &addrs.control.to_string(),
                        addrs.metrics.map(|m| m.to_string()).as_deref(),
                    );
                }
                self.addrs = Some(addrs);
                return addrs;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("ims-server exited during start-up: {st}");
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "server not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            let t0 = Instant::now();
            loop {
                if let Some(st) = c.try_wait().unwrap() {
                    assert!(st.success(), "unclean exit {st}");
                    return;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("server ignored SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    pub fn tls(&self) -> TlsSettings {
        TlsSettings::from_ca_pem_file(&self.ca, "localhost").unwrap()
    }

    pub async fn control(&self) -> ControlClient {
        let a = self.addrs.expect("started");
        ControlClient::connect(a.control, &self.tls())
            .await
            .unwrap()
            .with_admin_token(&self.token)
    }

    pub async fn provision(&self, hoa: Ipv6Addr) -> UpdateKey {
        let k = self.control().await.key_add(hoa).await.unwrap();
        UpdateKey::from_b64(k.key_id, &k.secret_b64).unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn hoa(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, i)
}

pub fn moa(site: u16, i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, site, 0, 0, 0, 0, i)
}

/// Collects every datagram arriving on `sock` within `wait`.
pub async fn drain(sock: &tokio::net::UdpSocket, wait: Duration) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
        out.push(buf[..n].to_vec());
    }
    out
}

/// Receives `n` datagrams (waiting up to `timeout` for them), then keeps
/// listening `linger` longer so that unexpected extra replies are caught.
pub async fn recv_n(
    sock: &tokio::net::UdpSocket,
    n: usize,
    timeout: Duration,
    linger: Duration,
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
            Ok(Ok((len, _))) => out.push(buf[..len].to_vec()),
            _ => break,
        }
    }
    out.extend(drain(sock, linger).await);
    out
}

/// A plain HTTP/1.1 GET (the metrics endpoint); the whole response.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
