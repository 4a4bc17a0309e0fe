//! This host as host-prep sees it: the config, the local site, and the
//! helpers that resolve a VM's NICs and roles.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::{Config, NicConfig, SiteHost, VmConfig};
use crate::error::Error;
use crate::state::{self, VmState};
use crate::template;

/// Config + where this host is.
#[derive(Debug, Clone)]
pub struct Host {
    /// The configuration.
    pub cfg: Config,
    /// The local site's name.
    pub site: String,
}

/// A VM's two NICs in their current roles.
#[derive(Debug, Clone)]
pub struct Roles<'a> {
    /// The NIC the VM uses now.
    pub active: &'a NicConfig,
    /// The NIC on the no-uplink bridge (to be prepared / to become active).
    pub standby: &'a NicConfig,
    /// The stored (or initial) state.
    pub state: VmState,
}

impl Host {
    /// The host, with the site from `--site` or the config's `local_site`.
    pub fn new(cfg: Config, site: Option<String>) -> Result<Self, Error> {
        let site = site
            .or_else(|| cfg.local_site.clone())
            .ok_or(Error::NoLocalSite)?;
        if !cfg.sites.contains_key(&site) {
            return Err(Error::UnknownLocalSite(site));
        }
        Ok(Self { cfg, site })
    }

    /// This host's bridges.
    pub fn local(&self) -> Result<&SiteHost, Error> {
        self.cfg
            .sites
            .get(&self.site)
            .ok_or_else(|| Error::UnknownLocalSite(self.site.clone()))
    }

    /// The no-uplink bridge of `vm` on this host: its own, else the site's.
    pub fn standby_bridge<'a>(&'a self, vm: &'a VmConfig) -> Result<&'a str, Error> {
        match &vm.standby_bridge {
            Some(b) => Ok(b),
            None => Ok(&self.local()?.standby_bridge),
        }
    }

    /// The VM's config.
    pub fn vm(&self, name: &str) -> Result<&VmConfig, Error> {
        self.cfg
            .vms
            .get(name)
            .ok_or_else(|| Error::UnknownVm(name.to_string()))
    }

    /// The VM's NIC roles: from `active` if given, else the state file, else
    /// the config order (first NIC active). Fails for a VM without two NICs.
    pub fn roles<'a>(
        &self,
        name: &str,
        vm: &'a VmConfig,
        active: Option<&str>,
    ) -> Result<Roles<'a>, Error> {
        let [a, b] = vm.nic_pair(name)?;
        let stored = state::load(&self.cfg.state_dir, name, vm)?;
        let mut st = match stored {
            Some(s) => s,
            None => VmState {
                site: self.site.clone(),
                active: a.id.clone(),
                migrations: 0,
            },
        };
        if let Some(id) = active {
            if vm.nic(id).is_none() {
                return Err(Error::UnknownNic {
                    vm: name.to_string(),
                    nic: id.to_string(),
                });
            }
            st.active = id.to_string();
        }
        let (active, standby) = if st.active == a.id { (a, b) } else { (b, a) };
        Ok(Roles {
            active,
            standby,
            state: st,
        })
    }

    /// Placeholders every template gets: `{vm}`, `{site}`, `{hoa}`.
    pub fn base_vars(&self, name: &str, vm: &VmConfig) -> BTreeMap<String, String> {
        let mut v = BTreeMap::new();
        v.insert("vm".to_string(), name.to_string());
        v.insert("site".to_string(), self.site.clone());
        v.insert("hoa".to_string(), vm.hoa.to_string());
        v
    }

    /// The VM's QMP socket on this host (`{vm}`/`{site}` expanded).
    pub fn qmp_path(&self, name: &str, vm: &VmConfig) -> Result<PathBuf, Error> {
        let vars = self.base_vars(name, vm);
        let p = template::expand(&[vm.qmp.display().to_string()], &vars)?;
        Ok(PathBuf::from(p.concat()))
    }

    /// The `-incoming` URI on this host (`{vm}`/`{site}` expanded).
    pub fn incoming(&self, name: &str, vm: &VmConfig) -> Result<String, Error> {
        let vars = self.base_vars(name, vm);
        Ok(template::expand(std::slice::from_ref(&vm.incoming), &vars)?.concat())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn cfg(dir: &std::path::Path) -> Config {
        let text = format!(
            r#"
state_dir = "{}"
[sites.A]
bridge = "br-a"
standby_bridge = "br-a-nu"
[sites.B]
bridge = "br-b"
standby_bridge = "br-b-nu"
[vms.web1]
qmp = "/run/{{vm}}-{{site}}.qmp"
hoa = "2001:db8:100::10"
incoming = "unix:/run/{{vm}}-{{site}}.mig"
[[vms.web1.nics]]
id = "net0"
tap = "w-n0"
[[vms.web1.nics]]
id = "net1"
tap = "w-n1"
"#,
            dir.display()
        );
        Config::from_toml(&text).unwrap()
    }

    #[test]
    fn site_from_flag_or_config() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            Host::new(cfg(d.path()), None),
            Err(Error::NoLocalSite)
        ));
        assert!(matches!(
            Host::new(cfg(d.path()), Some("Z".into())),
            Err(Error::UnknownLocalSite(_))
        ));
        let h = Host::new(cfg(d.path()), Some("B".into())).unwrap();
        assert_eq!(h.local().unwrap().bridge, "br-b");
        let vm = h.vm("web1").unwrap();
        assert_eq!(
            h.qmp_path("web1", vm).unwrap(),
            PathBuf::from("/run/web1-B.qmp")
        );
        assert_eq!(h.incoming("web1", vm).unwrap(), "unix:/run/web1-B.mig");
        assert!(matches!(h.vm("nope"), Err(Error::UnknownVm(_))));
        assert_eq!(h.standby_bridge(vm).unwrap(), "br-b-nu");
        let mut own = vm.clone();
        own.standby_bridge = Some("web1-nu".into());
        assert_eq!(h.standby_bridge(&own).unwrap(), "web1-nu");
        assert_eq!(h.cfg.all_taps(), ["w-n0", "w-n1"]);
    }

    #[test]
    fn roles_follow_state_and_override() {
        let d = tempfile::tempdir().unwrap();
        let h = Host::new(cfg(d.path()), Some("A".into())).unwrap();
        let vm = h.vm("web1").unwrap();
        let r = h.roles("web1", vm, None).unwrap();
        assert_eq!(
            (r.active.id.as_str(), r.standby.id.as_str()),
            ("net0", "net1")
        );
        let swapped = r.state.swapped(vm, "B").unwrap();
        state::save(&h.cfg.state_dir, "web1", &swapped).unwrap();
        let r = h.roles("web1", vm, None).unwrap();
        assert_eq!(
            (r.active.id.as_str(), r.standby.id.as_str()),
            ("net1", "net0")
        );
        let r = h.roles("web1", vm, Some("net0")).unwrap();
        assert_eq!(r.active.id, "net0");
        assert!(matches!(
            h.roles("web1", vm, Some("net9")),
            Err(Error::UnknownNic { .. })
        ));
    }
}
