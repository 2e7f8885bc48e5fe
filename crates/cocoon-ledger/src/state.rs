//! The contracts' rules as a deterministic state machine: the single source of truth for what
//! every ledger backend must do. An operation either applies in full or is refused with the
//! state unchanged (every check runs before the first change).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::LedgerError;
use crate::ledger::{ImageRole, Op, Receipt, Tx};
use crate::message::PaymentMessage;
use crate::registry::Registry;
use crate::types::{
    Address, ClientContract, ContractState, Nanoton, Network, ProxyContract, PublicKey,
    WorkerContract,
};

/// Everything a ledger holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerState {
    /// Who may take part, and the network's prices.
    pub registry: Registry,
    /// Proxy contracts, by address.
    pub proxies: BTreeMap<Address, ProxyContract>,
    /// Client contracts, by address.
    pub clients: BTreeMap<Address, ClientContract>,
    /// Worker contracts, by address.
    pub workers: BTreeMap<Address, WorkerContract>,
    /// Money brought in and sent out over the ledger's life: what it holds must always equal
    /// `deposited - paid_out`.
    pub deposited: Nanoton,
    /// Money sent out over the ledger's life, in nanoton.
    pub paid_out: Nanoton,
}

/// Which record an operation changed, so storage writes only those.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Touched {
    /// The registry: allowed images and models, registered proxies, parameters.
    Registry,
    /// The lifetime totals of money brought in and sent out.
    Totals,
    /// The proxy contract at this address.
    Proxy(Address),
    /// The client contract at this address.
    Client(Address),
    /// The worker contract at this address.
    Worker(Address),
}

fn add(a: Nanoton, b: Nanoton) -> Result<Nanoton, LedgerError> {
    a.checked_add(b).ok_or(LedgerError::Overflow)
}

fn nonzero(amount: Nanoton) -> Result<Nanoton, LedgerError> {
    if amount == 0 {
        Err(LedgerError::ZeroAmount)
    } else {
        Ok(amount)
    }
}

/// The contract at `at`, which must exist.
fn existing<C>(contracts: &mut BTreeMap<Address, C>, at: Address) -> Result<&mut C, LedgerError> {
    contracts.get_mut(&at).ok_or(LedgerError::NoContract(at))
}

/// Whether a closing contract's delay has passed.
fn unlocked(state: &ContractState, at: Address, now: u64) -> Result<(), LedgerError> {
    match *state {
        ContractState::Closing { unlock_at } if now >= unlock_at => Ok(()),
        ContractState::Closing { unlock_at } => Err(LedgerError::StillLocked {
            address: at,
            unlock_at,
            now,
        }),
        _ => Err(LedgerError::NotClosing(at)),
    }
}

/// The result of an operation that sent `amount` out of the ledger from the contract `from`.
fn moved_out(amount: Nanoton, from: Touched) -> (Receipt, Vec<Touched>) {
    let receipt = Receipt {
        paid_out: amount,
        ..Receipt::default()
    };
    (receipt, vec![from, Touched::Totals])
}

/// The result of an operation that brought `amount` into the ledger, into the contract `to`.
fn moved_in(amount: Nanoton, to: Touched) -> (Receipt, Vec<Touched>) {
    let receipt = Receipt {
        deposited: amount,
        ..Receipt::default()
    };
    (receipt, vec![to, Touched::Totals])
}

impl LedgerState {
    /// An empty ledger of `network` whose registry is owned by `owner`.
    pub fn new(owner: PublicKey, network: Network) -> Self {
        Self {
            registry: Registry::new(owner, network),
            proxies: BTreeMap::new(),
            clients: BTreeMap::new(),
            workers: BTreeMap::new(),
            deposited: 0,
            paid_out: 0,
        }
    }

    /// What all contracts hold together.
    pub fn held(&self) -> Nanoton {
        let proxies: Nanoton = self
            .proxies
            .values()
            .map(|p| p.balance + p.stake + p.owed)
            .sum();
        let clients: Nanoton = self.clients.values().map(|c| c.balance).sum();
        let workers: Nanoton = self.workers.values().map(|w| w.balance).sum();
        proxies + clients + workers
    }

