//! The thin I/O loop around [`crate::ra::RaSender`]: a raw ICMPv6 sender and
//! an NDP receiver (from `mat6-net`) on the prepared bridge, a timer, and a
//! stop signal. Everything it decides comes from the sans-IO core.

use std::net::Ipv6Addr;
use std::time::Instant;

use mat6_net::icmp6::{Icmp6Error, NdpReceiver, NdpSender};
use mat6_proto::binding::SiteInfo;
use mat6_proto::ndp::NdpRepr;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::ra::{self, RaSender, RaStats, RaTiming};

/// A running RA sender; [`RaTask::stop`] sends the final RA and ends it.
#[derive(Debug)]
pub struct RaTask {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<RaStats, Icmp6Error>>,
    /// The bridge it runs on.
    pub ifindex: u32,
}

impl RaTask {
    /// Open the sockets on `ifindex` and start sending RAs for `site` from
    /// the site gateway's link-local address (which must be on the bridge).
    /// Socket errors surface here, before anything is spawned.
    pub fn start(ifindex: u32, site: SiteInfo, timing: RaTiming) -> Result<Self, Icmp6Error> {
        let tx = NdpSender::bind(ifindex)?;
        let rx = NdpReceiver::bind(ifindex)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(tx, rx, site, timing, stop_rx));
        Ok(Self {
            stop: Some(stop_tx),
            task,
            ifindex,
        })
    }

    /// Stop: the final RA (router lifetime 0) goes out, then the task ends.
    pub async fn stop(mut self) -> Result<RaStats, Icmp6Error> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(Icmp6Error::Send {
                dst: "ff02::1".into(),
                ifindex: self.ifindex,
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }
}

impl Drop for RaTask {
    fn drop(&mut self) {
        // Not stopped properly (error path): at least end the task.
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

/// Sends what the core queued. A failed send is logged and skipped, not
/// fatal: until the bridge has carrier (the VM's tap not yet up) the gateway
/// address is still tentative and the kernel refuses it as a source; the
/// next RA or the answer to the guest's RS goes out once it is usable.
async fn flush(tx: &NdpSender, core: &mut RaSender, site: &SiteInfo, failures: &mut u64) {
    while let Some(t) = core.poll_transmit() {
        let repr = NdpRepr::RouterAdvert(ra::router_advert(site, t.reason));
        match tx.send(&repr, Some(site.gateway_ll), t.dst).await {
            Ok(_) => tracing::trace!(dst = %t.dst, reason = ?t.reason, "RA sent"),
            Err(e) => {
                *failures += 1;
                if *failures == 1 || failures.is_power_of_two() {
                    tracing::debug!(error = %e, failures = *failures, "RA not sent");
                }
            }
        }
    }
}

async fn run(
    tx: NdpSender,
    mut rx: NdpReceiver,
    site: SiteInfo,
    timing: RaTiming,
    mut stop: oneshot::Receiver<()>,
) -> Result<RaStats, Icmp6Error> {
    let mut core = RaSender::new(timing, Instant::now());
    let mut failures = 0u64;
    loop {
        let deadline = core.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = &mut stop => {
                core.stop();
                flush(&tx, &mut core, &site, &mut failures).await;
                return Ok(core.stats());
            }
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => {
                core.handle_timeout(Instant::now());
            }
            pkt = rx.recv() => {
                let pkt = pkt?;
                if let NdpRepr::RouterSolicit { .. } = pkt.repr {
                    let src: Ipv6Addr = pkt.src;
                    tracing::debug!(%src, "router solicitation");
                    core.handle_rs(src, Instant::now());
                }
            }
        }
        flush(&tx, &mut core, &site, &mut failures).await;
    }
}
