//! The update path: a UDP receive thread (rate limit → checked parse → key
//! lookup → constant-time HMAC verify → seq check → sign the assertion) and a
//! single committer thread that group-commits every pending job in one store
//! transaction, then updates the index, publishes watch events and only then
//! sends the acks.
//!
//! Unauthenticated, malformed, unknown-key or wrong-HoA datagrams get no reply
//! and change nothing. Authenticated but stale ones get a stale ack carrying
//! the last accepted seq (and the current assertion), and change nothing.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mat6_proto::assertion::SigningKey;
use mat6_proto::binding::{Binding, SiteInfo};
use mat6_proto::control::{
    AdminOp, BindingRecord, ErrorCode, ProvisionedKey, Response, WatchChange, WatchEvent,
};
use mat6_proto::update::{AckRepr, AckStatus, UpdateKey, UpdatePacket, UpdateRepr, MAX_ACK_LEN};
use ring::hmac;
use tokio::sync::{broadcast, oneshot};

use crate::index::{changed_event, Index};
use crate::metrics::{Activation, Metrics, Reject};
use crate::store::{BindingStore, HoaRecord, StoreOp, StoredBinding};

/// Work for the committer.
#[derive(Debug)]
pub enum Job {
    /// A verified update that looked fresh when received.
    Update(Box<UpdateJob>),
    /// `activate_standby`: make a registered standby MoA the active one.
    Activate {
        /// HoA.
        hoa: Ipv6Addr,
        /// The standby MoA.
        moa: Ipv6Addr,
        /// Where the answer goes.
        reply: oneshot::Sender<Response>,
    },
    /// An operator operation that writes.
    Admin {
        /// The operation.
        op: AdminOp,
        /// Where the answer goes.
        reply: oneshot::Sender<Response>,
    },
}

/// A verified update waiting for its commit.
#[derive(Debug)]
pub struct UpdateJob {
    /// The update.
    pub repr: UpdateRepr,
    /// Where the ack goes.
    pub from: SocketAddr,
    /// The HoA's key (to tag the ack).
    pub key: hmac::Key,
    /// The binding it produces.
    pub binding: Binding,
    /// Signature of its assertion.
    pub signature: [u8; 64],
}

/// State shared by the threads and the control server.
#[derive(Debug)]
pub struct Shared {
    /// Committed state.
    pub index: RwLock<Index>,
    /// Watch events (sent while the index write lock is held).
    pub events: broadcast::Sender<Arc<WatchEvent>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// IMS signing key.
    pub signing: SigningKey,
    /// Set to stop the threads.
    pub stop: AtomicBool,
}

/// Update-path limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Refuse lifetimes above this.
    pub max_lifetime_s: u32,
    /// Token-bucket rate per source IP (datagrams/s).
    pub rate_per_s: f64,
    /// Token-bucket depth.
    pub burst: f64,
    /// Most jobs in one commit.
    pub max_batch: usize,
    /// Receive/verify/sign threads.
    pub udp_threads: usize,
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Most sources tracked by the rate limiter (about 10 MB).
pub const MAX_BUCKETS: usize = 1 << 18;

/// Per-source token bucket.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<IpAddr, (f64, Instant)>,
    last_sweep: Instant,
}

impl RateLimiter {
    /// A limiter allowing `rate` per second with bursts of `burst`.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        RateLimiter {
            rate,
            burst: burst.max(1.0),
            buckets: HashMap::new(),
            last_sweep: now,
        }
    }

    /// Takes one token for `ip` if available.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        let full = self.buckets.len() >= MAX_BUCKETS;
        if full || now.duration_since(self.last_sweep) > Duration::from_secs(10) {
            // Forget sources whose bucket has refilled (same as absent).
            let (rate, burst) = (self.rate, self.burst);
            self.buckets
                .retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < burst);
            self.last_sweep = now;
            if self.buckets.len() >= MAX_BUCKETS {
                // A flood from (spoofed) sources: bound the memory, at the
                // price of forgetting who was throttled.
                self.buckets.clear();
            }
        }
        let (tokens, at) = self.buckets.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn send_ack(sock: &UdpSocket, to: SocketAddr, key: &hmac::Key, ack: &AckRepr) {
    let mut buf = [0u8; MAX_ACK_LEN];
    if let Ok(n) = ack.emit(key, &mut buf) {
        let _ = sock.send_to(&buf[..n], to);
    }
}

