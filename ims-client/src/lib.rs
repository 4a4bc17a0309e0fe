//! Async client for the mat6 IMS (IP address Mapping Server).
//!
//! Two transports, two types:
//!
//! * [`UpdateClient`] — the critical-path binding update over UDP: one
//!   HMAC-authenticated datagram out, one authenticated ack back,
//!   retransmitted with exponential backoff (the sans-IO core is
//!   [`mat6_proto::update::UpdateClient`]). It picks sequence numbers itself
//!   (`max(last + 1, unix time in µs)`, so a restarted agent needs no state)
//!   and resynchronises once when the IMS answers "stale seq". It returns the
//!   IMS-signed [`BindingAssertion`] the agent can forward to its peers.
//! * [`ControlClient`] — the TLS 1.3 control channel: lookups (pipelined:
//!   clone the client and issue requests concurrently), site registry,
//!   IMS public key, admin operations (with [`ControlClient::with_admin_token`]),
//!   and [`ControlClient::activate_standby`] (host token).
//!   A client whose connection died fails every request with
//!   [`ClientError::Closed`] ([`ControlClient::is_closed`]); connect again.
//!   [`Watch`] is a watch stream on its own connection that reconnects by
//!   itself and resumes from the last revision it saw, so no binding change is
//!   missed across reconnects.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ims_client::ClientError> {
//! use ims_client::*;
//! let tls = TlsSettings::from_ca_pem_file("/etc/mat6/ims-ca.pem".as_ref(), "ims.example")?;
//! let ctl = ControlClient::connect("[2001:db8::53]:7342".parse().unwrap(), &tls).await?;
//! let site = ctl.site_get("site-b").await?;
//! let hoa = "2001:db8:100::1".parse().unwrap();
//! let key = UpdateKey::from_key_string("7:base64secret...").unwrap();
//! let mut up = UpdateClient::bind("[2001:db8::53]:7341".parse().unwrap(), hoa, key).await?;
//! let accepted = up.send(&BindingUpdate::activate("2001:db8:b::10".parse().unwrap(), 600)).await?;
//! println!("seq {} assertion {}", accepted.seq, accepted.assertion.to_b64());
//! let mut watch = Watch::start("[2001:db8::53]:7342".parse().unwrap(), tls, WatchFilter::default(), None);
//! while let Ok(item) = watch.next().await { println!("{item:?}"); }
//! # let _ = (site, ctl); Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;

pub use mat6_proto::assertion::{
    public_key_from_b64, public_key_to_b64, AssertionError, BindingAssertion,
};
pub use mat6_proto::binding::{Binding, MacAddr, RaParams, SiteInfo};
pub use mat6_proto::control::{
    AdminOp, BindingRecord, ErrorCode, ProvisionedKey, Request, Response, WatchChange, WatchEvent,
    WatchFilter,
};
pub use mat6_proto::update::{AckRepr, AckStatus, RetransmitPolicy, UpdateKey};

use mat6_proto::control::{self, RequestFrame, ResponseFrame};
use mat6_proto::update::{self, UpdateOutcome, UpdateRepr};

