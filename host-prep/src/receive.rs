//! `receive` (destination host): attach the VM's taps swapped (the prepared
//! standby NIC on the real bridge, the currently active NIC on the bridge
//! with no uplink), start the incoming QEMU (or use one another tool
//! started), and on QMP `RESUME` turn the old active NIC's carrier off at
//! once. A prepared (`swap`) receive with the IMS configured looks up the
//! VM's standby MoA while the migration runs (and, with
//! `migration.seed_gateway_neighbour`, seeds the site gateway's neighbour
//! cache with it, [`crate::neigh`]). With an IMS host token in the config
//! it also activates that MoA at the IMS at `RESUME`, side by side with the
//! carrier switch, on the VM's behalf: the connection is opened and the
//! MoA looked up while the incoming QEMU starts, so at `RESUME` it is one
//! request. The guest-agent's own activation follows and resyncs its seq.
//! Progress goes out as [`ReceiveEvent`]s (JSON lines with `--json`),
//! which `migrate` on the source reads.

use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mat6_net::bridge;
use mat6_net::netlink::Netlink;
use serde::{Deserialize, Serialize};

use crate::config::{ImsSettings, NicConfig};
use crate::error::Error;
use crate::host::Host;
use crate::ims::{self, ImsError, ImsRegistry, Registry as _};
use crate::neigh;
use crate::qmp::{AnnounceParams, Qmp, QmpEvent};
use crate::report::ms;
use crate::state::{self, VmState};
use crate::template;

/// How the destination attaches the NICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Attach {
    /// Prepared migration: the standby NIC goes on the real bridge, the
    /// active one on the no-uplink bridge, and its carrier goes off on RESUME.
    Swap,
    /// Unprepared migration: same roles as on the source, no switch.
    Keep,
}

impl Attach {
    /// As the `{attach}` placeholder value.
    pub fn as_str(self) -> &'static str {
        match self {
            Attach::Swap => "swap",
            Attach::Keep => "keep",
        }
    }
}

/// What to receive.
#[derive(Debug, Clone)]
pub struct ReceiveOpts {
    /// VM name.
    pub vm: String,
    /// NIC active on the source (default: the state file, else the first NIC).
    pub active: Option<String>,
    /// Swap or keep the attachments.
    pub attach: Attach,
    /// Do not start QEMU: another tool started the incoming QEMU; connect to
    /// the configured QMP socket.
    pub existing: bool,
    /// QMP socket instead of the configured one.
    pub qmp: Option<PathBuf>,
}

/// Progress of `receive`, one JSON object per line with `--json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ReceiveEvent {
    /// The incoming QEMU listens; the source may start the migration.
    Listening {
        /// VM.
        vm: String,
        /// PID of the QEMU we started (none with `--existing`).
        qemu_pid: Option<u32>,
        /// `-incoming` URI.
        incoming: String,
        /// QMP socket.
        qmp: PathBuf,
        /// Time to attach the taps and get QEMU listening, ms.
        start_ms: f64,
    },
    /// The VM resumed here and the switch is done.
    Switched {
        /// VM.
        vm: String,
        /// NIC active before.
        old_active: String,
        /// NIC active now.
        new_active: String,
        /// Attachment mode.
        attach: Attach,
        /// `RESUME` received until `set_link <old active> off` returned, ms
        /// (0 with keep).
        switch_ms: f64,
        /// QEMU's own `RESUME` timestamp until `set_link` returned (includes
        /// the event's delivery), ms; absent when unknown.
        #[serde(default)]
        switch_from_qemu_ms: Option<f64>,
        /// `RESUME` received until the IMS confirmed the standby MoA's
        /// activation (host token), ms; absent when not configured, not
        /// prepared, or when it failed (the guest-agent activates anyway).
        #[serde(default)]
        activate_ms: Option<f64>,
    },
    /// Receiving failed.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Kills the QEMU we started unless disarmed (error paths).
struct QemuGuard(Option<tokio::process::Child>);

impl QemuGuard {
    fn pid(&self) -> Option<u32> {
        self.0.as_ref().and_then(|c| c.id())
    }
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            tracing::warn!(pid = ?c.id(), "killing the incoming QEMU we started");
            let _ = c.start_kill();
        }
    }
}