/// A receive loop (several threads may share one socket and one limiter;
/// each runs until `shared.stop`).
pub fn recv_loop(
    sock: UdpSocket,
    shared: Arc<Shared>,
    limits: Limits,
    jobs: SyncSender<Job>,
    limiter: Arc<Mutex<RateLimiter>>,
) {
    let mut buf = [0u8; 2048];
    let m = &shared.metrics;
    while !shared.stop.load(Ordering::Relaxed) {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(_) => continue, // read timeout or transient error
        };
        let allowed = match limiter.lock() {
            Ok(mut l) => l.allow(from.ip(), Instant::now()),
            Err(_) => return,
        };
        if !allowed {
            m.reject(Reject::RateLimited);
            continue;
        }
        let Ok(p) = UpdatePacket::new_checked(&buf[..n]) else {
            m.reject(Reject::Malformed);
            continue;
        };
        let hoa = p.hoa();
        let (key, last_seq, current) = {
            let Ok(ix) = shared.index.read() else {
                return;
            };
            let Some(e) = ix.get(&hoa) else {
                m.reject(Reject::UnknownHoa);
                continue;
            };
            if e.key_id() != p.key_id() {
                m.reject(Reject::UnknownKey);
                continue;
            }
            (
                hmac::Key::new(hmac::HMAC_SHA256, e.secret()),
                e.seq(),
                e.assertion(),
            )
        };
        if p.verify(&key).is_err() {
            m.reject(Reject::BadTag);
            continue;
        }
        let repr = UpdateRepr::parse(&p);
        if repr.seq <= last_seq {
            m.reject(Reject::StaleSeq);
            let ack = AckRepr {
                status: AckStatus::StaleSeq,
                key_id: repr.key_id,
                seq: repr.seq,
                last_accepted_seq: last_seq,
                hoa,
                // Only a retransmission of the accepted update itself (its
                // first ack was lost) gets the assertion back; other stale
                // answers stay small so replays reflect fewer bytes than sent.
                assertion: current.filter(|_| repr.seq == last_seq),
            };
            send_ack(&sock, from, &key, &ack);
            continue;
        }
        if repr.lifetime_s > limits.max_lifetime_s {
            m.reject(Reject::Policy);
            let ack = AckRepr {
                status: AckStatus::Refused,
                key_id: repr.key_id,
                seq: repr.seq,
                last_accepted_seq: last_seq,
                hoa,
                assertion: None,
            };
            send_ack(&sock, from, &key, &ack);
            continue;
        }
        let binding = Binding {
            hoa,
            active: repr.active,
            standby: repr.standby.clone(),
            seq: repr.seq,
            expires_unix: unix_now().saturating_add(u64::from(repr.lifetime_s)),
            key_id: repr.key_id,
        };
        let signature = shared.signing.sign(&binding).signature;
        let job = Job::Update(Box::new(UpdateJob {
            repr,
            from,
            key,
            binding,
            signature,
        }));
        if jobs.send(job).is_err() {
            return;
        }
    }
}

/// Batch-local view of records changed by earlier jobs of the same batch.
type Overlay = HashMap<Ipv6Addr, Option<HoaRecord>>;

enum Outgoing {
    Ack(SocketAddr, hmac::Key, AckRepr),
    Reply(oneshot::Sender<Response>, Response),
}

/// What a batch changes in the index, in order.
enum Apply {
    /// A record; `true` when its binding changed (a watch event).
    Put(Box<HoaRecord>, bool),
    Delete(Ipv6Addr, u64),
    PutSite(SiteInfo),
    RemoveSite(String),
}

