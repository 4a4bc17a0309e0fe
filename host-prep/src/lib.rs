//! host-prep: the operator's tool for mat6 live migration.
//!
//! * `prepare` (source host): make the VM's standby NIC's no-uplink bridge look
//!   like the destination link (gateway link-local address and MAC), send
//!   Router Advertisements for the destination prefix there, and wait until
//!   the guest-agent's standby MoA shows up at the IMS.
//! * `receive` (destination host): start the incoming QEMU with the NICs'
//!   attachments swapped, and on `RESUME` turn the old active NIC's carrier off.
//! * `migrate` (source host): the whole sequence, with a phase table.
//!
//! Protocol logic is sans-IO ([`ra`]); the rest is thin I/O glue.

pub mod cli;
pub mod config;
pub mod error;
pub mod host;
pub mod ims;
pub mod migrate;
pub mod neigh;
pub mod prepare;
pub mod qmp;
pub mod ra;
pub mod ra_io;
pub mod receive;
pub mod report;
pub mod state;
pub mod template;

pub use error::Error;
