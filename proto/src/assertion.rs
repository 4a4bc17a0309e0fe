//! IMS-signed binding assertions (Ed25519).
//!
//! When the IMS commits a binding it signs (HoA, active MoA, standby MoAs,
//! seq, expiry) with its Ed25519 key. The assertion travels in update acks and
//! watch events; a moving VM forwards it to its peers, which verify it offline
//! against the IMS public key from their configuration.
//!
//! Wire layout (all integers big-endian):
//!
//! ```text
//!  0      version (1)
//!  1      flags: bit 0 = active MoA present
//!  2      number of standby MoAs (<= MAX_STANDBY)
//!  3      reserved, 0
//!  4..12  seq
//! 12..20  expiry, unix seconds
//! 20..36  HoA
//!  ..     active MoA (16, if flag) then standby MoAs (16 each)
//!  ..     Ed25519 signature (64) over DOMAIN || all bytes before it
//! ```

use std::net::Ipv6Addr;

use base64::Engine as _;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};

use crate::binding::{Binding, MAX_STANDBY};

/// Version byte of the assertion format.
pub const VERSION: u8 = 1;
/// Domain separation prefix of the signed message.
pub const DOMAIN: &[u8] = b"mat6-binding-assertion-v1\0";
/// Length of the fixed header.
pub const HEADER_LEN: usize = 36;
/// Length of an Ed25519 signature.
pub const SIG_LEN: usize = 64;
/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Largest possible encoded assertion.
pub const MAX_LEN: usize = HEADER_LEN + 16 * (1 + MAX_STANDBY) + SIG_LEN;

const FLAG_ACTIVE: u8 = 0x01;

/// Errors decoding or verifying an assertion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    /// Fewer bytes than the header and counts require, or trailing bytes.
    #[error("assertion has the wrong length ({0} bytes)")]
    BadLength(usize),
    /// Unknown version byte.
    #[error("unsupported assertion version {0}")]
    BadVersion(u8),
    /// Unknown flag bits, non-zero reserved byte or too many standby MoAs.
    #[error("malformed assertion header")]
    Malformed,
    /// The signature does not verify against the given IMS public key.
    #[error("assertion signature does not verify against the IMS public key")]
    BadSignature,
    /// The output buffer is too small.
    #[error("buffer too small for assertion")]
    Exhausted,
    /// Base64 decoding failed.
    #[error("assertion is not valid base64")]
    Base64,
    /// The signing key could not be loaded.
    #[error("invalid Ed25519 signing key (expected PKCS#8 v2)")]
    BadKey,
}

/// The signed content of an assertion plus its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingAssertion {
    /// Home Address.
    pub hoa: Ipv6Addr,
    /// Active MoA.
    pub active: Option<Ipv6Addr>,
    /// Standby MoAs.
    pub standby: Vec<Ipv6Addr>,
    /// Sequence number of the accepted update.
    pub seq: u64,
    /// Absolute expiry, unix seconds.
    pub expires_unix: u64,
    /// Ed25519 signature by the IMS.
    pub signature: [u8; SIG_LEN],
}

/// The IMS signing key (Ed25519, stored as PKCS#8).
#[derive(Debug)]
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// Generates a fresh PKCS#8 document for a new key.
    pub fn generate_pkcs8() -> Result<Vec<u8>, AssertionError> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| AssertionError::BadKey)
    }

    /// Loads a key from a PKCS#8 document.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, AssertionError> {
        Ed25519KeyPair::from_pkcs8(der)
            .or_else(|_| Ed25519KeyPair::from_pkcs8_maybe_unchecked(der))
            .map(|pair| SigningKey { pair })
            .map_err(|_| AssertionError::BadKey)
    }

    /// The public key peers verify assertions with.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        let mut pk = [0u8; PUBLIC_KEY_LEN];
        pk.copy_from_slice(self.pair.public_key().as_ref());
        pk
    }

    /// Signs the content of `binding`.
    pub fn sign(&self, binding: &Binding) -> BindingAssertion {
        let mut a = BindingAssertion {
            hoa: binding.hoa,
            active: binding.active,
            standby: binding.standby.iter().take(MAX_STANDBY).copied().collect(),
            seq: binding.seq,
            expires_unix: binding.expires_unix,
            signature: [0u8; SIG_LEN],
        };
        let body = a.body();
        let mut msg = Vec::with_capacity(DOMAIN.len() + body.len());
        msg.extend_from_slice(DOMAIN);
        msg.extend_from_slice(&body);
        a.signature.copy_from_slice(self.pair.sign(&msg).as_ref());
        a
    }
}

/// Encodes a public key as base64 (what `ims-server keys export-public` prints).
pub fn public_key_to_b64(pk: &[u8; PUBLIC_KEY_LEN]) -> String {
    base64::engine::general_purpose::STANDARD.encode(pk)
}

/// Decodes a base64 public key.
pub fn public_key_from_b64(s: &str) -> Result<[u8; PUBLIC_KEY_LEN], AssertionError> {
    let v = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|_| AssertionError::Base64)?;
    v.try_into().map_err(|_| AssertionError::BadKey)
}

