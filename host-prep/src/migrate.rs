//! `migrate` (source host): prepare → start the destination (`receive`
//! through the site's `receive_command`) → QMP `migrate` with progress →
//! destination switch → stop the RA sender and restore the bridge → quit the
//! source QEMU → phase table.

use std::process::Stdio;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};

/// Resolves once `cancel` is (or becomes) true; never if the sender is gone.
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

use crate::error::Error;
use crate::host::Host;
use crate::ims::Registry;
use crate::prepare::{self, Prepared};
use crate::qmp::{LinkControl, MigrateInfo, Qmp, QmpEvent};
use crate::receive::{Attach, ReceiveEvent};
use crate::report::{ms, MigrationReport, Mode};
use crate::state::{self, VmState};
use crate::template;

/// What to migrate where.
#[derive(Debug, Clone)]
pub struct MigrateOpts {
    /// VM.
    pub vm: String,
    /// Destination site.
    pub to: String,
    /// Prepare (default) or not (`--no-prep`).
    pub mode: Mode,
    /// Migration URI instead of the site's `migrate_uri`.
    pub uri: Option<String>,
    /// Show an indicatif progress bar.
    pub progress: bool,
    /// The NIC active now (default: the state file, else the first NIC).
    pub active: Option<String>,
    /// The source QEMU's QMP socket instead of the configured one.
    pub qmp: Option<std::path::PathBuf>,
}

/// Everything `migrate` resolved from the config, before doing anything.
#[derive(Debug, Clone)]
pub struct Plan {
    /// VM.
    pub vm: String,
    /// Source site.
    pub from: String,
    /// Destination site.
    pub to: String,
    /// Mode.
    pub mode: Mode,
    /// Active NIC now.
    pub active: String,
    /// Standby NIC now.
    pub standby: String,
    /// Standby bridge here.
    pub standby_bridge: String,
    /// Source QMP socket.
    pub qmp: std::path::PathBuf,
    /// Migration URI.
    pub uri: String,
    /// Expanded destination command.
    pub receive_argv: Vec<String>,
}

/// Resolve the plan (config and state only; no side effect).
pub fn plan(host: &Host, opts: &MigrateOpts) -> Result<Plan, Error> {
    let vm = host.vm(&opts.vm)?;
    let roles = host.roles(&opts.vm, vm, opts.active.as_deref())?;
    if opts.to == host.site {
        return Err(Error::SameSite {
            vm: opts.vm.clone(),
            site: opts.to.clone(),
        });
    }
    let dest = host
        .cfg
        .sites
        .get(&opts.to)
        .ok_or_else(|| Error::DestinationIncomplete {
            site: opts.to.clone(),
            what: "a [sites.NAME] section",
        })?;
    let uri = opts
        .uri
        .clone()
        .or_else(|| dest.migrate_uri.clone())
        .ok_or_else(|| Error::DestinationIncomplete {
            site: opts.to.clone(),
            what: "migrate_uri",
        })?;
    if dest.receive_command.is_empty() {
        return Err(Error::DestinationIncomplete {
            site: opts.to.clone(),
            what: "receive_command",
        });
    }
    let attach = match opts.mode {
        Mode::Prep => Attach::Swap,
        Mode::Noprep => Attach::Keep,
    };
    let mut vars = host.base_vars(&opts.vm, vm);
    vars.insert("site".into(), opts.to.clone());
    vars.insert("from".into(), host.site.clone());
    vars.insert("active".into(), roles.active.id.clone());
    vars.insert("attach".into(), attach.as_str().into());
    let receive_argv = template::expand(&dest.receive_command, &vars)?;
    Ok(Plan {
        vm: opts.vm.clone(),
        from: host.site.clone(),
        to: opts.to.clone(),
        mode: opts.mode,
        active: roles.active.id.clone(),
        standby: roles.standby.id.clone(),
        standby_bridge: host.standby_bridge(vm)?.to_string(),
        qmp: match &opts.qmp {
            Some(p) => p.clone(),
            None => host.qmp_path(&opts.vm, vm)?,
        },
        uri,
        receive_argv,
    })
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "plan: migrate vm {} from site {} to site {}",
            self.vm, self.from, self.to
        )?;
        let mut n = 0;
        let mut line = |f: &mut std::fmt::Formatter<'_>, s: String| {
            n += 1;
            writeln!(f, "  {n}. {s}")
        };
        line(
            f,
            format!("connect to the source QEMU at {}", self.qmp.display()),
        )?;
        if self.mode == Mode::Prep {
            line(
                f,
                format!("look up site {} in the IMS site registry", self.to),
            )?;
            line(
                f,
                format!(
                    "bridge {}: set the MAC to site {}'s gateway MAC and add its link-local address (nodad)",
                    self.standby_bridge, self.to
                ),
            )?;
            line(
                f,
                format!(
                    "send Router Advertisements for site {}'s prefix on {}",
                    self.to, self.standby_bridge
                ),
            )?;
            line(f, format!("QMP set_link {} on", self.standby))?;
            line(
                f,
                "wait until the IMS shows the standby MoA inside the destination prefix".into(),
            )?;
        }
        line(
            f,
            format!("start the destination: {}", self.receive_argv.join(" ")),
        )?;
        line(f, format!("QMP migrate {}", self.uri))?;
        if self.mode == Mode::Prep {
            line(
                f,
                format!(
                    "destination: on RESUME, QMP set_link {} off ({} becomes active)",
                    self.active, self.standby
                ),
            )?;
            line(
                f,
                format!(
                    "stop the RA sender and restore bridge {}",
                    self.standby_bridge
                ),
            )?;
        } else {
            line(
                f,
                "destination: NICs keep their roles (no preparation, no switch)".into(),
            )?;
        }
        line(f, "quit the source QEMU".into())?;
        write!(f, "  (dry run: nothing was done)")
    }
}

