//! mat6 IMS (IP address Mapping Server): durable, authenticated HoA → MoA
//! bindings and the site registry.
//!
//! * UDP update path ([`pipeline`]): rate limit, checked parse, constant-time
//!   HMAC, seq check, Ed25519 assertion, group commit to the store
//!   ([`store::BindingStore`], redb with immediate durability), then acks.
//! * TLS 1.3 control channel ([`control`]): lookups, watch, sites, admin,
//!   and `activate_standby` (host-prep switches a resumed VM to its prepared
//!   standby MoA with the host token; committed like an update).
//! * Prometheus `/metrics` ([`metrics`]), sd-notify readiness, graceful stop.
//!
//! `main.rs` only parses the command line ([`cli`]) and calls [`run`].

pub mod cli;
pub mod config;
pub mod control;
pub mod index;
pub mod metrics;
pub mod pipeline;
pub mod secrets;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mat6_proto::assertion::public_key_to_b64;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub use config::ServeConfig;

use crate::index::Index;
use crate::pipeline::{Limits, Shared};
use crate::store::{BindingStore as _, RedbStore, StoreError};

/// Errors that stop `serve`; each names the thing to fix.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// A secret file (token, signing key) is missing, unreadable, too open or invalid.
    #[error(transparent)]
    Secret(#[from] secrets::SecretError),
    /// TLS certificate or key unusable.
    #[error("TLS {what} {path}: {reason}")]
    Tls {
        /// "certificate" or "private key".
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A listener cannot be bound (port in use, bad address).
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the ready file failed.
    #[error("cannot write ready file {path}: {source}")]
    ReadyFile {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    /// Bound UDP update address.
    pub udp_addr: SocketAddr,
    /// Bound TLS control address.
    pub control_addr: SocketAddr,
    /// Bound metrics address.
    pub metrics_addr: Option<SocketAddr>,
    /// Shared state (tests inspect it).
    pub shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn load_tls(cfg: &ServeConfig) -> Result<rustls::ServerConfig, ServeError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert_err = |reason: String| ServeError::Tls {
        what: "certificate",
        path: cfg.tls_cert.clone(),
        reason,
    };
    let bytes = std::fs::read(&cfg.tls_cert).map_err(|e| cert_err(e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(cert_err("no certificate in file".into()));
    }
    let key_err = |reason: String| ServeError::Tls {
        what: "private key",
        path: cfg.tls_key.clone(),
        reason,
    };
    let kbytes = std::fs::read(&cfg.tls_key).map_err(|e| key_err(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&kbytes)
        .map_err(|e| key_err(format!("not a PEM private key ({e})")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| key_err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            key_err(format!(
                "does not match the certificate or is unsupported ({e})"
            ))
        })
}

/// Opens everything, binds every socket and starts the threads and tasks.
/// Must be called inside a tokio runtime.
pub async fn start(cfg: &ServeConfig) -> Result<Running, ServeError> {
    let admin_token = secrets::read_admin_token(&cfg.admin_token_file)?;
    let host_token = match &cfg.host_token_file {
        Some(p) => Some(secrets::read_host_token(p)?),
        None => None,
    };
    let signing = secrets::read_signing_key(&cfg.signing_key_file)?;
    let tls = load_tls(cfg)?;
    let store = RedbStore::open(&cfg.store_path, cfg.store_cache_mb << 20)?;
    let mut index = Index::new(0, 1);
    let loaded = store.load_with(&mut |r| index.put(&r))?;
    index.revision = loaded.revision;
    index.next_key_id = loaded.next_key_id.max(1);
    index.finish_load(loaded.tombstones, loaded.sites);
    let hoas = index.len();

    let udp = std::net::UdpSocket::bind(cfg.udp_listen).map_err(|source| ServeError::Bind {
        what: "UDP update",
        addr: cfg.udp_listen,
        source,
    })?;
    let _ = nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::RcvBuf, &(8 << 20));
    let _ = udp.set_read_timeout(Some(Duration::from_millis(100)));
    let udp_addr = udp.local_addr().map_err(|source| ServeError::Bind {
        what: "UDP update",
        addr: cfg.udp_listen,
        source,
    })?;
    let bind_tcp = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { what, addr, source })
    };
    let control_l = bind_tcp("TLS control", cfg.control_listen).await?;
    let control_addr = control_l.local_addr().map_err(|source| ServeError::Bind {
        what: "TLS control",
        addr: cfg.control_listen,
        source,
    })?;
    let metrics_l = match cfg.metrics_listen {
        Some(a) => Some(bind_tcp("metrics", a).await?),
        None => None,
    };
    let metrics_addr = metrics_l.as_ref().and_then(|l| l.local_addr().ok());

    let metrics = metrics::Metrics::new();
    metrics.hoas.set(hoas as i64);
    let (events, _) = tokio::sync::broadcast::channel(16384);
    let public_key_b64: Arc<str> = public_key_to_b64(&signing.public_key()).into();
    let shared = Arc::new(Shared {
        index: RwLock::new(index),
        events,
        metrics: metrics.clone(),
        signing,
        stop: Default::default(),
    });
    let limits = Limits {
        max_lifetime_s: cfg.max_lifetime_s,
        rate_per_s: cfg.rate_limit_per_s,
        burst: cfg.rate_limit_burst,
        max_batch: cfg.max_batch,
        udp_threads: cfg.udp_threads,
    };
    let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel(65536);
    let ack_sock = udp.try_clone().map_err(|source| ServeError::Bind {
        what: "UDP update",
        addr: cfg.udp_listen,
        source,
    })?;
    let mut threads = Vec::new();
    {
        let shared = shared.clone();
        let store: Box<dyn store::BindingStore> = Box::new(store);
        threads.push(std::thread::spawn(move || {
            pipeline::commit_loop(store, ack_sock, shared, limits, jobs_rx)
        }));
    }
    let limiter = Arc::new(std::sync::Mutex::new(pipeline::RateLimiter::new(
        limits.rate_per_s,
        limits.burst,
        std::time::Instant::now(),
    )));
    for _ in 0..limits.udp_threads {
        let shared = shared.clone();
        let tx = jobs_tx.clone();
        let limiter = limiter.clone();
        let sock = udp.try_clone().map_err(|source| ServeError::Bind {
            what: "UDP update",
            addr: cfg.udp_listen,
            source,
        })?;
        threads.push(std::thread::spawn(move || {
            pipeline::recv_loop(sock, shared, limits, tx, limiter)
        }));
    }
    drop(udp);
    let ctx = control::ControlCtx {
        shared: shared.clone(),
        jobs: jobs_tx,
        admin_token: admin_token.into_bytes().into(),
        host_token: host_token.map(|t| t.into_bytes().into()),
        public_key_b64,
    };
    let mut tasks = vec![tokio::spawn(control::serve(
        control_l,
        TlsAcceptor::from(Arc::new(tls)),
        ctx,
    ))];
    if let Some(l) = metrics_l {
        tasks.push(tokio::spawn(metrics::serve(l, metrics)));
    }
    tracing::info!(%udp_addr, %control_addr, ?metrics_addr, hoas, store = %cfg.store_path.display(), "IMS ready");
    Ok(Running {
        udp_addr,
        control_addr,
        metrics_addr,
        shared,
        threads,
        tasks,
    })
}

impl Running {
    /// Stops the listeners and threads (pending commits finish first).
    pub async fn shutdown(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// `serve`: start, announce readiness (sd-notify, ready file), wait for
/// `shutdown`, stop gracefully.
pub async fn run(cfg: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let running = start(&cfg).await?;
    if let Some(path) = &cfg.ready_file {
        let j = serde_json::json!({
            "pid": std::process::id(),
            "udp": running.udp_addr.to_string(),
            "control": running.control_addr.to_string(),
            "metrics": running.metrics_addr.map(|a| a.to_string()),
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, j.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| ServeError::ReadyFile {
                path: path.clone(),
                source,
            })?;
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    shutdown.await;
    tracing::info!("shutting down");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    running.shutdown().await;
    Ok(())
}