impl BindingAssertion {
    /// Bytes this assertion takes on the wire.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + 16 * (usize::from(self.active.is_some()) + self.standby.len()) + SIG_LEN
    }

    fn body(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.buffer_len());
        let n = self.standby.len().min(MAX_STANDBY);
        v.push(VERSION);
        v.push(if self.active.is_some() {
            FLAG_ACTIVE
        } else {
            0
        });
        v.push(n as u8);
        v.push(0);
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.expires_unix.to_be_bytes());
        v.extend_from_slice(&self.hoa.octets());
        if let Some(a) = self.active {
            v.extend_from_slice(&a.octets());
        }
        for s in self.standby.iter().take(n) {
            v.extend_from_slice(&s.octets());
        }
        v
    }

    /// Writes the assertion into `buf`, returning the length written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, AssertionError> {
        if self.standby.len() > MAX_STANDBY {
            return Err(AssertionError::Malformed);
        }
        let body = self.body();
        let len = body.len() + SIG_LEN;
        let out = buf.get_mut(..len).ok_or(AssertionError::Exhausted)?;
        out[..body.len()].copy_from_slice(&body);
        out[body.len()..].copy_from_slice(&self.signature);
        Ok(len)
    }

    /// Encodes to a fresh vector.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.body();
        v.extend_from_slice(&self.signature);
        v
    }

    /// Encodes as base64 (for JSON transports).
    pub fn to_b64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.encode())
    }

    /// Decodes base64 then [`BindingAssertion::decode`].
    pub fn from_b64(s: &str) -> Result<Self, AssertionError> {
        let v = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| AssertionError::Base64)?;
        Self::decode(&v)
    }

    /// Parses untrusted bytes. Does **not** check the signature: call
    /// [`BindingAssertion::verify`] (or use [`BindingAssertion::decode_verified`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, AssertionError> {
        let hdr = bytes
            .get(..HEADER_LEN)
            .ok_or(AssertionError::BadLength(bytes.len()))?;
        if hdr[0] != VERSION {
            return Err(AssertionError::BadVersion(hdr[0]));
        }
        let flags = hdr[1];
        let n = usize::from(hdr[2]);
        if flags & !FLAG_ACTIVE != 0 || hdr[3] != 0 || n > MAX_STANDBY {
            return Err(AssertionError::Malformed);
        }
        let has_active = flags & FLAG_ACTIVE != 0;
        let expect = HEADER_LEN + 16 * (usize::from(has_active) + n) + SIG_LEN;
        if bytes.len() != expect {
            return Err(AssertionError::BadLength(bytes.len()));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&hdr[4..12]);
        let mut exp = [0u8; 8];
        exp.copy_from_slice(&hdr[12..20]);
        let mut addrs = bytes[HEADER_LEN..expect - SIG_LEN]
            .chunks_exact(16)
            .map(addr16);
        let hoa = addr16(&hdr[20..36]);
        let active = if has_active { addrs.next() } else { None };
        let standby = addrs.collect();
        let mut signature = [0u8; SIG_LEN];
        signature.copy_from_slice(&bytes[expect - SIG_LEN..]);
        Ok(BindingAssertion {
            hoa,
            active,
            standby,
            seq: u64::from_be_bytes(seq),
            expires_unix: u64::from_be_bytes(exp),
            signature,
        })
    }

    /// Verifies the signature against the IMS public key.
    pub fn verify(&self, public_key: &[u8; PUBLIC_KEY_LEN]) -> Result<(), AssertionError> {
        let mut msg = DOMAIN.to_vec();
        msg.extend_from_slice(&self.body());
        signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
            .verify(&msg, &self.signature)
            .map_err(|_| AssertionError::BadSignature)
    }

    /// Decodes and verifies in one step.
    pub fn decode_verified(
        bytes: &[u8],
        public_key: &[u8; PUBLIC_KEY_LEN],
    ) -> Result<Self, AssertionError> {
        let a = Self::decode(bytes)?;
        a.verify(public_key)?;
        Ok(a)
    }

    /// The binding this assertion vouches for (`key_id` is not part of it and
    /// is set to 0).
    pub fn to_binding(&self) -> Binding {
        Binding {
            hoa: self.hoa,
            active: self.active,
            standby: self.standby.clone(),
            seq: self.seq,
            expires_unix: self.expires_unix,
            key_id: 0,
        }
    }
}

pub(crate) fn addr16(b: &[u8]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    Ipv6Addr::from(o)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn binding() -> Binding {
        Binding {
            hoa: "2001:db8:100::1".parse().unwrap(),
            active: Some("2001:db8:a::10".parse().unwrap()),
            standby: vec!["2001:db8:b::10".parse().unwrap()],
            seq: 42,
            expires_unix: 1_900_000_000,
            key_id: 7,
        }
    }

    #[test]
    fn sign_encode_decode_verify() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let a = key.sign(&binding());
        let bytes = a.encode();
        assert_eq!(bytes.len(), a.buffer_len());
        let mut buf = [0u8; MAX_LEN];
        assert_eq!(a.emit(&mut buf).unwrap(), bytes.len());
        assert_eq!(&buf[..bytes.len()], &bytes[..]);
        let back = BindingAssertion::decode_verified(&bytes, &key.public_key()).unwrap();
        assert_eq!(back, a);
        assert_eq!(back.to_binding().standby, binding().standby);
        let b64 = BindingAssertion::from_b64(&a.to_b64()).unwrap();
        assert_eq!(b64, a);
    }

    #[test]
    fn every_bit_flip_fails() {
        let key = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let bytes = key.sign(&binding()).encode();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                BindingAssertion::decode_verified(&b, &key.public_key()).is_err(),
                "bit {i}"
            );
        }
        for n in 0..bytes.len() {
            assert!(BindingAssertion::decode(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn other_key_rejected() {
        let k1 = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let k2 = SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap();
        let a = k1.sign(&binding());
        assert_eq!(
            a.verify(&k2.public_key()),
            Err(AssertionError::BadSignature)
        );
        let pk = public_key_from_b64(&public_key_to_b64(&k1.public_key())).unwrap();
        a.verify(&pk).unwrap();
    }
}
