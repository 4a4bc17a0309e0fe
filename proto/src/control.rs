//! Messages of the IMS TLS control channel.
//!
//! Framing: a 4-byte big-endian length followed by that many bytes of JSON
//! (at most [`MAX_FRAME`]). Each request carries an `id` chosen by the client;
//! every response frame repeats it, so requests may be pipelined. A `watch`
//! request is answered by a stream of frames with the watch's id: the catch-up
//! events (bindings changed after `since_revision`, or the current state of
//! every matching binding when it is absent), one `watch_synced`, then live
//! events. Every event carries the store-wide `revision` at which it was
//! committed; a client that reconnects with `since_revision` = the last
//! revision it saw misses no binding's latest state.
//!
//! Lookups, watch, sites get/list and `info` are open to any TLS client;
//! `admin` requests carry the operator token. `activate_standby` carries the
//! operator token or a *host token*: a narrower credential given to the
//! hypervisor hosts (host-prep) that allows nothing but making one of a HoA's
//! registered standby MoAs its active MoA at the moment the VM resumes.

use std::net::Ipv6Addr;

use ipnetwork::Ipv6Network;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::binding::{Binding, SiteInfo};

/// Largest frame body accepted (bytes).
pub const MAX_FRAME: usize = 16 << 20;

/// Errors of the frame codec.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("control frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The JSON body does not match the message schema.
    #[error("malformed control frame: {0}")]
    Json(#[from] serde_json::Error),
}

/// Which bindings a watch follows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchFilter {
    /// Exact HoAs.
    #[serde(default)]
    pub hoas: Vec<Ipv6Addr>,
    /// HoA prefixes (`::/0` follows everything).
    #[serde(default)]
    pub prefixes: Vec<Ipv6Network>,
}

impl WatchFilter {
    /// True when `hoa` is followed.
    pub fn matches(&self, hoa: &Ipv6Addr) -> bool {
        self.hoas.contains(hoa) || self.prefixes.iter().any(|p| p.contains(*hoa))
    }
}

/// A request frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFrame {
    /// Client-chosen id echoed by the responses.
    pub id: u64,
    /// The request.
    pub req: Request,
}

/// Requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// One binding (answered by `binding`).
    Lookup {
        /// HoA.
        hoa: Ipv6Addr,
    },
    /// Many bindings in one round trip (answered by `lookups`, same order).
    LookupMany {
        /// HoAs.
        hoas: Vec<Ipv6Addr>,
    },
    /// Subscribe to binding changes.
    Watch {
        /// What to follow.
        filter: WatchFilter,
        /// Resume after this revision (absent: start with the current state).
        #[serde(default)]
        since_revision: Option<u64>,
    },
    /// One site (answered by `site`).
    SiteGet {
        /// Site name.
        name: String,
    },
    /// All sites (answered by `sites`).
    SiteList,
    /// The IMS public key and current revision (answered by `info`).
    Info,
    /// Make `moa`, one of `hoa`'s registered standby MoAs, its active MoA
    /// (answered by `activated`). Authorized by the admin token or the host
    /// token. The guest consented to this move when it registered `moa` as a
    /// standby with its own key; the IMS drops the old active MoA, bumps the
    /// seq by one and signs the new binding. Idempotent: when `moa` is already
    /// active the current binding is returned unchanged.
    ActivateStandby {
        /// Admin or host token.
        token: String,
        /// HoA.
        hoa: Ipv6Addr,
        /// The standby MoA to activate.
        moa: Ipv6Addr,
    },
    /// Operator operations.
    Admin {
        /// Admin token.
        token: String,
        /// Operation.
        op: AdminOp,
    },
}

