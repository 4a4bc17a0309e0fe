//! Privileged tests of `mat6_net::nft`, each in its own namespace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use mat6_net::nft::{self, Family, NftError, NftSession};
use mat6_tests::netns::Netns;

const TABLE: &str = "table ip6 m6t {\n\tmap peer_out {\n\t\ttype ipv6_addr : ipv6_addr\n\t}\n\tset movers {\n\t\ttype ipv6_addr\n\t}\n}\n";

fn map_elements(ns: &Netns) -> String {
    ns.exec_ok("nft", &["list", "map", "ip6", "m6t", "peer_out"])
        .unwrap()
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn session_adds_replaces_and_removes_map_elements() {
    let ns = Netns::new("m6n-nft").unwrap();
    ns.run_tokio(|| async {
        nft::apply(TABLE).await.unwrap();
        assert!(nft::table_exists(Family::Ip6, "m6t").await.unwrap());
        let mut s = NftSession::start().await.unwrap();
        assert!(s.is_interactive(), "nft -i should work with a pipe here");
        s.map_set(
            Family::Ip6,
            "m6t",
            "peer_out",
            "2001:db8:100::7",
            "2001:db8:a::7",
        )
        .await
        .unwrap();
        // Peer moved: the value is replaced in one transaction.
        s.map_set(
            Family::Ip6,
            "m6t",
            "peer_out",
            "2001:db8:100::7",
            "2001:db8:b::7",
        )
        .await
        .unwrap();
        let listed = s.run("list map ip6 m6t peer_out").await.unwrap();
        assert!(
            listed.contains("2001:db8:100::7 : 2001:db8:b::7"),
            "{listed}"
        );
        assert!(!listed.contains("2001:db8:a::7"), "{listed}");
        // Several at once.
        s.map_set_many(
            Family::Ip6,
            "m6t",
            "peer_out",
            &[
                ("2001:db8:100::8", "2001:db8:a::8"),
                ("2001:db8:100::7", "2001:db8:c::7"),
            ],
        )
        .await
        .unwrap();
        assert!(s
            .map_delete(Family::Ip6, "m6t", "peer_out", "2001:db8:100::8")
            .await
            .unwrap());
        assert!(!s
            .map_delete(Family::Ip6, "m6t", "peer_out", "2001:db8:100::8")
            .await
            .unwrap());
        s.set_add(Family::Ip6, "m6t", "movers", "2001:db8:100::9")
            .await
            .unwrap();
        assert!(s
            .set_delete(Family::Ip6, "m6t", "movers", "2001:db8:100::9")
            .await
            .unwrap());
        // An error carries nft's message, and the session keeps working.
        let e = s
            .run("add element ip6 m6t nosuchmap { ::1 : ::2 }")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, NftError::Command { stderr, .. } if stderr.contains("No such file")),
            "{e}"
        );
        assert!(e.is_not_found());
        let e = s.run("this is not nft").await.unwrap_err();
        assert!(e.to_string().contains("syntax error"), "{e}");
        // Injection attempts are refused before reaching nft.
        assert!(matches!(
            s.map_set(
                Family::Ip6,
                "m6t",
                "peer_out",
                "::1 }; flush ruleset; add element ip6 m6t peer_out { ::1",
                "::2"
            )
            .await,
            Err(NftError::BadArgument(_))
        ));
        assert!(matches!(
            s.run("list ruleset\nflush ruleset").await,
            Err(NftError::BadArgument(_))
        ));
        // Knowledge out of date (someone else deleted the element): still works.
        nft::elements_delete(Family::Ip6, "m6t", "peer_out", &["2001:db8:100::7"])
            .await
            .unwrap();
        s.map_set(
            Family::Ip6,
            "m6t",
            "peer_out",
            "2001:db8:100::7",
            "2001:db8:d::7",
        )
        .await
        .unwrap();
        // ... or added it behind our back.
        nft::map_add(
            Family::Ip6,
            "m6t",
            "peer_out",
            &[("2001:db8:100::20", "2001:db8:a::20")],
        )
        .await
        .unwrap();
        s.map_set(
            Family::Ip6,
            "m6t",
            "peer_out",
            "2001:db8:100::20",
            "2001:db8:e::20",
        )
        .await
        .unwrap();
        // The child died (killed from outside): the next call restarts it.
        let pid = s.pid().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        s.map_set(
            Family::Ip6,
            "m6t",
            "peer_out",
            "2001:db8:100::21",
            "2001:db8:a::21",
        )
        .await
        .unwrap();
        assert_ne!(s.pid().unwrap(), pid);
    })
    .unwrap();
    let m = map_elements(&ns);
    assert!(m.contains("2001:db8:100::7 : 2001:db8:d::7"), "{m}");
    assert!(m.contains("2001:db8:100::20 : 2001:db8:e::20"), "{m}");
    assert!(m.contains("2001:db8:100::21 : 2001:db8:a::21"), "{m}");
    assert!(!m.contains("2001:db8:100::8 "), "{m}");
    ns.run_tokio(|| async {
        assert!(nft::delete_table(Family::Ip6, "m6t").await.unwrap());
        assert!(!nft::delete_table(Family::Ip6, "m6t").await.unwrap());
    })
    .unwrap();
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn apply_is_atomic_and_reports_stderr() {
    let ns = Netns::new("m6n-nfa").unwrap();
    ns.run_tokio(|| async {
        nft::apply(TABLE).await.unwrap();
        // Second command fails: the first must not be applied either.
        let e = nft::apply("add element ip6 m6t peer_out { ::1 : ::2 }\nadd element ip6 m6t nosuch { ::3 : ::4 }\n")
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        let listed = nft::list_table(Family::Ip6, "m6t").await.unwrap();
        assert!(!listed.contains("::1 : ::2"), "{listed}");
        let e = nft::apply("table ip6 broken {").await.unwrap_err();
        assert!(matches!(&e, NftError::Command { stderr, .. } if stderr.contains("Error")), "{e}");
    })
    .unwrap();
    ns.run(|| {
        assert!(nft::apply_blocking("add element ip6 m6t movers { 2001:db8::1 }\n").is_ok());
        assert!(nft::apply_blocking("add element ip6 m6t nosuch { 2001:db8::1 }\n").is_err());
    })
    .unwrap();
    let m = ns
        .exec_ok("nft", &["list", "set", "ip6", "m6t", "movers"])
        .unwrap();
    assert!(m.contains("2001:db8::1"), "{m}");
}