    /// Applies `tx`, or refuses it and changes nothing.
    pub fn apply(&mut self, tx: &Tx) -> Result<(Receipt, Vec<Touched>), LedgerError> {
        let sender = tx.sender;
        let now = tx.now;
        match &tx.op {
            Op::SetParams { params } => {
                self.owner(sender)?;
                params.validate()?;
                self.registry.params = params.clone();
                Ok((Receipt::default(), vec![Touched::Registry]))
            }
            Op::AllowImage { role, hash } | Op::RevokeImage { role, hash } => {
                self.owner(sender)?;
                let set = match role {
                    ImageRole::Worker => &mut self.registry.worker_images,
                    ImageRole::Proxy => &mut self.registry.proxy_images,
                };
                if matches!(tx.op, Op::AllowImage { .. }) {
                    set.insert(hash.to_ascii_lowercase());
                } else {
                    set.remove(&hash.to_ascii_lowercase());
                }
                Ok((Receipt::default(), vec![Touched::Registry]))
            }
            Op::AllowModel { hash } => {
                self.owner(sender)?;
                self.registry.models.insert(hash.to_ascii_lowercase());
                Ok((Receipt::default(), vec![Touched::Registry]))
            }
            Op::RegisterProxy { key, address } => {
                self.owner(sender)?;
                self.registry
                    .proxies
                    .insert(hex::encode(key), address.clone());
                Ok((Receipt::default(), vec![Touched::Registry]))
            }
            Op::RevokeModel { hash } => {
                self.owner(sender)?;
                self.registry.models.remove(&hash.to_ascii_lowercase());
                Ok((Receipt::default(), vec![Touched::Registry]))
            }
            Op::UnregisterProxy { key } => {
                self.owner(sender)?;
                if self.registry.proxies.remove(&hex::encode(key)).is_none() {
                    return Err(LedgerError::UnknownProxy);
                }
                Ok((Receipt::default(), vec![Touched::Registry]))
            }
            Op::ProposeOwner { owner } => {
                self.owner(sender)?;
                self.registry.pending_owner = Some(hex::encode(owner));
                Ok((Receipt::default(), vec![Touched::Registry]))
            }
            Op::AcceptOwner => {
                if self.registry.pending_owner.as_deref() != Some(hex::encode(sender).as_str()) {
                    return Err(LedgerError::NotOwner);
                }
                self.registry.owner = sender;
                self.registry.pending_owner = None;
                Ok((Receipt::default(), vec![Touched::Registry]))
            }
            Op::ProxyOpen { stake } => self.proxy_open(sender, *stake),
            Op::ProxyAddStake { amount } => {
                let at = Address::proxy(&sender);
                nonzero(*amount)?;
                let deposited = add(self.deposited, *amount)?;
                let proxy = existing(&mut self.proxies, at)?;
                if proxy.state != ContractState::Normal {
                    return Err(LedgerError::NotOpen(at));
                }
                proxy.stake = add(proxy.stake, *amount)?;
                self.deposited = deposited;
                Ok(moved_in(*amount, Touched::Proxy(at)))
            }
            Op::ProxyWithdraw { amount } => self.proxy_withdraw(sender, *amount),
            Op::ProxyClose => {
                let at = Address::proxy(&sender);
                let unlock_at = now.saturating_add(self.registry.params.proxy_close_delay);
                let proxy = existing(&mut self.proxies, at)?;
                if proxy.state != ContractState::Normal {
                    return Err(LedgerError::AlreadyClosing(at));
                }
                proxy.state = ContractState::Closing { unlock_at };
                Ok((Receipt::default(), vec![Touched::Proxy(at)]))
            }
            Op::ProxyFinishClose => self.proxy_finish_close(sender, now),
            Op::ProxyRefundClient { client } => self.proxy_refund(sender, client),
            Op::ClientDeposit { proxy, amount } => self.client_deposit(sender, proxy, *amount),
            Op::ClientStake { proxy, amount } => self.client_stake(sender, proxy, *amount),
            Op::ClientWithdraw { proxy, amount } => self.client_withdraw(sender, proxy, *amount),
            Op::ClientClose { proxy } => self.client_close(sender, proxy, now),
            Op::ClientFinishClose { proxy } => self.client_finish_close(sender, proxy, now),
            Op::Charge { proxy, message } => {
                let message = message.verify(proxy, self.registry.network)?;
                self.charge(proxy, message)
            }
            Op::Payout { proxy, message } => {
                let message = message.verify(proxy, self.registry.network)?;
                self.payout(sender, proxy, message)
            }
            Op::WorkerWithdraw { proxy } => {
                let at = Address::worker(proxy, &sender);
                let worker = existing(&mut self.workers, at)?;
                let amount = nonzero(worker.balance)?;
                let paid_out = add(self.paid_out, amount)?;
                worker.balance = 0;
                self.paid_out = paid_out;
                Ok(moved_out(amount, Touched::Worker(at)))
            }
        }
    }