/// Errors of this client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What failed (names the address or file).
        context: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The CA file could not be used.
    #[error("CA certificate file {path}: {reason}")]
    BadCa {
        /// Path.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}")]
    BadServerName(String),
    /// The control connection closed.
    #[error("control connection to the IMS closed")]
    Closed,
    /// A control frame could not be encoded/decoded.
    #[error("control frame: {0}")]
    Frame(#[from] control::ControlError),
    /// The server answered with an error.
    #[error("IMS error ({code:?}): {message}")]
    Server {
        /// Code.
        code: ErrorCode,
        /// Message.
        message: String,
    },
    /// The server answered with a response of the wrong type.
    #[error("unexpected response from the IMS")]
    Unexpected,
    /// No authenticated ack after every retransmission.
    #[error("no authenticated ack from the IMS at {server} after {attempts} attempts")]
    TimedOut {
        /// Server address.
        server: SocketAddr,
        /// Transmissions made.
        attempts: u32,
    },
    /// The update was refused (authenticated refusal, e.g. lifetime too long).
    #[error("update refused by the IMS: {0:?}")]
    Refused(AckStatus),
    /// The IMS kept answering "stale seq" after a resync.
    #[error("IMS reports seq {last_accepted} already accepted (clock far behind?)")]
    Stale {
        /// Last accepted seq.
        last_accepted: u64,
    },
    /// The ack's assertion is missing or does not verify.
    #[error("bad assertion in ack: {0}")]
    Assertion(#[from] AssertionError),
    /// Local encoding error (too many standby MoAs...).
    #[error("cannot encode update: {0}")]
    Encode(#[from] update::UpdateError),
}

/// Longest a TCP connect, and then a TLS handshake, to the IMS control
/// channel may take before the attempt is abandoned (and, for [`Watch`],
/// retried on a new socket).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClientError {
    let context = context.into();
    move |source| ClientError::Io { context, source }
}

/// What one update asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingUpdate {
    /// Active MoA.
    pub active: Option<Ipv6Addr>,
    /// Standby MoAs (at most 4).
    pub standby: Vec<Ipv6Addr>,
    /// Lifetime in seconds.
    pub lifetime_s: u32,
    /// True for a switch, false for a standby registration/refresh.
    pub activate: bool,
}

impl BindingUpdate {
    /// Activation of `moa` with no standby.
    pub fn activate(moa: Ipv6Addr, lifetime_s: u32) -> Self {
        BindingUpdate {
            active: Some(moa),
            standby: Vec::new(),
            lifetime_s,
            activate: true,
        }
    }

    /// Keeps `active` and registers `standby`.
    pub fn standby(active: Option<Ipv6Addr>, standby: Vec<Ipv6Addr>, lifetime_s: u32) -> Self {
        BindingUpdate {
            active,
            standby,
            lifetime_s,
            activate: false,
        }
    }
}

/// An accepted, durable update.
#[derive(Debug, Clone)]
pub struct UpdateAccepted {
    /// Seq used.
    pub seq: u64,
    /// The authenticated ack.
    pub ack: AckRepr,
    /// The IMS-signed assertion (verified when a public key was configured).
    pub assertion: BindingAssertion,
    /// Time from first transmission to ack.
    pub rtt: Duration,
    /// Transmissions made.
    pub attempts: u32,
}

/// Async UDP update client for one HoA.
#[derive(Debug)]
pub struct UpdateClient {
    socket: UdpSocket,
    server: SocketAddr,
    hoa: Ipv6Addr,
    key: UpdateKey,
    last_seq: u64,
    policy: RetransmitPolicy,
    ims_public_key: Option<[u8; 32]>,
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl UpdateClient {
    /// Binds an ephemeral UDP socket of the server's family.
    pub async fn bind(
        server: SocketAddr,
        hoa: Ipv6Addr,
        key: UpdateKey,
    ) -> Result<Self, ClientError> {
        let local: SocketAddr = if server.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local)
            .await
            .map_err(io_err(format!("bind UDP socket {local}")))?;
        Ok(Self::from_socket(socket, server, hoa, key))
    }

    /// Uses a socket the caller bound (e.g. to a MoA as source).
    pub fn from_socket(
        socket: UdpSocket,
        server: SocketAddr,
        hoa: Ipv6Addr,
        key: UpdateKey,
    ) -> Self {
        UpdateClient {
            socket,
            server,
            hoa,
            key,
            last_seq: 0,
            policy: RetransmitPolicy::default(),
            ims_public_key: None,
        }
    }

    /// Sets the retransmission policy.
    pub fn with_policy(mut self, policy: RetransmitPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Verifies the assertion of every ack against this IMS public key.
    pub fn with_ims_public_key(mut self, pk: [u8; 32]) -> Self {
        self.ims_public_key = Some(pk);
        self
    }

    /// The last seq used or learned.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Sends `req` and waits for the durable ack. Resynchronises once on a
    /// "stale seq" answer.
    pub async fn send(&mut self, req: &BindingUpdate) -> Result<UpdateAccepted, ClientError> {
        let mut resynced = false;
        loop {
            let seq = (self.last_seq + 1).max(unix_micros());
            self.last_seq = seq;
            let repr = UpdateRepr {
                key_id: self.key.key_id,
                seq,
                hoa: self.hoa,
                lifetime_s: req.lifetime_s,
                activate: req.activate,
                active: req.active,
                standby: req.standby.clone(),
            };
            let started = Instant::now();
            let (outcome, attempts) = self.exchange(repr).await?;
            match outcome {
                UpdateOutcome::Accepted(ack) => {
                    let bytes = ack
                        .assertion
                        .as_deref()
                        .ok_or(ClientError::Assertion(AssertionError::BadLength(0)))?;
                    let assertion = match &self.ims_public_key {
                        Some(pk) => BindingAssertion::decode_verified(bytes, pk)?,
                        None => BindingAssertion::decode(bytes)?,
                    };
                    return Ok(UpdateAccepted {
                        seq,
                        ack,
                        assertion,
                        rtt: started.elapsed(),
                        attempts,
                    });
                }
                UpdateOutcome::Stale { last_accepted } => {
                    self.last_seq = self.last_seq.max(last_accepted);
                    if resynced {
                        return Err(ClientError::Stale { last_accepted });
                    }
                    resynced = true;
                }
                UpdateOutcome::Refused(s) => return Err(ClientError::Refused(s)),
                UpdateOutcome::TimedOut { attempts } => {
                    return Err(ClientError::TimedOut {
                        server: self.server,
                        attempts,
                    })
                }
            }
        }
    }

    async fn exchange(&mut self, repr: UpdateRepr) -> Result<(UpdateOutcome, u32), ClientError> {
        let mut sm = update::UpdateClient::new(&self.key, repr, self.policy, Instant::now())?;
        let mut buf = [0u8; 2048];
        let mut attempts = 0u32;
        loop {
            let now = Instant::now();
            if let Some(d) = sm.poll_transmit(now) {
                attempts += 1;
                self.socket
                    .send_to(d, self.server)
                    .await
                    .map_err(io_err(format!("send update to {}", self.server)))?;
            }
            if let Some(o) = sm.outcome() {
                return Ok((o.clone(), attempts));
            }
            let Some(deadline) = sm.poll_timeout() else {
                continue;
            };
            let recv = tokio::time::timeout_at(deadline.into(), self.socket.recv_from(&mut buf));
            // ICMP errors (port unreachable) surface as recv errors and a
            // timeout just means "retransmit": both fall through.
            if let Ok(Ok((n, from))) = recv.await {
                if from == self.server && sm.handle_datagram(&buf[..n], Instant::now()) {
                    if let Some(o) = sm.outcome() {
                        return Ok((o.clone(), attempts));
                    }
                }
            }
        }
    }
}

/// TLS settings for the control channel: trusted CA(s) and the name the
/// server certificate must carry.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsSettings {
    /// Trusts the CA certificate(s) in a PEM file.
    pub fn from_ca_pem_file(path: &Path, server_name: &str) -> Result<Self, ClientError> {
        let bytes =
            std::fs::read(path).map_err(io_err(format!("read CA file {}", path.display())))?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|_| ClientError::BadCa {
                path: path.to_owned(),
                reason: "not a PEM certificate file",
            })?;
        if certs.is_empty() {
            return Err(ClientError::BadCa {
                path: path.to_owned(),
                reason: "no certificate in file",
            });
        }
        Self::from_ca_ders(certs, server_name).map_err(|e| match e {
            ClientError::BadCa { reason, .. } => ClientError::BadCa {
                path: path.to_owned(),
                reason,
            },
            e => e,
        })
    }

    /// Trusts the given DER CA certificates.
    pub fn from_ca_ders(
        certs: Vec<CertificateDer<'static>>,
        server_name: &str,
    ) -> Result<Self, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs {
            roots.add(c).map_err(|_| ClientError::BadCa {
                path: PathBuf::new(),
                reason: "invalid CA certificate",
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|_| ClientError::BadCa {
                path: PathBuf::new(),
                reason: "TLS 1.3 unsupported by provider",
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| ClientError::BadServerName(server_name.to_owned()))?;
        Ok(TlsSettings {
            config: Arc::new(config),
            server_name,
        })
    }

    async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
        // Bounded: a SYN that left with an unusable source (e.g. the HoA,
        // while a booting node has no MoA yet, whose SYN-ACK can never come
        // back) would otherwise be retransmitted with that source for the
        // kernel's ~2 minutes; a new socket picks the source again.
        let timed_out = |what: &str| ClientError::Io {
            context: format!("{what} IMS control {addr}"),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            ),
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out("connect to"))?
            .map_err(io_err(format!("connect to IMS control {addr}")))?;
        let _ = tcp.set_nodelay(true);
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            TlsConnector::from(self.config.clone()).connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| timed_out("TLS handshake with"))?
        .map_err(io_err(format!("TLS handshake with IMS control {addr}")))
    }
}

