//! The netns harness itself: two namespaces joined over a bridge can ping6
//! each other, and every namespace, interface and process is gone after drop,
//! also after a panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use mat6_tests::netns::{netns_exists, unique_ifname, veth_pair, Netns};

const T: Duration = Duration::from_secs(5);

/// Host A and host B, each with a veth to a bridge in a "switch" namespace.
struct Lan {
    a: Netns,
    b: Netns,
    sw: Netns,
    br: String,
    sw_a: String,
}

fn lan() -> Lan {
    let a = Netns::new("m6n-a").unwrap();
    let b = Netns::new("m6n-b").unwrap();
    let sw = Netns::new("m6n-sw").unwrap();
    let br = unique_ifname("m6nbr");
    sw.bridge(&br).unwrap();
    let sw_a = unique_ifname("m6nsa");
    let sw_b = unique_ifname("m6nsb");
    veth_pair(&a, "eth0", &sw, &sw_a).unwrap();
    veth_pair(&b, "eth0", &sw, &sw_b).unwrap();
    sw.bridge_attach(&sw_a, &br).unwrap();
    sw.bridge_attach(&sw_b, &br).unwrap();
    a.addr_add("eth0", "2001:db8:100::a/64", true).unwrap();
    b.addr_add("eth0", "2001:db8:100::b/64", true).unwrap();
    a.link_up("eth0").unwrap();
    b.link_up("eth0").unwrap();
    Lan { a, b, sw, br, sw_a }
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn ping6_over_bridge_and_cleanup() {
    let names;
    let pid;
    {
        let l = lan();
        names = [
            l.a.name().to_owned(),
            l.b.name().to_owned(),
            l.sw.name().to_owned(),
        ];
        for n in &names {
            assert!(netns_exists(n), "{n} should exist");
        }
        assert!(l.sw.link_exists(&l.br));
        l.a.wait_carrier("eth0", true, T).unwrap();
        // nodad: usable at once.
        assert!(l.a.addr_ready("eth0", "2001:db8:100::a"));
        assert!(l.a.ping6("2001:db8:100::b", 2), "ping a -> b over bridge");
        assert!(l.b.ping6("2001:db8:100::a", 2), "ping b -> a over bridge");
        // A namespace we did not connect cannot reach it.
        assert!(!l.sw.ping6("2001:db8:100::a", 1));

        // Carrier: the switch-side end down takes a's carrier away.
        l.sw.set_peer_carrier(&l.sw_a, false).unwrap();
        l.a.wait_carrier("eth0", false, T).unwrap();
        assert!(!l.a.ping6("2001:db8:100::b", 1));
        l.sw.set_peer_carrier(&l.sw_a, true).unwrap();
        l.a.wait_carrier("eth0", true, T).unwrap();
        // The bridge port goes back to forwarding; allow a moment.
        l.a.wait_for("ping after carrier back", T, || {
            l.a.ping6("2001:db8:100::b", 1)
        })
        .unwrap();

        // A process started inside is killed on drop of its guard...
        let mut sleeper = l.a.spawn("sleep", &["600"]).unwrap();
        assert!(sleeper.is_running());
        // `ip netns exec` joins the namespace just after the spawn returns:
        // wait for it (a loaded machine showed the race).
        let sp = sleeper.pid() as i32;
        l.a.wait_for("the sleeper inside the namespace", T, || {
            l.a.pids().contains(&sp)
        })
        .unwrap();
        // ...and one left running is killed when its namespace drops.
        let orphan = l.b.spawn("sleep", &["600"]).unwrap();
        pid = orphan.pid();
        std::mem::forget(orphan);
        drop(sleeper);
        assert!(proc_alive(pid));

        // Sockets opened through run() are inside the namespace.
        let lo_only =
            l.a.run(|| {
                let s = std::net::UdpSocket::bind("[2001:db8:100::a]:0").unwrap();
                s.local_addr().unwrap().port()
            })
            .unwrap();
        assert_ne!(lo_only, 0);
        // The same address does not exist outside the namespace.
        assert!(std::net::UdpSocket::bind("[2001:db8:100::a]:0").is_err());

        let got =
            l.b.run_tokio(|| async {
                let s = tokio::net::UdpSocket::bind("[2001:db8:100::b]:0")
                    .await
                    .unwrap();
                s.send_to(b"hi", "[2001:db8:100::a]:9").await.unwrap()
            })
            .unwrap();
        assert_eq!(got, 2);
    }
    for n in &names {
        assert!(!netns_exists(n), "{n} should be gone after drop");
    }
    // The orphan was reaped by nobody (forgotten), but it must be dead:
    // a zombie or gone.
    assert!(!proc_alive(pid), "process {pid} survived its namespace");
}

/// True if `pid` runs and is not a zombie.
fn proc_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // state is the field after the parenthesised command name.
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn everything_gone_after_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let res = std::thread::spawn(move || {
        let l = lan();
        let guard = l.a.spawn("sleep", &["600"]).unwrap();
        tx.send((
            [
                l.a.name().to_owned(),
                l.b.name().to_owned(),
                l.sw.name().to_owned(),
            ],
            guard.pid(),
        ))
        .unwrap();
        panic!("deliberate panic inside a test body");
    })
    .join();
    assert!(res.is_err(), "the thread must have panicked");
    let (names, pid) = rx.recv().unwrap();
    for n in &names {
        assert!(!netns_exists(n), "{n} should be gone after a panic");
    }
    assert!(!proc_alive(pid), "process {pid} survived the panic");
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn move_link_and_router_namespace() {
    let r = Netns::new_router("m6n-r").unwrap();
    let h = Netns::new("m6n-h").unwrap();
    assert_eq!(r.sysctl_get("net.ipv6.conf.all.forwarding").unwrap(), "1");
    assert_eq!(h.sysctl_get("net.ipv6.conf.all.forwarding").unwrap(), "0");
    let tmp = Netns::new("m6n-t").unwrap();
    veth_pair(&r, "r0", &tmp, "h0").unwrap();
    tmp.move_link("h0", &h).unwrap();
    assert!(!tmp.link_exists("h0"));
    assert!(h.link_exists("h0"));
    r.addr_add("r0", "2001:db8:200::1/64", true).unwrap();
    h.addr_add("h0", "2001:db8:200::2/64", true).unwrap();
    r.link_up("r0").unwrap();
    h.link_up("h0").unwrap();
    h.wait_carrier("h0", true, T).unwrap();
    assert!(h.ping6("2001:db8:200::1", 2));
    let mac = h.mac_bytes("h0").unwrap();
    assert_eq!(h.mac("h0").unwrap().len(), 17);
    assert_ne!(mac, [0u8; 6]);
    h.set_mac("h0", "02:00:5e:00:53:01").unwrap();
    assert_eq!(h.mac_bytes("h0").unwrap(), [2, 0, 0x5e, 0, 0x53, 1]);
    assert!(h.ifindex("h0").unwrap() > 1);
    let ll = h.wait_link_local("h0", T).unwrap();
    assert!(ll.starts_with("fe80:"), "{ll}");
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn child_guard_and_error_messages() {
    use std::io::Read;
    let ns = Netns::new("m6n-c").unwrap();
    // Piped output is readable.
    let mut c = ns
        .spawn_piped("sh", &["-c", "echo hello; echo oops >&2"])
        .unwrap();
    let st = c.wait_timeout(T).unwrap();
    assert!(st.success());
    let mut out = String::new();
    c.child_mut()
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "hello\n");
    // terminate(): SIGTERM first, exit status reported.
    let mut s = ns.spawn("sleep", &["600"]).unwrap();
    let st = s.terminate(T).unwrap();
    assert!(!st.success());
    assert!(!s.is_running());
    // A failing command's error carries the command line and its stderr.
    let e = ns
        .ip(&["link", "set", "dev", "m6nnosuch", "up"])
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("m6nnosuch") && msg.contains(ns.name()),
        "{msg}"
    );
    // The namespace really is separate: only lo inside.
    let links = ns.ip(&["-o", "link", "show"]).unwrap();
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(ns.carrier("lo").unwrap());
    // Interface names stay within IFNAMSIZ and work with ip.
    let br = unique_ifname("m6nbridge-with-a-long-name");
    ns.bridge(&br).unwrap();
    assert!(ns.link_exists(&br));
    ns.tap("m6ntap0").unwrap();
    ns.bridge_attach("m6ntap0", &br).unwrap();
    // A tap nobody opened has no carrier.
    assert!(!ns.carrier("m6ntap0").unwrap());
    ns.bridge_detach("m6ntap0").unwrap();
    ns.link_del("m6ntap0").unwrap();
    assert!(!ns.link_exists("m6ntap0"));
}