    fn owner(&self, sender: PublicKey) -> Result<(), LedgerError> {
        if sender == self.registry.owner {
            Ok(())
        } else {
            Err(LedgerError::NotOwner)
        }
    }

    fn proxy_open(
        &mut self,
        sender: PublicKey,
        stake: Nanoton,
    ) -> Result<(Receipt, Vec<Touched>), LedgerError> {
        if !self.registry.is_proxy(&sender) {
            return Err(LedgerError::UnknownProxy);
        }
        let at = Address::proxy(&sender);
        // A proxy whose contract finished closing may open again: how it moves to the
        // parameters now in force.
        if self
            .proxies
            .get(&at)
            .is_some_and(|p| p.state != ContractState::Closed)
        {
            return Err(LedgerError::AlreadyExists(at));
        }
        let min = self.registry.params.min_proxy_stake;
        if stake < min || stake == 0 {
            return Err(LedgerError::StakeTooLow { stake, min });
        }
        let deposited = add(self.deposited, stake)?;
        self.proxies.insert(
            at,
            ProxyContract {
                key: sender,
                balance: 0,
                stake,
                owed: 0,
                state: ContractState::Normal,
            },
        );
        self.deposited = deposited;
        Ok(moved_in(stake, Touched::Proxy(at)))
    }

    fn proxy_withdraw(
        &mut self,
        sender: PublicKey,
        amount: Nanoton,
    ) -> Result<(Receipt, Vec<Touched>), LedgerError> {
        let at = Address::proxy(&sender);
        let proxy = existing(&mut self.proxies, at)?;
        nonzero(amount)?;
        if proxy.state == ContractState::Closed {
            return Err(LedgerError::NotOpen(at));
        }
        if amount > proxy.balance {
            return Err(LedgerError::InsufficientBalance {
                balance: proxy.balance,
                needed: amount,
            });
        }
        let paid_out = add(self.paid_out, amount)?;
        proxy.balance -= amount;
        self.paid_out = paid_out;
        Ok(moved_out(amount, Touched::Proxy(at)))
    }

    fn proxy_finish_close(
        &mut self,
        sender: PublicKey,
        now: u64,
    ) -> Result<(Receipt, Vec<Touched>), LedgerError> {
        let at = Address::proxy(&sender);
        let proxy = existing(&mut self.proxies, at)?;
        unlocked(&proxy.state, at, now)?;
        // What workers left unclaimed through the whole close delay goes with the rest.
        let amount = proxy.balance + proxy.stake + proxy.owed;
        let paid_out = add(self.paid_out, amount)?;
        proxy.balance = 0;
        proxy.stake = 0;
        proxy.owed = 0;
        proxy.state = ContractState::Closed;
        self.paid_out = paid_out;
        Ok(moved_out(amount, Touched::Proxy(at)))
    }

    fn proxy_refund(
        &mut self,
        sender: PublicKey,
        client: &PublicKey,
    ) -> Result<(Receipt, Vec<Touched>), LedgerError> {
        let at = Address::client(&sender, client);
        let contract = existing(&mut self.clients, at)?;
        if contract.state == ContractState::Closed {
            return Err(LedgerError::AlreadyClosing(at));
        }
        let amount = contract.balance;
        let paid_out = add(self.paid_out, amount)?;
        contract.balance = 0;
        contract.stake = 0;
        contract.state = ContractState::Closed;
        self.paid_out = paid_out;
        Ok(moved_out(amount, Touched::Client(at)))
    }

    fn open_proxy(&self, proxy: &PublicKey) -> Result<&ProxyContract, LedgerError> {
        let at = Address::proxy(proxy);
        let contract = self.proxies.get(&at).ok_or(LedgerError::UnknownProxy)?;
        if contract.state != ContractState::Normal {
            return Err(LedgerError::NotOpen(at));
        }
        Ok(contract)
    }

