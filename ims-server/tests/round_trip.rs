//! Real server on loopback: provision, standby then activate over UDP,
//! lookups, watch (including resume after a crash), sites, admin auth,
//! metrics, CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{hoa, http_get, moa, TestServer, BIN};
use ims_client::{
    BindingAssertion, BindingUpdate, ClientError, ControlClient, ErrorCode, SiteInfo, UpdateClient,
    Watch, WatchChange, WatchFilter, WatchItem,
};

async fn next_event(w: &mut Watch) -> ims_client::WatchEvent {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("watch event within 10 s")
            .unwrap()
        {
            WatchItem::Event(e) => return e,
            WatchItem::Synced { .. } => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_update_lookup_watch_standby_then_activate() {
    let mut srv = TestServer::new("");
    let addrs = srv.start();
    let ctl = srv.control().await;
    let (pk, rev0) = ctl.info().await.unwrap();
    assert_eq!(rev0, 0);

    let h = hoa(1);
    let key = srv.provision(h).await;
    assert_eq!(
        ctl.lookup(h).await.unwrap(),
        None,
        "no binding before the first update"
    );

    let filter = WatchFilter {
        hoas: vec![],
        prefixes: vec!["2001:db8:100::/48".parse().unwrap()],
    };
    let mut watch = Watch::start(addrs.control, srv.tls(), filter.clone(), None);
    match tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap()
    {
        WatchItem::Synced { revision } => assert_eq!(revision, 0),
        other => panic!("expected synced, got {other:?}"),
    }

    let mut up = UpdateClient::bind(addrs.udp, h, key.clone())
        .await
        .unwrap()
        .with_ims_public_key(pk);
    // Make-before-break: active on site A, standby on site B.
    let a = moa(0xa, 1);
    let b = moa(0xb, 1);
    let r1 = up
        .send(&BindingUpdate::standby(Some(a), vec![b], 600))
        .await
        .unwrap();
    assert_eq!(r1.assertion.active, Some(a));
    assert_eq!(r1.assertion.standby, vec![b]);
    r1.assertion.verify(&pk).unwrap();
    let ev = next_event(&mut watch).await;
    match &ev.change {
        WatchChange::Changed { record } => {
            assert_eq!(record.binding.active, Some(a));
            assert_eq!(record.binding.standby, vec![b]);
            assert_eq!(record.binding.seq, r1.seq);
            let asr = BindingAssertion::from_b64(record.assertion_b64.as_ref().unwrap()).unwrap();
            asr.verify(&pk).unwrap();
        }
        other => panic!("{other:?}"),
    }

    // Switch.
    let r2 = up.send(&BindingUpdate::activate(b, 600)).await.unwrap();
    assert!(r2.seq > r1.seq);
    let ev2 = next_event(&mut watch).await;
    assert!(ev2.revision > ev.revision);
    let rec = ctl.lookup(h).await.unwrap().unwrap();
    assert_eq!(rec.binding.active, Some(b));
    assert!(rec.binding.standby.is_empty());
    assert_eq!(rec.binding.seq, r2.seq);
    assert_eq!(rec.binding.key_id, key.key_id);
    BindingAssertion::from_b64(rec.assertion_b64.as_ref().unwrap())
        .unwrap()
        .verify(&pk)
        .unwrap();
    let many = ctl.lookup_many(vec![h, hoa(99)]).await.unwrap();
    assert_eq!(many.len(), 2);
    assert_eq!(many[0].as_ref().unwrap().binding.seq, r2.seq);
    assert!(many[1].is_none());

    // Resume: a watcher that saw revision ev.revision gets exactly the rest.
    let mut resumed = Watch::start(addrs.control, srv.tls(), filter.clone(), Some(ev.revision));
    let e = next_event(&mut resumed).await;
    assert_eq!(e.revision, ev2.revision);

    // Crash and restart: the live watch reconnects and misses nothing.
    let old = ctl.clone();
    drop(ctl);
    srv.kill9();
    srv.start();
    // A client whose connection died fails fast instead of hanging.
    let r = tokio::time::timeout(Duration::from_secs(5), old.lookup(h)).await;
    assert!(matches!(r, Ok(Err(ClientError::Closed))), "{r:?}");
    assert!(old.is_closed());
    let mut up2 = UpdateClient::bind(addrs.udp, h, key.clone()).await.unwrap();
    let r3 = up2.send(&BindingUpdate::activate(a, 600)).await.unwrap();
    assert!(r3.seq > r2.seq);
    let e3 = next_event(&mut watch).await;
    assert!(e3.revision > ev2.revision);
    match e3.change {
        WatchChange::Changed { record } => assert_eq!(record.binding.seq, r3.seq),
        other => panic!("{other:?}"),
    }

    // Delete: the watcher sees it, lookups stop answering, the key is gone.
    let ctl = srv.control().await;
    ctl.binding_delete(h).await.unwrap();
    let e4 = next_event(&mut watch).await;
    assert_eq!(e4.change, WatchChange::Deleted { hoa: h });
    assert_eq!(ctl.lookup(h).await.unwrap(), None);
    let mut up3 = UpdateClient::bind(addrs.udp, h, key)
        .await
        .unwrap()
        .with_policy(ims_client::RetransmitPolicy {
            initial_rto: Duration::from_millis(20),
            max_rto: Duration::from_millis(40),
            max_attempts: 3,
        });
    assert!(matches!(
        up3.send(&BindingUpdate::activate(a, 60)).await,
        Err(ClientError::TimedOut { .. })
    ));
    srv.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_admin_auth_metrics_and_cli() {
    let mut srv = TestServer::new("");
    let addrs = srv.start();
    let ctl = srv.control().await;
    let site: SiteInfo = serde_json::from_str(
        r#"{"name":"site-b","prefix":"2001:db8:b::/64","gateway_ll":"fe80::b","gateway_mac":"02:00:00:00:0b:01",
            "ra":{"router_lifetime_s":1800,"prefix_valid_lifetime_s":3600,"prefix_preferred_lifetime_s":1800,"interval_ms":200,"mtu":1500}}"#,
    )
    .unwrap();
    ctl.site_add(site.clone()).await.unwrap();
    assert_eq!(ctl.site_get("site-b").await.unwrap(), Some(site.clone()));
    assert_eq!(ctl.site_list().await.unwrap(), vec![site.clone()]);
    assert_eq!(ctl.site_get("nope").await.unwrap(), None);

    // Anyone may read; only the token holder may write.
    let anon = ControlClient::connect(addrs.control, &srv.tls())
        .await
        .unwrap();
    assert_eq!(anon.site_get("site-b").await.unwrap(), Some(site.clone()));
    let wrong = anon.clone().with_admin_token("not-the-token-at-all");
    for r in [
        wrong.key_add(hoa(5)).await.map(|_| ()),
        anon.site_remove("site-b").await,
        wrong.bindings_list(None, None).await.map(|_| ()),
    ] {
        match r {
            Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::Unauthorized),
            other => panic!("expected unauthorized, got {other:?}"),
        }
    }
    let mut bad = site.clone();
    bad.gateway_ll = "2001:db8::1".parse().unwrap();
    assert!(matches!(
        ctl.site_add(bad).await,
        Err(ClientError::Server {
            code: ErrorCode::BadRequest,
            ..
        })
    ));

    // CLI against the running server.
    let cli = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("IMS_SERVER", addrs.control.to_string())
            .env("IMS_CA", &srv.ca)
            .env("IMS_ADMIN_TOKEN_FILE", srv.path("token"))
            .output()
            .unwrap()
    };
    let out = cli(&[
        "sites",
        "add",
        "--name",
        "site-a",
        "--prefix",
        "2001:db8:a::/64",
        "--gateway-ll",
        "fe80::a",
        "--gateway-mac",
        "02:00:00:00:0a:01",
        "--router-lifetime",
        "600",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["sites", "get", "site-a"]);
    assert!(out.status.success());
    let got: SiteInfo = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got.gateway_mac.to_string(), "02:00:00:00:0a:01");
    assert_eq!(got.ra.unwrap().router_lifetime_s, 600);
    let out = cli(&["keys", "add", "--hoa", "2001:db8:100::77"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text.lines().last().unwrap();
    let key = mat6_proto::update::UpdateKey::from_key_string(line).unwrap();
    let h: std::net::Ipv6Addr = "2001:db8:100::77".parse().unwrap();
    let mut up = UpdateClient::bind(addrs.udp, h, key).await.unwrap();
    up.send(&BindingUpdate::activate(moa(0xa, 7), 60))
        .await
        .unwrap();
    let out = cli(&["bindings", "show", "2001:db8:100::77"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("2001:db8:a::7"));
    let out = cli(&["bindings", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("2001:db8:100::77"));
    let out = cli(&["sites", "remove", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    let out = cli(&["sites", "remove", "site-a"]);
    assert!(out.status.success());
    let out = std::process::Command::new(BIN)
        .args(["keys", "export-public", "--signing-key"])
        .arg(srv.path("signing.pk8"))
        .output()
        .unwrap();
    let (pk, _) = ctl.info().await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        ims_client::public_key_to_b64(&pk)
    );

    // Metrics.
    let m = http_get(addrs.metrics.unwrap(), "/metrics").await;
    assert!(m.contains("ims_updates_accepted_total 1"), "{m}");
    assert!(m.contains("ims_commit_latency_seconds_bucket"), "{m}");
    assert!(m.contains("ims_lookups_total"), "{m}");
    srv.stop();
}
