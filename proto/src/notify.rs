//! Peer notifications: a moving node hands its new IMS-signed binding straight
//! to the peers it talks to (UDP, default port 7343), and each peer acks.
//!
//! Layout (integers big-endian):
//!
//! ```text
//! Notify (moving node -> peer):
//!  0      version (1)
//!  1      type (1 = notify)
//!  2..4   assertion length (1..=assertion::MAX_LEN)
//!  4..12  nonce (echoed in the ack)
//!  ..     IMS-signed binding assertion (see `assertion`)
//!
//! Ack (peer -> moving node):
//!  0      version (1)
//!  1      type (2 = ack)
//!  2      status (0 applied, 1 not newer, 2 rejected)
//!  3      reserved, 0
//!  4..12  nonce of the notification
//! 12..28  HoA the notification was about (:: when it did not verify)
//! 28..36  seq the peer holds for that HoA after processing (0 if none)
//! ```
//!
//! The notification itself carries no extra authentication: the assertion
//! inside is signed by the IMS, and [`accept`] applies it only if it verifies
//! against the IMS public key, has not expired, and its seq is newer than the
//! peer's. Replaying an old notification therefore changes nothing. The ack is
//! not authenticated: all it does is stop the sender's retransmissions, and
//! the 64-bit nonce is known only on path; a forged ack at worst leaves a peer
//! to learn the binding from the IMS watch stream instead.

use std::net::Ipv6Addr;

use crate::assertion::{self, AssertionError, BindingAssertion, PUBLIC_KEY_LEN};

/// Protocol version.
pub const VERSION: u8 = 1;
/// Type byte of a notification.
pub const TYPE_NOTIFY: u8 = 1;
/// Type byte of an ack.
pub const TYPE_ACK: u8 = 2;
/// Fixed part of a notification.
pub const NOTIFY_HEADER_LEN: usize = 12;
/// Length of an ack.
pub const ACK_LEN: usize = 36;
/// Largest notification.
pub const MAX_LEN: usize = NOTIFY_HEADER_LEN + assertion::MAX_LEN;
/// Default UDP port of the guest agent's notification socket.
pub const DEFAULT_PORT: u16 = 7343;

/// Errors decoding, encoding or accepting a notification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyError {
    /// Shorter than its header, or length fields disagree with the size.
    #[error("notification has the wrong length ({0} bytes)")]
    BadLength(usize),
    /// Unknown version byte.
    #[error("unsupported notification version {0}")]
    BadVersion(u8),
    /// Unknown type byte or non-zero reserved byte.
    #[error("malformed notification header")]
    Malformed,
    /// The output buffer is too small.
    #[error("buffer too small for notification")]
    Exhausted,
    /// The assertion did not decode or verify against the IMS key.
    #[error("binding assertion rejected: {0}")]
    Assertion(#[from] AssertionError),
    /// The assertion's binding has expired.
    #[error("binding assertion expired at {expires_unix} (now {now_unix})")]
    Expired {
        /// Expiry in the assertion.
        expires_unix: u64,
        /// The peer's clock.
        now_unix: u64,
    },
    /// The peer already holds this seq or a newer one.
    #[error("binding seq {got} is not newer than the held seq {held}")]
    NotNewer {
        /// Seq in the assertion.
        got: u64,
        /// Seq the peer holds.
        held: u64,
    },
    /// The assertion is about this node's own HoA.
    #[error("notification about our own HoA")]
    OwnHoa,
}

/// Status of an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStatus {
    /// The binding was applied.
    Applied,
    /// Verified, but the peer already had this seq or a newer one.
    NotNewer,
    /// The assertion did not verify (or expired).
    Rejected,
    /// A status this version does not know.
    Other(u8),
}

impl AckStatus {
    fn to_u8(self) -> u8 {
        match self {
            AckStatus::Applied => 0,
            AckStatus::NotNewer => 1,
            AckStatus::Rejected => 2,
            AckStatus::Other(v) => v,
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            0 => AckStatus::Applied,
            1 => AckStatus::NotNewer,
            2 => AckStatus::Rejected,
            v => AckStatus::Other(v),
        }
    }
}

/// Checked view of a notification or ack datagram.
#[derive(Debug, Clone, Copy)]
pub struct NotifyPacket<'a> {
    buf: &'a [u8],
}

