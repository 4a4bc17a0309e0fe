//! The one-datagram binding update and its ack (UDP, HMAC-SHA-256).
//!
//! Update layout (integers big-endian):
//!
//! ```text
//!  0      version (1)
//!  1      type (1 = update)
//!  2      flags: bit 0 = ACTIVATE (a switch; otherwise a standby/refresh),
//!                bit 1 = active MoA present
//!  3      number of standby MoAs (<= MAX_STANDBY)
//!  4..8   key id
//!  8..16  seq
//! 16..32  HoA
//! 32..36  lifetime, seconds
//!  ..     active MoA (16, if flag) then standby MoAs (16 each)
//!  ..     HMAC-SHA-256 tag (32) over every byte before it, per-HoA secret
//! ```
//!
//! Ack layout:
//!
//! ```text
//!  0      version (1)
//!  1      type (2 = ack)
//!  2      status (0 accepted, 1 stale seq, 2 refused by policy)
//!  3      reserved, 0
//!  4..8   key id
//!  8..16  seq being acked
//! 16..24  last accepted seq for the HoA
//! 24..40  HoA
//! 40..42  assertion length (0 = none)
//!  ..     IMS-signed binding assertion (see `assertion`)
//!  ..     HMAC-SHA-256 tag (32) over every byte before it, same secret
//! ```
//!
//! Untrusted bytes only go through [`UpdatePacket::new_checked`] /
//! [`AckPacket::new_checked`]; tags are compared in constant time by
//! `ring::hmac::verify`.
//!
//! [`UpdateClient`] is the sans-IO sender: it retransmits with exponential
//! backoff on an explicit clock and authenticates the ack.

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use ring::hmac;

use crate::assertion::addr16;
use crate::binding::MAX_STANDBY;

/// Protocol version.
pub const VERSION: u8 = 1;
/// Type byte of an update.
pub const TYPE_UPDATE: u8 = 1;
/// Type byte of an ack.
pub const TYPE_ACK: u8 = 2;
/// Length of the HMAC-SHA-256 tag.
pub const TAG_LEN: usize = 32;
/// Length of a per-HoA secret.
pub const SECRET_LEN: usize = 32;
/// Fixed update header length.
pub const UPDATE_HEADER_LEN: usize = 36;
/// Fixed ack header length.
pub const ACK_HEADER_LEN: usize = 42;
/// Largest update datagram.
pub const MAX_UPDATE_LEN: usize = UPDATE_HEADER_LEN + 16 * (1 + MAX_STANDBY) + TAG_LEN;
/// Largest ack datagram.
pub const MAX_ACK_LEN: usize = ACK_HEADER_LEN + crate::assertion::MAX_LEN + TAG_LEN;

const FLAG_ACTIVATE: u8 = 0x01;
const FLAG_HAS_ACTIVE: u8 = 0x02;

/// Errors of the update/ack wire formats.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    /// Wrong length for the header and counts.
    #[error("datagram has the wrong length ({0} bytes)")]
    BadLength(usize),
    /// Unknown version.
    #[error("unsupported version {0}")]
    BadVersion(u8),
    /// Type byte not the expected one.
    #[error("unexpected message type {0}")]
    BadType(u8),
    /// Unknown flags, reserved bits set, or too many standby MoAs.
    #[error("malformed header")]
    Malformed,
    /// HMAC tag mismatch.
    #[error("authentication tag does not verify")]
    BadTag,
    /// Output buffer too small.
    #[error("buffer too small")]
    Exhausted,
    /// A key string could not be parsed.
    #[error("invalid update key: expected KEY_ID:BASE64_SECRET with a 32-byte secret")]
    BadKey,
}

/// A per-HoA update key: the id the IMS knows it by and the shared secret.
#[derive(Clone, PartialEq, Eq)]
pub struct UpdateKey {
    /// Key id carried in every update.
    pub key_id: u32,
    /// HMAC-SHA-256 secret.
    pub secret: [u8; SECRET_LEN],
}

