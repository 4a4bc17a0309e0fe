//! mat6 wire formats and sans-IO state machines.
//!
//! Nothing in this crate opens a socket, reads a clock or spawns a task: every
//! state machine takes an explicit `now` and hands back actions, so the whole
//! migration sequence can be tested deterministically in microseconds.

pub mod assertion;
pub mod binding;
pub mod control;
pub mod mobility;
pub mod ndp;
pub mod notify;
pub mod update;
