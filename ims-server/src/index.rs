//! In-memory index of everything committed: serves lookups, key checks and
//! watch snapshots without touching the store.
//!
//! Entries live in a slab (`Vec<Entry>`) addressed by a `HashMap<Ipv6Addr,
//! u32>`, which keeps the per-binding overhead near 200 bytes (1M bindings ≈
//! 220 MB worst case instead of ~400 MB for a map of full entries).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher as _, RandomState};
use std::net::Ipv6Addr;

use mat6_proto::assertion::BindingAssertion;
use mat6_proto::binding::{Binding, SiteInfo};
use mat6_proto::control::{BindingRecord, WatchChange, WatchEvent, WatchFilter};
use mat6_proto::update::SECRET_LEN;

use crate::store::{HoaRecord, Loaded, StoredBinding};

/// One HoA in memory.
#[derive(Debug, Clone)]
pub struct Entry {
    hoa: Ipv6Addr,
    secret: [u8; SECRET_LEN],
    key_id: u32,
    has_binding: bool,
    activate: bool,
    has_active: bool,
    seq: u64,
    expires_unix: u64,
    revision: u64,
    n_standby: u8,
    active: Ipv6Addr,
    /// First standby MoA inline (the common case), the rest on the heap.
    standby0: Ipv6Addr,
    standby_rest: Option<Box<[Ipv6Addr]>>,
    signature: [u8; 64],
}

impl Entry {
    fn from_record(r: &HoaRecord) -> Self {
        let mut e = Entry {
            hoa: r.hoa,
            secret: r.secret,
            key_id: r.key_id,
            has_binding: false,
            activate: false,
            has_active: false,
            seq: 0,
            expires_unix: 0,
            revision: 0,
            n_standby: 0,
            active: Ipv6Addr::UNSPECIFIED,
            standby0: Ipv6Addr::UNSPECIFIED,
            standby_rest: None,
            signature: [0; 64],
        };
        if let Some(b) = &r.binding {
            e.has_binding = true;
            e.activate = b.activate;
            e.has_active = b.binding.active.is_some();
            e.active = b.binding.active.unwrap_or(Ipv6Addr::UNSPECIFIED);
            let sb = &b.binding.standby;
            e.n_standby = sb.len().min(mat6_proto::binding::MAX_STANDBY) as u8;
            e.standby0 = sb.first().copied().unwrap_or(Ipv6Addr::UNSPECIFIED);
            e.standby_rest = (sb.len() > 1).then(|| sb[1..usize::from(e.n_standby)].into());
            e.seq = b.binding.seq;
            e.expires_unix = b.binding.expires_unix;
            e.revision = b.revision;
            e.signature = b.signature;
        }
        e
    }

    /// HoA.
    pub fn hoa(&self) -> Ipv6Addr {
        self.hoa
    }
    /// Key id.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }
    /// Secret.
    pub fn secret(&self) -> &[u8; SECRET_LEN] {
        &self.secret
    }
    /// Last accepted seq (0 before the first update).
    pub fn seq(&self) -> u64 {
        self.seq
    }
    /// Revision of the last binding change (0 when none).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn standby(&self) -> Vec<Ipv6Addr> {
        let mut v = Vec::with_capacity(usize::from(self.n_standby));
        if self.n_standby > 0 {
            v.push(self.standby0);
        }
        if let Some(rest) = &self.standby_rest {
            v.extend_from_slice(rest);
        }
        v
    }

    /// The binding, if one was ever accepted.
    pub fn binding(&self) -> Option<Binding> {
        self.has_binding.then(|| Binding {
            hoa: self.hoa,
            active: self.has_active.then_some(self.active),
            standby: self.standby(),
            seq: self.seq,
            expires_unix: self.expires_unix,
            key_id: self.key_id,
        })
    }

    /// The persistent form.
    pub fn to_record(&self) -> HoaRecord {
        HoaRecord {
            hoa: self.hoa,
            key_id: self.key_id,
            secret: self.secret,
            binding: self.binding().map(|binding| StoredBinding {
                binding,
                activate: self.activate,
                revision: self.revision,
                signature: self.signature,
            }),
        }
    }

    /// Encoded signed assertion of the current binding.
    pub fn assertion(&self) -> Option<Vec<u8>> {
        let b = self.binding()?;
        Some(assertion_of(&b, self.signature).encode())
    }

    /// The control-channel form.
    pub fn record(&self) -> Option<BindingRecord> {
        let b = self.binding()?;
        let a = assertion_of(&b, self.signature).to_b64();
        Some(BindingRecord {
            binding: b,
            revision: self.revision,
            assertion_b64: Some(a),
        })
    }
}

