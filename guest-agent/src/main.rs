//! `guest-agent`: thin entry point; everything lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use guest_agent::config::{AgentConfig, DEFAULT_STATUS_SOCKET};

/// mat6 guest agent: keeps this VM's Home Address reachable across moves.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent until SIGTERM/SIGINT.
    Run {
        /// Configuration file (TOML).
        #[arg(
            long,
            short,
            env = "GUEST_AGENT_CONFIG",
            default_value = "/etc/mat6/guest-agent.toml"
        )]
        config: PathBuf,
    },
    /// Validate a configuration file (and its key file) and exit.
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(
            long,
            short,
            env = "GUEST_AGENT_CONFIG",
            default_value = "/etc/mat6/guest-agent.toml"
        )]
        config: PathBuf,
    },
    /// Show the running agent's state: HoA, interfaces, MoAs, binding, peers,
    /// last handovers.
    Status {
        /// The agent's status socket.
        #[arg(long, env = "GUEST_AGENT_SOCKET", default_value = DEFAULT_STATUS_SOCKET)]
        socket: PathBuf,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("guest-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r: Result<(), String> = rt.block_on(async {
        match cli.cmd {
            Cmd::Run { config } => {
                let cfg = AgentConfig::load(&config).map_err(|e| e.to_string())?;
                guest_agent::daemon::run(cfg, shutdown_signal())
                    .await
                    .map_err(|e| e.to_string())
            }
            Cmd::CheckConfig { config } => {
                let cfg = AgentConfig::load(&config).map_err(|e| e.to_string())?;
                cfg.load_key().map_err(|e| e.to_string())?;
                println!("{}: ok", config.display());
                Ok(())
            }
            Cmd::Status { socket, json } => {
                let doc = guest_agent::status::query(&socket)
                    .await
                    .map_err(|e| e.to_string())?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
                    );
                } else {
                    print!("{}", guest_agent::status::render(&doc));
                }
                Ok(())
            }
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {},
                _ = i.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
