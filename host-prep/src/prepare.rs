//! `prepare` (source host): make the VM's standby NIC see the destination
//! link before the migration, and wait until the guest-agent has registered
//! a standby MoA for it at the IMS.
//!
//! Steps, each timed: site lookup → bridge impersonates the destination
//! gateway (MAC + link-local, nodad) → RA sender on the bridge → standby NIC
//! carrier on (QMP `set_link`) → standby MoA at the IMS. The bridge also
//! gets an nftables filter that lets only Neighbor Discovery reach the
//! host's stack from it. Any failure undoes what was done (RA sender stopped
//! with a final RA, filter removed, address removed, MAC restored) before
//! the error is returned.

use std::net::Ipv6Addr;
use std::time::Instant;

use mat6_net::bridge::{self, Impersonation};
use mat6_net::netlink::Netlink;
use mat6_proto::binding::SiteInfo;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::host::Host;
use crate::ims::Registry;
use crate::qmp::LinkControl;
use crate::ra::{self, RaTiming};
use crate::ra_io::RaTask;
use crate::report::ms;

/// One timed step.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Step {
    /// Step name.
    pub name: &'static str,
    /// Duration in milliseconds.
    pub ms: f64,
}

/// What `prepare` reports once the standby is ready.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// VM.
    pub vm: String,
    /// Destination site.
    pub site: String,
    /// Destination prefix.
    pub prefix: String,
    /// Standby NIC.
    pub standby_nic: String,
    /// The standby MoA the IMS shows.
    pub standby_moa: Ipv6Addr,
    /// Bridge that impersonates the destination gateway.
    pub bridge: String,
    /// Step timings.
    pub steps: Vec<Step>,
    /// Whole preparation, ms.
    pub prep_ms: f64,
}

/// A prepared source host: the RA sender runs and the bridge impersonates
/// the destination gateway until [`Prepared::release`].
#[derive(Debug)]
pub struct Prepared {
    /// What was achieved.
    pub readiness: Readiness,
    /// The destination site.
    pub site: SiteInfo,
    undo: Undo,
}

#[derive(Debug)]
struct Undo {
    /// Exclusive lock on the bridge, held until the bridge is restored.
    lock: Option<BridgeLock>,
    nl: Netlink,
    nl_task: JoinHandle<()>,
    imp: Option<Impersonation>,
    /// The bridge whose isolation filter is installed.
    isolated: Option<String>,
    ra: Option<RaTask>,
}

