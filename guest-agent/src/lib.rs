//! mat6 guest agent: keeps a VM's Home Address (HoA) reachable while the VM
//! moves between IPv6 networks.
//!
//! The movement-detection and handover logic is the sans-IO
//! [`mat6_proto::mobility::Mobility`] state machine; this crate is the I/O
//! around it: configuration ([`config`]), the nftables translation
//! ([`translate`]), the daemon loop ([`daemon`]) and the status socket
//! ([`status`]). See `README.md` for the design and its limits.

pub mod config;
pub mod daemon;
pub mod status;
pub mod translate;
