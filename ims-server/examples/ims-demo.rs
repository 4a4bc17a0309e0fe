//! A self-contained IMS demo for the README's main job: starts a server with
//! an embedded store in a temp dir, provisions a HoA, registers a standby MoA
//! then activates it over UDP, and shows the lookup and the watch events with
//! their verified IMS assertions.
//!
//! `cargo run --release -p ims-server --example ims-demo`

use std::net::Ipv6Addr;
use std::time::Duration;

use ims_client::{
    BindingAssertion, BindingUpdate, ControlClient, TlsSettings, UpdateClient, UpdateKey, Watch,
    WatchChange, WatchFilter, WatchItem,
};
use ims_server::{secrets, ServeConfig};

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxErr> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let tls_files = secrets::generate_tls(d, &["localhost".into()])?;
    let token = secrets::generate_admin_token(&d.join("token"))?;
    secrets::generate_signing_key(&d.join("signing.pk8"))?;
    let cfg = ServeConfig::from_toml(&format!(
        r#"udp_listen = "[::1]:0"
control_listen = "[::1]:0"
store_path = "{0}/ims.redb"
tls_cert = "{0}/server.pem"
tls_key = "{0}/server.key"
admin_token_file = "{0}/token"
signing_key_file = "{0}/signing.pk8"
"#,
        d.display()
    ))?;
    let srv = ims_server::start(&cfg).await?;
    println!(
        "IMS up: UDP updates on {}, TLS control on {}, store {}",
        srv.udp_addr,
        srv.control_addr,
        cfg.store_path.display()
    );
    let tls = TlsSettings::from_ca_pem_file(&tls_files.ca, "localhost")?;
    let ctl = ControlClient::connect(srv.control_addr, &tls)
        .await?
        .with_admin_token(&token);
    let (pk, _) = ctl.info().await?;
    println!("IMS public key: {}", ims_client::public_key_to_b64(&pk));

    let hoa: Ipv6Addr = "2001:db8:100::1".parse()?;
    let k = ctl.key_add(hoa).await?;
    println!("provisioned {hoa}: key id {}", k.key_id);
    let key = UpdateKey::from_b64(k.key_id, &k.secret_b64)?;

    let mut watch = Watch::start(
        srv.control_addr,
        tls.clone(),
        WatchFilter {
            hoas: vec![hoa],
            prefixes: vec![],
        },
        None,
    );
    let mut up = UpdateClient::bind(srv.udp_addr, hoa, key)
        .await?
        .with_ims_public_key(pk);
    let moa_a: Ipv6Addr = "2001:db8:a::10".parse()?;
    let moa_b: Ipv6Addr = "2001:db8:b::10".parse()?;
    let r = up
        .send(&BindingUpdate::standby(Some(moa_a), vec![moa_b], 600))
        .await?;
    println!(
        "update (standby {moa_b}) acked in {:.2} ms, seq {}",
        r.rtt.as_secs_f64() * 1e3,
        r.seq
    );
    let r = up.send(&BindingUpdate::activate(moa_b, 600)).await?;
    println!(
        "update (activate {moa_b}) acked in {:.2} ms, seq {}",
        r.rtt.as_secs_f64() * 1e3,
        r.seq
    );

    let rec = ctl.lookup(hoa).await?.ok_or("binding missing")?;
    println!(
        "lookup {hoa}: active {:?}, standby {:?}, seq {}, expires {}",
        rec.binding.active, rec.binding.standby, rec.binding.seq, rec.binding.expires_unix
    );
    let mut events = 0;
    while events < 2 {
        match tokio::time::timeout(Duration::from_secs(5), watch.next()).await?? {
            WatchItem::Event(ev) => {
                if let WatchChange::Changed { record } = &ev.change {
                    let a = BindingAssertion::from_b64(
                        record.assertion_b64.as_deref().ok_or("no assertion")?,
                    )?;
                    a.verify(&pk)?;
                    println!(
                        "watch event rev {}: {hoa} -> active {:?} standby {:?} (IMS signature verified)",
                        ev.revision, a.active, a.standby
                    );
                    events += 1;
                }
            }
            WatchItem::Synced { revision } => println!("watch synced at revision {revision}"),
        }
    }
    drop(watch);
    drop(ctl);
    srv.shutdown().await;
    println!("IMS stopped");
    Ok(())
}