/// The committer loop (its own thread; ends when `jobs` closes or on stop).
pub fn commit_loop(
    mut store: Box<dyn BindingStore>,
    sock: UdpSocket,
    shared: Arc<Shared>,
    limits: Limits,
    jobs: Receiver<Job>,
) {
    let m = shared.metrics.clone();
    loop {
        let first = match jobs.recv_timeout(Duration::from_millis(100)) {
            Ok(j) => j,
            Err(RecvTimeoutError::Timeout) => {
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < limits.max_batch {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        m.batch_size.observe(batch.len() as f64);
        run_batch(&mut *store, &sock, &shared, batch);
    }
}

fn run_batch(store: &mut dyn BindingStore, sock: &UdpSocket, shared: &Shared, batch: Vec<Job>) {
    let m = &shared.metrics;
    let (mut revision, mut next_key_id) = match shared.index.read() {
        Ok(ix) => (ix.revision, ix.next_key_id),
        Err(_) => return,
    };
    let mut overlay: HashMap<Ipv6Addr, Option<HoaRecord>> = HashMap::new();
    let mut ops = Vec::with_capacity(batch.len());
    let mut applies = Vec::with_capacity(batch.len());
    let mut out = Vec::with_capacity(batch.len());
    let mut accepted = 0u64;
    let mut activated = 0u64;
    {
        let Ok(ix) = shared.index.read() else {
            return;
        };
        let current = |overlay: &HashMap<Ipv6Addr, Option<HoaRecord>>, hoa: &Ipv6Addr| match overlay
            .get(hoa)
        {
            Some(r) => r.clone(),
            None => ix.get(hoa).map(|e| e.to_record()),
        };
        for job in batch {
            match job {
                Job::Update(u) => {
                    let UpdateJob {
                        repr,
                        from,
                        key,
                        binding,
                        signature,
                    } = *u;
                    let Some(mut rec) = current(&overlay, &repr.hoa) else {
                        continue; // deleted meanwhile: no reply
                    };
                    if rec.key_id != repr.key_id {
                        continue; // key rotated meanwhile: no reply
                    }
                    let last = rec.binding.as_ref().map_or(0, |b| b.binding.seq);
                    if repr.seq <= last {
                        m.reject(Reject::StaleSeq);
                        let ack = AckRepr {
                            status: AckStatus::StaleSeq,
                            key_id: repr.key_id,
                            seq: repr.seq,
                            last_accepted_seq: last,
                            hoa: repr.hoa,
                            assertion: rec.binding.as_ref().filter(|_| repr.seq == last).map(|b| {
                                crate::index::assertion_of(&b.binding, b.signature).encode()
                            }),
                        };
                        out.push(Outgoing::Ack(from, key, ack));
                        continue;
                    }
                    revision += 1;
                    let assertion = crate::index::assertion_of(&binding, signature).encode();
                    let sb = StoredBinding {
                        binding,
                        activate: repr.activate,
                        revision,
                        signature,
                    };
                    rec.binding = Some(sb);
                    overlay.insert(repr.hoa, Some(rec.clone()));
                    let rec = Box::new(rec);
                    ops.push(StoreOp::PutHoa(rec.clone()));
                    applies.push(Apply::Put(rec, true));
                    accepted += 1;
                    let ack = AckRepr {
                        status: AckStatus::Accepted,
                        key_id: repr.key_id,
                        seq: repr.seq,
                        last_accepted_seq: repr.seq,
                        hoa: repr.hoa,
                        assertion: Some(assertion),
                    };
                    out.push(Outgoing::Ack(from, key, ack));
                }
                Job::Activate { hoa, moa, reply } => {
                    let resp = match activate_standby(
                        current(&overlay, &hoa),
                        moa,
                        unix_now(),
                        &shared.signing,
                        revision + 1,
                    ) {
                        ActivateOutcome::Already(record) => {
                            m.activation(Activation::AlreadyActive);
                            Response::Activated {
                                record,
                                changed: false,
                            }
                        }
                        ActivateOutcome::Changed(rec, record) => {
                            revision += 1;
                            activated += 1;
                            overlay.insert(hoa, Some((*rec).clone()));
                            ops.push(StoreOp::PutHoa(rec.clone()));
                            applies.push(Apply::Put(rec, true));
                            Response::Activated {
                                record,
                                changed: true,
                            }
                        }
                        ActivateOutcome::Rejected(a, code) => {
                            m.activation(a);
                            let message = match a {
                                Activation::NotStandby => format!(
                                    "{moa} is not a registered standby MoA of {hoa} (nothing changed)"
                                ),
                                _ => format!("no live binding for HoA {hoa}"),
                            };
                            Response::Error { code, message }
                        }
                    };
                    out.push(Outgoing::Reply(reply, resp));
                }
                Job::Admin { op, reply } => {
                    let resp = match op {
                        AdminOp::KeyAdd { hoa } => admin_keys(
                            &[hoa],
                            &mut overlay,
                            &current,
                            &mut next_key_id,
                            &mut ops,
                            &mut applies,
                        ),
                        AdminOp::KeyAddMany { hoas } => admin_keys(
                            &hoas,
                            &mut overlay,
                            &current,
                            &mut next_key_id,
                            &mut ops,
                            &mut applies,
                        ),
                        AdminOp::BindingDelete { hoa } => {
                            if current(&overlay, &hoa).is_none() {
                                Response::Error {
                                    code: ErrorCode::NotFound,
                                    message: format!("no HoA {hoa}"),
                                }
                            } else {
                                revision += 1;
                                overlay.insert(hoa, None);
                                ops.push(StoreOp::DeleteHoa { hoa, revision });
                                applies.push(Apply::Delete(hoa, revision));
                                Response::Ok
                            }
                        }
                        AdminOp::SiteAdd { site } => match site.validate() {
                            Err(e) => Response::Error {
                                code: ErrorCode::BadRequest,
                                message: e.to_string(),
                            },
                            Ok(()) => {
                                ops.push(StoreOp::PutSite(site.clone()));
                                applies.push(Apply::PutSite(site));
                                Response::Ok
                            }
                        },
                        AdminOp::SiteRemove { name } => {
                            if ix.sites().contains_key(&name) {
                                ops.push(StoreOp::RemoveSite(name.clone()));
                                applies.push(Apply::RemoveSite(name));
                                Response::Ok
                            } else {
                                Response::Error {
                                    code: ErrorCode::NotFound,
                                    message: format!("no site {name:?}"),
                                }
                            }
                        }
                        AdminOp::BindingsList { .. } => Response::Error {
                            code: ErrorCode::BadRequest,
                            message: "read-only operation sent to the committer".into(),
                        },
                    };
                    out.push(Outgoing::Reply(reply, resp));
                }
            }
        }
    }
    if !ops.is_empty() {
        let t = Instant::now();
        if let Err(e) = store.commit(&ops, revision, next_key_id) {
            m.commit_errors.inc();
            for _ in 0..activated {
                m.activation(Activation::Internal);
            }
            tracing::error!(error = %e, "store commit failed; batch not acknowledged");
            for o in out {
                if let Outgoing::Reply(r, _) = o {
                    let _ = r.send(Response::Error {
                        code: ErrorCode::Internal,
                        message: e.to_string(),
                    });
                }
            }
            return;
        }
        m.commit_latency.observe(t.elapsed().as_secs_f64());
        let Ok(mut ix) = shared.index.write() else {
            return;
        };
        // Events are built and published under the write lock, so a watcher
        // (which subscribes and snapshots under the read lock) sees each
        // change exactly once. Their base64 assertions are only built when
        // someone listens.
        let listening = shared.events.receiver_count() > 0;
        for a in applies {
            match a {
                Apply::Put(r, changed) => {
                    ix.put(&r);
                    if let (true, true, Some(b)) = (listening, changed, &r.binding) {
                        let _ = shared.events.send(Arc::new(changed_event(b)));
                    }
                }
                Apply::Delete(hoa, revision) => {
                    ix.remove(&hoa, revision);
                    if listening {
                        let _ = shared.events.send(Arc::new(WatchEvent {
                            revision,
                            change: WatchChange::Deleted { hoa },
                        }));
                    }
                }
                Apply::PutSite(s) => ix.put_site(s),
                Apply::RemoveSite(n) => {
                    ix.remove_site(&n);
                }
            }
        }
        ix.revision = revision;
        ix.next_key_id = next_key_id;
        m.hoas.set(ix.len() as i64);
    }
    m.updates_accepted.inc_by(accepted);
    for _ in 0..activated {
        m.activation(Activation::Accepted);
    }
    for o in out {
        match o {
            Outgoing::Ack(to, key, ack) => send_ack(sock, to, &key, &ack),
            Outgoing::Reply(r, resp) => {
                let _ = r.send(resp);
            }
        }
    }
}

/// What `activate_standby` does to a record.
#[derive(Debug)]
enum ActivateOutcome {
    /// `moa` is already active: the current binding, unchanged.
    Already(BindingRecord),
    /// The new record to commit, and the binding record to answer with.
    Changed(Box<HoaRecord>, BindingRecord),
    /// Refused (metric label, wire code); nothing changes.
    Rejected(Activation, ErrorCode),
}

/// Decides an `activate_standby` against the HoA's current record: `moa`
/// must be one of its standby MoAs (or already active). The new binding makes
/// `moa` active, drops it from the standby list, drops the old active MoA
/// (the VM just left that link), keeps the expiry and key id, and bumps the
/// seq by one; it is signed here and committed at `revision`.
fn activate_standby(
    rec: Option<HoaRecord>,
    moa: Ipv6Addr,
    now_unix: u64,
    signing: &SigningKey,
    revision: u64,
) -> ActivateOutcome {
    let unknown = || ActivateOutcome::Rejected(Activation::UnknownHoa, ErrorCode::NotFound);
    let Some(mut rec) = rec else {
        return unknown();
    };
    let hoa = rec.hoa;
    let Some(cur) = rec
        .binding
        .as_ref()
        .filter(|b| !b.binding.is_expired(now_unix))
    else {
        return unknown();
    };
    let record_of = |b: &StoredBinding| BindingRecord {
        binding: b.binding.clone(),
        revision: b.revision,
        assertion_b64: Some(crate::index::assertion_of(&b.binding, b.signature).to_b64()),
    };
    if cur.binding.active == Some(moa) {
        return ActivateOutcome::Already(record_of(cur));
    }
    if !cur.binding.standby.contains(&moa) {
        return ActivateOutcome::Rejected(Activation::NotStandby, ErrorCode::Conflict);
    }
    let binding = Binding {
        hoa,
        active: Some(moa),
        standby: cur
            .binding
            .standby
            .iter()
            .copied()
            .filter(|a| *a != moa)
            .collect(),
        seq: cur.binding.seq.saturating_add(1),
        expires_unix: cur.binding.expires_unix,
        key_id: cur.binding.key_id,
    };
    let signature = signing.sign(&binding).signature;
    let sb = StoredBinding {
        binding,
        activate: true,
        revision,
        signature,
    };
    let answer = record_of(&sb);
    rec.binding = Some(sb);
    ActivateOutcome::Changed(Box::new(rec), answer)
}

fn admin_keys(
    hoas: &[Ipv6Addr],
    overlay: &mut Overlay,
    current: &dyn Fn(&Overlay, &Ipv6Addr) -> Option<HoaRecord>,
    next_key_id: &mut u32,
    ops: &mut Vec<StoreOp>,
    applies: &mut Vec<Apply>,
) -> Response {
    let mut keys = Vec::with_capacity(hoas.len());
    for &hoa in hoas {
        let key_id = *next_key_id;
        let Ok(k) = UpdateKey::generate(key_id) else {
            return Response::Error {
                code: ErrorCode::Internal,
                message: "system random number generator failed".into(),
            };
        };
        *next_key_id = next_key_id.wrapping_add(1).max(1);
        // Rotation keeps the binding and its seq; the new key signs from now on.
        let binding = current(overlay, &hoa).and_then(|r| r.binding);
        let rec = HoaRecord {
            hoa,
            key_id,
            secret: k.secret,
            binding,
        };
        overlay.insert(hoa, Some(rec.clone()));
        let rec = Box::new(rec);
        ops.push(StoreOp::PutHoa(rec.clone()));
        applies.push(Apply::Put(rec, false));
        keys.push(ProvisionedKey {
            hoa,
            key_id,
            secret_b64: k.secret_b64(),
        });
    }
    Response::KeysAdded { keys }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn token_bucket() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(10.0, 3.0, t0);
        let ip: IpAddr = "::1".parse().unwrap();
        let other: IpAddr = "::2".parse().unwrap();
        assert!(rl.allow(ip, t0));
        assert!(rl.allow(ip, t0));
        assert!(rl.allow(ip, t0));
        assert!(!rl.allow(ip, t0));
        assert!(rl.allow(other, t0));
        assert!(rl.allow(ip, t0 + Duration::from_millis(100)));
        assert!(!rl.allow(ip, t0 + Duration::from_millis(100)));
        // Sweeping forgets full buckets but keeps behaviour.
        assert!(rl.allow(ip, t0 + Duration::from_secs(11)));
    }
}
