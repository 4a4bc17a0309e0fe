//! Command line: `serve`, key tools, and admin subcommands that talk to a
//! running server through `ims_client::ControlClient`.

use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ims_client::{ClientError, ControlClient, MacAddr, RaParams, SiteInfo, TlsSettings};
use ipnetwork::Ipv6Network;

use crate::secrets::{self, SecretError};
use crate::{ServeConfig, ServeError};

/// mat6 IP address Mapping Server.
#[derive(Debug, Parser)]
#[command(name = "ims-server", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the server.
    Serve(ServeArgs),
    /// IMS signing key, admin token and per-HoA update keys.
    Keys {
        /// Key subcommand.
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Inspect or delete bindings on a running server.
    Bindings {
        /// Connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// Bindings subcommand.
        #[command(subcommand)]
        cmd: BindingsCmd,
    },
    /// Manage the site registry on a running server.
    Sites {
        /// Connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// Sites subcommand.
        #[command(subcommand)]
        cmd: SitesCmd,
    },
}

/// `serve` options (flags override the config file).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "IMS_CONFIG")]
    pub config: PathBuf,
    /// Override `udp_listen`.
    #[arg(long, env = "IMS_UDP_LISTEN")]
    pub udp_listen: Option<SocketAddr>,
    /// Override `control_listen`.
    #[arg(long, env = "IMS_CONTROL_LISTEN")]
    pub control_listen: Option<SocketAddr>,
    /// Override `metrics_listen`.
    #[arg(long, env = "IMS_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Override `store_path`.
    #[arg(long, env = "IMS_STORE")]
    pub store: Option<PathBuf>,
}

impl ServeArgs {
    /// Reads the config file and applies the overrides.
    pub fn load(&self) -> Result<ServeConfig, ServeError> {
        let mut c = ServeConfig::from_file(&self.config)?;
        if let Some(a) = self.udp_listen {
            c.udp_listen = a;
        }
        if let Some(a) = self.control_listen {
            c.control_listen = a;
        }
        if let Some(a) = self.metrics_listen {
            c.metrics_listen = Some(a);
        }
        if let Some(p) = &self.store {
            c.store_path = p.clone();
        }
        Ok(c)
    }
}

