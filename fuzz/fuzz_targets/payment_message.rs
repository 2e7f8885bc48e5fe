//! Signed payment messages and signed ledger transactions, as parsed from the wire: never a
//! panic, and no forgery verifies (the fuzzer cannot sign with the keys below).
#![no_main]

use cocoon_ledger::{SignedMessage, SignedTx, Wallet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let proxy = Wallet::from_seed([9; 32]).public_key();
    assert!(SignedMessage(data.to_vec()).verify(&proxy).is_err());
    if let Ok(tx) = serde_json::from_slice::<SignedTx>(data)
        && let Ok(body) = tx.open()
    {
        // Only a genuine signature opens, and the fuzzer holds no key: a body that opens must
        // name a sender whose key signed it, which cannot be one of ours.
        assert_ne!(body.sender, proxy);
    }
});