async fn ensure_tap(
    nl: &Netlink,
    nic: &NicConfig,
    bridge_name: &str,
    create: bool,
) -> Result<(), Error> {
    match nl.link_by_name(&nic.tap).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() && create => {
            let out = tokio::process::Command::new("ip")
                .args(["tuntap", "add", "dev", &nic.tap, "mode", "tap"])
                .output()
                .await
                .map_err(|source| Error::Process {
                    what: format!("ip tuntap add dev {}", nic.tap),
                    source,
                })?;
            if !out.status.success() {
                return Err(Error::Process {
                    what: format!("ip tuntap add dev {}", nic.tap),
                    source: std::io::Error::other(
                        String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    ),
                });
            }
            tracing::info!(tap = %nic.tap, "tap created");
        }
        Err(e) => return Err(e.into()),
    }
    bridge::attach(nl, &nic.tap, bridge_name).await?;
    tracing::info!(nic = %nic.id, tap = %nic.tap, bridge = bridge_name, "tap attached");
    Ok(())
}

/// The guest announcements after `set_link <old active> off` (prepared
/// receive), on the old active NIC only: rounds at 0 and 10 ms. Each makes
/// the guest's virtio-net driver emit an RTM_NEWLINK
/// (`IFLA_EVENT_NOTIFY_PEERS`) with the current carrier bit at once, so the
/// guest-agent sees the carrier loss without waiting for linkwatch, which
/// defers a carrier-off up to a second after its previous run. The first
/// round may reach the guest together with the link change and report the
/// old carrier (the driver announces before it turns the carrier off); the
/// second reports it off. Every round costs the guest unsolicited NAs and
/// MLD reports for each address of the NIC, so there are no more.
pub fn switch_announce(old: &str) -> AnnounceParams {
    AnnounceParams {
        initial: 10,
        max: 100,
        rounds: 2,
        step: 10,
        interfaces: vec![old.to_string()],
    }
}

/// QEMU's own post-migration announce rounds on a prepared destination.
/// virtio-net ignores `announce-self` while its migration announce timer
/// still runs (QEMU's default: 5 rounds over ~800 ms), so the destination
/// makes one (at resume) and [`switch_announce`] the rest.
pub const MIGRATION_ANNOUNCE_ROUNDS: u64 = 1;

/// Everything needed to activate the standby MoA at `RESUME` with a single
/// request on an open connection.
struct Activation {
    reg: ImsRegistry,
    token: String,
    hoa: Ipv6Addr,
    moa: Ipv6Addr,
}

/// Readies the destination while the migration runs: connects to the IMS,
/// looks up the VM's standby MoA inside `site`'s prefix, with `seed_on`
/// seeds the site gateway's neighbour cache with it from that real bridge
/// ([`crate::neigh`]; a failure is a warning), and with a host token keeps
/// the connection for the activation at `RESUME`. `None` when there is
/// nothing to activate (no IMS or no host token configured).
async fn ready_destination(
    settings: Option<ImsSettings>,
    site: String,
    request_timeout: Duration,
    hoa: Ipv6Addr,
    seed_on: Option<u32>,
) -> Result<Option<Activation>, ImsError> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    let token = match &settings.host_token_file {
        Some(path) => Some(ims::read_host_token(path)?),
        None => None,
    };
    let reg = ImsRegistry::connect(Some(&settings), request_timeout).await?;
    let info = reg.site(&site).await?;
    let moa = reg.standby_moa(hoa, info.prefix).await?;
    if let Some(ifindex) = seed_on {
        match neigh::seed_gateway(ifindex, &info, moa).await {
            Ok(()) => {
                tracing::info!(%moa, gateway = %info.gateway_ll, "gateway neighbour cache seeded with the standby MoA")
            }
            Err(e) => {
                tracing::warn!(error = %e, %moa, "gateway neighbour cache not seeded (its first packets for the VM wait for neighbour discovery)")
            }
        }
    }
    let Some(token) = token else {
        return Ok(None);
    };
    tracing::info!(%hoa, %moa, %site, "standby MoA will be activated at RESUME");
    Ok(Some(Activation {
        reg,
        token,
        hoa,
        moa,
    }))
}

/// Aborts a background task when dropped (receive failed before RESUME).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// After the switch: activates the standby MoA at the IMS once the
/// background preparation is ready; returns when the IMS answered (the
/// caller measures from `RESUME`). Failures are warnings: the guest-agent's
/// own activation follows anyway.
async fn activate(mut task: AbortOnDrop<Result<Option<Activation>, ImsError>>) -> Option<Instant> {
    let ready = match (&mut task.0).await {
        Ok(Ok(Some(a))) => a,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "standby MoA not activated at RESUME (the guest-agent still activates it)");
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "standby activation task failed");
            return None;
        }
    };
    match ready
        .reg
        .activate_standby(&ready.token, ready.hoa, ready.moa)
        .await
    {
        Ok(changed) => {
            tracing::info!(hoa = %ready.hoa, moa = %ready.moa, changed, "standby MoA activated at the IMS");
            Some(Instant::now())
        }
        Err(e) => {
            tracing::warn!(error = %e, hoa = %ready.hoa, moa = %ready.moa, "standby activation at the IMS failed (the guest-agent still activates it)");
            None
        }
    }
}