/// Operator operations (require the admin token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminOp {
    /// Provision (or rotate) the update key of a HoA (answered by `keys_added`).
    KeyAdd {
        /// HoA.
        hoa: Ipv6Addr,
    },
    /// Provision many HoAs in one transaction (answered by `keys_added`).
    KeyAddMany {
        /// HoAs.
        hoas: Vec<Ipv6Addr>,
    },
    /// List bindings, optionally under a prefix (answered by `bindings`).
    BindingsList {
        /// Only HoAs inside this prefix.
        #[serde(default)]
        prefix: Option<Ipv6Network>,
        /// At most this many.
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Delete a binding and its key (answered by `ok`).
    BindingDelete {
        /// HoA.
        hoa: Ipv6Addr,
    },
    /// Add or replace a site (answered by `ok`).
    SiteAdd {
        /// The site.
        site: SiteInfo,
    },
    /// Remove a site (answered by `ok`).
    SiteRemove {
        /// Site name.
        name: String,
    },
}

/// A binding as served over the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingRecord {
    /// The binding.
    pub binding: Binding,
    /// Store revision of its last change.
    pub revision: u64,
    /// Base64 [`crate::assertion::BindingAssertion`] signed by the IMS.
    #[serde(default)]
    pub assertion_b64: Option<String>,
}

/// A freshly provisioned key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionedKey {
    /// HoA.
    pub hoa: Ipv6Addr,
    /// Key id.
    pub key_id: u32,
    /// Base64 secret (32 bytes).
    pub secret_b64: String,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WatchChange {
    /// New or updated binding.
    Changed {
        /// The binding and its assertion.
        record: BindingRecord,
    },
    /// Binding deleted by an operator.
    Deleted {
        /// HoA.
        hoa: Ipv6Addr,
    },
}

/// One watch event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchEvent {
    /// Store revision of this change.
    pub revision: u64,
    /// The change.
    pub change: WatchChange,
}

impl WatchEvent {
    /// The HoA concerned.
    pub fn hoa(&self) -> Ipv6Addr {
        match &self.change {
            WatchChange::Changed { record } => record.binding.hoa,
            WatchChange::Deleted { hoa } => *hoa,
        }
    }
}

/// Error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Admin token missing or wrong.
    Unauthorized,
    /// No such HoA/site.
    NotFound,
    /// Invalid argument.
    BadRequest,
    /// Store failure.
    Internal,
    /// The request does not fit the current state (e.g. the MoA to activate
    /// is not one of the HoA's registered standby MoAs).
    Conflict,
}

/// A response frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseFrame {
    /// Id of the request answered.
    pub id: u64,
    /// The response.
    pub resp: Response,
}

/// Responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Answer to `lookup`.
    Binding {
        /// The binding, if any.
        record: Option<BindingRecord>,
    },
    /// Answer to `lookup_many`.
    Lookups {
        /// One entry per requested HoA.
        records: Vec<Option<BindingRecord>>,
    },
    /// Answer to `bindings_list`.
    Bindings {
        /// Bindings.
        records: Vec<BindingRecord>,
    },
    /// Answer to `site_get`.
    Site {
        /// The site, if any.
        site: Option<SiteInfo>,
    },
    /// Answer to `site_list`.
    Sites {
        /// All sites.
        sites: Vec<SiteInfo>,
    },
    /// Answer to `info`.
    Info {
        /// IMS Ed25519 public key, base64.
        public_key_b64: String,
        /// Current store revision.
        revision: u64,
    },
    /// Answer to `key_add` / `key_add_many`.
    KeysAdded {
        /// The new keys.
        keys: Vec<ProvisionedKey>,
    },
    /// Answer to `activate_standby`: the binding now in force and its
    /// signed assertion.
    Activated {
        /// The binding.
        record: BindingRecord,
        /// False when `moa` was already active (nothing changed).
        changed: bool,
    },
    /// Success without data.
    Ok,
    /// A watch event.
    Event {
        /// The event.
        event: WatchEvent,
    },
    /// End of a watch's catch-up; live events follow.
    WatchSynced {
        /// Revision the catch-up covered.
        revision: u64,
    },
    /// Failure.
    Error {
        /// Code.
        code: ErrorCode,
        /// Human-readable message.
        message: String,
    },
}

