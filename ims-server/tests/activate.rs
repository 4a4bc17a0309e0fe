//! `activate_standby` against a real server on loopback (real TLS): host-prep
//! switches a resumed VM to its registered standby MoA with the host token.
//! Success bumps the seq by one, reaches a watcher with a verifying
//! assertion and survives kill -9; every refusal changes nothing; a repeat
//! is idempotent; the host token opens nothing else.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::Ipv6Addr;
use std::time::Duration;

use common::{hoa, http_get, moa, TestServer};
use ims_client::{
    BindingAssertion, BindingRecord, BindingUpdate, ClientError, ControlClient, ErrorCode,
    UpdateClient, Watch, WatchChange, WatchFilter, WatchItem,
};

/// A server with a host token; returns it and the token.
fn server_with_host_token() -> (TestServer, String) {
    let mut srv = TestServer::new("");
    let path = srv.path("host-token");
    let token = ims_server::secrets::generate_admin_token(&path).unwrap();
    srv.extra = format!("host_token_file = \"{}\"\n", path.display());
    srv.write_config("[::1]:0", "[::1]:0", Some("[::1]:0"));
    (srv, token)
}

fn code_of<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

async fn next_change(w: &mut Watch) -> BindingRecord {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("watch event within 10 s")
            .unwrap()
        {
            WatchItem::Event(e) => match e.change {
                WatchChange::Changed { record } => return record,
                other => panic!("unexpected {other:?}"),
            },
            WatchItem::Synced { .. } => continue,
        }
    }
}

