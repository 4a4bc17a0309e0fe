//! Durable storage behind the [`BindingStore`] trait, and its redb backend.
//!
//! The committer is the only writer: it hands a whole batch of operations to
//! [`BindingStore::commit`], which must make all of them durable in one
//! transaction before returning (acks are sent only afterwards).

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use mat6_proto::binding::{Binding, SiteInfo, MAX_STANDBY};
use mat6_proto::update::SECRET_LEN;
use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};

/// One HoA's persistent record: its key and, once updated, its binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoaRecord {
    /// HoA.
    pub hoa: Ipv6Addr,
    /// Update key id.
    pub key_id: u32,
    /// Update key secret.
    pub secret: [u8; SECRET_LEN],
    /// Binding, revision of its last change and the IMS signature over it.
    pub binding: Option<StoredBinding>,
}

/// A committed binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBinding {
    /// The binding (key_id = the key that authenticated it).
    pub binding: Binding,
    /// Whether the update was an activation.
    pub activate: bool,
    /// Store revision.
    pub revision: u64,
    /// Ed25519 signature of the assertion.
    pub signature: [u8; 64],
}

/// One write in a batch.
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// Insert or replace a HoA record.
    PutHoa(Box<HoaRecord>),
    /// Delete a HoA and record a tombstone at `revision`.
    DeleteHoa {
        /// HoA.
        hoa: Ipv6Addr,
        /// Revision of the deletion.
        revision: u64,
    },
    /// Insert or replace a site.
    PutSite(SiteInfo),
    /// Remove a site.
    RemoveSite(String),
}

/// Everything a store holds, read at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    /// All HoA records (empty when streamed to a callback by
    /// [`BindingStore::load_with`]).
    pub hoas: Vec<HoaRecord>,
    /// Deleted HoAs and the revision of their deletion.
    pub tombstones: Vec<(Ipv6Addr, u64)>,
    /// Sites.
    pub sites: Vec<SiteInfo>,
    /// Highest committed revision.
    pub revision: u64,
    /// Next key id to hand out.
    pub next_key_id: u32,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store file cannot be opened/created.
    #[error("cannot open store {path}: {source}")]
    Open {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: redb::Error,
    },
    /// A read or write failed.
    #[error("store {path}: {source}")]
    Db {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: redb::Error,
    },
    /// A stored record does not decode.
    #[error("store {path}: corrupt record ({what})")]
    Corrupt {
        /// Path.
        path: PathBuf,
        /// Which table.
        what: &'static str,
    },
}

/// A durable binding store. Implementations must be atomic per `commit`.
pub trait BindingStore: Send {
    /// Reads the whole state, handing each HoA record to `on_hoa` as it is
    /// read (start-up with 1M bindings must not hold them all twice).
    fn load_with(&self, on_hoa: &mut dyn FnMut(HoaRecord)) -> Result<Loaded, StoreError>;

    /// Reads the whole state into memory.
    fn load(&self) -> Result<Loaded, StoreError> {
        let mut hoas = Vec::new();
        let mut l = self.load_with(&mut |r| hoas.push(r))?;
        l.hoas = hoas;
        Ok(l)
    }
    /// Applies `ops` and the new counters in one durable transaction.
    fn commit(
        &mut self,
        ops: &[StoreOp],
        revision: u64,
        next_key_id: u32,
    ) -> Result<(), StoreError>;
}

const HOAS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("hoas");
const TOMBSTONES: TableDefinition<&[u8], u64> = TableDefinition::new("tombstones");
const SITES: TableDefinition<&str, &str> = TableDefinition::new("sites");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// redb backend (`Durability::Immediate`: a commit is on disk when it returns).
#[derive(Debug)]
pub struct RedbStore {
    db: redb::Database,
    path: PathBuf,
    /// next_key_id as last written to the meta table (None: unknown).
    meta_key_id: Option<u32>,
}

impl RedbStore {
    /// Opens or creates the store at `path` with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let open_err = |e: redb::Error| StoreError::Open {
            path: path.to_owned(),
            source: e,
        };
        // The store holds every HoA's secret: only the owner may read it.
        {
            use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
            let io = |e: std::io::Error| open_err(redb::Error::Io(e));
            if !path.exists() {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
            } else if path.is_file() {
                let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
                if mode & 0o077 != 0 {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                        .map_err(io)?;
                }
            }
        }
        let db = redb::Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| open_err(e.into()))?;
        let s = RedbStore {
            db,
            path: path.to_owned(),
            meta_key_id: None,
        };
        // Make sure every table exists so readers never see "table missing".
        let tx = s.db.begin_write().map_err(|e| open_err(e.into()))?;
        {
            tx.open_table(HOAS).map_err(|e| open_err(e.into()))?;
            tx.open_table(TOMBSTONES).map_err(|e| open_err(e.into()))?;
            tx.open_table(SITES).map_err(|e| open_err(e.into()))?;
            tx.open_table(META).map_err(|e| open_err(e.into()))?;
        }
        tx.commit().map_err(|e| open_err(e.into()))?;
        Ok(s)
    }

    fn db_err(&self) -> impl Fn(redb::Error) -> StoreError + '_ {
        move |source| StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }
}