/// Builds the assertion for a binding and its stored signature.
pub fn assertion_of(b: &Binding, signature: [u8; 64]) -> BindingAssertion {
    BindingAssertion {
        hoa: b.hoa,
        active: b.active,
        standby: b.standby.clone(),
        seq: b.seq,
        expires_unix: b.expires_unix,
        signature,
    }
}

/// Watch event for a stored binding.
pub fn changed_event(b: &StoredBinding) -> WatchEvent {
    WatchEvent {
        revision: b.revision,
        change: WatchChange::Changed {
            record: BindingRecord {
                binding: b.binding.clone(),
                revision: b.revision,
                assertion_b64: Some(assertion_of(&b.binding, b.signature).to_b64()),
            },
        },
    }
}

/// The committed state.
#[derive(Debug, Default)]
pub struct Index {
    slots: Vec<Entry>,
    /// Slot numbers, hashed by the slot's HoA (4 bytes per bucket).
    table: hashbrown::HashTable<u32>,
    hasher: RandomState,
    tombstones: HashMap<Ipv6Addr, u64>,
    sites: BTreeMap<String, SiteInfo>,
    /// Highest committed revision.
    pub revision: u64,
    /// Next key id.
    pub next_key_id: u32,
}

impl Index {
    /// An empty index with the given counters.
    pub fn new(revision: u64, next_key_id: u32) -> Self {
        Index {
            revision,
            next_key_id: next_key_id.max(1),
            ..Index::default()
        }
    }

    /// Builds the index from a store's content.
    pub fn from_loaded(l: Loaded) -> Self {
        let mut ix = Index::new(l.revision, l.next_key_id);
        for r in &l.hoas {
            ix.put(r);
        }
        ix.finish_load(l.tombstones, l.sites);
        ix
    }

    /// Adds what a store load returns besides the HoAs.
    pub fn finish_load(&mut self, tombstones: Vec<(Ipv6Addr, u64)>, sites: Vec<SiteInfo>) {
        self.tombstones = tombstones.into_iter().collect();
        self.sites = sites.into_iter().map(|s| (s.name.clone(), s)).collect();
        self.slots.shrink_to_fit();
        self.table.shrink_to_fit(|&i| {
            self.hasher
                .hash_one(self.slots.get(i as usize).map(|e| e.hoa))
        });
    }