/// How to reach a running server.
#[derive(Debug, Args, Clone)]
pub struct ConnArgs {
    /// Control address of the server.
    #[arg(long, env = "IMS_SERVER", default_value = "[::1]:7342")]
    pub server: SocketAddr,
    /// Name in the server's TLS certificate.
    #[arg(long, env = "IMS_SERVER_NAME", default_value = "localhost")]
    pub server_name: String,
    /// CA certificate (PEM) that signed the server certificate.
    #[arg(long, env = "IMS_CA")]
    pub ca: PathBuf,
    /// Admin token file (mode 0600).
    #[arg(long, env = "IMS_ADMIN_TOKEN_FILE")]
    pub token_file: PathBuf,
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Create the IMS Ed25519 signing key (PKCS#8 DER, mode 0600).
    GenSigning {
        /// Output file (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the IMS public key (base64) that peers verify assertions with.
    ExportPublic {
        /// Signing key file.
        #[arg(long)]
        signing_key: PathBuf,
    },
    /// Create an admin token file (mode 0600).
    GenAdminToken {
        /// Output file (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Create a host token file (mode 0600) for `host_token_file`: it lets
    /// hypervisor hosts (host-prep) activate a VM's registered standby MoA,
    /// nothing else.
    GenHostToken {
        /// Output file (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Create a private CA and server certificate (labs/tests): ca.pem, server.pem, server.key.
    GenTls {
        /// Output directory (must exist; files must not).
        #[arg(long)]
        dir: PathBuf,
        /// Names/addresses the certificate is valid for.
        #[arg(long = "name", default_values_t = vec!["localhost".to_string(), "::1".to_string()])]
        names: Vec<String>,
    },
    /// Provision (or rotate) the update key of a HoA on a running server.
    Add {
        /// Connection.
        #[command(flatten)]
        conn: ConnArgs,
        /// The HoA.
        #[arg(long)]
        hoa: Ipv6Addr,
    },
}

/// `bindings` subcommands.
#[derive(Debug, Subcommand)]
pub enum BindingsCmd {
    /// List bindings.
    List {
        /// Only HoAs in this prefix.
        #[arg(long)]
        prefix: Option<Ipv6Network>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one binding.
    Show {
        /// The HoA.
        hoa: Ipv6Addr,
    },
    /// Delete a binding and its key.
    Delete {
        /// The HoA.
        hoa: Ipv6Addr,
    },
}

/// `sites` subcommands.
#[derive(Debug, Subcommand)]
pub enum SitesCmd {
    /// Add or replace a site.
    Add {
        /// Site name.
        #[arg(long)]
        name: String,
        /// On-link prefix, e.g. 2001:db8:b::/64.
        #[arg(long)]
        prefix: Ipv6Network,
        /// Gateway link-local address.
        #[arg(long)]
        gateway_ll: Ipv6Addr,
        /// Gateway MAC address.
        #[arg(long)]
        gateway_mac: MacAddr,
        /// RA router lifetime (s); giving any RA option stores RA parameters.
        #[arg(long)]
        router_lifetime: Option<u16>,
        /// RA prefix valid lifetime (s).
        #[arg(long)]
        valid_lifetime: Option<u32>,
        /// RA prefix preferred lifetime (s).
        #[arg(long)]
        preferred_lifetime: Option<u32>,
        /// RA interval (ms).
        #[arg(long)]
        ra_interval_ms: Option<u32>,
        /// MTU to announce.
        #[arg(long)]
        mtu: Option<u32>,
    },
    /// List sites.
    List,
    /// Show one site (JSON).
    Get {
        /// Site name.
        name: String,
    },
    /// Remove a site.
    Remove {
        /// Site name.
        name: String,
    },
}

/// Errors of the non-serve subcommands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Server start-up.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Secret files.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// Talking to the server.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Something asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// Invalid site.
    #[error(transparent)]
    Site(#[from] mat6_proto::binding::SiteError),
}

async fn connect(c: &ConnArgs) -> Result<ControlClient, CliError> {
    let token = secrets::read_admin_token(&c.token_file)?;
    let tls = TlsSettings::from_ca_pem_file(&c.ca, &c.server_name)?;
    Ok(ControlClient::connect(c.server, &tls)
        .await?
        .with_admin_token(&token))
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// Runs every subcommand except `serve`.
pub async fn run_admin(cmd: Cmd) -> Result<(), CliError> {
    match cmd {
        Cmd::Serve(_) => Ok(()),
        Cmd::Keys { cmd } => match cmd {
            KeysCmd::GenSigning { out } => {
                let k = secrets::generate_signing_key(&out)?;
                println!(
                    "wrote {}; public key: {}",
                    out.display(),
                    ims_client::public_key_to_b64(&k.public_key())
                );
                Ok(())
            }
            KeysCmd::ExportPublic { signing_key } => {
                let k = secrets::read_signing_key(&signing_key)?;
                println!("{}", ims_client::public_key_to_b64(&k.public_key()));
                Ok(())
            }
            KeysCmd::GenAdminToken { out } => {
                secrets::generate_admin_token(&out)?;
                println!("wrote {} (mode 0600)", out.display());
                Ok(())
            }
            KeysCmd::GenHostToken { out } => {
                secrets::generate_admin_token(&out)?;
                println!("wrote {} (mode 0600)", out.display());
                Ok(())
            }
            KeysCmd::GenTls { dir, names } => {
                let f = secrets::generate_tls(&dir, &names)?;
                println!(
                    "wrote {} (give to clients), {}, {}",
                    f.ca.display(),
                    f.cert.display(),
                    f.key.display()
                );
                Ok(())
            }
            KeysCmd::Add { conn, hoa } => {
                let c = connect(&conn).await?;
                let k = c.key_add(hoa).await?;
                println!(
                    "hoa = {}\nkey_id = {}\nsecret_b64 = {}",
                    k.hoa, k.key_id, k.secret_b64
                );
                println!("# guest-agent key file (mode 0600), one line KEY_ID:SECRET_B64:");
                println!("{}:{}", k.key_id, k.secret_b64);
                Ok(())
            }
        },
        Cmd::Bindings { conn, cmd } => {
            let c = connect(&conn).await?;
            match cmd {
                BindingsCmd::List {
                    prefix,
                    limit,
                    json: as_json,
                } => {
                    let rs = c.bindings_list(prefix, limit).await?;
                    if as_json {
                        println!("{}", json(&rs));
                    } else {
                        println!(
                            "{:<40} {:<40} {:>20} {:>12} {:>8} standby",
                            "hoa", "active", "seq", "expires", "rev"
                        );
                        for r in rs {
                            let b = &r.binding;
                            let standby: Vec<String> =
                                b.standby.iter().map(ToString::to_string).collect();
                            println!(
                                "{:<40} {:<40} {:>20} {:>12} {:>8} {}",
                                b.hoa,
                                b.active.map_or("-".into(), |a| a.to_string()),
                                b.seq,
                                b.expires_unix,
                                r.revision,
                                standby.join(",")
                            );
                        }
                    }
                    Ok(())
                }
                BindingsCmd::Show { hoa } => {
                    let net = Ipv6Network::new(hoa, 128)
                        .map_err(|_| CliError::NotFound(hoa.to_string()))?;
                    let rs = c.bindings_list(Some(net), Some(1)).await?;
                    let r = rs
                        .into_iter()
                        .next()
                        .ok_or_else(|| CliError::NotFound(format!("binding for {hoa}")))?;
                    println!("{}", json(&r));
                    Ok(())
                }
                BindingsCmd::Delete { hoa } => {
                    c.binding_delete(hoa).await?;
                    println!("deleted {hoa}");
                    Ok(())
                }
            }
        }
        Cmd::Sites { conn, cmd } => {
            let c = connect(&conn).await?;
            match cmd {
                SitesCmd::Add {
                    name,
                    prefix,
                    gateway_ll,
                    gateway_mac,
                    router_lifetime,
                    valid_lifetime,
                    preferred_lifetime,
                    ra_interval_ms,
                    mtu,
                } => {
                    let any_ra = router_lifetime.is_some()
                        || valid_lifetime.is_some()
                        || preferred_lifetime.is_some()
                        || ra_interval_ms.is_some()
                        || mtu.is_some();
                    let d = RaParams::default();
                    let site = SiteInfo {
                        name,
                        prefix,
                        gateway_ll,
                        gateway_mac,
                        ra: any_ra.then(|| RaParams {
                            router_lifetime_s: router_lifetime.unwrap_or(d.router_lifetime_s),
                            prefix_valid_lifetime_s: valid_lifetime
                                .unwrap_or(d.prefix_valid_lifetime_s),
                            prefix_preferred_lifetime_s: preferred_lifetime
                                .unwrap_or(d.prefix_preferred_lifetime_s),
                            interval_ms: ra_interval_ms.unwrap_or(d.interval_ms),
                            mtu,
                        }),
                    };
                    site.validate()?;
                    let name = site.name.clone();
                    c.site_add(site).await?;
                    println!("site {name} stored");
                    Ok(())
                }
                SitesCmd::List => {
                    for s in c.site_list().await? {
                        println!(
                            "{:<20} {:<24} {:<26} {}",
                            s.name, s.prefix, s.gateway_ll, s.gateway_mac
                        );
                    }
                    Ok(())
                }
                SitesCmd::Get { name } => {
                    let s = c
                        .site_get(&name)
                        .await?
                        .ok_or_else(|| CliError::NotFound(format!("site {name:?}")))?;
                    println!("{}", json(&s));
                    Ok(())
                }
                SitesCmd::Remove { name } => {
                    c.site_remove(&name).await?;
                    println!("site {name} removed");
                    Ok(())
                }
            }
        }
    }
}