/// The destination process and its event lines.
struct Destination {
    child: tokio::process::Child,
    /// Events with the instant their line was read: T_ALL ends when the
    /// destination reported the switch, not when this side next looked.
    events: mpsc::UnboundedReceiver<(Instant, ReceiveEvent)>,
}

impl Destination {
    fn spawn(argv: &[String]) -> Result<Self, Error> {
        let (prog, args) = argv.split_first().ok_or(template::TemplateError::Empty)?;
        let mut child = tokio::process::Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| Error::Process {
                what: format!("start the destination ({prog})"),
                source,
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<ReceiveEvent>(&line) {
                        Ok(ev) => {
                            if tx.send((Instant::now(), ev)).is_err() {
                                break;
                            }
                        }
                        Err(_) => tracing::info!(target: "destination", "{line}"),
                    }
                }
            });
        }
        Ok(Self { child, events: rx })
    }

    /// The next event and when it arrived.
    async fn next(
        &mut self,
        what: &str,
        timeout: Duration,
    ) -> Result<(Instant, ReceiveEvent), Error> {
        match tokio::time::timeout(timeout, self.events.recv()).await {
            Ok(Some((_, ReceiveEvent::Error { message }))) => Err(Error::Destination(message)),
            Ok(Some(ev)) => Ok(ev),
            Ok(None) => {
                let status = self
                    .child
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                Err(Error::Destination(format!(
                    "exited ({status}) before {what}"
                )))
            }
            Err(_) => Err(Error::Timeout {
                what: format!("the destination: {what}"),
                after: timeout,
            }),
        }
    }

    /// Ask the destination to stop (SIGTERM: it kills the QEMU it started).
    async fn abort(&mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

fn progress_bar(enabled: bool) -> Option<ProgressBar> {
    if !enabled {
        return None;
    }
    let pb = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{bar:30}] {bytes}/{total_bytes} transferred, {msg}",
    )
    .ok()?;
    pb.set_style(style.progress_chars("=> "));
    Some(pb)
}

