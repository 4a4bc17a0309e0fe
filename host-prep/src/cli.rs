//! Command line (clap) and the dispatch to the library. `main.rs` only
//! parses, sets up logging and maps the error to an exit code.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::error::Error;
use crate::host::Host;
use crate::ims::ImsRegistry;
use crate::migrate::{self, MigrateOpts};
use crate::prepare;
use crate::qmp::{LinkControl, Qmp};
use crate::receive::{self, Attach, ReceiveOpts};
use crate::report::Mode;
use crate::state;

/// mat6 host-prep: prepare the destination network on a VM's standby NIC,
/// swap NIC attachments and orchestrate QEMU live migration across IPv6
/// networks.
#[derive(Debug, Parser)]
#[command(name = "host-prep", version)]
pub struct Cli {
    /// Configuration file (TOML).
    #[arg(
        short,
        long,
        env = "HOST_PREP_CONFIG",
        default_value = "/etc/mat6/host-prep.toml"
    )]
    pub config: PathBuf,
    /// This host's site (overrides `local_site` in the config).
    #[arg(long, env = "HOST_PREP_SITE")]
    pub site: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Source host: make the VM's standby NIC see the destination site's link
    /// (gateway MAC + link-local address on the no-uplink bridge, Router
    /// Advertisements), wait for the standby MoA at the IMS, print readiness,
    /// then hold the preparation until SIGINT/SIGTERM and undo it.
    Prepare {
        /// VM name (a [vms.NAME] section).
        #[arg(long)]
        vm: String,
        /// Destination site (in the IMS site registry).
        #[arg(long)]
        to: String,
        /// NIC active now (default: the state file, else the first NIC).
        #[arg(long)]
        active: Option<String>,
        /// Print readiness as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Destination host: attach the taps (swapped for a prepared migration),
    /// start the incoming QEMU, and on RESUME turn the old active NIC's
    /// carrier off.
    Receive {
        /// VM name.
        #[arg(long)]
        vm: String,
        /// NIC active on the source (default: the state file, else the first NIC).
        #[arg(long)]
        active: Option<String>,
        /// `swap` (prepared) or `keep` (unprepared) NIC attachments.
        #[arg(long, value_enum, default_value = "swap")]
        attach: Attach,
        /// Do not start QEMU: use the incoming QEMU another tool started (its
        /// QMP socket from the config or --qmp).
        #[arg(long)]
        existing: bool,
        /// QMP socket of the incoming QEMU (default: the VM's `qmp` setting).
        #[arg(long)]
        qmp: Option<PathBuf>,
        /// Print progress as JSON lines (what `migrate` reads).
        #[arg(long)]
        json: bool,
    },
    /// Source host: prepare, start the destination, live-migrate over QMP,
    /// switch, clean up, and print the phase table.
    Migrate {
        /// VM name.
        #[arg(long)]
        vm: String,
        /// Destination site.
        #[arg(long)]
        to: String,
        /// Migrate without preparation (no RA sender, no NIC swap).
        #[arg(long)]
        no_prep: bool,
        /// Migration URI (default: the destination site's `migrate_uri`).
        #[arg(long)]
        uri: Option<String>,
        /// NIC active now (default: the state file, else the first NIC).
        #[arg(long)]
        active: Option<String>,
        /// QMP socket of the source QEMU (default: the VM's `qmp` setting).
        #[arg(long)]
        qmp: Option<PathBuf>,
        /// Print the phase table as JSON.
        #[arg(long)]
        json: bool,
        /// Print the plan and do nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show a VM's role state (site, active NIC, migrations).
    Status {
        /// VM name.
        #[arg(long)]
        vm: String,
    },
}

fn print_line(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
    let _ = out.flush();
}

fn json_line<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v)
        .unwrap_or_else(|e| format!("{{\"event\":\"error\",\"message\":\"json: {e}\"}}"))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Run a parsed command line.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let cfg = Config::load(&cli.config)?;
    let host = Host::new(cfg, cli.site)?;
    match cli.command {
        Command::Prepare {
            vm,
            to,
            active,
            json,
        } => {
            let vmc = host.vm(&vm)?;
            let lock = prepare::lock_for(&host, &vm)?;
            let t0 = std::time::Instant::now();
            let reg = ImsRegistry::connect(host.cfg.ims.as_ref(), host.cfg.timeouts.ims()).await?;
            tracing::debug!(elapsed = ?t0.elapsed(), "IMS connected");
            let qmp = match vmc.link_command.as_slice() {
                [] => Some(Qmp::connect(&host.qmp_path(&vm, vmc)?).await?),
                _ => None,
            };
            let link = match &qmp {
                Some(q) => LinkControl::Qmp(q),
                None => LinkControl::Command {
                    vm: &vm,
                    argv: &vmc.link_command,
                },
            };
            tracing::debug!(elapsed = ?t0.elapsed(), "link control ready");
            let prepared = tokio::select! {
                p = prepare::prepare(&host, &reg, &link, &vm, &to, active.as_deref(), lock) => p?,
                _ = shutdown_signal() => return Err(Error::Interrupted),
            };
            if json {
                let mut v = serde_json::to_value(&prepared.readiness).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("event".into(), "ready".into());
                }
                print_line(&v.to_string());
            } else {
                print_line(&prepared.readiness.to_string());
                print_line("holding the preparation; SIGINT/SIGTERM undoes it");
            }
            shutdown_signal().await;
            prepared.release().await?;
            tracing::info!("preparation undone");
            Ok(())
        }
        Command::Receive {
            vm,
            active,
            attach,
            existing,
            qmp,
            json,
        } => {
            let opts = ReceiveOpts {
                vm,
                active,
                attach,
                existing,
                qmp,
            };
            let emit = |ev: &receive::ReceiveEvent| {
                if json {
                    print_line(&json_line(ev));
                } else {
                    tracing::info!(?ev, "receive");
                }
            };
            let r = tokio::select! {
                r = receive::receive(&host, &opts, emit) => r,
                _ = shutdown_signal() => Err(Error::Interrupted),
            };
            match r {
                Ok(receive::ReceiveEvent::Switched {
                    switch_ms,
                    new_active,
                    ..
                }) if !json => {
                    print_line(&format!(
                        "vm {} resumed; active NIC {new_active}; RESUME -> set_link done in {switch_ms:.2} ms",
                        opts.vm
                    ));
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) => {
                    if json {
                        print_line(&json_line(&receive::ReceiveEvent::Error {
                            message: e.to_string(),
                        }));
                    }
                    Err(e)
                }
            }
        }
        Command::Migrate {
            vm,
            to,
            no_prep,
            uri,
            active,
            qmp,
            json,
            dry_run,
        } => {
            let opts = MigrateOpts {
                vm,
                to,
                mode: if no_prep { Mode::Noprep } else { Mode::Prep },
                uri,
                active,
                qmp,
                progress: !json && std::io::stderr().is_terminal(),
            };
            if dry_run {
                let plan = migrate::plan(&host, &opts)?;
                print_line(&plan.to_string());
                return Ok(());
            }
            let reg = match opts.mode {
                Mode::Prep => Some(
                    ImsRegistry::connect(host.cfg.ims.as_ref(), host.cfg.timeouts.ims()).await?,
                ),
                Mode::Noprep => None,
            };
            // A signal asks the migration to stop; its future then finishes
            // by itself (cancel + clean-up, or switch when already done).
            let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
            let run = migrate::migrate(&host, reg.as_ref(), &opts, cancel_rx);
            tokio::pin!(run);
            let report = tokio::select! {
                r = &mut run => r?,
                _ = shutdown_signal() => {
                    tracing::warn!("signal: stopping the migration");
                    let _ = cancel_tx.send(true);
                    run.await?
                }
            };
            if json {
                print_line(&json_line(&report));
            } else {
                print_line(&report.to_string());
            }
            Ok(())
        }
        Command::Status { vm } => {
            let vmc = host.vm(&vm)?;
            let roles = host.roles(&vm, vmc, None)?;
            let stored = state::load(&host.cfg.state_dir, &vm, vmc)?.is_some();
            print_line(&format!(
                "vm {vm}: site {}, active NIC {} (tap {}), standby NIC {} (tap {}), {} migrations{}",
                roles.state.site,
                roles.active.id,
                roles.active.tap,
                roles.standby.id,
                roles.standby.tap,
                roles.state.migrations,
                if stored { "" } else { " (no state file yet: initial roles)" }
            ));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_every_subcommand_has_help() {
        Cli::command().debug_assert();
        for sub in ["prepare", "receive", "migrate", "status"] {
            let err = Cli::try_parse_from(["host-prep", sub, "--help"]).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp, "{sub}");
            assert!(err.to_string().contains("--vm"), "{sub}: {err}");
        }
    }

    #[test]
    fn migrate_flags_parse() {
        let cli = Cli::try_parse_from([
            "host-prep",
            "-c",
            "/x.toml",
            "--site",
            "A",
            "migrate",
            "--vm",
            "web1",
            "--to",
            "B",
            "--no-prep",
            "--json",
        ])
        .unwrap();
        match cli.command {
            Command::Migrate {
                no_prep,
                json,
                dry_run,
                ..
            } => assert!(no_prep && json && !dry_run),
            other => panic!("{other:?}"),
        }
        assert!(
            Cli::try_parse_from(["host-prep", "migrate", "--vm", "web1"]).is_err(),
            "--to is required"
        );
        let cli =
            Cli::try_parse_from(["host-prep", "receive", "--vm", "v", "--attach", "keep"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Receive {
                attach: Attach::Keep,
                ..
            }
        ));
    }
}
