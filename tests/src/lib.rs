//! mat6 testbeds: RAII network namespaces, bridges and veths (`netns`), QEMU
//! guests driven over QMP (`qemu`), and the two-site topology used by the
//! end-to-end migration tests (`testbed`). Everything is created under unique
//! names and removed on drop, also when a test fails.

pub mod netns;
pub mod qemu;
pub mod testbed;