    /// Number of HoAs.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn hash(&self, hoa: &Ipv6Addr) -> u64 {
        self.hasher.hash_one(Some(*hoa))
    }

    /// The entry of `hoa`.
    pub fn get(&self, hoa: &Ipv6Addr) -> Option<&Entry> {
        let slots = &self.slots;
        self.table
            .find(self.hash(hoa), |&i| {
                slots.get(i as usize).is_some_and(|e| e.hoa == *hoa)
            })
            .and_then(|&i| slots.get(i as usize))
    }

    /// Inserts or replaces.
    pub fn put(&mut self, r: &HoaRecord) {
        let e = Entry::from_record(r);
        let h = self.hash(&r.hoa);
        let slots = &mut self.slots;
        if let Some(&i) = self.table.find(h, |&i| {
            slots.get(i as usize).is_some_and(|e| e.hoa == r.hoa)
        }) {
            if let Some(slot) = slots.get_mut(i as usize) {
                *slot = e;
            }
            return;
        }
        let idx = slots.len() as u32;
        slots.push(e);
        let hasher = &self.hasher;
        self.table.insert_unique(h, idx, |&i| {
            hasher.hash_one(slots.get(i as usize).map(|e| e.hoa))
        });
    }

    /// Removes `hoa` and records a tombstone.
    pub fn remove(&mut self, hoa: &Ipv6Addr, revision: u64) {
        self.tombstones.insert(*hoa, revision);
        let h = self.hash(hoa);
        let slots = &self.slots;
        let Ok(entry) = self
            .table
            .find_entry(h, |&i| slots.get(i as usize).is_some_and(|e| e.hoa == *hoa))
        else {
            return;
        };
        let (i, _) = entry.remove();
        let i = i as usize;
        let Some(last) = self.slots.len().checked_sub(1) else {
            return;
        };
        self.slots.swap_remove(i);
        if i != last {
            // The former last slot moved to `i`: repoint its table entry.
            let moved = self.slots[i].hoa;
            let hm = self.hash(&moved);
            if let Some(p) = self.table.find_mut(hm, |&j| j as usize == last) {
                *p = i as u32;
            }
        }
    }

    /// All entries (unordered).
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.slots.iter()
    }

    /// Sites.
    pub fn sites(&self) -> &BTreeMap<String, SiteInfo> {
        &self.sites
    }

    /// Inserts or replaces a site.
    pub fn put_site(&mut self, s: SiteInfo) {
        self.sites.insert(s.name.clone(), s);
    }

    /// Removes a site.
    pub fn remove_site(&mut self, name: &str) -> bool {
        self.sites.remove(name).is_some()
    }

    /// What a watcher resuming after `since` (or starting fresh) needs, as
    /// (revision, HoA, deleted) sorted by revision: small keys only, so a
    /// `::/0` watch over 1M bindings does not materialise 1M records at once.
    pub fn catch_up_keys(
        &self,
        filter: &WatchFilter,
        since: Option<u64>,
    ) -> Vec<(u64, Ipv6Addr, bool)> {
        let after = since.unwrap_or(0);
        let mut out = Vec::new();
        let cands: Box<dyn Iterator<Item = &Entry>> =
            if filter.prefixes.is_empty() && filter.hoas.len() < 1024 {
                Box::new(filter.hoas.iter().filter_map(|h| self.get(h)))
            } else {
                Box::new(self.slots.iter())
            };
        for e in cands {
            if e.has_binding && e.revision > after && filter.matches(&e.hoa) {
                out.push((e.revision, e.hoa, false));
            }
        }
        if since.is_some() {
            for (hoa, &rev) in &self.tombstones {
                if rev > after
                    && filter.matches(hoa)
                    && self.get(hoa).is_none_or(|e| e.revision < rev)
                {
                    out.push((rev, *hoa, true));
                }
            }
        }
        out.sort_unstable();
        out.dedup_by_key(|k| k.0);
        out
    }

    /// The event for a catch-up key, if that change is still the current
    /// state (a newer change arrives as a live event instead).
    pub fn catch_up_event(&self, key: &(u64, Ipv6Addr, bool)) -> Option<WatchEvent> {
        let (rev, hoa, deleted) = *key;
        if deleted {
            let current = self.tombstones.get(&hoa) == Some(&rev)
                && self.get(&hoa).is_none_or(|e| e.revision < rev);
            return current.then_some(WatchEvent {
                revision: rev,
                change: WatchChange::Deleted { hoa },
            });
        }
        let e = self.get(&hoa).filter(|e| e.revision == rev)?;
        Some(WatchEvent {
            revision: rev,
            change: WatchChange::Changed {
                record: e.record()?,
            },
        })
    }

    /// Events a watcher resuming after `since` (or starting fresh) needs,
    /// sorted by revision.
    pub fn catch_up(&self, filter: &WatchFilter, since: Option<u64>) -> Vec<WatchEvent> {
        self.catch_up_keys(filter, since)
            .iter()
            .filter_map(|k| self.catch_up_event(k))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn rec(i: u16, rev: u64) -> HoaRecord {
        let hoa = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, i);
        HoaRecord {
            hoa,
            key_id: u32::from(i),
            secret: [i as u8; 32],
            binding: (rev > 0).then(|| StoredBinding {
                binding: Binding {
                    hoa,
                    active: Some(Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, i)),
                    standby: vec![],
                    seq: rev * 10,
                    expires_unix: 100,
                    key_id: u32::from(i),
                },
                activate: true,
                revision: rev,
                signature: [1; 64],
            }),
        }
    }

    #[test]
    fn put_remove_keeps_map_consistent() {
        let mut ix = Index::default();
        for i in 1..=5 {
            ix.put(&rec(i, u64::from(i)));
        }
        ix.remove(&rec(2, 0).hoa, 9);
        assert_eq!(ix.len(), 4);
        assert!(ix.get(&rec(2, 0).hoa).is_none());
        for i in [1u16, 3, 4, 5] {
            assert_eq!(
                ix.get(&rec(i, 0).hoa).unwrap().to_record(),
                rec(i, u64::from(i))
            );
        }
        let f = WatchFilter {
            hoas: vec![],
            prefixes: vec!["2001:db8:100::/48".parse().unwrap()],
        };
        let revs: Vec<u64> = ix
            .catch_up(&f, Some(3))
            .iter()
            .map(|e| e.revision)
            .collect();
        assert_eq!(revs, vec![4, 5, 9]);
        let fresh: Vec<u64> = ix.catch_up(&f, None).iter().map(|e| e.revision).collect();
        assert_eq!(fresh, vec![1, 3, 4, 5]);
        // A change after the snapshot: its old catch-up key yields nothing
        // (the new revision comes as a live event).
        let keys = ix.catch_up_keys(&f, None);
        ix.put(&rec(3, 12));
        let evs: Vec<u64> = keys
            .iter()
            .filter_map(|k| ix.catch_up_event(k))
            .map(|e| e.revision)
            .collect();
        assert_eq!(evs, vec![1, 4, 5]);
    }
}
