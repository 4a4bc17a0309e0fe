//! Forged datagrams get zero reply bytes and change nothing; replays of
//! accepted datagrams are rejected, also after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{drain, hoa, moa, recv_n, TestServer};
use mat6_proto::update::{AckRepr, AckStatus, UpdateKey, UpdateRepr};
use tokio::net::UdpSocket;

const HIGH_RATE: &str = "rate_limit_per_s = 1000000.0\nrate_limit_burst = 1000000.0\n";

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn update(key: &UpdateKey, h: std::net::Ipv6Addr, seq: u64, site: u16) -> Vec<u8> {
    UpdateRepr {
        key_id: key.key_id,
        seq,
        hoa: h,
        lifetime_s: 3600,
        activate: true,
        active: Some(moa(site, 1)),
        standby: vec![moa(site + 1, 1)],
    }
    .to_vec(&key.hmac_key())
    .unwrap()
}

async fn check_replays(
    sock: &UdpSocket,
    udp: std::net::SocketAddr,
    accepted: &[Vec<u8>],
    hk: &ring::hmac::Key,
    last: u64,
) {
    for d in accepted {
        sock.send_to(d, udp).await.unwrap();
    }
    let acks = recv_n(
        sock,
        accepted.len(),
        Duration::from_secs(10),
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(acks.len(), accepted.len());
    for a in acks {
        let ack = AckRepr::parse_verified(&a, hk).unwrap();
        assert_eq!(ack.status, AckStatus::StaleSeq, "replay accepted: {ack:?}");
        assert_eq!(ack.last_accepted_seq, last);
        // Only the replay of the last accepted update (indistinguishable from
        // a retransmission after a lost ack) carries the current assertion.
        assert_eq!(ack.assertion.is_some(), ack.seq == last, "{ack:?}");
    }
}

async fn snapshot(srv: &TestServer) -> Vec<ims_client::BindingRecord> {
    srv.control().await.bindings_list(None, None).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_datagrams_get_no_reply_and_change_nothing() {
    let mut srv = TestServer::new(HIGH_RATE);
    let addrs = srv.start();
    let (a, b) = (hoa(1), hoa(2));
    let ka = srv.provision(a).await;
    let kb = srv.provision(b).await;
    let sock = UdpSocket::bind("[::1]:0").await.unwrap();

    // A legitimate first binding for A, so "unchanged" is meaningful.
    let seq0 = now_us();
    sock.send_to(&update(&ka, a, seq0, 0xa), addrs.udp)
        .await
        .unwrap();
    let acks = recv_n(
        &sock,
        1,
        Duration::from_secs(10),
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(acks.len(), 1);
    let ack = AckRepr::parse_verified(&acks[0], &ka.hmac_key()).unwrap();
    assert_eq!(ack.status, AckStatus::Accepted);
    let before = snapshot(&srv).await;

    let valid = update(&ka, a, seq0 + 1000, 0xc);
    let mut forged: Vec<Vec<u8>> = Vec::new();
    for i in 0..valid.len() * 8 {
        let mut v = valid.clone();
        v[i / 8] ^= 1 << (i % 8);
        forged.push(v);
    }
    for n in 0..valid.len() {
        forged.push(valid[..n].to_vec());
    }
    let mut long = valid.clone();
    long.push(0);
    forged.push(long);
    // Wrong key (right key id), B's key for A's HoA, B's key id with A's
    // secret, an unknown key id, and a HoA nobody provisioned.
    let wrong = UpdateKey::generate(ka.key_id).unwrap();
    forged.push(update(&wrong, a, seq0 + 2000, 0xd));
    forged.push(update(&kb, a, seq0 + 2001, 0xd));
    forged.push(update(
        &UpdateKey {
            key_id: kb.key_id,
            secret: ka.secret,
        },
        a,
        seq0 + 2002,
        0xd,
    ));
    forged.push(update(
        &UpdateKey {
            key_id: 999_999,
            secret: ka.secret,
        },
        a,
        seq0 + 2003,
        0xd,
    ));
    forged.push(update(&ka, hoa(3), seq0 + 2004, 0xd));
    assert!(forged.len() > 900);
    for (i, f) in forged.iter().enumerate() {
        sock.send_to(f, addrs.udp).await.unwrap();
        if i % 64 == 63 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let replies = drain(&sock, Duration::from_millis(800)).await;
    assert_eq!(
        replies.iter().map(Vec::len).sum::<usize>(),
        0,
        "forged datagrams must get zero reply bytes"
    );
    assert_eq!(
        snapshot(&srv).await,
        before,
        "store changed by forged datagrams"
    );

    // The server is alive and the valid datagram still works afterwards.
    sock.send_to(&valid, addrs.udp).await.unwrap();
    let acks = recv_n(
        &sock,
        1,
        Duration::from_secs(10),
        Duration::from_millis(200),
    )
    .await;
    assert_eq!(acks.len(), 1);
    assert_eq!(
        AckRepr::parse_verified(&acks[0], &ka.hmac_key())
            .unwrap()
            .status,
        AckStatus::Accepted
    );
    srv.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_rejected_also_after_restart() {
    let mut srv = TestServer::new(HIGH_RATE);
    let addrs = srv.start();
    let h = hoa(1);
    let k = srv.provision(h).await;
    let hk = k.hmac_key();
    let sock = UdpSocket::bind("[::1]:0").await.unwrap();
    let mut accepted = Vec::new();
    let base = now_us();
    for i in 0..20u64 {
        let d = update(&k, h, base + i, 0xa + (i % 4) as u16);
        sock.send_to(&d, addrs.udp).await.unwrap();
        let acks = recv_n(&sock, 1, Duration::from_secs(10), Duration::from_millis(20)).await;
        assert_eq!(acks.len(), 1);
        let ack = AckRepr::parse_verified(&acks[0], &hk).unwrap();
        assert_eq!(ack.status, AckStatus::Accepted);
        accepted.push(d);
    }
    let last = base + 19;
    let before = snapshot(&srv).await;
    assert_eq!(before[0].binding.seq, last);

    check_replays(&sock, addrs.udp, &accepted, &hk, last).await;
    assert_eq!(snapshot(&srv).await, before);

    srv.stop();
    srv.start();
    check_replays(&sock, addrs.udp, &accepted, &hk, last).await;
    assert_eq!(snapshot(&srv).await, before);

    srv.kill9();
    srv.start();
    check_replays(&sock, addrs.udp, &accepted, &hk, last).await;
    assert_eq!(snapshot(&srv).await, before);
    srv.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_drops_excess_before_crypto() {
    let mut srv = TestServer::new("rate_limit_per_s = 0.1\nrate_limit_burst = 5.0\n");
    let addrs = srv.start();
    let h = hoa(1);
    let k = srv.provision(h).await;
    let sock = UdpSocket::bind("[::1]:0").await.unwrap();
    let base = now_us();
    for i in 0..20 {
        sock.send_to(&update(&k, h, base + i, 0xa), addrs.udp)
            .await
            .unwrap();
    }
    let acks = recv_n(
        &sock,
        5,
        Duration::from_secs(10),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(acks.len(), 5, "burst of 5 then nothing");
    srv.stop();
}