async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<ResponseFrame, ClientError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .await
        .map_err(|_| ClientError::Closed)?;
    let n = control::frame_len(&len)?.unwrap_or(0);
    buf.resize(n, 0);
    r.read_exact(buf).await.map_err(|_| ClientError::Closed)?;
    Ok(serde_json::from_slice(buf).map_err(control::ControlError::from)?)
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

/// TLS control-channel client. Cheap to clone; clones share the connection
/// and may issue requests concurrently (pipelined).
#[derive(Debug, Clone)]
pub struct ControlClient {
    tx: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    closed: Arc<std::sync::atomic::AtomicBool>,
    next_id: Arc<AtomicU64>,
    admin_token: Option<Arc<str>>,
}

impl ControlClient {
    /// Connects and completes the TLS 1.3 handshake.
    pub async fn connect(addr: SocketAddr, tls: &TlsSettings) -> Result<Self, ClientError> {
        let stream = tls.connect(addr).await?;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
        let pending: Pending = Arc::default();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut out = first;
                while let Ok(more) = rx.try_recv() {
                    out.extend_from_slice(&more);
                    if out.len() > 256 * 1024 {
                        break;
                    }
                }
                if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let p2 = pending.clone();
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed2 = closed.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            while let Ok(f) = read_frame(&mut rd, &mut buf).await {
                let waiter = p2.lock().ok().and_then(|mut m| m.remove(&f.id));
                if let Some(w) = waiter {
                    let _ = w.send(f.resp);
                }
            }
            // Mark closed before failing the waiters, so that a request
            // registered after this point sees the flag (see `request`).
            closed2.store(true, Ordering::SeqCst);
            if let Ok(mut m) = p2.lock() {
                m.clear();
            }
        });
        Ok(ControlClient {
            tx,
            pending,
            closed,
            next_id: Arc::new(AtomicU64::new(1)),
            admin_token: None,
        })
    }

    /// True once the connection is gone (every request then fails with
    /// [`ClientError::Closed`]; connect again).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Uses `token` for admin operations.
    pub fn with_admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.trim().into());
        self
    }

    /// Sends any request and waits for its response (errors mapped to
    /// [`ClientError::Server`]).
    pub async fn request(&self, req: Request) -> Result<Response, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = control::encode_frame(&RequestFrame { id, req })?;
        let (otx, orx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| ClientError::Closed)?
            .insert(id, otx);
        if self.closed.load(Ordering::SeqCst) {
            if let Ok(mut m) = self.pending.lock() {
                m.remove(&id);
            }
            return Err(ClientError::Closed);
        }
        self.tx.send(bytes).await.map_err(|_| ClientError::Closed)?;
        match orx.await.map_err(|_| ClientError::Closed)? {
            Response::Error { code, message } => Err(ClientError::Server { code, message }),
            r => Ok(r),
        }
    }

    async fn admin(&self, op: AdminOp) -> Result<Response, ClientError> {
        let token = self.admin_token.as_deref().unwrap_or("").to_owned();
        self.request(Request::Admin { token, op }).await
    }

    /// Current binding of `hoa`.
    pub async fn lookup(&self, hoa: Ipv6Addr) -> Result<Option<BindingRecord>, ClientError> {
        match self.request(Request::Lookup { hoa }).await? {
            Response::Binding { record } => Ok(record),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Many bindings in one round trip (same order as `hoas`; at most
    /// 10,000 per call, the server refuses more).
    pub async fn lookup_many(
        &self,
        hoas: Vec<Ipv6Addr>,
    ) -> Result<Vec<Option<BindingRecord>>, ClientError> {
        match self.request(Request::LookupMany { hoas }).await? {
            Response::Lookups { records } => Ok(records),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// A site of the registry.
    pub async fn site_get(&self, name: &str) -> Result<Option<SiteInfo>, ClientError> {
        match self
            .request(Request::SiteGet {
                name: name.to_owned(),
            })
            .await?
        {
            Response::Site { site } => Ok(site),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// All sites.
    pub async fn site_list(&self) -> Result<Vec<SiteInfo>, ClientError> {
        match self.request(Request::SiteList).await? {
            Response::Sites { sites } => Ok(sites),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// The IMS public key (for verifying assertions) and current revision.
    pub async fn info(&self) -> Result<([u8; 32], u64), ClientError> {
        match self.request(Request::Info).await? {
            Response::Info {
                public_key_b64,
                revision,
            } => Ok((public_key_from_b64(&public_key_b64)?, revision)),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Makes `moa`, one of `hoa`'s registered standby MoAs, its active MoA
    /// (host-prep does this when the VM resumes on the destination).
    /// `token` is the host token (or the admin token). Returns the binding
    /// now in force with its signed assertion, and whether it changed
    /// (`false`: `moa` was already active). A MoA that is not a registered
    /// standby is refused with [`ErrorCode::Conflict`], an unknown HoA with
    /// [`ErrorCode::NotFound`], a wrong token with
    /// [`ErrorCode::Unauthorized`]; nothing changes then.
    pub async fn activate_standby(
        &self,
        token: &str,
        hoa: Ipv6Addr,
        moa: Ipv6Addr,
    ) -> Result<(BindingRecord, bool), ClientError> {
        let req = Request::ActivateStandby {
            token: token.trim().to_owned(),
            hoa,
            moa,
        };
        match self.request(req).await? {
            Response::Activated { record, changed } => Ok((record, changed)),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Admin: provisions (or rotates) the update key of `hoa`.
    pub async fn key_add(&self, hoa: Ipv6Addr) -> Result<ProvisionedKey, ClientError> {
        match self.admin(AdminOp::KeyAdd { hoa }).await? {
            Response::KeysAdded { mut keys } if keys.len() == 1 => {
                keys.pop().ok_or(ClientError::Unexpected)
            }
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Admin: provisions many HoAs in one transaction.
    pub async fn key_add_many(
        &self,
        hoas: Vec<Ipv6Addr>,
    ) -> Result<Vec<ProvisionedKey>, ClientError> {
        match self.admin(AdminOp::KeyAddMany { hoas }).await? {
            Response::KeysAdded { keys } => Ok(keys),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Admin: lists bindings.
    pub async fn bindings_list(
        &self,
        prefix: Option<ipnetwork::Ipv6Network>,
        limit: Option<usize>,
    ) -> Result<Vec<BindingRecord>, ClientError> {
        match self.admin(AdminOp::BindingsList { prefix, limit }).await? {
            Response::Bindings { records } => Ok(records),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Admin: deletes a binding and its key.
    pub async fn binding_delete(&self, hoa: Ipv6Addr) -> Result<(), ClientError> {
        match self.admin(AdminOp::BindingDelete { hoa }).await? {
            Response::Ok => Ok(()),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Admin: adds or replaces a site.
    pub async fn site_add(&self, site: SiteInfo) -> Result<(), ClientError> {
        match self.admin(AdminOp::SiteAdd { site }).await? {
            Response::Ok => Ok(()),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// Admin: removes a site.
    pub async fn site_remove(&self, name: &str) -> Result<(), ClientError> {
        match self
            .admin(AdminOp::SiteRemove {
                name: name.to_owned(),
            })
            .await?
        {
            Response::Ok => Ok(()),
            _ => Err(ClientError::Unexpected),
        }
    }
}

/// An item of a [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    /// A binding changed or was deleted.
    Event(WatchEvent),
    /// Catch-up finished (after each (re)connect); live events follow.
    Synced {
        /// Revision covered.
        revision: u64,
    },
}

/// A self-reconnecting watch stream. Dropping it stops it.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<WatchItem>,
    last_revision: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watch {
    /// Starts watching `filter` at `addr`; with `since_revision` = None the
    /// stream starts with the current state of every matching binding.
    pub fn start(
        addr: SocketAddr,
        tls: TlsSettings,
        filter: WatchFilter,
        since_revision: Option<u64>,
    ) -> Watch {
        let (tx, rx) = mpsc::channel(4096);
        let last = Arc::new(AtomicU64::new(since_revision.unwrap_or(0)));
        let last2 = last.clone();
        let task = tokio::spawn(async move {
            let mut since = since_revision;
            let mut delay = Duration::from_millis(50);
            loop {
                match watch_once(addr, &tls, &filter, since, &tx, &last2).await {
                    Ok(()) => return, // receiver dropped
                    Err(e) => {
                        tracing::debug!(error = %e, "IMS watch disconnected; reconnecting");
                    }
                }
                if last2.load(Ordering::SeqCst) > 0 || since.is_some() {
                    since = Some(last2.load(Ordering::SeqCst));
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        });
        Watch {
            rx,
            last_revision: last,
            task,
        }
    }

    /// Next item; waits across reconnects.
    pub async fn next(&mut self) -> Result<WatchItem, ClientError> {
        self.rx.recv().await.ok_or(ClientError::Closed)
    }

    /// Highest revision delivered so far.
    pub fn last_revision(&self) -> u64 {
        self.last_revision.load(Ordering::SeqCst)
    }
}

async fn watch_once(
    addr: SocketAddr,
    tls: &TlsSettings,
    filter: &WatchFilter,
    since: Option<u64>,
    tx: &mpsc::Sender<WatchItem>,
    last: &AtomicU64,
) -> Result<(), ClientError> {
    let mut stream = tls.connect(addr).await?;
    let req = RequestFrame {
        id: 1,
        req: Request::Watch {
            filter: filter.clone(),
            since_revision: since,
        },
    };
    stream
        .write_all(&control::encode_frame(&req)?)
        .await
        .map_err(io_err(format!("send watch to {addr}")))?;
    stream
        .flush()
        .await
        .map_err(io_err(format!("send watch to {addr}")))?;
    let mut buf = Vec::new();
    loop {
        let f = read_frame(&mut stream, &mut buf).await?;
        let item = match f.resp {
            Response::Event { event } => {
                let rev = event.revision;
                // Revisions only grow within a connection; drop anything
                // already delivered (a resumed catch-up may overlap).
                if rev <= last.load(Ordering::SeqCst) && since.is_some() {
                    continue;
                }
                last.fetch_max(rev, Ordering::SeqCst);
                WatchItem::Event(event)
            }
            Response::WatchSynced { revision } => {
                last.fetch_max(revision, Ordering::SeqCst);
                WatchItem::Synced { revision }
            }
            Response::Error { code, message } => return Err(ClientError::Server { code, message }),
            _ => return Err(ClientError::Unexpected),
        };
        if tx.send(item).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn ca_file_errors_name_the_file() {
        let missing = Path::new("/nonexistent/mat6-ca.pem");
        let e = TlsSettings::from_ca_pem_file(missing, "localhost").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/mat6-ca.pem"), "{e}");
        let dir = std::env::temp_dir().join(format!("ims-client-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(
            TlsSettings::from_ca_pem_file(&empty, "localhost"),
            Err(ClientError::BadCa {
                reason: "no certificate in file",
                ..
            })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            TlsSettings::from_ca_ders(vec![], "not a name!"),
            Err(ClientError::BadServerName(_))
        ));
    }

    #[tokio::test]
    async fn silent_server_times_out_the_handshake() {
        // Accepts the TCP connection and never speaks TLS.
        let l = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(s);
        });
        let tls = TlsSettings::from_ca_ders(vec![], "localhost").unwrap();
        let t0 = Instant::now();
        let e = ControlClient::connect(addr, &tls).await.unwrap_err();
        assert!(t0.elapsed() >= CONNECT_TIMEOUT);
        assert!(
            e.to_string().contains("TLS handshake with IMS control"),
            "{e}"
        );
        assert!(
            matches!(&e, ClientError::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut),
            "{e:?}"
        );
        hold.abort();
    }

    #[test]
    fn update_constructors() {
        let m: Ipv6Addr = "2001:db8:b::1".parse().unwrap();
        let a = BindingUpdate::activate(m, 60);
        assert!(a.activate && a.active == Some(m) && a.standby.is_empty());
        let s = BindingUpdate::standby(None, vec![m], 60);
        assert!(!s.activate && s.active.is_none() && s.standby == vec![m]);
    }
}