impl BindingStore for RedbStore {
    fn load_with(&self, on_hoa: &mut dyn FnMut(HoaRecord)) -> Result<Loaded, StoreError> {
        let e = self.db_err();
        let corrupt = |what| StoreError::Corrupt {
            path: self.path.clone(),
            what,
        };
        let tx = self.db.begin_read().map_err(|x| e(x.into()))?;
        let mut out = Loaded::default();
        // Every revision is recorded with the binding or tombstone it
        // produced, so the store revision is their maximum (the meta table is
        // only rewritten when next_key_id changes: one B-tree less per commit).
        let mut max_rev = 0u64;
        let hoas = tx.open_table(HOAS).map_err(|x| e(x.into()))?;
        for item in hoas.iter().map_err(|x| e(x.into()))? {
            let (k, v) = item.map_err(|x| e(x.into()))?;
            let rec = decode_hoa(k.value(), v.value()).ok_or_else(|| corrupt("hoas"))?;
            if let Some(b) = &rec.binding {
                max_rev = max_rev.max(b.revision);
            }
            on_hoa(rec);
        }
        let tomb = tx.open_table(TOMBSTONES).map_err(|x| e(x.into()))?;
        for item in tomb.iter().map_err(|x| e(x.into()))? {
            let (k, v) = item.map_err(|x| e(x.into()))?;
            let a: [u8; 16] = k.value().try_into().map_err(|_| corrupt("tombstones"))?;
            max_rev = max_rev.max(v.value());
            out.tombstones.push((Ipv6Addr::from(a), v.value()));
        }
        let sites = tx.open_table(SITES).map_err(|x| e(x.into()))?;
        for item in sites.iter().map_err(|x| e(x.into()))? {
            let (_, v) = item.map_err(|x| e(x.into()))?;
            out.sites
                .push(serde_json::from_str(v.value()).map_err(|_| corrupt("sites"))?);
        }
        let meta = tx.open_table(META).map_err(|x| e(x.into()))?;
        out.revision = meta
            .get("revision")
            .map_err(|x| e(x.into()))?
            .map_or(0, |v| v.value());
        out.next_key_id = meta
            .get("next_key_id")
            .map_err(|x| e(x.into()))?
            .map_or(1, |v| v.value() as u32);
        out.revision = out.revision.max(max_rev);
        Ok(out)
    }

    fn commit(
        &mut self,
        ops: &[StoreOp],
        revision: u64,
        next_key_id: u32,
    ) -> Result<(), StoreError> {
        let e = self.db_err();
        let tx = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut hoas = tx.open_table(HOAS).map_err(|x| e(x.into()))?;
            // Only the hoas table is touched by plain updates; the others
            // are opened when an operation needs them (less work per commit).
            let mut tomb = None;
            let mut sites = None;
            let mut buf = Vec::with_capacity(256);
            for op in ops {
                match op {
                    StoreOp::PutHoa(r) => {
                        buf.clear();
                        encode_hoa(r, &mut buf);
                        hoas.insert(&r.hoa.octets()[..], &buf[..])
                            .map_err(|x| e(x.into()))?;
                    }
                    StoreOp::DeleteHoa { hoa, revision } => {
                        hoas.remove(&hoa.octets()[..]).map_err(|x| e(x.into()))?;
                        if tomb.is_none() {
                            tomb = Some(tx.open_table(TOMBSTONES).map_err(|x| e(x.into()))?);
                        }
                        if let Some(t) = tomb.as_mut() {
                            t.insert(&hoa.octets()[..], *revision)
                                .map_err(|x| e(x.into()))?;
                        }
                    }
                    StoreOp::PutSite(site) => {
                        let j = serde_json::to_string(site).map_err(|_| StoreError::Corrupt {
                            path: self.path.clone(),
                            what: "site encode",
                        })?;
                        if sites.is_none() {
                            sites = Some(tx.open_table(SITES).map_err(|x| e(x.into()))?);
                        }
                        if let Some(t) = sites.as_mut() {
                            t.insert(site.name.as_str(), j.as_str())
                                .map_err(|x| e(x.into()))?;
                        }
                    }
                    StoreOp::RemoveSite(n) => {
                        if sites.is_none() {
                            sites = Some(tx.open_table(SITES).map_err(|x| e(x.into()))?);
                        }
                        if let Some(t) = sites.as_mut() {
                            t.remove(n.as_str()).map_err(|x| e(x.into()))?;
                        }
                    }
                }
            }
            if self.meta_key_id != Some(next_key_id) {
                let mut meta = tx.open_table(META).map_err(|x| e(x.into()))?;
                meta.insert("revision", revision).map_err(|x| e(x.into()))?;
                meta.insert("next_key_id", u64::from(next_key_id))
                    .map_err(|x| e(x.into()))?;
            }
        }
        tx.commit().map_err(|x| e(x.into()))?;
        drop(e);
        self.meta_key_id = Some(next_key_id);
        Ok(())
    }
}

