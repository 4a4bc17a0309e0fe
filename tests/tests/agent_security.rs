//! guest-agent against hostile input in network namespaces: rogue Router
//! Advertisements from a non-allow-listed router, and forged, tampered or
//! replayed peer notifications.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod agent_common;

use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_common::*;
use base64::Engine as _;
use mat6_proto::assertion::SigningKey;
use mat6_proto::binding::Binding;
use mat6_proto::notify::NotifyRepr;

const ROGUE: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x666);
const ROGUE_PFX: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x66, 0, 0, 0, 0, 0);
const ROGUE_MOA: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x66, 0, 0, 0, 0, 1);

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn rogue_ra_creates_no_moa() {
    let mut bed = Bed::new(BedOptions {
        standby: true,
        radvd: false,
    });
    bed.start_cn();
    bed.start_vm();
    bed.wait_ready();
    let before = bed.vm().status().unwrap();

    // Another router on both site links, from its own link-local address.
    for r in [&bed.ra, &bed.rb] {
        r.addr_add("lan", "fe80::666/64", true).unwrap();
    }
    let mac_a = bed.ra.mac_bytes("lan").unwrap();
    let rogue_a = RaSender::start(
        &bed.ra,
        "lan",
        ROGUE,
        ROGUE_PFX,
        mac_a,
        Duration::from_millis(200),
    );
    let rogue_b = RaSender::start(
        &bed.rb,
        "lan",
        ROGUE,
        ROGUE_PFX,
        RB_MAC,
        Duration::from_millis(200),
    );
    // Make the VM solicit, so it would hear the rogue answers too.
    bed.sw.link_down("v1").unwrap();
    bed.sw.link_up("v1").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    drop(rogue_a);
    drop(rogue_b);

    let st = bed.vm().status().unwrap();
    let addrs = bed.vm.ip(&["-6", "addr"]).unwrap();
    assert!(
        !addrs.contains("2001:db8:66:"),
        "rogue prefix configured:\n{addrs}\n{}",
        bed.diag()
    );
    assert_eq!(
        st["status"]["active_moa"], before["status"]["active_moa"],
        "{st}"
    );
    assert_eq!(
        st["status"]["standby_moas"],
        serde_json::json!([moa(PFX_B, VM_MAC1).to_string()]),
        "{st}"
    );
    let dropped = st["status"]["counters"]["ra_not_allowed"].as_u64().unwrap();
    assert!(dropped >= 2, "rogue RAs were not seen and dropped: {st}");
    let b = bed.ims_lookup(VM_HOA).unwrap();
    assert!(b
        .active
        .into_iter()
        .chain(b.standby)
        .all(|m| !m.to_string().starts_with("2001:db8:66:")));
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn send_notify(bed: &Bed, to: Ipv6Addr, assertion: Vec<u8>, nonce: u64) -> Option<Vec<u8>> {
    let bytes = NotifyRepr::Notify { nonce, assertion }.to_vec().unwrap();
    bed.vm
        .run(move || {
            let s = UdpSocket::bind("[::]:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s.send_to(&bytes, SocketAddr::from((to, 7343))).unwrap();
            let mut buf = [0u8; 256];
            s.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
        })
        .unwrap()
}

#[test]
#[ignore = "privileged: run with ./test.sh (root, netns)"]
fn forged_notifications_change_no_peer_binding() {
    let mut bed = Bed::new(BedOptions {
        standby: false,
        radvd: false,
    });
    bed.start_cn();
    bed.start_vm();
    bed.wait_ready();
    let cn_moa = moa(PFX_C, CN_MAC);
    let seq0 = bed.cn().peer_seq(VM_HOA).unwrap();
    let active0 = bed.cn().peer_active(VM_HOA).unwrap();
    let maps0 = bed
        .cn
        .exec_ok("nft", &["list", "map", "ip6", "mat6", "peer_out"])
        .unwrap();
    assert!(maps0.contains(&active0.to_string()), "{maps0}");

    // 1. Signed by a key that is not the IMS's.
    let mallory = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
    let forged = mallory.sign(&Binding {
        hoa: VM_HOA,
        active: Some(ROGUE_MOA),
        standby: vec![],
        seq: seq0 + 1_000_000,
        expires_unix: unix_now() + 600,
        key_id: 0,
    });
    let r1 = send_notify(&bed, cn_moa, forged.encode(), 1);

    // 2. The IMS's own current assertion, replayed (not newer), and the
    //    same assertion with its active MoA rewritten (signature breaks).
    let ca = bed.path("ca.pem");
    let rec = bed
        .ims
        .run_tokio(move || async move {
            let tls = ims_client::TlsSettings::from_ca_pem_file(&ca, "ims.test").unwrap();
            let ctl = ims_client::ControlClient::connect("[::1]:7342".parse().unwrap(), &tls)
                .await
                .unwrap();
            ctl.lookup(VM_HOA).await.unwrap().unwrap()
        })
        .unwrap();
    let genuine = base64::engine::general_purpose::STANDARD
        .decode(rec.assertion_b64.unwrap())
        .unwrap();
    let r2 = send_notify(&bed, cn_moa, genuine.clone(), 2);
    let mut tampered = mat6_proto::assertion::BindingAssertion::decode(&genuine).unwrap();
    tampered.active = Some(ROGUE_MOA);
    tampered.seq += 10;
    let r3 = send_notify(&bed, cn_moa, tampered.encode(), 3);
    // 3. Garbage.
    let r4 = bed
        .vm
        .run(move || {
            let s = UdpSocket::bind("[::]:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            s.send_to(&[1, 1, 0, 200, 9, 9], SocketAddr::from((cn_moa, 7343)))
                .unwrap();
            let mut buf = [0u8; 64];
            s.recv_from(&mut buf).ok().map(|(n, _)| n)
        })
        .unwrap();

    assert!(r1.is_none(), "forged notification was answered");
    assert!(r3.is_none(), "tampered notification was answered");
    assert!(r4.is_none(), "garbage was answered");
    // The replay verifies but is not newer: acked as such, nothing applied.
    let ack = NotifyRepr::parse_bytes(&r2.expect("replayed genuine assertion not acked")).unwrap();
    assert!(
        matches!(
            ack,
            NotifyRepr::Ack {
                nonce: 2,
                status: mat6_proto::notify::AckStatus::NotNewer,
                ..
            }
        ),
        "{ack:?}"
    );

    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(bed.cn().peer_seq(VM_HOA), Some(seq0));
    assert_eq!(bed.cn().peer_active(VM_HOA), Some(active0));
    let maps = bed
        .cn
        .exec_ok("nft", &["list", "map", "ip6", "mat6", "peer_out"])
        .unwrap();
    assert_eq!(maps, maps0);
    let peer_in = bed
        .cn
        .exec_ok("nft", &["list", "map", "ip6", "mat6", "peer_in"])
        .unwrap();
    assert!(!peer_in.contains("2001:db8:66:"), "{peer_in}");
    // Traffic still flows to the real MoA.
    assert!(
        bed.cn
            .exec(
                "ping",
                &[
                    "-6",
                    "-c",
                    "3",
                    "-i",
                    "0.2",
                    "-W",
                    "1",
                    "-I",
                    &CN_HOA.to_string(),
                    &VM_HOA.to_string()
                ]
            )
            .unwrap()
            .status
            .success(),
        "{}",
        bed.diag()
    );
}
