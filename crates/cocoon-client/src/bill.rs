//! The gateway's check of each bill the proxy hands over: the charge must be the proxy's own
//! signature (the key it proved in the handshake) over this client's contract and the counter
//! the bill states, the price must be within the request's `max_price`, the billed units must
//! not exceed the weighted tokens at that price, and the cost must be the units at the unit
//! price. A bill that fails is still passed on, marked `bill_verified: false`, and logged: the
//! app decides.

use cocoon_ledger::{Address, PaymentMessage, SignedMessage};
use cocoon_protocol::Billing;

/// Who a bill must be between: the proxy of the connection and this gateway's contract with
/// it, named as the ledger names it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parties {
    pub proxy: Option<[u8; 32]>,
    pub contract: Option<Address>,
    /// The request's price cap, if it set one.
    pub max_price: Option<u64>,
}

impl Parties {
    /// Checks `bill`; the reason when it does not hold.
    pub(crate) fn check(&self, bill: &Billing) -> Result<(), String> {
        let proxy = self.proxy.ok_or("the proxy's key is unknown")?;
        let bytes = hex::decode(&bill.charge).map_err(|_| "the charge is not hex".to_string())?;
        let message = SignedMessage(bytes)
            .verify(&proxy)
            .map_err(|e| format!("the charge is not the proxy's: {e}"))?;
        let PaymentMessage::ChargeClient {
            tokens_used,
            contract,
            ..
        } = message
        else {
            return Err("the charge is not a charge message".into());
        };
        if Some(contract) != self.contract {
            return Err("the charge is for another contract".into());
        }
        if tokens_used != bill.tokens_used || tokens_used < bill.billed_tokens {
            return Err(format!(
                "the charge counts {tokens_used} tokens, the bill {} (this answer {})",
                bill.tokens_used, bill.billed_tokens
            ));
        }
        if let Some(max) = self.max_price
            && bill.price_per_token > max
        {
            return Err(format!(
                "the price {} is above the request's max_price {max}",
                bill.price_per_token
            ));
        }
        let allowed = u128::from(bill.weighted_tokens) * u128::from(bill.price_per_token)
            / u128::from(bill.unit_price.max(1));
        if u128::from(bill.billed_tokens) > allowed {
            return Err(format!(
                "{} units billed for {} tokens at {} (unit price {})",
                bill.billed_tokens, bill.weighted_tokens, bill.price_per_token, bill.unit_price
            ));
        }
        if bill.billed_tokens.checked_mul(bill.unit_price) != Some(bill.cost) {
            return Err(format!(
                "cost {} is not {} units at {}",
                bill.cost, bill.billed_tokens, bill.unit_price
            ));
        }
        Ok(())
    }

    /// Whether `bill` holds, logging why when it does not.
    pub(crate) fn verified(&self, bill: &Billing) -> bool {
        match self.check(bill) {
            Ok(()) => true,
            Err(reason) => {
                tracing::error!(%reason, "the proxy's bill does not check out");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_ledger::Wallet;

    fn bill(proxy: &Wallet, client: [u8; 32], tokens_used: u64, billed: u64) -> Billing {
        let charge = PaymentMessage::ChargeClient {
            query_id: tokens_used,
            tokens_used,
            contract: Address::client(&proxy.public_key(), &client),
        }
        .sign(proxy.key_pair());
        Billing {
            price_per_token: 20,
            weighted_tokens: billed,
            unit_price: 20,
            billed_tokens: billed,
            cost: billed * 20,
            tokens_used,
            charge: hex::encode(&charge.0),
        }
    }

    #[test]
    fn only_the_proxys_consistent_bills_for_this_client_pass() {
        let proxy = Wallet::from_seed([9; 32]);
        let client = [2; 32];
        let parties = Parties {
            proxy: Some(proxy.public_key()),
            contract: Some(Address::client(&proxy.public_key(), &client)),
            max_price: Some(30),
        };
        parties.check(&bill(&proxy, client, 100, 10)).unwrap();
        // Signed by someone else, for another client, a counter other than stated, an
        // inflated cost, an unknown proxy.
        let impostor = Wallet::from_seed([8; 32]);
        assert!(parties.check(&bill(&impostor, client, 100, 10)).is_err());
        assert!(parties.check(&bill(&proxy, [3; 32], 100, 10)).is_err());
        let mut b = bill(&proxy, client, 100, 10);
        b.tokens_used = 90;
        assert!(parties.check(&b).is_err());
        let mut b = bill(&proxy, client, 100, 10);
        b.cost += 1;
        assert!(parties.check(&b).is_err());
        // A dearer worker: 10 tokens at 30 are 15 units of 20, not more, and not above the cap.
        let mut b = bill(&proxy, client, 100, 15);
        (b.weighted_tokens, b.price_per_token) = (10, 30);
        parties.check(&b).unwrap();
        b.billed_tokens = 16;
        b.cost = 16 * 20;
        assert!(parties.check(&b).is_err());
        let mut b = bill(&proxy, client, 100, 10);
        b.price_per_token = 31;
        b.weighted_tokens = 7;
        assert!(parties.check(&b).is_err());
        let unknown = Parties {
            proxy: None,
            ..parties
        };
        assert!(unknown.check(&bill(&proxy, client, 100, 10)).is_err());
        let unnamed = Parties {
            contract: None,
            ..parties
        };
        assert!(unnamed.check(&bill(&proxy, client, 100, 10)).is_err());
    }
}
