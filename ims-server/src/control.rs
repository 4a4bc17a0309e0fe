//! The TLS 1.3 control channel: lookups, watch, sites, admin, and
//! `activate_standby` (admin or host token).

use std::sync::Arc;

use mat6_proto::control::{
    self, AdminOp, ErrorCode, Request, RequestFrame, Response, ResponseFrame, WatchEvent,
    WatchFilter,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_rustls::TlsAcceptor;

use crate::metrics::Activation;
use crate::pipeline::{Job, Shared};

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most HoAs in one `lookup_many` (bounds the response size).
pub const MAX_LOOKUP_MANY: usize = 10_000;

/// What every connection needs.
#[derive(Debug, Clone)]
pub struct ControlCtx {
    /// Shared state.
    pub shared: Arc<Shared>,
    /// Committer queue (admin writes).
    pub jobs: std::sync::mpsc::SyncSender<Job>,
    /// Admin token.
    pub admin_token: Arc<[u8]>,
    /// Host token (only `activate_standby`); `None`: not configured.
    pub host_token: Option<Arc<[u8]>>,
    /// IMS public key, base64.
    pub public_key_b64: Arc<str>,
}

/// Accepts connections until the task is dropped.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, ctx: ControlCtx) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // A peer that never finishes the handshake must not hold a task.
            let hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            match hs {
                Ok(Ok(tls)) => connection(tls, ctx).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

fn frame(id: u64, resp: Response) -> Vec<u8> {
    control::encode_frame(&ResponseFrame { id, resp }).unwrap_or_default()
}

fn err(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

fn token_ok(expected: &[u8], given: &str) -> bool {
    let g = given.trim().as_bytes();
    // Constant time for equal lengths; the length itself is not secret.
    g.len() == expected.len() && g.iter().zip(expected).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
}

async fn connection<S>(tls: S, ctx: ControlCtx)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(tls);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(1024);
    let writer = tokio::spawn(async move {
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
    let mut buf = Vec::new();
    let mut watches = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if rd.read_exact(&mut len).await.is_err() {
            break;
        }
        let n = match control::frame_len(&len) {
            Ok(Some(n)) => n,
            _ => {
                let _ = tx
                    .send(frame(0, err(ErrorCode::BadRequest, "frame too large")))
                    .await;
                break;
            }
        };
        buf.resize(n, 0);
        if rd.read_exact(&mut buf).await.is_err() {
            break;
        }
        let req: RequestFrame = match serde_json::from_slice(&buf) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx
                    .send(frame(
                        0,
                        err(ErrorCode::BadRequest, format!("malformed request: {e}")),
                    ))
                    .await;
                break;
            }
        };
        let id = req.id;
        let resp = match req.req {
            Request::Watch {
                filter,
                since_revision,
            } => {
                watches.push(tokio::spawn(watch(
                    id,
                    filter,
                    since_revision,
                    ctx.shared.clone(),
                    tx.clone(),
                )));
                continue;
            }
            Request::ActivateStandby { token, hoa, moa } => {
                let host_ok = ctx
                    .host_token
                    .as_deref()
                    .is_some_and(|h| token_ok(h, &token));
                if !host_ok && !token_ok(&ctx.admin_token, &token) {
                    ctx.shared.metrics.activation(Activation::Unauthorized);
                    err(
                        ErrorCode::Unauthorized,
                        "admin or host token missing or wrong",
                    )
                } else {
                    activate(hoa, moa, &ctx).await
                }
            }
            Request::Admin { token, op } => {
                if !token_ok(&ctx.admin_token, &token) {
                    err(ErrorCode::Unauthorized, "admin token missing or wrong")
                } else {
                    admin(op, &ctx).await
                }
            }
            other => read_only(other, &ctx),
        };
        if tx.send(frame(id, resp)).await.is_err() {
            break;
        }
    }
    for w in watches {
        w.abort();
    }
    drop(tx);
    let _ = writer.await;
}

fn read_only(req: Request, ctx: &ControlCtx) -> Response {
    let Ok(ix) = ctx.shared.index.read() else {
        return err(ErrorCode::Internal, "index lock poisoned");
    };
    let now = crate::pipeline::unix_now();
    let live = |e: &crate::index::Entry| e.record().filter(|r| !r.binding.is_expired(now));
    match req {
        Request::Lookup { hoa } => {
            ctx.shared.metrics.lookups.inc();
            Response::Binding {
                record: ix.get(&hoa).and_then(live),
            }
        }
        Request::LookupMany { hoas } if hoas.len() > MAX_LOOKUP_MANY => err(
            ErrorCode::BadRequest,
            format!("lookup_many takes at most {MAX_LOOKUP_MANY} HoAs"),
        ),
        Request::LookupMany { hoas } => {
            ctx.shared.metrics.lookups.inc_by(hoas.len() as u64);
            Response::Lookups {
                records: hoas.iter().map(|h| ix.get(h).and_then(live)).collect(),
            }
        }
        Request::SiteGet { name } => Response::Site {
            site: ix.sites().get(&name).cloned(),
        },
        Request::SiteList => Response::Sites {
            sites: ix.sites().values().cloned().collect(),
        },
        Request::Info => Response::Info {
            public_key_b64: ctx.public_key_b64.to_string(),
            revision: ix.revision,
        },
        Request::Watch { .. } | Request::Admin { .. } | Request::ActivateStandby { .. } => {
            err(ErrorCode::BadRequest, "not a read-only request")
        }
    }
}

/// Hands a job to the committer and waits for its answer (sent after the
/// commit).
async fn committed(ctx: &ControlCtx, job: Job, rx: oneshot::Receiver<Response>) -> Response {
    let jobs = ctx.jobs.clone();
    // The committer queue is bounded; do not block a runtime thread on it.
    let sent = tokio::task::spawn_blocking(move || jobs.send(job).is_ok()).await;
    if !matches!(sent, Ok(true)) {
        return err(ErrorCode::Internal, "committer stopped");
    }
    rx.await
        .unwrap_or_else(|_| err(ErrorCode::Internal, "committer stopped"))
}

async fn activate(hoa: std::net::Ipv6Addr, moa: std::net::Ipv6Addr, ctx: &ControlCtx) -> Response {
    let (reply, rx) = oneshot::channel();
    committed(ctx, Job::Activate { hoa, moa, reply }, rx).await
}

async fn admin(op: AdminOp, ctx: &ControlCtx) -> Response {
    if let AdminOp::BindingsList { prefix, limit } = &op {
        let Ok(ix) = ctx.shared.index.read() else {
            return err(ErrorCode::Internal, "index lock poisoned");
        };
        let mut records: Vec<_> = ix
            .entries()
            .filter(|e| prefix.is_none_or(|p| p.contains(e.hoa())))
            .filter_map(|e| e.record())
            .collect();
        records.sort_by_key(|r| r.binding.hoa);
        if let Some(l) = limit {
            records.truncate(*l);
        }
        return Response::Bindings { records };
    }
    let (reply, rx) = oneshot::channel();
    committed(ctx, Job::Admin { op, reply }, rx).await
}

async fn watch(
    id: u64,
    filter: WatchFilter,
    since: Option<u64>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<u8>>,
) {
    shared.metrics.watch_subscribers.inc();
    let _guard = GaugeGuard(shared.clone());
    let mut since = since;
    loop {
        // Subscribe and snapshot under the index lock: the committer publishes
        // while holding the write lock, so nothing falls between the two.
        let (mut rx, keys, synced) = {
            let Ok(ix) = shared.index.read() else {
                return;
            };
            (
                shared.events.subscribe(),
                ix.catch_up_keys(&filter, since),
                ix.revision,
            )
        };
        // Send the catch-up in chunks, re-reading each record under a short
        // read lock. A record changed since the snapshot is skipped here: its
        // new revision is > `synced`, so it arrives as a live event.
        for chunk in keys.chunks(512) {
            let events: Vec<WatchEvent> = {
                let Ok(ix) = shared.index.read() else {
                    return;
                };
                chunk.iter().filter_map(|k| ix.catch_up_event(k)).collect()
            };
            for ev in events {
                if tx
                    .send(frame(id, Response::Event { event: ev }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        if tx
            .send(frame(id, Response::WatchSynced { revision: synced }))
            .await
            .is_err()
        {
            return;
        }
        let mut last = synced;
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    if ev.revision <= last {
                        continue;
                    }
                    last = ev.revision;
                    if filter.matches(&ev.hoa()) {
                        let e: WatchEvent = (*ev).clone();
                        if tx
                            .send(frame(id, Response::Event { event: e }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow: resume from what was delivered, like a reconnect.
                    since = Some(last);
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

struct GaugeGuard(Arc<Shared>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.metrics.watch_subscribers.dec();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn token_compare() {
        assert!(token_ok(b"abc", "abc\n"));
        assert!(!token_ok(b"abc", "abd"));
        assert!(!token_ok(b"abc", "ab"));
        assert!(!token_ok(b"abc", ""));
    }
}