fn show(pb: Option<&ProgressBar>, info: &MigrateInfo) {
    let Some(ram) = &info.ram else { return };
    let total = u64::try_from(ram.total).unwrap_or(0);
    let done = u64::try_from(ram.transferred).unwrap_or(0);
    let remaining = u64::try_from(ram.remaining).unwrap_or(0);
    match pb {
        Some(pb) => {
            pb.set_length(total.max(done));
            pb.set_position(done);
            pb.set_message(format!(
                "{} MiB remaining, dirty-sync {}",
                remaining >> 20,
                ram.dirty_sync_count
            ));
        }
        None => tracing::debug!(
            status = info.status.as_deref().unwrap_or("?"),
            transferred = done,
            remaining,
            dirty_sync = ram.dirty_sync_count,
            "migration progress"
        ),
    }
}

/// Run the migration.
///
/// `cancel` turning `true` (SIGINT/SIGTERM in the CLI) stops it: during the
/// preparation (undone), or during the pre-copy with QMP `migrate_cancel`
/// (the VM stays at the source, the destination is told to stop). Once QEMU
/// reported the migration completed, the switch and clean-up run to the end.
pub async fn migrate<R: Registry>(
    host: &Host,
    reg: Option<&R>,
    opts: &MigrateOpts,
    mut cancel: watch::Receiver<bool>,
) -> Result<MigrationReport, Error> {
    let t0 = Instant::now();
    let plan = plan(host, opts)?;
    let vm = host.vm(&opts.vm)?;
    let roles = host.roles(&opts.vm, vm, opts.active.as_deref())?;
    let lock = match opts.mode {
        Mode::Prep => Some(prepare::lock_for(host, &opts.vm)?),
        Mode::Noprep => None,
    };
    let qmp = Qmp::connect(&plan.qmp).await?;

    let prepared = match (lock, reg) {
        (Some(lock), Some(reg)) => {
            let link = match vm.link_command.as_slice() {
                [] => LinkControl::Qmp(&qmp),
                argv => LinkControl::Command { vm: &opts.vm, argv },
            };
            let active = opts.active.as_deref();
            let prep = prepare::prepare(host, reg, &link, &opts.vm, &opts.to, active, lock);
            // Dropping the preparation undoes it (Prepared's safety net).
            let p = tokio::select! {
                p = prep => p?,
                _ = cancelled(&mut cancel) => return Err(Error::Interrupted),
            };
            tracing::info!("{}", p.readiness);
            Some(p)
        }
        (Some(_), None) => return Err(crate::ims::ImsError::NotConfigured.into()),
        (None, _) => None,
    };
    let prep_ms = ms(t0.elapsed());

    let result = run_migration(host, &plan, qmp, opts, t0, &cancel).await;
    let cleanup_start = Instant::now();
    let released = match prepared {
        Some(p) => release(p).await,
        None => Ok(()),
    };
    let (mut report, qmp) = result?;
    // The VM runs at the destination now: record that and quit the source
    // even if undoing the preparation failed (that is reported, not fatal).
    let st = VmState {
        site: opts.to.clone(),
        active: report.new_active.clone(),
        migrations: roles.state.migrations + 1,
    };
    state::save(&host.cfg.state_dir, &opts.vm, &st)?;
    if let Err(e) = qmp.quit().await {
        tracing::warn!(error = %e, "source QEMU did not quit cleanly");
    }
    if let Err(e) = released {
        tracing::error!(error = %e, "migration done, but the source bridge was not fully restored");
        report.cleanup_error = Some(e.to_string());
    }
    report.cleanup_ms = ms(cleanup_start.elapsed());
    report.prep_ms = prep_ms;
    Ok(report)
}

async fn release(p: Prepared) -> Result<(), Error> {
    p.release().await
}

/// How often the source polls `query-migrate` (progress bar, completion).
/// T_ALL does not depend on it: it ends when the destination's switch
/// event arrives, timestamped as it is read.
const QUERY_MIGRATE_EVERY: Duration = Duration::from_millis(20);