    fn client_deposit(
        &mut self,
        sender: PublicKey,
        proxy: &PublicKey,
        amount: Nanoton,
    ) -> Result<(Receipt, Vec<Touched>), LedgerError> {
        nonzero(amount)?;
        self.open_proxy(proxy)?;
        let at = Address::client(proxy, &sender);
        let deposited = add(self.deposited, amount)?;
        let contract = self.clients.entry(at).or_insert_with(|| ClientContract {
            client: sender,
            proxy: *proxy,
            balance: 0,
            stake: 0,
            tokens_used: 0,
            state: ContractState::Normal,
        });
        if contract.state != ContractState::Normal {
            return Err(LedgerError::NotOpen(at));
        }
        let balance = add(contract.balance, amount)?;
        contract.balance = balance;
        self.deposited = deposited;
        Ok(moved_in(amount, Touched::Client(at)))
    }

    fn open_client(
        &mut self,
        sender: &PublicKey,
        proxy: &PublicKey,
    ) -> Result<(Address, &mut ClientContract), LedgerError> {
        let at = Address::client(proxy, sender);
        let contract = existing(&mut self.clients, at)?;
        if contract.state != ContractState::Normal {
            return Err(LedgerError::NotOpen(at));
        }
        Ok((at, contract))
    }

    fn client_stake(
        &mut self,
        sender: PublicKey,
        proxy: &PublicKey,
        amount: Nanoton,
    ) -> Result<(Receipt, Vec<Touched>), LedgerError> {
        nonzero(amount)?;
        let min = self.registry.params.min_client_stake;
        let (at, contract) = self.open_client(&sender, proxy)?;
        let stake = add(contract.stake, amount)?;
        if stake > contract.balance {
            return Err(LedgerError::InsufficientBalance {
                balance: contract.balance,
                needed: stake,
            });
        }
        if stake < min {
            return Err(LedgerError::StakeTooLow { stake, min });
        }
        contract.stake = stake;
        Ok((Receipt::default(), vec![Touched::Client(at)]))
    }

    fn client_withdraw(
        &mut self,
        sender: PublicKey,
        proxy: &PublicKey,
        amount: Nanoton,
    ) -> Result<(Receipt, Vec<Touched>), LedgerError> {
        nonzero(amount)?;
        let paid_out_before = self.paid_out;
        let (at, contract) = self.open_client(&sender, proxy)?;
        let left = contract.balance.checked_sub(amount);
        match left {
            Some(left) if left >= contract.stake => {
                let paid_out = add(paid_out_before, amount)?;
                contract.balance = left;
                self.paid_out = paid_out;
                Ok(moved_out(amount, Touched::Client(at)))
            }
            _ => Err(LedgerError::BelowStake {
                amount,
                left: contract.balance.saturating_sub(amount),
                stake: contract.stake,
            }),
        }
    }

    /// Without the proxy: what is above the stake comes back now, the stake after the close
    /// delay, so the proxy can still charge for work it did.
    fn client_close(
        &mut self,
        sender: PublicKey,
        proxy: &PublicKey,
        now: u64,
    ) -> Result<(Receipt, Vec<Touched>), LedgerError> {
        let unlock_at = now.saturating_add(self.registry.params.client_close_delay);
        let at = Address::client(proxy, &sender);
        let contract = existing(&mut self.clients, at)?;
        if contract.state != ContractState::Normal {
            return Err(LedgerError::AlreadyClosing(at));
        }
        let amount = contract.balance - contract.stake;
        let paid_out = add(self.paid_out, amount)?;
        contract.balance = contract.stake;
        contract.state = ContractState::Closing { unlock_at };
        self.paid_out = paid_out;
        Ok(moved_out(amount, Touched::Client(at)))
    }

    fn client_finish_close(
        &mut self,
        sender: PublicKey,
        proxy: &PublicKey,
        now: u64,
    ) -> Result<(Receipt, Vec<Touched>), LedgerError> {
        let at = Address::client(proxy, &sender);
        let contract = existing(&mut self.clients, at)?;
        unlocked(&contract.state, at, now)?;
        let amount = contract.balance;
        let paid_out = add(self.paid_out, amount)?;
        contract.balance = 0;
        contract.stake = 0;
        contract.state = ContractState::Closed;
        self.paid_out = paid_out;
        Ok(moved_out(amount, Touched::Client(at)))
    }