impl std::fmt::Debug for UpdateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateKey")
            .field("key_id", &self.key_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl UpdateKey {
    /// Generates a random secret.
    pub fn generate(key_id: u32) -> Result<Self, UpdateError> {
        use ring::rand::SecureRandom as _;
        let mut secret = [0u8; SECRET_LEN];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| UpdateError::BadKey)?;
        Ok(UpdateKey { key_id, secret })
    }

    /// The ring HMAC key.
    pub fn hmac_key(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.secret)
    }

    /// The secret in base64.
    pub fn secret_b64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.secret)
    }

    /// Builds a key from an id and a base64 secret.
    pub fn from_b64(key_id: u32, secret_b64: &str) -> Result<Self, UpdateError> {
        let v = base64::engine::general_purpose::STANDARD
            .decode(secret_b64.trim())
            .map_err(|_| UpdateError::BadKey)?;
        let secret: [u8; SECRET_LEN] = v.try_into().map_err(|_| UpdateError::BadKey)?;
        Ok(UpdateKey { key_id, secret })
    }

    /// Formats as `KEY_ID:BASE64` (the key-file format).
    pub fn to_key_string(&self) -> String {
        format!("{}:{}", self.key_id, self.secret_b64())
    }

    /// Parses `KEY_ID:BASE64`.
    pub fn from_key_string(s: &str) -> Result<Self, UpdateError> {
        let (id, sec) = s.trim().split_once(':').ok_or(UpdateError::BadKey)?;
        let key_id = id.trim().parse().map_err(|_| UpdateError::BadKey)?;
        Self::from_b64(key_id, sec)
    }
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The fixed header of an update or ack: present, our version, the expected type.
fn checked_header(buf: &[u8], header_len: usize, msg_type: u8) -> Result<&[u8], UpdateError> {
    let h = buf
        .get(..header_len)
        .ok_or(UpdateError::BadLength(buf.len()))?;
    if h[0] != VERSION {
        return Err(UpdateError::BadVersion(h[0]));
    }
    if h[1] != msg_type {
        return Err(UpdateError::BadType(h[1]));
    }
    Ok(h)
}

/// Constant-time check of the trailing HMAC tag of a checked datagram (its
/// constructor guaranteed at least `TAG_LEN` bytes after the header).
fn verify_tag(buf: &[u8], key: &hmac::Key) -> Result<(), UpdateError> {
    let split = buf.len() - TAG_LEN;
    hmac::verify(key, &buf[..split], &buf[split..]).map_err(|_| UpdateError::BadTag)
}

/// Checked view of an update datagram: lengths and header validated, tag not
/// yet verified.
#[derive(Debug, Clone, Copy)]
pub struct UpdatePacket<'a> {
    buf: &'a [u8],
}

impl<'a> UpdatePacket<'a> {
    /// Validates the header and exact length.
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, UpdateError> {
        let h = checked_header(buf, UPDATE_HEADER_LEN, TYPE_UPDATE)?;
        let flags = h[2];
        let n = usize::from(h[3]);
        if flags & !(FLAG_ACTIVATE | FLAG_HAS_ACTIVE) != 0 || n > MAX_STANDBY {
            return Err(UpdateError::Malformed);
        }
        let expect =
            UPDATE_HEADER_LEN + 16 * (usize::from(flags & FLAG_HAS_ACTIVE != 0) + n) + TAG_LEN;
        if buf.len() != expect {
            return Err(UpdateError::BadLength(buf.len()));
        }
        Ok(UpdatePacket { buf })
    }

    /// Key id (unauthenticated until [`UpdatePacket::verify`]).
    pub fn key_id(&self) -> u32 {
        be_u32(&self.buf[4..8])
    }

    /// HoA (unauthenticated until [`UpdatePacket::verify`]).
    pub fn hoa(&self) -> Ipv6Addr {
        addr16(&self.buf[16..32])
    }

    /// Seq (unauthenticated until [`UpdatePacket::verify`]).
    pub fn seq(&self) -> u64 {
        be_u64(&self.buf[8..16])
    }

    /// Verifies the tag in constant time.
    pub fn verify(&self, key: &hmac::Key) -> Result<(), UpdateError> {
        verify_tag(self.buf, key)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }
}

/// Semantic content of an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRepr {
    /// Key id.
    pub key_id: u32,
    /// Sequence number (strictly increasing per HoA).
    pub seq: u64,
    /// Home Address.
    pub hoa: Ipv6Addr,
    /// Requested lifetime in seconds.
    pub lifetime_s: u32,
    /// True for a switch (activation); false for a standby registration or refresh.
    pub activate: bool,
    /// Active MoA.
    pub active: Option<Ipv6Addr>,
    /// Standby MoAs.
    pub standby: Vec<Ipv6Addr>,
}

