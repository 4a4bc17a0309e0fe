//! Per-VM role state: where the VM is and which of its two NICs is active.
//!
//! The NICs swap roles at every migration, so the state must survive the
//! process: a small JSON file per VM under the configured state directory,
//! replaced atomically (write to a temporary file, then rename).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O error on the state file or directory.
    #[error("state file {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file exists but is not valid state.
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        /// The path.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
    /// The file names a NIC the config does not have.
    #[error("state file {path} names NIC {nic:?}, which vm config does not list")]
    UnknownNic {
        /// The path.
        path: PathBuf,
        /// The NIC id.
        nic: String,
    },
}

/// Role state of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// Site the VM runs at.
    pub site: String,
    /// Id of the active NIC; the other one is the standby.
    pub active: String,
    /// Number of completed migrations.
    pub migrations: u64,
}

impl VmState {
    /// Initial state: the first NIC of the config is active.
    pub fn initial(site: &str, vm: &VmConfig) -> Option<Self> {
        vm.nics.first().map(|n| Self {
            site: site.to_string(),
            active: n.id.clone(),
            migrations: 0,
        })
    }

    /// The standby NIC's id (the one that is not active).
    pub fn standby<'a>(&self, vm: &'a VmConfig) -> Option<&'a str> {
        vm.nics
            .iter()
            .find(|n| n.id != self.active)
            .map(|n| n.id.as_str())
    }

    /// The state after a migration to `site`: roles swapped.
    pub fn swapped(&self, vm: &VmConfig, site: &str) -> Option<Self> {
        self.standby(vm).map(|s| Self {
            site: site.to_string(),
            active: s.to_string(),
            migrations: self.migrations + 1,
        })
    }
}

/// The state file of a VM.
pub fn path(state_dir: &Path, vm: &str) -> PathBuf {
    state_dir.join(format!("{vm}.json"))
}

/// Load the VM's state, or `None` when no migration has recorded one yet.
pub fn load(state_dir: &Path, vm: &str, cfg: &VmConfig) -> Result<Option<VmState>, StateError> {
    let p = path(state_dir, vm);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { path: p, source }),
    };
    let st: VmState = serde_json::from_str(&text).map_err(|source| StateError::Corrupt {
        path: p.clone(),
        source,
    })?;
    if cfg.nic(&st.active).is_none() {
        return Err(StateError::UnknownNic {
            path: p,
            nic: st.active,
        });
    }
    Ok(Some(st))
}

/// Store the VM's state atomically.
pub fn save(state_dir: &Path, vm: &str, st: &VmState) -> Result<(), StateError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let p = path(state_dir, vm);
    let tmp = state_dir.join(format!(".{vm}.json.tmp"));
    let text = serde_json::to_string_pretty(st).map_err(|source| StateError::Corrupt {
        path: p.clone(),
        source,
    })?;
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &p).map_err(io(&p))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::config::NicConfig;

    fn vm() -> VmConfig {
        VmConfig {
            qmp: "/x".into(),
            hoa: "2001:db8::10".parse().unwrap(),
            nics: vec![
                NicConfig {
                    id: "net0".into(),
                    tap: "t0".into(),
                },
                NicConfig {
                    id: "net1".into(),
                    tap: "t1".into(),
                },
            ],
            incoming: "tcp:[::]:1".into(),
            qemu_command: vec![],
            qemu_log: None,
            link_command: vec![],
            standby_bridge: None,
        }
    }

    #[test]
    fn roles_swap_at_every_migration() {
        let vm = vm();
        let s0 = VmState::initial("A", &vm).unwrap();
        assert_eq!(
            (s0.active.as_str(), s0.standby(&vm)),
            ("net0", Some("net1"))
        );
        let s1 = s0.swapped(&vm, "B").unwrap();
        assert_eq!((s1.site.as_str(), s1.active.as_str()), ("B", "net1"));
        let s2 = s1.swapped(&vm, "A").unwrap();
        assert_eq!((s2.active.as_str(), s2.migrations), ("net0", 2));
    }

    #[test]
    fn save_load_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let vm = vm();
        assert_eq!(load(dir.path(), "web1", &vm).unwrap(), None);
        let st = VmState::initial("A", &vm)
            .unwrap()
            .swapped(&vm, "B")
            .unwrap();
        save(dir.path(), "web1", &st).unwrap();
        assert_eq!(load(dir.path(), "web1", &vm).unwrap(), Some(st));

        std::fs::write(path(dir.path(), "web1"), "{not json").unwrap();
        assert!(matches!(
            load(dir.path(), "web1", &vm),
            Err(StateError::Corrupt { .. })
        ));
        std::fs::write(
            path(dir.path(), "web1"),
            r#"{"site":"A","active":"net7","migrations":0}"#,
        )
        .unwrap();
        let err = load(dir.path(), "web1", &vm).unwrap_err().to_string();
        assert!(err.contains("net7"), "{err}");
    }
}
