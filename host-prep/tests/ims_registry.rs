//! host-prep's IMS access (`ImsRegistry`) against a real ims-server running
//! in-process on loopback (real TLS, real UDP updates): site lookup, unknown
//! site, unreachable server, and the standby wait via the watch stream, with
//! its timeout naming the HoA and the prefix; the standby lookup and its
//! activation with the host token (what `receive` does at RESUME).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use host_prep::config::ImsSettings;
use host_prep::ims::{ImsError, ImsRegistry, Registry};
use ims_client::{BindingUpdate, ControlClient, SiteInfo, TlsSettings, UpdateClient};
use mat6_proto::update::UpdateKey;

const HOA: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x42);

struct Server {
    _dir: tempfile::TempDir,
    running: Option<ims_server::Running>,
    settings: ImsSettings,
    token: String,
}

async fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ims_server::secrets::generate_tls(d, &["localhost".to_string(), "::1".to_string()]).unwrap();
    ims_server::secrets::generate_signing_key(&d.join("signing.pk8")).unwrap();
    let token = ims_server::secrets::generate_admin_token(&d.join("token")).unwrap();
    ims_server::secrets::generate_admin_token(&d.join("host-token")).unwrap();
    let cfg = ims_server::ServeConfig::from_toml(&format!(
        "udp_listen = \"[::1]:0\"\ncontrol_listen = \"[::1]:0\"\nstore_path = \"{0}/ims.redb\"\ntls_cert = \"{0}/server.pem\"\ntls_key = \"{0}/server.key\"\nadmin_token_file = \"{0}/token\"\nhost_token_file = \"{0}/host-token\"\nsigning_key_file = \"{0}/signing.pk8\"\n",
        d.display()
    ))
    .unwrap();
    let running = ims_server::start(&cfg).await.unwrap();
    let settings = ImsSettings {
        control: running.control_addr,
        server_name: "localhost".into(),
        ca_cert: d.join("ca.pem"),
        host_token_file: Some(d.join("host-token")),
    };
    Server {
        _dir: dir,
        running: Some(running),
        settings,
        token,
    }
}

impl Server {
    async fn admin(&self) -> ControlClient {
        let tls = TlsSettings::from_ca_pem_file(&self.settings.ca_cert, "localhost").unwrap();
        ControlClient::connect(self.settings.control, &tls)
            .await
            .unwrap()
            .with_admin_token(&self.token)
    }
}