impl UpdateRepr {
    /// Parses a checked packet (call [`UpdatePacket::verify`] first for
    /// untrusted input).
    pub fn parse(p: &UpdatePacket<'_>) -> Self {
        let b = p.buf;
        let flags = b[2];
        let has_active = flags & FLAG_HAS_ACTIVE != 0;
        let mut addrs = b[UPDATE_HEADER_LEN..b.len() - TAG_LEN]
            .chunks_exact(16)
            .map(addr16);
        let active = if has_active { addrs.next() } else { None };
        UpdateRepr {
            key_id: p.key_id(),
            seq: p.seq(),
            hoa: p.hoa(),
            lifetime_s: be_u32(&b[32..36]),
            activate: flags & FLAG_ACTIVATE != 0,
            active,
            standby: addrs.collect(),
        }
    }

    /// Checks, verifies with `key` and parses in one step.
    pub fn parse_verified(buf: &[u8], key: &hmac::Key) -> Result<Self, UpdateError> {
        let p = UpdatePacket::new_checked(buf)?;
        p.verify(key)?;
        Ok(Self::parse(&p))
    }

    /// Bytes on the wire.
    pub fn buffer_len(&self) -> usize {
        UPDATE_HEADER_LEN + 16 * (usize::from(self.active.is_some()) + self.standby.len()) + TAG_LEN
    }

    /// Writes the datagram, tag included.
    pub fn emit(&self, key: &hmac::Key, buf: &mut [u8]) -> Result<usize, UpdateError> {
        if self.standby.len() > MAX_STANDBY {
            return Err(UpdateError::Malformed);
        }
        let len = self.buffer_len();
        let out = buf.get_mut(..len).ok_or(UpdateError::Exhausted)?;
        out[0] = VERSION;
        out[1] = TYPE_UPDATE;
        out[2] = (if self.activate { FLAG_ACTIVATE } else { 0 })
            | (if self.active.is_some() {
                FLAG_HAS_ACTIVE
            } else {
                0
            });
        out[3] = self.standby.len() as u8;
        out[4..8].copy_from_slice(&self.key_id.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..32].copy_from_slice(&self.hoa.octets());
        out[32..36].copy_from_slice(&self.lifetime_s.to_be_bytes());
        let mut off = UPDATE_HEADER_LEN;
        for a in self.active.iter().chain(self.standby.iter()) {
            out[off..off + 16].copy_from_slice(&a.octets());
            off += 16;
        }
        let tag = hmac::sign(key, &out[..off]);
        out[off..off + TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(len)
    }

    /// Emits into a fresh vector.
    pub fn to_vec(&self, key: &hmac::Key) -> Result<Vec<u8>, UpdateError> {
        let mut v = vec![0u8; self.buffer_len()];
        self.emit(key, &mut v)?;
        Ok(v)
    }
}

/// Ack status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStatus {
    /// Committed durably; the ack carries the assertion.
    Accepted,
    /// seq <= last accepted; the ack carries the last accepted seq.
    StaleSeq,
    /// Authenticated but refused by policy (e.g. lifetime too long).
    Refused,
    /// A status this version does not know.
    Other(u8),
}

impl AckStatus {
    fn to_u8(self) -> u8 {
        match self {
            AckStatus::Accepted => 0,
            AckStatus::StaleSeq => 1,
            AckStatus::Refused => 2,
            AckStatus::Other(v) => v,
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            0 => AckStatus::Accepted,
            1 => AckStatus::StaleSeq,
            2 => AckStatus::Refused,
            v => AckStatus::Other(v),
        }
    }
}

/// Checked view of an ack datagram.
#[derive(Debug, Clone, Copy)]
pub struct AckPacket<'a> {
    buf: &'a [u8],
}

impl<'a> AckPacket<'a> {
    /// Validates header and exact length.
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, UpdateError> {
        let h = checked_header(buf, ACK_HEADER_LEN, TYPE_ACK)?;
        if h[3] != 0 {
            return Err(UpdateError::Malformed);
        }
        let alen = usize::from(u16::from_be_bytes([h[40], h[41]]));
        if alen > crate::assertion::MAX_LEN {
            return Err(UpdateError::Malformed);
        }
        if buf.len() != ACK_HEADER_LEN + alen + TAG_LEN {
            return Err(UpdateError::BadLength(buf.len()));
        }
        Ok(AckPacket { buf })
    }

