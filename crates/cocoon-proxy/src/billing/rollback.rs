//! Rollback detection: at start, the proxy's record and the ledger must tell one story. If the
//! ledger holds a counter the record never signed, the record was rolled back (restored from
//! an old copy, or another proxy with the same key signed), and serving would sign counters the
//! ledger refuses, or worse, sign a counter twice for different work. If the record knows the
//! ledger accepted more than the ledger now shows, the ledger was rolled back or is another one.

use cocoon_ledger::{LedgerState, PublicKey};

use super::book::Book;

/// Every disagreement, as a sentence; empty when record and ledger agree.
pub(crate) fn disagreements(book: &Book, ledger: &LedgerState, proxy: &PublicKey) -> Vec<String> {
    let mut found = Vec::new();
    for contract in ledger.clients.values().filter(|c| &c.proxy == proxy) {
        let record = book.client(&contract.client);
        let client = hex::encode(contract.client);
        if contract.tokens_used > record.charged {
            found.push(format!(
                "the ledger has charged client {client} for {} tokens, but this proxy's record \
                 only ever signed {}: the record was rolled back or another proxy holds this key",
                contract.tokens_used, record.charged
            ));
        }
        if contract.tokens_used < record.committed {
            found.push(format!(
                "this proxy committed {} tokens for client {client}, but the ledger shows {}: \
                 the ledger was rolled back or is not the one this proxy used",
                record.committed, contract.tokens_used
            ));
        }
    }
    for (client, record) in book.clients() {
        let known = ledger
            .clients
            .values()
            .any(|c| &c.proxy == proxy && &c.client == client);
        if !known && record.committed > 0 {
            found.push(format!(
                "this proxy committed {} tokens for client {}, whose contract the ledger does \
                 not have",
                record.committed,
                hex::encode(client)
            ));
        }
    }
    for contract in ledger.workers.values().filter(|w| &w.proxy == proxy) {
        let owed = book.worker(&contract.worker).owed;
        if contract.tokens_paid > owed {
            found.push(format!(
                "the ledger has paid worker {} for {} tokens, but this proxy's record only ever \
                 signed {owed}: the record was rolled back or another proxy holds this key",
                hex::encode(contract.worker),
                contract.tokens_paid
            ));
        }
    }
    found
}