impl<'a> NotifyPacket<'a> {
    /// Validates version, type and lengths.
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, NotifyError> {
        if buf.len() < 4 {
            return Err(NotifyError::BadLength(buf.len()));
        }
        if buf[0] != VERSION {
            return Err(NotifyError::BadVersion(buf[0]));
        }
        match buf[1] {
            TYPE_NOTIFY => {
                let alen = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
                if alen == 0 || alen > assertion::MAX_LEN || buf.len() != NOTIFY_HEADER_LEN + alen {
                    return Err(NotifyError::BadLength(buf.len()));
                }
            }
            TYPE_ACK => {
                if buf.len() != ACK_LEN {
                    return Err(NotifyError::BadLength(buf.len()));
                }
                if buf[3] != 0 {
                    return Err(NotifyError::Malformed);
                }
            }
            _ => return Err(NotifyError::Malformed),
        }
        Ok(Self { buf })
    }

    /// The nonce.
    pub fn nonce(&self) -> u64 {
        be_u64(&self.buf[4..12])
    }
}

/// Semantic content of a datagram on the notification port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyRepr {
    /// A moving node's new binding.
    Notify {
        /// Nonce echoed in the ack.
        nonce: u64,
        /// Encoded [`BindingAssertion`].
        assertion: Vec<u8>,
    },
    /// A peer's answer.
    Ack {
        /// Nonce of the notification.
        nonce: u64,
        /// Outcome.
        status: AckStatus,
        /// HoA the notification was about.
        hoa: Ipv6Addr,
        /// Seq the peer now holds for it.
        seq: u64,
    },
}

impl NotifyRepr {
    /// Parses a checked packet.
    pub fn parse(p: &NotifyPacket<'_>) -> Self {
        let b = p.buf;
        if b[1] == TYPE_NOTIFY {
            NotifyRepr::Notify {
                nonce: p.nonce(),
                assertion: b[NOTIFY_HEADER_LEN..].to_vec(),
            }
        } else {
            let mut hoa = [0u8; 16];
            hoa.copy_from_slice(&b[12..28]);
            NotifyRepr::Ack {
                nonce: p.nonce(),
                status: AckStatus::from_u8(b[2]),
                hoa: Ipv6Addr::from(hoa),
                seq: be_u64(&b[28..36]),
            }
        }
    }

    /// Checks and parses untrusted bytes.
    pub fn parse_bytes(buf: &[u8]) -> Result<Self, NotifyError> {
        Ok(Self::parse(&NotifyPacket::new_checked(buf)?))
    }

    /// Bytes [`NotifyRepr::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        match self {
            NotifyRepr::Notify { assertion, .. } => NOTIFY_HEADER_LEN + assertion.len(),
            NotifyRepr::Ack { .. } => ACK_LEN,
        }
    }

    /// Writes the datagram; returns its length.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, NotifyError> {
        let n = self.buffer_len();
        let out = buf.get_mut(..n).ok_or(NotifyError::Exhausted)?;
        out[0] = VERSION;
        match self {
            NotifyRepr::Notify { nonce, assertion } => {
                if assertion.is_empty() || assertion.len() > assertion::MAX_LEN {
                    return Err(NotifyError::BadLength(n));
                }
                out[1] = TYPE_NOTIFY;
                let alen = u16::try_from(assertion.len()).map_err(|_| NotifyError::BadLength(n))?;
                out[2..4].copy_from_slice(&alen.to_be_bytes());
                out[4..12].copy_from_slice(&nonce.to_be_bytes());
                out[NOTIFY_HEADER_LEN..].copy_from_slice(assertion);
            }
            NotifyRepr::Ack {
                nonce,
                status,
                hoa,
                seq,
            } => {
                out[1] = TYPE_ACK;
                out[2] = status.to_u8();
                out[3] = 0;
                out[4..12].copy_from_slice(&nonce.to_be_bytes());
                out[12..28].copy_from_slice(&hoa.octets());
                out[28..36].copy_from_slice(&seq.to_be_bytes());
            }
        }
        Ok(n)
    }

    /// Encodes into a new vector.
    pub fn to_vec(&self) -> Result<Vec<u8>, NotifyError> {
        let mut v = vec![0u8; self.buffer_len()];
        self.emit(&mut v)?;
        Ok(v)
    }
}