    /// Verifies the tag in constant time.
    pub fn verify(&self, key: &hmac::Key) -> Result<(), UpdateError> {
        verify_tag(self.buf, key)
    }
}

/// Semantic content of an ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRepr {
    /// Status.
    pub status: AckStatus,
    /// Key id of the update.
    pub key_id: u32,
    /// The seq being acknowledged.
    pub seq: u64,
    /// The HoA's last accepted seq after processing.
    pub last_accepted_seq: u64,
    /// HoA.
    pub hoa: Ipv6Addr,
    /// Encoded [`crate::assertion::BindingAssertion`] (when accepted).
    pub assertion: Option<Vec<u8>>,
}

impl AckRepr {
    /// Parses a checked packet.
    pub fn parse(p: &AckPacket<'_>) -> Self {
        let b = p.buf;
        let alen = usize::from(u16::from_be_bytes([b[40], b[41]]));
        AckRepr {
            status: AckStatus::from_u8(b[2]),
            key_id: be_u32(&b[4..8]),
            seq: be_u64(&b[8..16]),
            last_accepted_seq: be_u64(&b[16..24]),
            hoa: addr16(&b[24..40]),
            assertion: (alen > 0).then(|| b[ACK_HEADER_LEN..ACK_HEADER_LEN + alen].to_vec()),
        }
    }

    /// Checks, verifies and parses.
    pub fn parse_verified(buf: &[u8], key: &hmac::Key) -> Result<Self, UpdateError> {
        let p = AckPacket::new_checked(buf)?;
        p.verify(key)?;
        Ok(Self::parse(&p))
    }

    /// Bytes on the wire.
    pub fn buffer_len(&self) -> usize {
        ACK_HEADER_LEN + self.assertion.as_ref().map_or(0, Vec::len) + TAG_LEN
    }

    /// Writes the ack, tag included.
    pub fn emit(&self, key: &hmac::Key, buf: &mut [u8]) -> Result<usize, UpdateError> {
        let alen = self.assertion.as_ref().map_or(0, Vec::len);
        if alen > crate::assertion::MAX_LEN {
            return Err(UpdateError::Malformed);
        }
        let len = self.buffer_len();
        let out = buf.get_mut(..len).ok_or(UpdateError::Exhausted)?;
        out[0] = VERSION;
        out[1] = TYPE_ACK;
        out[2] = self.status.to_u8();
        out[3] = 0;
        out[4..8].copy_from_slice(&self.key_id.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..24].copy_from_slice(&self.last_accepted_seq.to_be_bytes());
        out[24..40].copy_from_slice(&self.hoa.octets());
        out[40..42].copy_from_slice(&(alen as u16).to_be_bytes());
        if let Some(a) = &self.assertion {
            out[ACK_HEADER_LEN..ACK_HEADER_LEN + alen].copy_from_slice(a);
        }
        let split = ACK_HEADER_LEN + alen;
        let tag = hmac::sign(key, &out[..split]);
        out[split..].copy_from_slice(tag.as_ref());
        Ok(len)
    }

    /// Emits into a fresh vector.
    pub fn to_vec(&self, key: &hmac::Key) -> Result<Vec<u8>, UpdateError> {
        let mut v = vec![0u8; self.buffer_len()];
        self.emit(key, &mut v)?;
        Ok(v)
    }
}

/// Retransmission policy of [`UpdateClient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetransmitPolicy {
    /// First retransmission timeout.
    pub initial_rto: Duration,
    /// Cap of the exponential backoff.
    pub max_rto: Duration,
    /// Total transmissions before giving up.
    pub max_attempts: u32,
}

impl Default for RetransmitPolicy {
    fn default() -> Self {
        RetransmitPolicy {
            initial_rto: Duration::from_millis(50),
            max_rto: Duration::from_secs(2),
            max_attempts: 8,
        }
    }
}

/// Final result of one update exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Accepted and durable; the ack (with its assertion).
    Accepted(AckRepr),
    /// The IMS already has `last_accepted` >= our seq.
    Stale {
        /// The HoA's last accepted seq at the IMS.
        last_accepted: u64,
    },
    /// Refused by policy (or an unknown status).
    Refused(AckStatus),
    /// No authenticated ack after all attempts.
    TimedOut {
        /// Transmissions made.
        attempts: u32,
    },
}