fn verified(rec: &BindingRecord, pk: &[u8; 32]) -> BindingAssertion {
    let a = BindingAssertion::from_b64(rec.assertion_b64.as_deref().unwrap()).unwrap();
    a.verify(pk).unwrap();
    // The assertion covers everything but the key id.
    let mut covered = a.to_binding();
    covered.key_id = rec.binding.key_id;
    assert_eq!(covered, rec.binding, "assertion covers the binding");
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_token_activates_a_registered_standby_and_nothing_else() {
    let (mut srv, host_token) = server_with_host_token();
    let addrs = srv.start();
    let admin = srv.control().await;
    let (pk, _) = admin.info().await.unwrap();
    let h = hoa(1);
    let (a, b, c) = (moa(0xa, 1), moa(0xb, 1), moa(0xc, 1));
    let key = srv.provision(h).await;
    // Provisioned, no binding yet: nothing to activate.
    let host = ControlClient::connect(addrs.control, &srv.tls())
        .await
        .unwrap();
    assert_eq!(
        code_of(host.activate_standby(&host_token, h, b).await),
        ErrorCode::NotFound
    );

    let mut up = UpdateClient::bind(addrs.udp, h, key)
        .await
        .unwrap()
        .with_ims_public_key(pk);
    let reg = up
        .send(&BindingUpdate::standby(Some(a), vec![b, c], 600))
        .await
        .unwrap();
    let before = admin.lookup(h).await.unwrap().unwrap();
    assert_eq!(before.binding.seq, reg.seq);

    let mut watch = Watch::start(
        addrs.control,
        srv.tls(),
        WatchFilter {
            hoas: vec![h],
            prefixes: vec![],
        },
        None,
    );
    assert_eq!(next_change(&mut watch).await, before, "catch-up");

    // Refusals: each leaves the binding (and the store revision) as it was.
    let (_, rev0) = admin.info().await.unwrap();
    assert_eq!(
        code_of(host.activate_standby("not-the-token-at-all", h, b).await),
        ErrorCode::Unauthorized
    );
    assert_eq!(
        code_of(host.activate_standby("", h, b).await),
        ErrorCode::Unauthorized
    );
    let d: Ipv6Addr = moa(0xd, 1);
    let e = host.activate_standby(&host_token, h, d).await;
    match &e {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(*code, ErrorCode::Conflict);
            assert!(message.contains("not a registered standby"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        code_of(host.activate_standby(&host_token, hoa(99), b).await),
        ErrorCode::NotFound
    );
    // The host token is not an admin token.
    let as_admin = host.clone().with_admin_token(&host_token);
    assert_eq!(
        code_of(as_admin.key_add(hoa(2)).await),
        ErrorCode::Unauthorized
    );
    assert_eq!(
        code_of(as_admin.binding_delete(h).await),
        ErrorCode::Unauthorized
    );
    assert_eq!(
        code_of(as_admin.bindings_list(None, None).await),
        ErrorCode::Unauthorized
    );
    assert_eq!(admin.lookup(h).await.unwrap().unwrap(), before);
    assert_eq!(admin.lookup(hoa(2)).await.unwrap(), None);
    assert_eq!(admin.info().await.unwrap().1, rev0, "nothing committed");

    // The switch: b active, the old active a dropped, c still standby.
    let (rec, changed) = host.activate_standby(&host_token, h, b).await.unwrap();
    assert!(changed);
    assert_eq!(rec.binding.active, Some(b));
    assert_eq!(rec.binding.standby, vec![c]);
    assert_eq!(rec.binding.seq, reg.seq + 1);
    assert_eq!(rec.binding.expires_unix, before.binding.expires_unix);
    assert_eq!(rec.binding.key_id, before.binding.key_id);
    assert_eq!(rec.revision, rev0 + 1);
    verified(&rec, &pk);
    let seen = next_change(&mut watch).await;
    assert_eq!(seen, rec, "the watcher gets the new binding at once");
    verified(&seen, &pk);
    assert_eq!(admin.lookup(h).await.unwrap().unwrap(), rec);

    // Idempotent: again → the same binding, no bump, nothing committed.
    let (again, changed) = host.activate_standby(&host_token, h, b).await.unwrap();
    assert!(!changed);
    assert_eq!(again, rec);
    assert_eq!(admin.info().await.unwrap().1, rev0 + 1);
    // The old active MoA is gone: it cannot be "re-activated" this way.
    assert_eq!(
        code_of(host.activate_standby(&host_token, h, a).await),
        ErrorCode::Conflict
    );

    // Durable: the answer came after the commit, so kill -9 keeps it.
    srv.kill9();
    srv.start();
    let admin = srv.control().await;
    assert_eq!(admin.lookup(h).await.unwrap().unwrap(), rec);

    // The admin token may activate too (c is still a standby).
    let (rc, changed) = admin.activate_standby(&srv.token, h, c).await.unwrap();
    assert!(changed);
    assert_eq!((rc.binding.active, rc.binding.seq), (Some(c), reg.seq + 2));
    assert!(rc.binding.standby.is_empty());

    // The agent's own (later) activation still goes through and moves past
    // the IMS's seq: its UpdateClient picks max(last + 1, now in µs) and
    // resyncs once on a stale answer.
    let own = up.send(&BindingUpdate::activate(b, 600)).await.unwrap();
    assert!(own.seq > rc.binding.seq);
    let fin = admin.lookup(h).await.unwrap().unwrap();
    assert_eq!((fin.binding.active, fin.binding.seq), (Some(b), own.seq));

    let m = http_get(srv.addrs.unwrap().metrics.unwrap(), "/metrics").await;
    // Counters restart with the process: one accepted (admin, c) since.
    assert!(
        m.contains(r#"ims_standby_activations_total{result="accepted"} 1"#),
        "{m}"
    );
    srv.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_activations_by_result() {
    let (mut srv, host_token) = server_with_host_token();
    let addrs = srv.start();
    let admin = srv.control().await;
    let h = hoa(3);
    let key = srv.provision(h).await;
    let mut up = UpdateClient::bind(addrs.udp, h, key).await.unwrap();
    up.send(&BindingUpdate::standby(
        Some(moa(0xa, 3)),
        vec![moa(0xb, 3)],
        600,
    ))
    .await
    .unwrap();
    let _ = admin.activate_standby("wrong", h, moa(0xb, 3)).await;
    let _ = admin.activate_standby(&host_token, h, moa(0xc, 3)).await;
    let _ = admin
        .activate_standby(&host_token, hoa(77), moa(0xb, 3))
        .await;
    admin
        .activate_standby(&host_token, h, moa(0xb, 3))
        .await
        .unwrap();
    admin
        .activate_standby(&host_token, h, moa(0xb, 3))
        .await
        .unwrap();
    let m = http_get(addrs.metrics.unwrap(), "/metrics").await;
    for (result, n) in [
        ("accepted", 1),
        ("already_active", 1),
        ("unauthorized", 1),
        ("not_standby", 1),
        ("unknown_hoa", 1),
    ] {
        let line = format!("ims_standby_activations_total{{result=\"{result}\"}} {n}");
        assert!(m.contains(&line), "missing {line}: {m}");
    }
    srv.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_host_token_file_only_the_admin_token_activates() {
    let mut srv = TestServer::new("");
    let addrs = srv.start();
    let admin = srv.control().await;
    let h = hoa(4);
    let key = srv.provision(h).await;
    let mut up = UpdateClient::bind(addrs.udp, h, key).await.unwrap();
    up.send(&BindingUpdate::standby(
        Some(moa(0xa, 4)),
        vec![moa(0xb, 4)],
        600,
    ))
    .await
    .unwrap();
    assert_eq!(
        code_of(admin.activate_standby("", h, moa(0xb, 4)).await),
        ErrorCode::Unauthorized
    );
    let (rec, changed) = admin
        .activate_standby(&srv.token, h, moa(0xb, 4))
        .await
        .unwrap();
    assert!(changed && rec.binding.active == Some(moa(0xb, 4)));
    srv.stop();
}

#[test]
fn a_host_token_file_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let (srv, _) = server_with_host_token();
    let path = srv.path("host-token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&srv.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("host token file") && err.contains("0644"),
        "{err}"
    );
}
