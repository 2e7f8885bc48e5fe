//! The payment messages a proxy signs. Layout, after COCOON's contracts: `op: u32`,
//! `query_id: u64`, then the payload (`tokens: u64`, then the full address of the contract it
//! is for: network id `i32`, workchain `i8`, 32-byte account id), all big-endian. The Ed25519
//! signature (64 bytes) is over SHA-256 of those 57 bytes. The network makes a message signed
//! on a test network (or another embedded ledger) worthless everywhere else.
//!
//! Both messages are cumulative: "client C has used N tokens in total", "worker W has been paid
//! for N tokens in total". A contract applies one only if N is above what it stored, so a
//! replay or an older message changes nothing, and only to the address it names.

use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::types::{Address, Network, PublicKey};

/// The first field (`op`) of a charge message.
pub const OP_CHARGE_CLIENT: u32 = 0x6368_7267; // "chrg"
/// The first field (`op`) of a payout message.
pub const OP_PAY_WORKER: u32 = 0x7061_7977; // "payw"

const BODY_LEN: usize = 4 + 8 + 8 + 4 + 1 + 32;
const SIGNED_LEN: usize = BODY_LEN + 64;

/// Why a signed payment message was rejected before any contract looked at it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The message is not one body and one signature long; the value is its length in bytes.
    #[error("message is {0} bytes, expected {SIGNED_LEN}")]
    Length(usize),
    /// The `op` is neither a charge nor a payout; the value is the `op` found.
    #[error("unknown op {0:#010x}")]
    UnknownOp(u32),
    /// The signature does not verify under the proxy's key: forged, altered or another proxy's.
    #[error("signature does not verify under the proxy's key")]
    BadSignature,
    /// Genuinely signed, but for another network (or workchain) than the one checking it.
    #[error("signed for {found}, not {expected}")]
    WrongNetwork {
        /// The network of the ledger that checked it.
        expected: Network,
        /// The network the message names.
        found: Network,
    },
}

/// What a proxy vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PaymentMessage {
    /// The client contract at `contract` has used `tokens_used` weighted tokens in total.
    ChargeClient {
        /// An identifier the proxy chooses, signed along as in a TON message; contracts ignore it.
        query_id: u64,
        /// The cumulative counter, in weighted tokens.
        tokens_used: u64,
        /// The client contract the message is for.
        contract: Address,
    },
    /// The worker contract at `contract` is owed for `tokens` weighted tokens in total.
    PayWorker {
        /// An identifier the proxy chooses, signed along as in a TON message; contracts ignore it.
        query_id: u64,
        /// The cumulative counter, in weighted tokens.
        tokens: u64,
        /// The worker contract the message is for.
        contract: Address,
    },
}

impl PaymentMessage {
    /// The address of the contract the message is for, whichever kind it is.
    pub fn contract(&self) -> Address {
        match self {
            Self::ChargeClient { contract, .. } | Self::PayWorker { contract, .. } => *contract,
        }
    }

    fn encode(&self, network: Network) -> [u8; BODY_LEN] {
        let (op, query_id, tokens, contract) = match *self {
            Self::ChargeClient {
                query_id,
                tokens_used,
                contract,
            } => (OP_CHARGE_CLIENT, query_id, tokens_used, contract),
            Self::PayWorker {
                query_id,
                tokens,
                contract,
            } => (OP_PAY_WORKER, query_id, tokens, contract),
        };
        let mut out = [0u8; BODY_LEN];
        out[..4].copy_from_slice(&op.to_be_bytes());
        out[4..12].copy_from_slice(&query_id.to_be_bytes());
        out[12..20].copy_from_slice(&tokens.to_be_bytes());
        out[20..24].copy_from_slice(&network.id.to_be_bytes());
        out[24] = network.workchain.to_be_bytes()[0];
        out[25..].copy_from_slice(&contract.0);
        out
    }

    fn decode(body: &[u8]) -> Result<(Self, Network), MessageError> {
        let u32_at = |at: usize| u32::from_be_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let network = Network {
            id: i32::from_be_bytes(body[20..24].try_into().expect("4 bytes")),
            workchain: i8::from_be_bytes([body[24]]),
        };
        let contract = Address(body[25..57].try_into().expect("32 bytes"));
        let message = match u32_at(0) {
            OP_CHARGE_CLIENT => Self::ChargeClient {
                query_id: u64_at(4),
                tokens_used: u64_at(12),
                contract,
            },
            OP_PAY_WORKER => Self::PayWorker {
                query_id: u64_at(4),
                tokens: u64_at(12),
                contract,
            },
            op => return Err(MessageError::UnknownOp(op)),
        };
        Ok((message, network))
    }