#[derive(Debug, Clone)]
enum Phase {
    Sending { sent: u32, next_at: Instant },
    Done(UpdateOutcome),
}

/// Sans-IO update sender: one datagram, retransmitted with exponential
/// backoff until an authenticated ack for this HoA and seq arrives.
///
/// Drive it with [`UpdateClient::poll_transmit`] (send what it returns),
/// [`UpdateClient::handle_datagram`] (every datagram received from the IMS)
/// and [`UpdateClient::poll_timeout`] (when to call `poll_transmit` again).
#[derive(Debug, Clone)]
pub struct UpdateClient {
    key: hmac::Key,
    repr: UpdateRepr,
    datagram: Vec<u8>,
    policy: RetransmitPolicy,
    rto: Duration,
    phase: Phase,
}

impl UpdateClient {
    /// Prepares the exchange; the first transmission is due at `now`.
    pub fn new(
        key: &UpdateKey,
        repr: UpdateRepr,
        policy: RetransmitPolicy,
        now: Instant,
    ) -> Result<Self, UpdateError> {
        let hk = key.hmac_key();
        let datagram = repr.to_vec(&hk)?;
        Ok(UpdateClient {
            key: hk,
            repr,
            datagram,
            rto: policy.initial_rto,
            policy,
            phase: Phase::Sending {
                sent: 0,
                next_at: now,
            },
        })
    }

    /// The update being sent.
    pub fn repr(&self) -> &UpdateRepr {
        &self.repr
    }

