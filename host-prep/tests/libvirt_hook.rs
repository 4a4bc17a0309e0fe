//! The libvirt hook (`hooks/qemu`): syntax, and the `migrate begin` filter
//! that swaps the two interfaces' bridges, run on a domain XML as libvirt
//! writes it. (libvirt itself is not installed; `started begin` needs virsh.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn hook() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hooks/qemu")
}

const XML: &str = r#"<domain type='kvm'>
  <name>web1</name>
  <devices>
    <interface type='bridge'>
      <mac address='52:54:00:00:00:01'/>
      <source bridge='br0'/>
      <target dev='web1-n0'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:00:00:02'/>
      <source bridge='br0-nu'/>
      <target dev='web1-n1'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>
"#;

fn run(vm: &str, op: &str, sub: &str, stdin: &str, dir: &std::path::Path) -> (bool, String) {
    let mut c = Command::new("bash")
        .arg(hook())
        .args([vm, op, sub, "-"])
        .env("MAT6_HOOK_CONF", dir.join("hook.conf"))
        .env("MAT6_RUN_DIR", dir.join("run"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The hook does not read stdin for every operation: a broken pipe is fine.
    let _ = c.stdin.take().unwrap().write_all(stdin.as_bytes());
    let o = c.wait_with_output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn hook_is_valid_bash() {
    let o = Command::new("bash").arg("-n").arg(hook()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn migrate_begin_swaps_bridges_of_managed_vms_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hook.conf"),
        format!(
            "MAT6_VMS=\"web1\"\nBRIDGE=br0\nSTANDBY_BRIDGE=br0-nu\nLOG={}/hook.log\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (ok, out) = run("web1", "migrate", "begin", XML, dir.path());
    assert!(ok);
    // NIC 1 (the prepared standby) is now on the real bridge, NIC 0 on the
    // bridge with no uplink; nothing else changed.
    let expect = XML
        .replace("<source bridge='br0'/>", "<source bridge='TMP'/>")
        .replace("<source bridge='br0-nu'/>", "<source bridge='br0'/>")
        .replace("<source bridge='TMP'/>", "<source bridge='br0-nu'/>");
    assert_eq!(out, expect);
    let old = std::fs::read_to_string(dir.path().join("run/web1.old-active")).unwrap();
    assert_eq!(old.trim(), "52:54:00:00:00:01");

    // A VM mat6 does not manage passes through unchanged.
    let (ok, out) = run("other", "migrate", "begin", XML, dir.path());
    assert!(ok);
    assert_eq!(out, XML);
    // Other operations print nothing and succeed.
    let (ok, out) = run("web1", "prepare", "begin", XML, dir.path());
    assert!(ok && out.is_empty());
}

#[test]
fn vm_without_secondary_nic_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hook.conf"),
        format!(
            "MAT6_VMS=\"web1\"\nBRIDGE=br0\nSTANDBY_BRIDGE=br0-nu\nLOG={}/hook.log\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let one = XML.replace("<source bridge='br0-nu'/>", "<source bridge='other'/>");
    let (ok, out) = run("web1", "migrate", "begin", &one, dir.path());
    assert!(ok);
    assert_eq!(out, one);
    let log = std::fs::read_to_string(dir.path().join("hook.log")).unwrap();
    assert!(log.contains("without a secondary NIC"), "{log}");
}