fn site_b() -> SiteInfo {
    SiteInfo {
        name: "B".into(),
        prefix: "2001:db8:b::/64".parse().unwrap(),
        gateway_ll: "fe80::b".parse().unwrap(),
        gateway_mac: "02:00:00:00:00:0b".parse().unwrap(),
        ra: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_lookup_and_errors() {
    let mut s = server().await;
    s.admin().await.site_add(site_b()).await.unwrap();
    let reg = ImsRegistry::connect(Some(&s.settings), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reg.site("B").await.unwrap(), site_b());
    match reg.site("Z").await {
        Err(e @ ImsError::UnknownSite(_)) => assert!(e.to_string().contains("\"Z\"")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ImsRegistry::connect(None, Duration::from_secs(1)).await,
        Err(ImsError::NotConfigured)
    ));
    let addr = s.settings.control;
    s.running.take().unwrap().shutdown().await;
    match ImsRegistry::connect(Some(&s.settings), Duration::from_secs(2)).await {
        Err(e @ ImsError::Unreachable { .. }) => {
            assert!(e.to_string().contains(&addr.to_string()), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_wait_returns_when_the_standby_appears_and_times_out_otherwise() {
    let s = server().await;
    let admin = s.admin().await;
    let k = admin.key_add(HOA).await.unwrap();
    let key = UpdateKey::from_b64(k.key_id, &k.secret_b64).unwrap();
    let udp = s.running.as_ref().unwrap().udp_addr;
    let mut agent = UpdateClient::bind(udp, HOA, key).await.unwrap();
    let active: Ipv6Addr = "2001:db8:a::42".parse().unwrap();
    agent
        .send(&BindingUpdate::activate(active, 600))
        .await
        .unwrap();

    let reg = ImsRegistry::connect(Some(&s.settings), Duration::from_secs(5))
        .await
        .unwrap();
    let prefix = site_b().prefix;
    // Nothing in B yet: the wait times out and says what it waited for.
    match reg
        .wait_standby(HOA, prefix, Duration::from_millis(300))
        .await
    {
        Err(e @ ImsError::StandbyTimeout { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains(&HOA.to_string()) && m.contains("2001:db8:b::/64"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A standby outside the prefix does not count; one inside does.
    let wait = tokio::spawn({
        let reg = reg.clone();
        async move { reg.wait_standby(HOA, prefix, Duration::from_secs(10)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let elsewhere: Ipv6Addr = "2001:db8:c::42".parse().unwrap();
    agent
        .send(&BindingUpdate::standby(Some(active), vec![elsewhere], 600))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !wait.is_finished(),
        "a standby outside the prefix ended the wait"
    );
    let want: Ipv6Addr = "2001:db8:b::42".parse().unwrap();
    let t = Instant::now();
    agent
        .send(&BindingUpdate::standby(Some(active), vec![want], 600))
        .await
        .unwrap();
    let got = wait.await.unwrap().unwrap();
    assert_eq!(got, want);
    eprintln!(
        "standby seen {:?} after the update was acknowledged",
        t.elapsed()
    );
    // Already there: returns at once.
    assert_eq!(
        reg.wait_standby(HOA, prefix, Duration::from_secs(5))
            .await
            .unwrap(),
        want
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_lookup_and_activation_with_the_host_token() {
    let s = server().await;
    let admin = s.admin().await;
    let k = admin.key_add(HOA).await.unwrap();
    let key = UpdateKey::from_b64(k.key_id, &k.secret_b64).unwrap();
    let udp = s.running.as_ref().unwrap().udp_addr;
    let mut agent = UpdateClient::bind(udp, HOA, key).await.unwrap();
    let active: Ipv6Addr = "2001:db8:a::42".parse().unwrap();
    let standby: Ipv6Addr = "2001:db8:b::42".parse().unwrap();
    let reg = ImsRegistry::connect(Some(&s.settings), Duration::from_secs(5))
        .await
        .unwrap();
    let prefix = site_b().prefix;
    agent
        .send(&BindingUpdate::activate(active, 600))
        .await
        .unwrap();
    assert!(matches!(
        reg.standby_moa(HOA, prefix).await,
        Err(ImsError::NoStandby { .. })
    ));
    let registered = agent
        .send(&BindingUpdate::standby(Some(active), vec![standby], 600))
        .await
        .unwrap();
    assert_eq!(reg.standby_moa(HOA, prefix).await.unwrap(), standby);

    let path = s.settings.host_token_file.clone().unwrap();
    let token = host_prep::ims::read_host_token(&path).unwrap();
    match reg.activate_standby("wrong-token", HOA, standby).await {
        Err(ImsError::Request { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(reg.activate_standby(&token, HOA, standby).await.unwrap());
    let b = admin.lookup(HOA).await.unwrap().unwrap().binding;
    assert_eq!(b.active, Some(standby));
    assert!(b.standby.is_empty());
    assert_eq!(b.seq, registered.seq + 1);
    // Repeating it (a retried receive) changes nothing.
    assert!(!reg.activate_standby(&token, HOA, standby).await.unwrap());
    assert_eq!(admin.lookup(HOA).await.unwrap().unwrap().binding, b);
    // The agent's own activation afterwards still lands, above the IMS's seq.
    let own = agent
        .send(&BindingUpdate::activate(standby, 600))
        .await
        .unwrap();
    assert!(own.seq > b.seq);
}