async fn run_migration(
    host: &Host,
    plan: &Plan,
    mut qmp: Qmp,
    opts: &MigrateOpts,
    t0: Instant,
    cancel: &watch::Receiver<bool>,
) -> Result<(MigrationReport, Qmp), Error> {
    let t_dest = Instant::now();
    let mut dest = Destination::spawn(&plan.receive_argv)?;
    let out = async {
        match dest
            .next("the incoming QEMU listens", host.cfg.timeouts.start())
            .await?
            .1
        {
            ReceiveEvent::Listening { .. } => {}
            other => {
                return Err(Error::Destination(format!("unexpected event {other:?}")));
            }
        }
        let dest_start_ms = ms(t_dest.elapsed());

        let m = &host.cfg.migration;
        qmp.set_migration_parameters(m.downtime_limit_ms, m.max_bandwidth_bytes)
            .await?;
        let _ = qmp.drain_events();
        if *cancel.borrow() {
            return Err(Error::Interrupted);
        }
        let t_mig = Instant::now();
        qmp.migrate(&plan.uri).await?;
        tracing::info!(uri = %plan.uri, "migration started");
        let pb = progress_bar(opts.progress);
        let deadline = t_mig + host.cfg.timeouts.migrate();
        let info = loop {
            let info = qmp.query_migrate().await?;
            show(pb.as_ref(), &info);
            match info.status.as_deref() {
                Some("completed") => break info,
                Some("failed") | Some("cancelled") => {
                    return Err(Error::MigrationFailed {
                        vm: plan.vm.clone(),
                        status: info.status.clone().unwrap_or_default(),
                        desc: info.error_desc.clone(),
                    })
                }
                _ => {}
            }
            let timed_out = Instant::now() > deadline;
            if timed_out || *cancel.borrow() {
                // Still pre-copying: cancel, the VM keeps running here.
                if let Err(e) = qmp.migrate_cancel().await {
                    tracing::error!(error = %e, "migrate_cancel failed");
                }
                if let Some(pb) = &pb {
                    pb.abandon();
                }
                return Err(if timed_out {
                    Error::Timeout {
                        what: format!("migration of vm {} to complete", plan.vm),
                        after: host.cfg.timeouts.migrate(),
                    }
                } else {
                    Error::Interrupted
                });
            }
            tokio::time::sleep(QUERY_MIGRATE_EVERY).await;
        };
        if let Some(pb) = &pb {
            pb.finish_and_clear();
        }
        let stop_at = qmp
            .drain_events()
            .into_iter()
            .find(|e| e.event == QmpEvent::Stop && e.at >= t_mig)
            .map(|e| e.at);
        let qemu_total = info.total_time.unwrap_or(0) as f64;
        let qemu_down = info.downtime.unwrap_or(0) as f64;
        let precopy_ms = match stop_at {
            Some(at) => ms(at - t_mig),
            None => (qemu_total - qemu_down).max(0.0),
        };

        let (t_switch, switched) = dest
            .next(
                "the VM resumes and the switch is done",
                host.cfg.timeouts.start(),
            )
            .await?;
        let (old_active, new_active, switch_ms, switch_from_qemu_ms, activate_ms) = match switched {
            ReceiveEvent::Switched {
                old_active,
                new_active,
                switch_ms,
                switch_from_qemu_ms,
                activate_ms,
                ..
            } => (
                old_active,
                new_active,
                switch_ms,
                switch_from_qemu_ms,
                activate_ms,
            ),
            other => return Err(Error::Destination(format!("unexpected event {other:?}"))),
        };
        let ram = info.ram.clone().unwrap_or_default();
        Ok(MigrationReport {
            vm: plan.vm.clone(),
            from: plan.from.clone(),
            to: plan.to.clone(),
            mode: plan.mode,
            old_active,
            new_active,
            prep_ms: 0.0,
            dest_start_ms,
            precopy_ms,
            qemu_downtime_ms: qemu_down,
            qemu_total_ms: qemu_total,
            switch_ms,
            switch_from_qemu_ms,
            activate_ms,
            cleanup_ms: 0.0,
            cleanup_error: None,
            migration_ms: ms(t_switch - t_mig),
            total_ms: ms(t_switch - t0),
            transferred_bytes: u64::try_from(ram.transferred).unwrap_or(0),
            dirty_sync_count: u64::try_from(ram.dirty_sync_count).unwrap_or(0),
        })
    }
    .await;
    match out {
        Ok(report) => {
            match tokio::time::timeout(Duration::from_secs(10), dest.child.wait()).await {
                Ok(Ok(s)) if !s.success() => {
                    tracing::warn!(status = %s, "destination exited with an error")
                }
                Ok(_) => {}
                Err(_) => tracing::warn!("destination did not exit after the switch"),
            }
            Ok((report, qmp))
        }
        Err(e) => {
            dest.abort().await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::config::Config;

    fn host(dir: &std::path::Path, extra_b: &str) -> Host {
        let text = format!(
            r#"
state_dir = "{}"
local_site = "A"
[sites.A]
bridge = "br0"
standby_bridge = "brnu"
[sites.B]
bridge = "br0"
standby_bridge = "brnu"
{extra_b}
[vms.web1]
qmp = "/run/{{vm}}-{{site}}.qmp"
hoa = "2001:db8:100::10"
[[vms.web1.nics]]
id = "net0"
tap = "w0"
[[vms.web1.nics]]
id = "net1"
tap = "w1"
"#,
            dir.display()
        );
        Host::new(Config::from_toml(&text).unwrap(), None).unwrap()
    }

    fn opts(to: &str, mode: Mode) -> MigrateOpts {
        MigrateOpts {
            vm: "web1".into(),
            to: to.into(),
            mode,
            uri: None,
            progress: false,
            active: None,
            qmp: None,
        }
    }

    const COMPLETE: &str = r#"migrate_uri = "tcp:[2001:db8:b::2]:4444"
receive_command = ["ssh", "hb", "host-prep", "receive", "--vm", "{vm}", "--active", "{active}", "--attach", "{attach}"]"#;

    #[test]
    fn plan_expands_the_destination_command() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path(), COMPLETE);
        let p = plan(&h, &opts("B", Mode::Prep)).unwrap();
        assert_eq!(
            p.receive_argv,
            [
                "ssh",
                "hb",
                "host-prep",
                "receive",
                "--vm",
                "web1",
                "--active",
                "net0",
                "--attach",
                "swap"
            ]
        );
        assert_eq!(p.qmp, std::path::PathBuf::from("/run/web1-A.qmp"));
        assert_eq!((p.active.as_str(), p.standby.as_str()), ("net0", "net1"));
        let text = p.to_string();
        assert!(
            text.contains("RA") && text.contains("set_link net0 off") && text.contains("dry run"),
            "{text}"
        );

        let p = plan(&h, &opts("B", Mode::Noprep)).unwrap();
        assert_eq!(p.receive_argv.last().map(String::as_str), Some("keep"));
        assert!(!p.to_string().contains("Router Advertisements"));

        let mut o = opts("B", Mode::Prep);
        o.active = Some("net1".into());
        o.uri = Some("unix:/x".into());
        let p = plan(&h, &o).unwrap();
        assert_eq!((p.active.as_str(), p.uri.as_str()), ("net1", "unix:/x"));
    }

    #[test]
    fn plan_errors_name_what_is_missing() {
        let d = tempfile::tempdir().unwrap();
        let h = host(d.path(), "");
        assert!(matches!(
            plan(&h, &opts("A", Mode::Prep)),
            Err(Error::SameSite { .. })
        ));
        assert!(matches!(
            plan(&h, &opts("Z", Mode::Prep)),
            Err(Error::DestinationIncomplete { .. })
        ));
        let e = plan(&h, &opts("B", Mode::Prep)).unwrap_err().to_string();
        assert!(e.contains("migrate_uri"), "{e}");
        let h = host(d.path(), "migrate_uri = \"unix:/x\"");
        let e = plan(&h, &opts("B", Mode::Prep)).unwrap_err().to_string();
        assert!(e.contains("receive_command"), "{e}");
    }

    #[test]
    fn progress_bar_template_is_valid() {
        assert!(progress_bar(true).is_some());
        assert!(progress_bar(false).is_none());
    }
}