/// Encodes one frame (length prefix + JSON).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, ControlError> {
    let mut v = vec![0u8; 4];
    serde_json::to_writer(&mut v, msg)?;
    let len = v.len() - 4;
    if len > MAX_FRAME {
        return Err(ControlError::TooLarge(len));
    }
    v[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(v)
}

/// Length of the frame at the start of `buf`, if its prefix is complete.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, ControlError> {
    let Some(p) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
    if len > MAX_FRAME {
        return Err(ControlError::TooLarge(len));
    }
    Ok(Some(len))
}

/// Decodes one frame from the start of `buf`: `Ok(None)` when more bytes are
/// needed, otherwise the message and the bytes consumed.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, ControlError> {
    let Some(len) = frame_len(buf)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((serde_json::from_slice(body)?, 4 + len)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn frames_round_trip() {
        let r = RequestFrame {
            id: 3,
            req: Request::Watch {
                filter: WatchFilter {
                    hoas: vec!["2001:db8::1".parse().unwrap()],
                    prefixes: vec!["2001:db8:100::/48".parse().unwrap()],
                },
                since_revision: Some(17),
            },
        };
        let bytes = encode_frame(&r).unwrap();
        let (back, used): (RequestFrame, usize) = decode_frame(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, r);
        for n in 0..bytes.len() {
            assert!(decode_frame::<RequestFrame>(&bytes[..n]).unwrap().is_none());
        }
        let admin = RequestFrame {
            id: 4,
            req: Request::Admin {
                token: "t".into(),
                op: AdminOp::BindingsList {
                    prefix: None,
                    limit: Some(3),
                },
            },
        };
        let b = encode_frame(&admin).unwrap();
        assert_eq!(decode_frame::<RequestFrame>(&b).unwrap().unwrap().0, admin);
        let act = RequestFrame {
            id: 5,
            req: Request::ActivateStandby {
                token: "h".into(),
                hoa: "2001:db8:ff::1".parse().unwrap(),
                moa: "2001:db8:b::5".parse().unwrap(),
            },
        };
        let b = encode_frame(&act).unwrap();
        let text = std::str::from_utf8(&b[4..]).unwrap();
        assert!(text.contains(r#""request":"activate_standby""#), "{text}");
        assert_eq!(decode_frame::<RequestFrame>(&b).unwrap().unwrap().0, act);
        let e = ResponseFrame {
            id: 5,
            resp: Response::Error {
                code: ErrorCode::Conflict,
                message: "x".into(),
            },
        };
        let b = encode_frame(&e).unwrap();
        assert_eq!(decode_frame::<ResponseFrame>(&b).unwrap().unwrap().0, e);
    }

    #[test]
    fn oversize_and_garbage_rejected() {
        let mut big = vec![0xff, 0xff, 0xff, 0xff];
        big.extend_from_slice(b"{}");
        assert!(matches!(
            decode_frame::<RequestFrame>(&big),
            Err(ControlError::TooLarge(_))
        ));
        let mut junk = 5u32.to_be_bytes().to_vec();
        junk.extend_from_slice(b"{\"a\":");
        assert!(matches!(
            decode_frame::<RequestFrame>(&junk),
            Err(ControlError::Json(_))
        ));
        let unknown = br#"{"id":1,"req":{"request":"lookup","hoa":"::1","extra":1}}"#;
        let mut f = (unknown.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(unknown);
        assert!(decode_frame::<RequestFrame>(&f).is_err());
    }

    #[test]
    fn filter_matches() {
        let f = WatchFilter {
            hoas: vec!["2001:db8::5".parse().unwrap()],
            prefixes: vec!["2001:db8:100::/48".parse().unwrap()],
        };
        assert!(f.matches(&"2001:db8::5".parse().unwrap()));
        assert!(f.matches(&"2001:db8:100:1::9".parse().unwrap()));
        assert!(!f.matches(&"2001:db8:101::9".parse().unwrap()));
    }
}