/// Record layout: key_id u32 | secret 32 | has_binding u8 |
/// [activate u8 | has_active u8 | n u8 | seq u64 | expiry u64 | revision u64 |
///  active 16 | standby n*16 | signature 64]
pub fn encode_hoa(r: &HoaRecord, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.key_id.to_be_bytes());
    out.extend_from_slice(&r.secret);
    match &r.binding {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            out.push(u8::from(b.activate));
            out.push(u8::from(b.binding.active.is_some()));
            let n = b.binding.standby.len().min(MAX_STANDBY);
            out.push(n as u8);
            out.extend_from_slice(&b.binding.seq.to_be_bytes());
            out.extend_from_slice(&b.binding.expires_unix.to_be_bytes());
            out.extend_from_slice(&b.revision.to_be_bytes());
            out.extend_from_slice(&b.binding.active.unwrap_or(Ipv6Addr::UNSPECIFIED).octets());
            for s in b.binding.standby.iter().take(n) {
                out.extend_from_slice(&s.octets());
            }
            out.extend_from_slice(&b.signature);
        }
    }
}

fn take<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
    let (h, t) = b.split_at_checked(N)?;
    *b = t;
    h.try_into().ok()
}

/// Inverse of [`encode_hoa`].
pub fn decode_hoa(key: &[u8], mut v: &[u8]) -> Option<HoaRecord> {
    let hoa = Ipv6Addr::from(<[u8; 16]>::try_from(key).ok()?);
    let key_id = u32::from_be_bytes(take::<4>(&mut v)?);
    let secret = take::<SECRET_LEN>(&mut v)?;
    let [has] = take::<1>(&mut v)?;
    let binding = if has == 0 {
        None
    } else {
        let [activate, has_active, n] = take::<3>(&mut v)?;
        let seq = u64::from_be_bytes(take::<8>(&mut v)?);
        let expires_unix = u64::from_be_bytes(take::<8>(&mut v)?);
        let revision = u64::from_be_bytes(take::<8>(&mut v)?);
        let active = Ipv6Addr::from(take::<16>(&mut v)?);
        let mut standby = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            standby.push(Ipv6Addr::from(take::<16>(&mut v)?));
        }
        let signature = take::<64>(&mut v)?;
        Some(StoredBinding {
            binding: Binding {
                hoa,
                active: (has_active != 0).then_some(active),
                standby,
                seq,
                expires_unix,
                key_id,
            },
            activate: activate != 0,
            revision,
            signature,
        })
    };
    v.is_empty().then_some(HoaRecord {
        hoa,
        key_id,
        secret,
        binding,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn rec(with: bool) -> HoaRecord {
        let hoa: Ipv6Addr = "2001:db8:100::1".parse().unwrap();
        HoaRecord {
            hoa,
            key_id: 3,
            secret: [5; 32],
            binding: with.then(|| StoredBinding {
                binding: Binding {
                    hoa,
                    active: Some("2001:db8:a::1".parse().unwrap()),
                    standby: vec!["2001:db8:b::1".parse().unwrap()],
                    seq: 10,
                    expires_unix: 99,
                    key_id: 3,
                },
                activate: true,
                revision: 4,
                signature: [9; 64],
            }),
        }
    }

    #[test]
    fn record_codec_round_trip() {
        for with in [false, true] {
            let r = rec(with);
            let mut v = Vec::new();
            encode_hoa(&r, &mut v);
            assert_eq!(decode_hoa(&r.hoa.octets(), &v), Some(r));
            for n in 0..v.len() {
                assert_eq!(decode_hoa(&rec(with).hoa.octets(), &v[..n]), None);
            }
        }
    }

    #[test]
    fn redb_commit_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let mut s = RedbStore::open(&path, 1 << 20).unwrap();
            let site: SiteInfo = serde_json::from_str(
                r#"{"name":"b","prefix":"2001:db8:b::/64","gateway_ll":"fe80::1","gateway_mac":"02:00:00:00:00:01"}"#,
            )
            .unwrap();
            s.commit(
                &[
                    StoreOp::PutHoa(Box::new(rec(true))),
                    StoreOp::PutSite(site),
                    StoreOp::DeleteHoa {
                        hoa: "2001:db8::9".parse().unwrap(),
                        revision: 5,
                    },
                ],
                5,
                4,
            )
            .unwrap();
            // Same next_key_id: the meta table is not rewritten, the revision
            // is recovered from the records.
            let mut r = rec(true);
            r.hoa = "2001:db8:100::2".parse().unwrap();
            if let Some(b) = r.binding.as_mut() {
                b.binding.hoa = r.hoa;
                b.revision = 6;
            }
            s.commit(&[StoreOp::PutHoa(Box::new(r))], 6, 4).unwrap();
        }
        let s = RedbStore::open(&path, 1 << 20).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "store holds secrets");
        let l = s.load().unwrap();
        assert_eq!(l.hoas.len(), 2);
        assert_eq!(l.hoas[0], rec(true));
        assert_eq!(l.revision, 6);
        assert_eq!(l.next_key_id, 4);
        assert_eq!(l.sites.len(), 1);
        assert_eq!(l.tombstones, vec![("2001:db8::9".parse().unwrap(), 5)]);
    }
}