/// Measures per-update latency of the interactive session against one
/// `nft -f -` per update, and prints it (no timed assertion).
#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn session_update_latency_report() {
    let ns = Netns::new("m6n-nfl").unwrap();
    let (inter, oneshot) = ns
        .run_tokio(|| async {
            nft::apply(TABLE).await.unwrap();
            let mut fast = NftSession::start().await.unwrap();
            let mut slow = NftSession::one_shot();
            assert!(!slow.is_interactive());
            let n = 200;
            let mut t_fast = Vec::with_capacity(n);
            for i in 0..n {
                let k = format!("2001:db8:100::{:x}", i % 50);
                let v = format!("2001:db8:{:x}::1", i);
                let t = Instant::now();
                fast.map_set(Family::Ip6, "m6t", "peer_out", &k, &v)
                    .await
                    .unwrap();
                t_fast.push(t.elapsed());
            }
            let m = 40;
            let mut t_slow = Vec::with_capacity(m);
            for i in 0..m {
                let k = format!("2001:db8:200::{:x}", i % 10);
                let v = format!("2001:db8:{:x}::2", i);
                let t = Instant::now();
                slow.map_set(Family::Ip6, "m6t", "peer_out", &k, &v)
                    .await
                    .unwrap();
                t_slow.push(t.elapsed());
            }
            t_fast.sort();
            t_slow.sort();
            (t_fast, t_slow)
        })
        .unwrap();
    let p = |v: &Vec<std::time::Duration>, q: f64| {
        v[((v.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3
    };
    println!(
        "nft element update latency: nft -i session p50 {:.3} ms p99 {:.3} ms ({} updates); nft -f - per update p50 {:.3} ms p99 {:.3} ms ({} updates)",
        p(&inter, 0.5),
        p(&inter, 0.99),
        inter.len(),
        p(&oneshot, 0.5),
        p(&oneshot, 0.99),
        oneshot.len()
    );
    // Correctness of the measured updates: every key holds its last value.
    let m = map_elements(&ns);
    assert!(
        m.contains(&format!("2001:db8:100::31 : 2001:db8:{:x}::1", 199)),
        "{m}"
    );
    assert!(
        m.contains(&format!("2001:db8:200::9 : 2001:db8:{:x}::2", 39)),
        "{m}"
    );
}

/// The handles the daemons move into tasks must be `Send` (and the shared
/// ones `Sync`).
#[test]
fn handles_are_send() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<NftSession>();
    send::<mat6_net::icmp6::NdpReceiver>();
    send_sync::<mat6_net::icmp6::NdpSender>();
    send_sync::<mat6_net::icmp6::PacketSocket>();
    send_sync::<mat6_net::netlink::Netlink>();
    send::<mat6_net::netlink::NetEvents>();
    send_sync::<NftError>();
    send_sync::<mat6_net::icmp6::Icmp6Error>();
    send_sync::<mat6_net::netlink::NetlinkError>();
}