    /// Signs with the proxy's key, for contracts on `network`.
    pub fn sign(&self, proxy_key: &Ed25519KeyPair, network: Network) -> SignedMessage {
        let body = self.encode(network);
        let signature = proxy_key.sign(digest(&body).as_ref());
        let mut bytes = body.to_vec();
        bytes.extend_from_slice(signature.as_ref());
        SignedMessage(bytes)
    }
}

fn digest(body: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, body)
}

/// A payment message with the proxy's signature, as it travels and is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedMessage(#[serde(with = "hex_bytes")] pub Vec<u8>);

impl SignedMessage {
    /// The network the message names, unchecked (its signature is not verified): for reading
    /// a message where no ledger says which network to expect.
    pub fn named_network(&self) -> Option<Network> {
        if self.0.len() != SIGNED_LEN {
            return None;
        }
        PaymentMessage::decode(&self.0[..BODY_LEN])
            .ok()
            .map(|(_, network)| network)
    }

    /// Parses, checks the signature against `proxy`'s key and that the message is for
    /// `network`. Nothing else: whether the counter moves forward and the account matches is
    /// the contract's decision.
    pub fn verify(
        &self,
        proxy: &PublicKey,
        network: Network,
    ) -> Result<PaymentMessage, MessageError> {
        if self.0.len() != SIGNED_LEN {
            return Err(MessageError::Length(self.0.len()));
        }
        let (body, signature) = self.0.split_at(BODY_LEN);
        let (message, found) = PaymentMessage::decode(body)?;
        UnparsedPublicKey::new(&ED25519, proxy)
            .verify(digest(body).as_ref(), signature)
            .map_err(|_| MessageError::BadSignature)?;
        if found != network {
            return Err(MessageError::WrongNetwork {
                expected: network,
                found,
            });
        }
        Ok(message)
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn public(k: &Ed25519KeyPair) -> PublicKey {
        ring::signature::KeyPair::public_key(k)
            .as_ref()
            .try_into()
            .unwrap()
    }

    const NET: Network = Network::TON_TESTNET;

    #[test]
    fn round_trip_and_forgeries() {
        let proxy = key();
        let msg = PaymentMessage::ChargeClient {
            query_id: 7,
            tokens_used: 1234,
            contract: Address([9; 32]),
        };
        let signed = msg.sign(&proxy, NET);
        assert_eq!(signed.verify(&public(&proxy), NET), Ok(msg));
        // Another key's signature.
        assert_eq!(
            signed.verify(&public(&key()), NET),
            Err(MessageError::BadSignature)
        );
        // Any flipped bit, in body or signature.
        for i in 0..signed.0.len() {
            let mut forged = signed.clone();
            forged.0[i] ^= 0x10;
            assert!(forged.verify(&public(&proxy), NET).is_err(), "byte {i}");
        }
        let mut short = signed.clone();
        short.0.pop();
        assert_eq!(
            short.verify(&public(&proxy), NET),
            Err(MessageError::Length(SIGNED_LEN - 1))
        );
    }

    /// The same proxy key, the same account id: a testnet message is refused on mainnet, on
    /// another workchain and on an embedded ledger, and the other way round.
    #[test]
    fn a_message_for_one_network_is_refused_on_every_other() {
        let proxy = key();
        let msg = PaymentMessage::PayWorker {
            query_id: 1,
            tokens: 50,
            contract: Address([4; 32]),
        };
        let networks = [
            Network::TON_TESTNET,
            Network::TON_MAINNET,
            Network {
                id: -239,
                workchain: -1,
            },
            Network::UNNAMED,
            Network::basechain(0x1234_5678),
        ];
        for signed_for in networks {
            let signed = msg.sign(&proxy, signed_for);
            for checked_on in networks {
                let got = signed.verify(&public(&proxy), checked_on);
                if signed_for == checked_on {
                    assert_eq!(got, Ok(msg));
                } else {
                    assert_eq!(
                        got,
                        Err(MessageError::WrongNetwork {
                            expected: checked_on,
                            found: signed_for
                        })
                    );
                }
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_verify_or_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let proxy = key();
            prop_assert!(SignedMessage(bytes).verify(&public(&proxy), NET).is_err());
        }
    }
}
