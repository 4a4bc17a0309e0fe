//! Prometheus metrics and the `/metrics` HTTP endpoint.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Why an update datagram was rejected.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reject {
    /// Source over its rate limit.
    RateLimited,
    /// Header/length invalid.
    Malformed,
    /// HoA has no key.
    UnknownHoa,
    /// Key id is not the HoA's key.
    UnknownKey,
    /// HMAC tag mismatch.
    BadTag,
    /// seq <= last accepted (answered with a stale ack).
    StaleSeq,
    /// Lifetime above the configured maximum (answered with a refused ack).
    Policy,
}

impl Reject {
    fn as_str(self) -> &'static str {
        match self {
            Reject::RateLimited => "rate_limited",
            Reject::Malformed => "malformed",
            Reject::UnknownHoa => "unknown_hoa",
            Reject::UnknownKey => "unknown_key",
            Reject::BadTag => "bad_tag",
            Reject::StaleSeq => "stale_seq",
            Reject::Policy => "policy",
        }
    }
}

/// Outcome of an `activate_standby` request.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Activation {
    /// The standby MoA became active (seq bumped, committed).
    Accepted,
    /// It was already active (nothing changed).
    AlreadyActive,
    /// Neither the admin nor the host token.
    Unauthorized,
    /// No binding for the HoA (or it expired).
    UnknownHoa,
    /// The MoA is not one of the HoA's registered standby MoAs.
    NotStandby,
    /// The store commit failed.
    Internal,
}

impl Activation {
    fn as_str(self) -> &'static str {
        match self {
            Activation::Accepted => "accepted",
            Activation::AlreadyActive => "already_active",
            Activation::Unauthorized => "unauthorized",
            Activation::UnknownHoa => "unknown_hoa",
            Activation::NotStandby => "not_standby",
            Activation::Internal => "internal",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// All server metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Durably accepted updates.
    pub updates_accepted: Counter,
    rejected: Family<ReasonLabel, Counter>,
    activations: Family<ResultLabel, Counter>,
    /// Lookups served (one per HoA looked up).
    pub lookups: Counter,
    /// Current watch subscribers.
    pub watch_subscribers: Gauge,
    /// Commit latency, seconds.
    pub commit_latency: Histogram,
    /// Jobs per commit.
    pub batch_size: Histogram,
    /// Failed commits.
    pub commit_errors: Counter,
    /// HoAs in the index.
    pub hoas: Gauge,
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("ims");
        let updates_accepted = Counter::default();
        let rejected = Family::<ReasonLabel, Counter>::default();
        let activations = Family::<ResultLabel, Counter>::default();
        let lookups = Counter::default();
        let watch_subscribers = Gauge::default();
        let commit_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let commit_errors = Counter::default();
        let hoas = Gauge::default();
        registry.register(
            "updates_accepted",
            "Durably committed binding updates",
            updates_accepted.clone(),
        );
        registry.register(
            "updates_rejected",
            "Update datagrams rejected, by reason",
            rejected.clone(),
        );
        registry.register(
            "standby_activations",
            "activate_standby requests (host-prep at RESUME), by result",
            activations.clone(),
        );
        registry.register("lookups", "Bindings looked up", lookups.clone());
        registry.register(
            "watch_subscribers",
            "Open watch streams",
            watch_subscribers.clone(),
        );
        registry.register(
            "commit_latency_seconds",
            "Store commit latency",
            commit_latency.clone(),
        );
        registry.register(
            "commit_batch_size",
            "Jobs per group commit",
            batch_size.clone(),
        );
        registry.register(
            "commit_errors",
            "Failed store commits",
            commit_errors.clone(),
        );
        registry.register("hoas", "Provisioned HoAs", hoas.clone());
        Arc::new(Metrics {
            registry,
            updates_accepted,
            rejected,
            activations,
            lookups,
            watch_subscribers,
            commit_latency,
            batch_size,
            commit_errors,
            hoas,
        })
    }

    /// Counts a rejection.
    pub fn reject(&self, r: Reject) {
        self.rejected
            .get_or_create(&ReasonLabel { reason: r.as_str() })
            .inc();
    }

    /// Rejections so far for `r`.
    pub fn rejected(&self, r: Reject) -> u64 {
        self.rejected
            .get_or_create(&ReasonLabel { reason: r.as_str() })
            .get()
    }

    /// Counts an `activate_standby` outcome.
    pub fn activation(&self, a: Activation) {
        self.activations
            .get_or_create(&ResultLabel { result: a.as_str() })
            .inc();
    }

    /// `activate_standby` outcomes so far for `a`.
    pub fn activations(&self, a: Activation) -> u64 {
        self.activations
            .get_or_create(&ResultLabel { result: a.as_str() })
            .get()
    }

    /// Text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// Serves `/metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let m = m.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(m.encode())))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    Ok::<_, Infallible>(resp.unwrap_or_default())
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