    fn charge(
        &mut self,
        proxy: &PublicKey,
        message: PaymentMessage,
    ) -> Result<(Receipt, Vec<Touched>), LedgerError> {
        let PaymentMessage::ChargeClient {
            tokens_used,
            contract: named,
            ..
        } = message
        else {
            return Err(LedgerError::BadMessage("not a charge message".into()));
        };
        let proxy_at = Address::proxy(proxy);
        let contract = self
            .clients
            .get(&named)
            .ok_or(LedgerError::NoContract(named))?;
        let this = Address::client(proxy, &contract.client);
        if this != named {
            // The message names a contract of another proxy's client.
            return Err(LedgerError::WrongContract {
                this,
                expected_in_message: named,
            });
        }
        if contract.state == ContractState::Closed {
            return Err(LedgerError::NotOpen(named));
        }
        if tokens_used <= contract.tokens_used {
            return Err(LedgerError::CounterNotIncreasing {
                stored: contract.tokens_used,
                got: tokens_used,
            });
        }
        let tokens = tokens_used - contract.tokens_used;
        let cost = self.registry.params.cost(tokens)?;
        // The workers' share of these tokens is held for their payouts, out of the proxy's reach.
        let for_workers = self.registry.params.worker_earnings(tokens)?.min(cost);
        if cost > contract.balance {
            return Err(LedgerError::InsufficientBalance {
                balance: contract.balance,
                needed: cost,
            });
        }
        let proxy_contract = self
            .proxies
            .get(&proxy_at)
            .ok_or(LedgerError::UnknownProxy)?;
        if proxy_contract.state == ContractState::Closed {
            return Err(LedgerError::NotOpen(proxy_at));
        }
        let proxy_balance = add(proxy_contract.balance, cost - for_workers)?;
        let proxy_owed = add(proxy_contract.owed, for_workers)?;
        let contract = self.clients.get_mut(&named).expect("checked above");
        contract.balance -= cost;
        contract.stake = contract.stake.min(contract.balance);
        contract.tokens_used = tokens_used;
        let proxy_contract = self.proxies.get_mut(&proxy_at).expect("checked above");
        proxy_contract.balance = proxy_balance;
        proxy_contract.owed = proxy_owed;
        let receipt = Receipt {
            charged: cost,
            ..Receipt::default()
        };
        Ok((
            receipt,
            vec![Touched::Client(named), Touched::Proxy(proxy_at)],
        ))
    }

    /// Workers are paid from what is held for them first, then from the proxy's earnings, then
    /// from its stake: the stake is what guarantees workers their pay.
    fn payout(
        &mut self,
        sender: PublicKey,
        proxy: &PublicKey,
        message: PaymentMessage,
    ) -> Result<(Receipt, Vec<Touched>), LedgerError> {
        let PaymentMessage::PayWorker {
            tokens,
            contract: named,
            ..
        } = message
        else {
            return Err(LedgerError::BadMessage("not a payout message".into()));
        };
        let this = Address::worker(proxy, &sender);
        if this != named {
            return Err(LedgerError::WrongContract {
                this,
                expected_in_message: named,
            });
        }
        let proxy_at = Address::proxy(proxy);
        let proxy_contract = self
            .proxies
            .get(&proxy_at)
            .ok_or(LedgerError::UnknownProxy)?;
        if proxy_contract.state == ContractState::Closed {
            return Err(LedgerError::NotOpen(proxy_at));
        }
        let paid = self.workers.get(&this).map_or(0, |w| w.tokens_paid);
        if tokens <= paid {
            return Err(LedgerError::CounterNotIncreasing {
                stored: paid,
                got: tokens,
            });
        }
        let earned = self.registry.params.worker_earnings(tokens - paid)?;
        let available = proxy_contract.owed + proxy_contract.balance + proxy_contract.stake;
        if earned > available {
            return Err(LedgerError::InsufficientBalance {
                balance: available,
                needed: earned,
            });
        }
        let worker_balance = add(self.workers.get(&this).map_or(0, |w| w.balance), earned)?;
        let from_owed = earned.min(proxy_contract.owed);
        let from_balance = (earned - from_owed).min(proxy_contract.balance);
        let proxy_contract = self.proxies.get_mut(&proxy_at).expect("checked above");
        proxy_contract.owed -= from_owed;
        proxy_contract.balance -= from_balance;
        proxy_contract.stake -= earned - from_owed - from_balance;
        let worker = self.workers.entry(this).or_insert_with(|| WorkerContract {
            worker: sender,
            proxy: *proxy,
            tokens_paid: 0,
            balance: 0,
        });
        worker.tokens_paid = tokens;
        worker.balance = worker_balance;
        let receipt = Receipt {
            earned,
            ..Receipt::default()
        };
        Ok((
            receipt,
            vec![Touched::Worker(this), Touched::Proxy(proxy_at)],
        ))
    }
}
