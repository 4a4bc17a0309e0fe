//! kill -9 at random moments while clients stream updates: after every
//! restart, no acknowledged binding or seq is missing or older.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{hoa, moa, TestServer};
use ims_client::{BindingUpdate, RetransmitPolicy, UpdateClient, UpdateKey};
use rand::{Rng as _, SeedableRng as _};

const CYCLES: usize = 24;
const HOAS: u16 = 8;

/// Highest acknowledged (seq, active MoA) per HoA.
type Acked = Arc<Mutex<HashMap<Ipv6Addr, (u64, Ipv6Addr)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_never_loses_an_acknowledged_update() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x6d617436);
    let mut srv = TestServer::new("rate_limit_per_s = 1000000.0\nrate_limit_burst = 1000000.0\n");
    let addrs = srv.start();
    let mut keys: Vec<(Ipv6Addr, UpdateKey)> = Vec::new();
    for i in 0..HOAS {
        keys.push((hoa(i + 1), srv.provision(hoa(i + 1)).await));
    }
    let acked: Acked = Arc::default();
    // A watcher that lives through every crash: it must end up with each
    // HoA's latest binding (resume by revision, no gaps).
    let seen: Arc<Mutex<(u64, HashMap<Ipv6Addr, u64>)>> = Arc::default();
    let watcher = {
        let seen = seen.clone();
        let mut w = ims_client::Watch::start(
            addrs.control,
            srv.tls(),
            ims_client::WatchFilter {
                hoas: vec![],
                prefixes: vec!["::/0".parse().unwrap()],
            },
            None,
        );
        tokio::spawn(async move {
            while let Ok(item) = w.next().await {
                let mut g = seen.lock().unwrap();
                match item {
                    ims_client::WatchItem::Event(ev) => {
                        assert!(ev.revision > g.0, "watch revisions must grow");
                        g.0 = ev.revision;
                        if let ims_client::WatchChange::Changed { record } = ev.change {
                            g.1.insert(record.binding.hoa, record.binding.seq);
                        }
                    }
                    ims_client::WatchItem::Synced { revision } => g.0 = g.0.max(revision),
                }
            }
        })
    };
    let mut total_acks = 0usize;
    for cycle in 0..CYCLES {
        // Stream updates from one task per HoA until the kill.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (h, k) in keys.clone() {
            let acked = acked.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut up = UpdateClient::bind(addrs.udp, h, k)
                    .await
                    .unwrap()
                    .with_policy(RetransmitPolicy {
                        initial_rto: Duration::from_millis(20),
                        max_rto: Duration::from_millis(40),
                        max_attempts: 3,
                    });
                let mut n = 0usize;
                let mut i = 0u16;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    i = i.wrapping_add(1);
                    let m = moa(0xa + (i % 3), i);
                    if let Ok(r) = up.send(&BindingUpdate::activate(m, 3600)).await {
                        let mut g = acked.lock().unwrap();
                        let e = g.entry(h).or_insert((0, m));
                        assert!(r.seq > e.0, "ack seqs must grow");
                        *e = (r.seq, m);
                        n += 1;
                    }
                }
                n
            }));
        }
        let wait = rng.random_range(30..250u64);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        srv.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in tasks {
            total_acks += t.await.unwrap();
        }
        srv.start();
        let ctl = srv.control().await;
        let snapshot = acked.lock().unwrap().clone();
        let hoas: Vec<Ipv6Addr> = snapshot.keys().copied().collect();
        let got = ctl.lookup_many(hoas.clone()).await.unwrap();
        for (h, rec) in hoas.iter().zip(got) {
            let (seq, m) = snapshot[h];
            let rec = rec.unwrap_or_else(|| panic!("cycle {cycle}: acked binding of {h} missing"));
            assert!(
                rec.binding.seq >= seq,
                "cycle {cycle}: {h} has seq {} < acked {seq}",
                rec.binding.seq
            );
            if rec.binding.seq == seq {
                assert_eq!(rec.binding.active, Some(m), "cycle {cycle}: {h} content");
            }
        }
    }
    assert!(
        total_acks > CYCLES * 10,
        "too few acks ({total_acks}) to mean anything"
    );
    let ctl = srv.control().await;
    let (_, rev) = ctl.info().await.unwrap();
    let t0 = std::time::Instant::now();
    while seen.lock().unwrap().0 < rev {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "watch did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!watcher.is_finished(), "watcher task failed");
    let latest = seen.lock().unwrap().1.clone();
    let hoas: Vec<Ipv6Addr> = keys.iter().map(|(h, _)| *h).collect();
    for (h, rec) in hoas
        .iter()
        .zip(ctl.lookup_many(hoas.clone()).await.unwrap())
    {
        assert_eq!(
            latest.get(h).copied(),
            rec.map(|r| r.binding.seq),
            "watcher missed the latest binding of {h}"
        );
    }
    watcher.abort();
    srv.stop();
}