    /// Returns the datagram when a (re)transmission is due at `now`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<&[u8]> {
        let Phase::Sending { sent, next_at } = &mut self.phase else {
            return None;
        };
        if now < *next_at {
            return None;
        }
        if *sent >= self.policy.max_attempts {
            let attempts = *sent;
            self.phase = Phase::Done(UpdateOutcome::TimedOut { attempts });
            return None;
        }
        *sent += 1;
        *next_at = now + self.rto;
        self.rto = (self.rto * 2).min(self.policy.max_rto);
        Some(&self.datagram)
    }

    /// When `poll_transmit` must be called next (None when done).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Sending { next_at, .. } => Some(*next_at),
            Phase::Done(_) => None,
        }
    }

    /// Feeds a received datagram. Anything that is not an authenticated ack
    /// for this HoA, key and seq is ignored. Returns true when it completed
    /// the exchange.
    pub fn handle_datagram(&mut self, bytes: &[u8], _now: Instant) -> bool {
        if matches!(self.phase, Phase::Done(_)) {
            return false;
        }
        let Ok(ack) = AckRepr::parse_verified(bytes, &self.key) else {
            return false;
        };
        if ack.hoa != self.repr.hoa || ack.seq != self.repr.seq || ack.key_id != self.repr.key_id {
            return false;
        }
        // A retransmission whose first ack was lost is answered "stale" with
        // last_accepted == our seq and the current assertion: that is our
        // own update, durably accepted.
        let ours = ack.status == AckStatus::StaleSeq
            && ack.last_accepted_seq == self.repr.seq
            && ack.assertion.as_deref().is_some_and(|a| {
                crate::assertion::BindingAssertion::decode(a).is_ok_and(|a| {
                    a.seq == self.repr.seq
                        && a.active == self.repr.active
                        && a.standby == self.repr.standby
                })
            });
        let outcome = match ack.status {
            AckStatus::Accepted => UpdateOutcome::Accepted(ack),
            _ if ours => UpdateOutcome::Accepted(ack),
            AckStatus::StaleSeq => UpdateOutcome::Stale {
                last_accepted: ack.last_accepted_seq,
            },
            s => UpdateOutcome::Refused(s),
        };
        self.phase = Phase::Done(outcome);
        true
    }

    /// The outcome once done.
    pub fn outcome(&self) -> Option<&UpdateOutcome> {
        match &self.phase {
            Phase::Done(o) => Some(o),
            Phase::Sending { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn key() -> UpdateKey {
        UpdateKey {
            key_id: 9,
            secret: [7u8; 32],
        }
    }

    fn repr() -> UpdateRepr {
        UpdateRepr {
            key_id: 9,
            seq: 1000,
            hoa: "2001:db8:100::1".parse().unwrap(),
            lifetime_s: 600,
            activate: true,
            active: Some("2001:db8:b::10".parse().unwrap()),
            standby: vec!["2001:db8:a::10".parse().unwrap()],
        }
    }

    #[test]
    fn update_round_trip_and_forgeries() {
        let k = key().hmac_key();
        let r = repr();
        let bytes = r.to_vec(&k).unwrap();
        assert_eq!(bytes.len(), r.buffer_len());
        assert_eq!(UpdateRepr::parse_verified(&bytes, &k).unwrap(), r);
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(UpdateRepr::parse_verified(&b, &k).is_err(), "bit {i}");
        }
        for n in 0..bytes.len() {
            assert!(UpdateRepr::parse_verified(&bytes[..n], &k).is_err());
        }
        let other = UpdateKey {
            key_id: 9,
            secret: [8u8; 32],
        };
        assert_eq!(
            UpdateRepr::parse_verified(&bytes, &other.hmac_key()),
            Err(UpdateError::BadTag)
        );
        let mut none = r.clone();
        none.active = None;
        none.standby.clear();
        none.activate = false;
        let b2 = none.to_vec(&k).unwrap();
        assert_eq!(UpdateRepr::parse_verified(&b2, &k).unwrap(), none);
    }

    #[test]
    fn ack_round_trip() {
        let k = key().hmac_key();
        let a = AckRepr {
            status: AckStatus::StaleSeq,
            key_id: 9,
            seq: 5,
            last_accepted_seq: 7,
            hoa: "2001:db8:100::1".parse().unwrap(),
            assertion: Some(vec![1, 2, 3]),
        };
        let bytes = a.to_vec(&k).unwrap();
        assert_eq!(AckRepr::parse_verified(&bytes, &k).unwrap(), a);
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(AckRepr::parse_verified(&b, &k).is_err(), "bit {i}");
        }
        // An update is never mistaken for an ack and vice versa.
        let u = repr().to_vec(&k).unwrap();
        assert!(AckRepr::parse_verified(&u, &k).is_err());
        assert!(UpdateRepr::parse_verified(&bytes, &k).is_err());
    }

    #[test]
    fn key_string_round_trip() {
        let k = UpdateKey::generate(77).unwrap();
        let s = k.to_key_string();
        assert_eq!(UpdateKey::from_key_string(&s).unwrap(), k);
        assert!(UpdateKey::from_key_string("77").is_err());
        assert!(UpdateKey::from_key_string("x:AAAA").is_err());
        assert!(!format!("{k:?}").contains(&k.secret_b64()));
    }

    #[test]
    fn client_backoff_and_timeout() {
        let t0 = Instant::now();
        let policy = RetransmitPolicy {
            initial_rto: Duration::from_millis(10),
            max_rto: Duration::from_millis(40),
            max_attempts: 4,
        };
        let mut c = UpdateClient::new(&key(), repr(), policy, t0).unwrap();
        assert!(c.poll_transmit(t0).is_some());
        assert!(c.poll_transmit(t0).is_none());
        let mut sends = vec![t0];
        let mut now = t0;
        while let Some(t) = c.poll_timeout() {
            now = t;
            if c.poll_transmit(now).is_some() {
                sends.push(now);
            }
        }
        let gaps: Vec<u128> = sends
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect();
        assert_eq!(gaps, vec![10, 20, 40]);
        assert_eq!(c.outcome(), Some(&UpdateOutcome::TimedOut { attempts: 4 }));
        assert_eq!(now - t0, Duration::from_millis(110));
    }

    #[test]
    fn lost_ack_then_stale_with_own_assertion_is_accepted() {
        let t0 = Instant::now();
        let k = key().hmac_key();
        let sk = crate::assertion::SigningKey::from_pkcs8(
            &crate::assertion::SigningKey::generate_pkcs8().unwrap(),
        )
        .unwrap();
        let r = repr();
        let own = sk.sign(&crate::binding::Binding {
            hoa: r.hoa,
            active: r.active,
            standby: r.standby.clone(),
            seq: r.seq,
            expires_unix: 1,
            key_id: r.key_id,
        });
        let mut stale = AckRepr {
            status: AckStatus::StaleSeq,
            key_id: 9,
            seq: r.seq,
            last_accepted_seq: r.seq,
            hoa: r.hoa,
            assertion: Some(own.encode()),
        };
        let mut c = UpdateClient::new(&key(), r.clone(), RetransmitPolicy::default(), t0).unwrap();
        c.poll_transmit(t0).unwrap();
        assert!(c.handle_datagram(&stale.to_vec(&k).unwrap(), t0));
        assert!(matches!(c.outcome(), Some(UpdateOutcome::Accepted(_))));
        // Someone else's newer binding: a real stale answer.
        stale.last_accepted_seq = r.seq + 5;
        let mut c = UpdateClient::new(&key(), r, RetransmitPolicy::default(), t0).unwrap();
        c.poll_transmit(t0).unwrap();
        assert!(c.handle_datagram(&stale.to_vec(&k).unwrap(), t0));
        assert_eq!(
            c.outcome(),
            Some(&UpdateOutcome::Stale {
                last_accepted: 1005
            })
        );
    }

    #[test]
    fn client_accepts_only_matching_authenticated_ack() {
        let t0 = Instant::now();
        let mut c = UpdateClient::new(&key(), repr(), RetransmitPolicy::default(), t0).unwrap();
        c.poll_transmit(t0).unwrap();
        let k = key().hmac_key();
        let mut ack = AckRepr {
            status: AckStatus::Accepted,
            key_id: 9,
            seq: 999,
            last_accepted_seq: 1000,
            hoa: repr().hoa,
            assertion: None,
        };
        assert!(!c.handle_datagram(&ack.to_vec(&k).unwrap(), t0));
        ack.seq = 1000;
        let forged = ack
            .to_vec(&UpdateKey::generate(9).unwrap().hmac_key())
            .unwrap();
        assert!(!c.handle_datagram(&forged, t0));
        assert!(c.handle_datagram(&ack.to_vec(&k).unwrap(), t0));
        assert!(matches!(c.outcome(), Some(UpdateOutcome::Accepted(_))));
        assert!(c.poll_timeout().is_none());
        assert!(c.poll_transmit(t0 + Duration::from_secs(9)).is_none());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn addr() -> impl Strategy<Value = Ipv6Addr> {
            any::<u128>().prop_map(Ipv6Addr::from)
        }

        fn update() -> impl Strategy<Value = UpdateRepr> {
            (
                any::<u32>(),
                any::<u64>(),
                addr(),
                any::<u32>(),
                any::<bool>(),
                proptest::option::of(addr()),
                proptest::collection::vec(addr(), 0..=MAX_STANDBY),
            )
                .prop_map(
                    |(key_id, seq, hoa, lifetime_s, activate, active, standby)| UpdateRepr {
                        key_id,
                        seq,
                        hoa,
                        lifetime_s,
                        activate,
                        active,
                        standby,
                    },
                )
        }

        proptest! {
            #[test]
            fn update_emit_parse_round_trip(r in update(), secret in any::<[u8; 32]>()) {
                let k = UpdateKey { key_id: r.key_id, secret }.hmac_key();
                let bytes = r.to_vec(&k).unwrap();
                prop_assert_eq!(bytes.len(), r.buffer_len());
                prop_assert_eq!(UpdateRepr::parse_verified(&bytes, &k).unwrap(), r);
            }

            #[test]
            fn ack_emit_parse_round_trip(
                status in any::<u8>(),
                seq in any::<u64>(),
                last in any::<u64>(),
                hoa in addr(),
                assertion in proptest::option::of(
                    proptest::collection::vec(any::<u8>(), 1..crate::assertion::MAX_LEN)
                ),
            ) {
                let k = key().hmac_key();
                let a = AckRepr {
                    status: AckStatus::from_u8(status),
                    key_id: 9,
                    seq,
                    last_accepted_seq: last,
                    hoa,
                    assertion,
                };
                let bytes = a.to_vec(&k).unwrap();
                prop_assert_eq!(AckRepr::parse_verified(&bytes, &k).unwrap(), a);
            }

            #[test]
            fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
                let k = key().hmac_key();
                if let Ok(p) = UpdatePacket::new_checked(&data) {
                    let r = UpdateRepr::parse(&p);
                    prop_assert_eq!(r.buffer_len(), data.len());
                    prop_assert!(p.verify(&k).is_err());
                }
                if let Ok(p) = AckPacket::new_checked(&data) {
                    prop_assert_eq!(AckRepr::parse(&p).buffer_len(), data.len());
                }
            }
        }
    }
}