impl Undo {
    async fn run(&mut self) -> Result<(), Error> {
        let mut first = None;
        if let Some(ra) = self.ra.take() {
            match ra.stop().await {
                Ok(stats) => tracing::debug!(?stats, "RA sender stopped"),
                Err(e) => {
                    first.get_or_insert(Error::from(e));
                }
            }
        }
        if let Some(br) = self.isolated.take() {
            if let Err(e) = bridge::unisolate(&br).await {
                first.get_or_insert(Error::from(e));
            }
        }
        if let Some(imp) = self.imp.take() {
            if let Err(e) = bridge::restore(&self.nl, &imp).await {
                first.get_or_insert(Error::from(e));
            } else {
                tracing::info!(bridge = %imp.bridge, "bridge restored");
            }
        }
        self.nl_task.abort();
        self.lock = None;
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Undo {
    /// Safety net when a `Prepared` is dropped without `release` (a signal
    /// ended the command): put the bridge back with synchronous `ip` calls.
    fn drop(&mut self) {
        if let Some(br) = self.isolated.take() {
            let _ = std::process::Command::new(mat6_net::nft::NFT)
                .args(["delete", "table", "ip6", &bridge::isolation_table(&br)])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        if let Some(imp) = self.imp.take() {
            tracing::warn!(bridge = %imp.bridge, "restoring bridge on drop");
            let run = |args: &[&str]| {
                let _ = std::process::Command::new("ip")
                    .args(args)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            };
            if imp.added_addr {
                run(&[
                    "-6",
                    "addr",
                    "del",
                    &format!("{}/64", imp.gateway_ll),
                    "dev",
                    &imp.bridge,
                ]);
            }
            if let Some(mac) = imp.old_mac {
                run(&[
                    "link",
                    "set",
                    "dev",
                    &imp.bridge,
                    "address",
                    &mat6_net::netlink::fmt_mac(&mac),
                ]);
            }
            if !imp.was_up {
                run(&["link", "set", "dev", &imp.bridge, "down"]);
            }
        }
        self.nl_task.abort();
    }
}

impl Prepared {
    /// Stop the RA sender (final RA with router lifetime 0) and restore the
    /// bridge (address removed, MAC and admin state as before).
    pub async fn release(mut self) -> Result<(), Error> {
        self.undo.run().await
    }
}

/// Take the exclusive lock of `bridge` (a file under the state directory;
/// released when the file is closed, also when the process dies).
pub fn lock_bridge(state_dir: &std::path::Path, bridge: &str) -> Result<BridgeLock, Error> {
    let out = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| Error::Output { path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(out(state_dir))?;
    let path = state_dir.join(format!("bridge-{bridge}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(out(&path))?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((_, Errno::EWOULDBLOCK)) => Err(Error::BridgeBusy {
            bridge: bridge.to_string(),
            lock: path,
        }),
        Err((_, e)) => Err(out(&path)(std::io::Error::from(e))),
    }
}

/// The exclusive lock of a no-uplink bridge (see [`lock_for`]).
pub type BridgeLock = Flock<std::fs::File>;

/// Take the lock of `vm_name`'s no-uplink bridge on this host. Call it
/// before connecting to QMP, so that a second preparation fails at once
/// instead of waiting for a QMP socket the first one holds.
pub fn lock_for(host: &Host, vm_name: &str) -> Result<BridgeLock, Error> {
    let vm = host.vm(vm_name)?;
    lock_bridge(&host.cfg.state_dir, host.standby_bridge(vm)?)
}

/// Prepare `vm_name` on this host for a migration to site `to`.
pub async fn prepare<R: Registry>(
    host: &Host,
    reg: &R,
    link: &LinkControl<'_>,
    vm_name: &str,
    to: &str,
    active: Option<&str>,
    lock: BridgeLock,
) -> Result<Prepared, Error> {
    let t0 = Instant::now();
    let vm = host.vm(vm_name)?;
    let roles = host.roles(vm_name, vm, active)?;
    if to == host.site {
        return Err(Error::SameSite {
            vm: vm_name.to_string(),
            site: to.to_string(),
        });
    }
    let standby_bridge = host.standby_bridge(vm)?.to_string();
    let mut steps = Vec::new();
    let mut step = |name: &'static str, since: &mut Instant| {
        let now = Instant::now();
        steps.push(Step {
            name,
            ms: ms(now - *since),
        });
        *since = now;
    };
    let mut t = t0;

    let site = reg.site(to).await?;
    step("site lookup", &mut t);
    tracing::info!(site = %site.name, prefix = %site.prefix, gateway = %site.gateway_ll, mac = %site.gateway_mac, "destination site");

    let (nl, nl_task) = Netlink::connect()?;
    let mut undo = Undo {
        lock: Some(lock),
        nl,
        nl_task,
        imp: None,
        isolated: None,
        ra: None,
    };
    let result = async {
        // The standby NIC's tap must be on the no-uplink bridge, whose other
        // ports may only be taps of VMs host-prep manages (no uplink).
        let br = bridge::require(&undo.nl, &standby_bridge).await?;
        let ports = bridge::ports(&undo.nl, &br).await?;
        if !ports.iter().any(|p| p.name == roles.standby.tap) {
            return Err(Error::StandbyNotOnBridge {
                vm: vm_name.to_string(),
                nic: roles.standby.id.clone(),
                tap: roles.standby.tap.clone(),
                bridge: standby_bridge.clone(),
            });
        }
        let imp = bridge::impersonate_gateway(
            &undo.nl,
            &standby_bridge,
            site.gateway_ll,
            site.gateway_mac.0,
            &host.cfg.all_taps(),
        )
        .await?;
        let ifindex = imp.ifindex;
        undo.imp = Some(imp);
        // Only Neighbor Discovery reaches this host's stack from the bridge:
        // a host that routes must not forward what the guest sends to the
        // impersonated gateway (the guest-agent's bicast copies).
        bridge::isolate(&standby_bridge).await?;
        undo.isolated = Some(standby_bridge.clone());
        step("bridge", &mut t);

        let timing = ra::timing_for(site.ra.as_ref(), RaTiming::from(&host.cfg.ra));
        undo.ra = Some(RaTask::start(ifindex, site.clone(), timing)?);
        step("RA sender", &mut t);

        link.set_link(&roles.standby.id, true)
            .await
            .map_err(|source| Error::NoSuchNic {
                vm: vm_name.to_string(),
                nic: roles.standby.id.clone(),
                source: Box::new(source),
            })?;
        step("standby carrier on", &mut t);

        let moa = reg
            .wait_standby(vm.hoa, site.prefix, host.cfg.timeouts.prepare())
            .await?;
        step("standby MoA", &mut t);
        Ok(moa)
    }
    .await;

    match result {
        Ok(standby_moa) => {
            let readiness = Readiness {
                vm: vm_name.to_string(),
                site: site.name.clone(),
                prefix: site.prefix.to_string(),
                standby_nic: roles.standby.id.clone(),
                standby_moa,
                bridge: standby_bridge.clone(),
                steps,
                prep_ms: ms(t0.elapsed()),
            };
            Ok(Prepared {
                readiness,
                site,
                undo,
            })
        }
        Err(e) => {
            if let Err(ue) = undo.run().await {
                tracing::error!(error = %ue, "rollback after failed preparation incomplete");
            }
            Err(e)
        }
    }
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "vm {} ready for site {}: standby NIC {} has MoA {} ({} on bridge {})",
            self.vm, self.site, self.standby_nic, self.standby_moa, self.prefix, self.bridge
        )?;
        for s in &self.steps {
            writeln!(f, "  {:<22} {:>10.1} ms", s.name, s.ms)?;
        }
        write!(f, "  {:<22} {:>10.1} ms", "preparation total", self.prep_ms)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn one_preparation_per_bridge() {
        let d = tempfile::tempdir().unwrap();
        let held = lock_bridge(d.path(), "brnu").unwrap();
        let err = lock_bridge(d.path(), "brnu").unwrap_err();
        assert!(matches!(err, Error::BridgeBusy { .. }), "{err}");
        assert!(err.to_string().contains("brnu"));
        // Another bridge is independent; the lock goes with the file.
        let _other = lock_bridge(d.path(), "brnu2").unwrap();
        drop(held);
        lock_bridge(d.path(), "brnu").unwrap();
    }
}