/// Receive the VM on this host; `emit` gets the progress events.
pub async fn receive(
    host: &Host,
    opts: &ReceiveOpts,
    mut emit: impl FnMut(&ReceiveEvent),
) -> Result<ReceiveEvent, Error> {
    let t0 = Instant::now();
    let vm = host.vm(&opts.vm)?;
    let roles = host.roles(&opts.vm, vm, opts.active.as_deref())?;
    let local = host.local()?;
    let standby_bridge = host.standby_bridge(vm)?.to_string();
    // `up` goes on the real bridge and is active after the migration.
    let (up, down) = match opts.attach {
        Attach::Swap => (roles.standby, roles.active),
        Attach::Keep => (roles.active, roles.standby),
    };
    let qmp_path = match &opts.qmp {
        Some(p) => p.clone(),
        None => host.qmp_path(&opts.vm, vm)?,
    };
    let incoming = host.incoming(&opts.vm, vm)?;

    let (nl, nl_task) = Netlink::connect()?;
    let attached = async {
        ensure_tap(&nl, up, &local.bridge, !opts.existing).await?;
        ensure_tap(&nl, down, &standby_bridge, !opts.existing).await?;
        // The real bridge's index, only when the gateway seeding needs it.
        let seed = opts.attach == Attach::Swap && host.cfg.migration.seed_gateway_neighbour;
        if seed {
            Ok::<_, Error>(Some(nl.link_by_name(&local.bridge).await?.ifindex))
        } else {
            Ok(None)
        }
    }
    .await;
    nl_task.abort();
    let seed_on = attached?;

    let mut guard = QemuGuard(None);
    if !opts.existing {
        let mut vars = host.base_vars(&opts.vm, vm);
        vars.insert("qmp".into(), qmp_path.display().to_string());
        vars.insert("incoming".into(), incoming.clone());
        for (nic, br) in [(up, &local.bridge), (down, &standby_bridge)] {
            vars.insert(format!("tap:{}", nic.id), nic.tap.clone());
            vars.insert(format!("bridge:{}", nic.id), br.clone());
        }
        let argv = template::expand(&vm.qemu_command, &vars)?;
        let (prog, args) = argv.split_first().ok_or(template::TemplateError::Empty)?;
        let mut cmd = tokio::process::Command::new(prog);
        cmd.args(args).stdin(Stdio::null()).process_group(0);
        // stdout may be the JSON event stream: QEMU must not write there.
        match &vm.qemu_log {
            Some(p) => {
                let f = std::fs::File::create(p).map_err(|source| Error::Output {
                    path: p.clone(),
                    source,
                })?;
                let f2 = f.try_clone().map_err(|source| Error::Output {
                    path: p.clone(),
                    source,
                })?;
                cmd.stdout(f).stderr(f2);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
            }
        }
        let child = cmd.spawn().map_err(|source| Error::Process {
            what: format!("start destination QEMU ({prog})"),
            source,
        })?;
        tracing::info!(pid = ?child.id(), "incoming QEMU started");
        guard = QemuGuard(Some(child));
    }

    // Ready the destination in the background while QEMU starts and the
    // migration runs (standby MoA lookup, gateway neighbour cache, the IMS
    // activation): neither the listening report nor the switch waits for it.
    let activation = (opts.attach == Attach::Swap).then(|| {
        AbortOnDrop(tokio::spawn(ready_destination(
            host.cfg.ims.clone(),
            host.site.clone(),
            host.cfg.timeouts.ims(),
            vm.hoa,
            seed_on,
        )))
    });
    let mut qmp = Qmp::connect_retry(&qmp_path, host.cfg.timeouts.start()).await?;
    if opts.attach == Attach::Swap {
        if let Err(e) = qmp.set_announce_rounds(MIGRATION_ANNOUNCE_ROUNDS).await {
            tracing::warn!(error = %e, "cannot shorten the post-migration announce (the guest may see the switch late)");
        }
    }
    emit(&ReceiveEvent::Listening {
        vm: opts.vm.clone(),
        qemu_pid: guard.pid(),
        incoming,
        qmp: qmp_path.clone(),
        start_ms: ms(t0.elapsed()),
    });

    // With --existing the migration may have finished before we connected.
    let already_running =
        opts.existing && qmp.query_status().await.map(|s| s.running).unwrap_or(false);
    let (resumed_at, qemu_resumed) = if already_running {
        tracing::warn!("VM already running when receive connected: switching now");
        (Instant::now(), None)
    } else {
        let migrate_timeout = host.cfg.timeouts.migrate();
        let wait = qmp.wait_event("RESUME of the incoming VM", migrate_timeout, |e| {
            matches!(e, QmpEvent::Resume | QmpEvent::Shutdown)
        });
        let ev = match &mut guard.0 {
            Some(child) => {
                tokio::select! {
                    ev = wait => ev?,
                    status = child.wait() => {
                        return Err(Error::Destination(format!(
                            "incoming QEMU exited before the VM resumed ({})",
                            status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
                        )));
                    }
                }
            }
            None => wait.await?,
        };
        if ev.event == QmpEvent::Shutdown {
            return Err(Error::Destination(
                "incoming QEMU shut down before the VM resumed".into(),
            ));
        }
        (ev.at, ev.qemu_time)
    };

    // From RESUME on, this QEMU runs the only live copy of the VM: whatever
    // fails next must not kill it.
    guard.disarm();
    // The carrier switch and the IMS activation run side by side: neither
    // waits for the other's round trips.
    let switch = async {
        match opts.attach {
            Attach::Swap => {
                qmp.set_link(&down.id, false)
                    .await
                    .map_err(|source| Error::NoSuchNic {
                        vm: opts.vm.clone(),
                        nic: down.id.clone(),
                        source: Box::new(source),
                    })?;
                let switched = ms(resumed_at.elapsed());
                if let Err(e) = qmp.announce_self(&switch_announce(&down.id)).await {
                    tracing::warn!(error = %e, "announce-self failed (the guest sees the carrier loss through linkwatch, up to a second late)");
                }
                Ok::<f64, Error>(switched)
            }
            Attach::Keep => Ok(0.0),
        }
    };
    let activated = async {
        match activation {
            Some(task) => activate(task).await,
            None => None,
        }
    };
    let (switched, activated) = tokio::join!(switch, activated);
    let switch_ms = switched?;
    let activate_ms = activated.map(|done| ms(done.duration_since(resumed_at)));
    let switch_from_qemu_ms = match (opts.attach, qemu_resumed) {
        (Attach::Swap, Some(t)) => std::time::SystemTime::now().duration_since(t).ok().map(ms),
        _ => None,
    };
    tracing::info!(old = %roles.active.id, new = %up.id, switch_ms, ?activate_ms, "switched");

    let st = VmState {
        site: host.site.clone(),
        active: up.id.clone(),
        migrations: roles.state.migrations + 1,
    };
    state::save(&host.cfg.state_dir, &opts.vm, &st)?;
    let done = ReceiveEvent::Switched {
        vm: opts.vm.clone(),
        old_active: roles.active.id.clone(),
        new_active: up.id.clone(),
        attach: opts.attach,
        switch_ms,
        switch_from_qemu_ms,
        activate_ms,
    };
    emit(&done);
    Ok(done)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn switch_announce_is_two_early_rounds_on_the_old_nic() {
        let p = switch_announce("nic0");
        assert_eq!(p.interfaces, ["nic0"]);
        // Round times: 0, then initial + k * step (capped at max).
        let mut t = 0;
        let mut times = vec![0];
        for k in 0..p.rounds - 1 {
            t += (p.initial + k * p.step).min(p.max);
            times.push(t);
        }
        assert_eq!(times, [0, 10]);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["rounds"], 2);
        assert_eq!(v["interfaces"][0], "nic0");
    }

    #[test]
    fn events_are_json_lines_with_a_tag() {
        let ev = ReceiveEvent::Switched {
            vm: "web1".into(),
            old_active: "net0".into(),
            new_active: "net1".into(),
            attach: Attach::Swap,
            switch_ms: 0.25,
            switch_from_qemu_ms: Some(0.5),
            activate_ms: Some(1.5),
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert!(line.starts_with(r#"{"event":"switched""#), "{line}");
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<ReceiveEvent>(&line).unwrap(), ev);
        let l: ReceiveEvent = serde_json::from_str(
            r#"{"event":"listening","vm":"v","qemu_pid":null,"incoming":"unix:/x","qmp":"/q","start_ms":1.0}"#,
        )
        .unwrap();
        assert!(matches!(l, ReceiveEvent::Listening { qemu_pid: None, .. }));
        // An older receive (no activation) still parses.
        let old: ReceiveEvent = serde_json::from_str(
            r#"{"event":"switched","vm":"v","old_active":"a","new_active":"b","attach":"swap","switch_ms":1.0}"#,
        )
        .unwrap();
        assert!(matches!(
            old,
            ReceiveEvent::Switched {
                activate_ms: None,
                ..
            }
        ));
    }
}
