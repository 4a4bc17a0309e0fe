//! The phase table printed by `host-prep migrate` (and its JSON form, which
//! the e2e test and `./bench.sh migration` parse: keep the keys stable).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whether the migration was prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Cross-subnet with preparation (RA sender, standby MoA, NIC swap).
    Prep,
    /// Cross-subnet without preparation: the guest finds the new network
    /// after resuming by itself.
    Noprep,
}

/// Timings of one migration, all in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// VM name.
    pub vm: String,
    /// Site the VM left.
    pub from: String,
    /// Site the VM went to.
    pub to: String,
    /// Prepared or not.
    pub mode: Mode,
    /// NIC active before the migration.
    pub old_active: String,
    /// NIC active after the migration.
    pub new_active: String,
    /// Preparation (site lookup, bridge, RAs, standby MoA at the IMS).
    pub prep_ms: f64,
    /// Starting the destination QEMU until it listens.
    pub dest_start_ms: f64,
    /// `migrate` command until QEMU stopped the source (pre-copy).
    pub precopy_ms: f64,
    /// Downtime as reported by the source QEMU (`query-migrate`).
    pub qemu_downtime_ms: f64,
    /// Total migration time as reported by the source QEMU.
    pub qemu_total_ms: f64,
    /// Destination `RESUME` until `set_link <old active> off` returned.
    pub switch_ms: f64,
    /// Same, from QEMU's own `RESUME` timestamp (includes the event's
    /// delivery to host-prep); `null` when unknown or not prepared.
    #[serde(default)]
    pub switch_from_qemu_ms: Option<f64>,
    /// Destination `RESUME` until the IMS confirmed the activation of the
    /// standby MoA that the destination sent with the host token; `null`
    /// when not configured, not prepared or failed.
    #[serde(default)]
    pub activate_ms: Option<f64>,
    /// Source clean-up (RA sender stopped, bridge restored, source QEMU quit).
    pub cleanup_ms: f64,
    /// Set when undoing the preparation failed after a successful migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_error: Option<String>,
    /// QMP `migrate` until the switch was done (the migration without the
    /// preparation).
    pub migration_ms: f64,
    /// Start of the command until the switch was done (T_ALL).
    pub total_ms: f64,
    /// RAM bytes transferred.
    pub transferred_bytes: u64,
    /// Dirty-bitmap sync rounds (pre-copy iterations).
    pub dirty_sync_count: u64,
}

/// Milliseconds of a duration, as a float with microsecond resolution.
pub fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            Mode::Prep => "prepared",
            Mode::Noprep => "not prepared",
        };
        writeln!(
            f,
            "migration of {} from {} to {} ({mode}); active NIC {} -> {}",
            self.vm, self.from, self.to, self.old_active, self.new_active
        )?;
        writeln!(f, "{:<34} {:>12}", "phase", "ms")?;
        let rows = [
            ("preparation", Some(self.prep_ms)),
            ("destination start", Some(self.dest_start_ms)),
            ("pre-copy", Some(self.precopy_ms)),
            ("downtime (reported by QEMU)", Some(self.qemu_downtime_ms)),
            ("switch (RESUME -> set_link off)", Some(self.switch_ms)),
            ("  same, from QEMU's RESUME stamp", self.switch_from_qemu_ms),
            ("activate at IMS (RESUME -> answer)", self.activate_ms),
            ("migrate -> switch done", Some(self.migration_ms)),
            ("total (T_ALL)", Some(self.total_ms)),
            ("source clean-up (after T_ALL)", Some(self.cleanup_ms)),
        ];
        for (name, v) in rows {
            match v {
                Some(v) => writeln!(f, "{name:<34} {v:>12.1}")?,
                None => writeln!(f, "{name:<34} {:>12}", "-")?,
            }
        }
        write!(
            f,
            "QEMU total {:.1} ms, {} bytes transferred, {} dirty-sync rounds",
            self.qemu_total_ms, self.transferred_bytes, self.dirty_sync_count
        )?;
        if let Some(e) = &self.cleanup_error {
            write!(f, "\nWARNING: source clean-up incomplete: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn sample() -> MigrationReport {
        MigrationReport {
            vm: "web1".into(),
            from: "A".into(),
            to: "B".into(),
            mode: Mode::Prep,
            old_active: "net0".into(),
            new_active: "net1".into(),
            prep_ms: 412.5,
            dest_start_ms: 80.0,
            precopy_ms: 650.25,
            qemu_downtime_ms: 7.0,
            qemu_total_ms: 660.0,
            switch_ms: 0.4,
            switch_from_qemu_ms: Some(0.6),
            activate_ms: Some(2.5),
            cleanup_ms: 12.0,
            cleanup_error: None,
            migration_ms: 667.0,
            total_ms: 1160.0,
            transferred_bytes: 1 << 20,
            dirty_sync_count: 3,
        }
    }

    #[test]
    fn json_keys_are_stable() {
        let v = serde_json::to_value(sample()).unwrap();
        for key in [
            "prep_ms",
            "precopy_ms",
            "qemu_downtime_ms",
            "switch_ms",
            "activate_ms",
            "total_ms",
            "mode",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["mode"], "prep");
        let back: MigrationReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn table_has_every_phase() {
        let t = sample().to_string();
        for row in [
            "preparation",
            "pre-copy",
            "downtime",
            "switch",
            "activate at IMS",
            "T_ALL",
        ] {
            assert!(t.contains(row), "{t}");
        }
        assert!(t.contains("1160.0"), "{t}");
    }

    #[test]
    fn ms_has_sub_millisecond_resolution() {
        assert_eq!(ms(Duration::from_micros(1500)), 1.5);
    }
}