/// Decides whether a received notification's assertion may be applied: it
/// must decode, verify against the IMS public key, not be expired at
/// `now_unix`, not be about `own_hoa`, and carry a seq newer than `held_seq`
/// (what the peer holds for that HoA, if anything). Returns the verified
/// assertion to apply.
pub fn accept(
    assertion_bytes: &[u8],
    ims_public_key: &[u8; PUBLIC_KEY_LEN],
    own_hoa: Ipv6Addr,
    held_seq: impl FnOnce(Ipv6Addr) -> Option<u64>,
    now_unix: u64,
) -> Result<BindingAssertion, NotifyError> {
    let a = BindingAssertion::decode_verified(assertion_bytes, ims_public_key)?;
    if a.hoa == own_hoa {
        return Err(NotifyError::OwnHoa);
    }
    if a.expires_unix <= now_unix {
        return Err(NotifyError::Expired {
            expires_unix: a.expires_unix,
            now_unix,
        });
    }
    if let Some(held) = held_seq(a.hoa) {
        if a.seq <= held {
            return Err(NotifyError::NotNewer { got: a.seq, held });
        }
    }
    Ok(a)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::assertion::SigningKey;
    use crate::binding::Binding;

    const PEER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 2);
    const ME: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);

    fn signer() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate_pkcs8().unwrap()).unwrap()
    }

    fn binding(seq: u64) -> Binding {
        Binding {
            hoa: PEER,
            active: Some("2001:db8:b::9".parse().unwrap()),
            standby: vec![],
            seq,
            expires_unix: 2_000_000_000,
            key_id: 3,
        }
    }

    #[test]
    fn notify_round_trip() {
        let k = signer();
        let a = k.sign(&binding(7)).encode();
        let n = NotifyRepr::Notify {
            nonce: 0x0102_0304_0506_0708,
            assertion: a.clone(),
        };
        let bytes = n.to_vec().unwrap();
        assert_eq!(&bytes[..4], &[1, 1, 0, a.len() as u8]);
        assert_eq!(&bytes[4..12], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(NotifyRepr::parse_bytes(&bytes).unwrap(), n);
    }

    #[test]
    fn ack_round_trip() {
        let n = NotifyRepr::Ack {
            nonce: 42,
            status: AckStatus::NotNewer,
            hoa: PEER,
            seq: 9,
        };
        let bytes = n.to_vec().unwrap();
        assert_eq!(bytes.len(), ACK_LEN);
        assert_eq!(NotifyRepr::parse_bytes(&bytes).unwrap(), n);
    }

    #[test]
    fn truncations_and_garbage_are_errors() {
        let k = signer();
        let n = NotifyRepr::Notify {
            nonce: 1,
            assertion: k.sign(&binding(7)).encode(),
        };
        let bytes = n.to_vec().unwrap();
        for l in 0..bytes.len() {
            assert!(NotifyRepr::parse_bytes(&bytes[..l]).is_err(), "len {l}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(NotifyRepr::parse_bytes(&long).is_err());
        let mut v = bytes.clone();
        v[0] = 2;
        assert_eq!(NotifyRepr::parse_bytes(&v), Err(NotifyError::BadVersion(2)));
        let mut t = bytes;
        t[1] = 9;
        assert_eq!(NotifyRepr::parse_bytes(&t), Err(NotifyError::Malformed));
        let ack = NotifyRepr::Ack {
            nonce: 1,
            status: AckStatus::Applied,
            hoa: PEER,
            seq: 1,
        };
        let mut a = ack.to_vec().unwrap();
        a[3] = 1;
        assert_eq!(NotifyRepr::parse_bytes(&a), Err(NotifyError::Malformed));
        let mut small = [0u8; 10];
        assert_eq!(ack.emit(&mut small), Err(NotifyError::Exhausted));
    }

    #[test]
    fn accept_requires_ims_signature_and_newer_seq() {
        let ims = signer();
        let pk = ims.public_key();
        let good = ims.sign(&binding(7)).encode();
        let a = accept(&good, &pk, ME, |_| Some(6), 1_000).unwrap();
        assert_eq!(a.seq, 7);
        assert_eq!(a.hoa, PEER);
        assert!(accept(&good, &pk, ME, |_| None, 1_000).is_ok());
        assert_eq!(
            accept(&good, &pk, ME, |_| Some(7), 1_000),
            Err(NotifyError::NotNewer { got: 7, held: 7 })
        );
        // Signed by someone else.
        let forged = signer().sign(&binding(8)).encode();
        assert!(matches!(
            accept(&forged, &pk, ME, |_| Some(6), 1_000),
            Err(NotifyError::Assertion(AssertionError::BadSignature))
        ));
        // Every single-bit flip of a valid assertion is rejected.
        for i in 0..good.len() * 8 {
            let mut b = good.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(accept(&b, &pk, ME, |_| None, 1_000).is_err(), "bit {i}");
        }
        // Expired.
        assert!(matches!(
            accept(&good, &pk, ME, |_| None, 2_000_000_000),
            Err(NotifyError::Expired { .. })
        ));
        // About ourselves.
        let mut own = binding(9);
        own.hoa = ME;
        let own = ims.sign(&own).encode();
        assert_eq!(
            accept(&own, &pk, ME, |_| None, 1_000),
            Err(NotifyError::OwnHoa)
        );
    }
}
