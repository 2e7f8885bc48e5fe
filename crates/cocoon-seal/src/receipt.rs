//! Workers' receipts: signed with the Ed25519 key their attestation binds to their
//! certificate, so a receipt proves which attested worker reported which counts.

use cocoon_protocol::Receipt;

use crate::SealError;

/// `receipt` signed by `key` (the worker's identity key): its `signature` filled in.
pub fn sign_receipt(mut receipt: Receipt, key: &ring::signature::Ed25519KeyPair) -> Receipt {
    receipt.signature = hex::encode(key.sign(&receipt.signed_bytes()).as_ref());
    receipt
}

/// Checks `receipt`'s signature against the worker's Ed25519 key `public_key`.
pub fn verify_receipt(receipt: &Receipt, public_key: &[u8; 32]) -> Result<(), SealError> {
    let signature = hex::decode(&receipt.signature)
        .map_err(|_| SealError::BadReceipt("its signature is not hex".into()))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(&receipt.signed_bytes(), &signature)
        .map_err(|_| SealError::BadReceipt("its signature is not the worker's".into()))
}
