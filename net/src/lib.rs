//! Host networking helpers shared by guest-agent and host-prep: netlink
//! (links, addresses, routes, neighbours, link events), nftables, and raw
//! ICMPv6 / packet sockets. All of it is I/O glue; protocol logic lives in
//! `mat6-proto`.

pub mod bridge;
pub mod icmp6;
pub mod netlink;
pub mod nft;
pub mod prio;
pub mod sysctl;
