//! A local emulated chain: accounts with code, data and balance, executed by tycho-vm (a pure
//! Rust TVM with the reference's opcodes and exit codes). It delivers external messages to
//! wallets and the internal messages contracts send, in order, with bounces, so contract
//! tests and the TON ledger backend's tests run offline.
//!
//! It models what cocoon's contracts depend on: the compute phase (TVM), the send modes they
//! use (0, +1, +2, +64, +128) and bounces carrying the first 256 bits of the body. It does not
//! charge gas or storage fees (the reference emulator's figures are in the sandbox run), so TON
//! balances here are the amounts moved, not what a real chain would leave.

use std::collections::{BTreeMap, VecDeque};

use num_bigint::BigInt;
use tycho_types::cell::{Cell, CellBuilder, CellSlice, HashBytes};
use tycho_types::models::{
    CurrencyCollection, IntAddr, IntMsgInfo, MsgInfo, OutAction, OutActionsRevIter, OwnedMessage,
    RelaxedMsgInfo, ReserveCurrencyFlags, SendMsgFlags, StdAddr,
};
use tycho_types::num::Tokens;
use tycho_types::prelude::Boc;
use tycho_vm::{
    GasParams, OwnedCellSlice, RcStackValue, SafeRc, SmcInfoBase, SmcInfoTonV11, Stack,
    UnpackedInMsgSmcInfo, VmState, VmVersion, tuple,
};

use crate::error::TonError;

/// Exit code of a transaction whose compute phase was skipped (no code to run).
pub const SKIPPED: i32 = i32::MIN;
const GAS_LIMIT: u64 = 1_000_000;
const EXTERNAL_CREDIT: u64 = 10_000;

/// One account on the emulated chain (workchain 0, keyed by its address hash).
#[derive(Clone, Debug, Default)]
pub struct Account {
    /// The contract's code; `None` until the account is deployed.
    pub code: Option<Cell>,
    /// The contract's persistent data; `None` until the account is deployed.
    pub data: Option<Cell>,
    /// Balance in nanotons.
    pub balance: u128,
    /// Logical time of the account's last transaction.
    pub last_lt: u64,
}

/// One executed transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tx {
    /// Address hash (workchain 0) of the account that executed the transaction.
    pub account: HashBytes,
    /// The transaction's logical time, unique and increasing across the chain.
    pub lt: u64,
    /// The compute phase's exit code ([`SKIPPED`] when nothing ran).
    pub exit_code: i32,
    /// Gas the compute phase consumed (not charged: the emulator takes no fees).
    pub gas_used: u64,
    /// Whether the inbound message was a bounce.
    pub bounced: bool,
    /// Hash of the inbound message cell.
    pub in_msg_hash: HashBytes,
    /// The messages the transaction sent, in order (a bounce included).
    pub out_msgs: Vec<OutMsg>,
    /// The action phase's result code (0: it succeeded, and only then do the messages go out);
    /// `None` when there was no action phase (the compute phase was skipped or failed).
    pub action_result: Option<i32>,
}

/// A message a transaction sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutMsg {
    /// Address hash (workchain 0) of the destination.
    pub dst: HashBytes,
    /// Hash of the message cell: the `in_msg_hash` of the transaction that receives it.
    pub hash: HashBytes,
}

/// TON's action-phase result code for a message or reservation asking for more than the account
/// has: the emulator's failures carry a chain's codes so clients read both alike.
const ACTION_NO_FUNDS: i32 = 37;
/// TON's action-phase result code for an action that does not parse.
const ACTION_INVALID: i32 = 34;

/// Why [`Chain::send_external`] refused an external message.
#[derive(Debug, thiserror::Error)]
pub enum RejectReason {
    /// The destination has no code ([`SKIPPED`]) or its code did not accept the message (the exit
    /// code).
    #[error("external message not accepted (exit code {0})")]
    NotAccepted(i32),
    /// The bytes are not a BOC holding an inbound external message.
    #[error("malformed message: {0}")]
    Malformed(String),
}

struct Pending {
    src: Option<IntAddr>,
    msg: OwnedMessage,
    value: u128,
}

/// The emulated chain: its accounts, clock and the history of transactions executed.
#[derive(Default)]
pub struct Chain {
    /// The chain's clock, Unix time in seconds, as contracts see it.
    pub now: u32,
    accounts: BTreeMap<HashBytes, Account>,
    lt: u64,
    history: Vec<Tx>,
}

fn std_addr(hash: HashBytes) -> IntAddr {
    IntAddr::Std(StdAddr::new(0, hash))
}

/// What a reserve action keeps back, as TON's action phase computes it: `x` is the amount asked,
/// `original` the balance the contract ran with, `free` what earlier actions left. `None` when
/// the reservation cannot be met and the action does not allow less (the action phase fails).
fn reservation(mode: ReserveCurrencyFlags, x: u128, original: u128, free: u128) -> Option<u128> {
    let mut x = x;
    if mode.contains(ReserveCurrencyFlags::WITH_ORIGINAL_BALANCE) {
        x = if mode.contains(ReserveCurrencyFlags::REVERSE) {
            original.checked_sub(x)?
        } else {
            original.checked_add(x)?
        };
    } else if mode.contains(ReserveCurrencyFlags::REVERSE) {
        return None;
    }
    if mode.contains(ReserveCurrencyFlags::ALL_BUT) {
        x = free.checked_sub(x)?;
    }
    if mode.contains(ReserveCurrencyFlags::IGNORE_ERROR) {
        x = x.min(free);
    }
    (x <= free).then_some(x)
}

fn hash_of(addr: &IntAddr) -> HashBytes {
    match addr {
        IntAddr::Std(a) => a.address,
        IntAddr::Var(_) => HashBytes::ZERO,
    }
}

fn int(v: &RcStackValue) -> Option<BigInt> {
    v.as_int().cloned()
}

impl Chain {
    /// An empty chain whose clock reads `now` (Unix seconds).
    pub fn new(now: u32) -> Self {
        Self {
            now,
            ..Self::default()
        }
    }

    /// The account at `address`, if the chain knows it (funded, deployed or sent a message).
    pub fn account(&self, address: &HashBytes) -> Option<&Account> {
        self.accounts.get(address)
    }

    /// Whether the account at `address` has been deployed (has code).
    pub fn is_active(&self, address: &HashBytes) -> bool {
        self.accounts.get(address).is_some_and(|a| a.code.is_some())
    }

    /// All the TON the chain's accounts hold, in nanotons. The emulator charges no fees, so
    /// only [`Chain::fund`] changes it: a test can check that no contract creates or loses any.
    pub fn total_balance(&self) -> u128 {
        self.accounts.values().map(|a| a.balance).sum()
    }

    /// Gives `amount` to an account (a faucet: how test wallets get their first TON).
    pub fn fund(&mut self, address: HashBytes, amount: u128) {
        self.accounts.entry(address).or_default().balance += amount;
    }

    /// Every transaction executed so far, oldest first.
    pub fn transactions(&self) -> &[Tx] {
        &self.history
    }

    /// Delivers an external message (a BOC) and everything it sets off; returns the
    /// transactions it caused, in order.
    pub fn send_external(&mut self, boc: &[u8]) -> Result<Vec<Tx>, RejectReason> {
        let root = Boc::decode(boc).map_err(|e| RejectReason::Malformed(e.to_string()))?;
        let msg: OwnedMessage = root
            .parse::<OwnedMessage>()
            .map_err(|e| RejectReason::Malformed(e.to_string()))?;
        let MsgInfo::ExtIn(info) = &msg.info else {
            return Err(RejectReason::Malformed(
                "not an inbound external message".into(),
            ));
        };
        let dest = hash_of(&info.dst);
        let first = self.history.len();
        let account = self.accounts.entry(dest).or_default().clone();
        let account = self.with_init(account, &msg, dest);
        let Some(code) = account.code.clone() else {
            return Err(RejectReason::NotAccepted(SKIPPED));
        };
        self.lt += 1;
        let lt = self.lt;
        let body = OwnedCellSlice::from(msg.body.clone());
        let stack = tuple![int account.balance, int 0, cell root.clone(), slice body, int -1];
        let gas = GasParams {
            max: GAS_LIMIT,
            limit: 0,
            credit: EXTERNAL_CREDIT,
            ..GasParams::getter()
        };
        let run = self.run(&account, dest, code, stack, gas, None, 0);
        if !run.accepted {
            return Err(RejectReason::NotAccepted(run.exit_code));
        }
        let mut queue = VecDeque::new();
        self.finish(
            dest,
            account,
            run,
            lt,
            *root.repr_hash(),
            false,
            0,
            &mut queue,
        );
        self.drain(queue);
        Ok(self.history[first..].to_vec())
    }

    fn with_init(&self, mut account: Account, msg: &OwnedMessage, dest: HashBytes) -> Account {
        if account.code.is_none()
            && let Some(init) = &msg.init
            && CellBuilder::build_from(init).is_ok_and(|c| *c.repr_hash() == dest)
        {
            account.code = init.code.clone();
            account.data = init.data.clone();
        }
        account
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        account: &Account,
        address: HashBytes,
        code: Cell,
        stack: Vec<RcStackValue>,
        gas: GasParams,
        in_msg: Option<SafeRc<tycho_vm::Tuple>>,
        msg_value: u128,
    ) -> Run {
        let smc = SmcInfoBase::new()
            .with_now(self.now)
            .with_block_lt(self.lt)
            .with_tx_lt(self.lt)
            .with_raw_rand_seed(HashBytes::ZERO)
            .with_account_balance(CurrencyCollection::new(account.balance))
            .with_account_addr(std_addr(address))
            .require_ton_v4()
            .with_code(code.clone())
            .with_message_balance(CurrencyCollection::new(msg_value))
            .require_ton_v6()
            .require_ton_v11()
            .with_unpacked_in_msg(in_msg);
        let mut vm = VmState::builder()
            .with_smc_info(smc)
            .with_code(code)
            // c3 is the code itself, so CALLDICT reaches the contract's procedures.
            .with_init_selector(false)
            .with_data(account.data.clone().unwrap_or_default())
            .with_raw_stack(SafeRc::new(Stack { items: stack }))
            .with_gas(gas)
            // After the smc info, which would pin v11: the contracts use v12's BTOS.
            .with_version(VmVersion::LATEST_TON)
            .build();
        let exit_code = !vm.run();
        let accepted = vm.gas.credit() == 0;
        Run {
            exit_code,
            accepted,
            gas_used: vm.gas.consumed(),
            committed: vm
                .committed_state
                .take()
                .filter(|_| accepted && (exit_code == 0 || exit_code == 1))
                .map(|c| (c.c4, c.c5)),
            stack: vm.stack.items.clone(),
        }
    }

    fn drain(&mut self, mut queue: VecDeque<Pending>) {
        while let Some(p) = queue.pop_front() {
            self.deliver(p, &mut queue);
        }
    }

    fn deliver(&mut self, p: Pending, queue: &mut VecDeque<Pending>) {
        let MsgInfo::Int(info) = &p.msg.info else {
            return;
        };
        let dest = hash_of(&info.dst);
        let bounce = info.bounce;
        let bounced = info.bounced;
        let mut account = self.accounts.get(&dest).cloned().unwrap_or_default();
        account = self.with_init(account, &p.msg, dest);
        account.balance += p.value;
        self.lt += 1;
        let lt = self.lt;
        let root = CellBuilder::build_from(&p.msg).expect("a parsed message rebuilds");
        let Some(code) = account.code.clone() else {
            // Nothing to run: the value stays on the (uninitialized) account unless it bounces.
            let mut out = Vec::new();
            if bounce && !bounced {
                account.balance -= p.value;
                out.push(self.bounce_of(&p, dest));
            }
            self.record(dest, lt, SKIPPED, 0, bounced, *root.repr_hash(), &out, None);
            queue.extend(out);
            self.accounts.insert(dest, account);
            return;
        };
        let in_msg = SmcInfoTonV11::unpack_in_msg_partial(root.clone(), None)
            .ok()
            .flatten()
            .map(UnpackedInMsgSmcInfo::into_tuple);
        let body = OwnedCellSlice::from(p.msg.body.clone());
        let stack = tuple![int account.balance, int p.value, cell root.clone(), slice body, int 0];
        let gas = GasParams {
            max: GAS_LIMIT,
            limit: GAS_LIMIT,
            credit: 0,
            ..GasParams::getter()
        };
        let run = self.run(&account, dest, code, stack, gas, in_msg, p.value);
        if run.committed.is_none() {
            let mut out = Vec::new();
            if bounce && !bounced {
                account.balance -= p.value;
                out.push(self.bounce_of(&p, dest));
            }
            self.record(
                dest,
                lt,
                run.exit_code,
                run.gas_used,
                bounced,
                *root.repr_hash(),
                &out,
                None,
            );
            queue.extend(out);
            self.accounts.insert(dest, account);
            return;
        }
        self.finish(
            dest,
            account,
            run,
            lt,
            *root.repr_hash(),
            bounced,
            p.value,
            queue,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        dest: HashBytes,
        mut account: Account,
        run: Run,
        lt: u64,
        in_hash: HashBytes,
        bounced: bool,
        msg_value: u128,
        queue: &mut VecDeque<Pending>,
    ) {
        let (c4, c5) = run.committed.clone().expect("only committed runs finish");
        let before = account.clone();
        account.data = Some(c4);
        account.last_lt = lt;
        let mut remaining_in = msg_value;
        let mut sends = Vec::new();
        let mut actions: Vec<_> = OutActionsRevIter::new(c5.as_slice().expect("ordinary cell"))
            .filter_map(Result::ok)
            .collect();
        actions.reverse();
        let mut failed = None;
        // The balance the contract saw when it ran, and what its reservations keep back from
        // the messages that follow them (TON's rawreserve, in the action list's order).
        let original = account.balance;
        let mut reserved: u128 = 0;
        for action in actions {
            let (mode, out_msg) = match action {
                OutAction::SendMsg { mode, out_msg } => (mode, out_msg),
                OutAction::ReserveCurrency { mode, value } => {
                    match reservation(
                        mode,
                        value.tokens.into_inner(),
                        original,
                        account.balance - reserved,
                    ) {
                        Some(amount) => reserved += amount,
                        None => {
                            failed = Some(ACTION_NO_FUNDS);
                            break;
                        }
                    }
                    continue;
                }
                _ => continue,
            };
            let Ok(relaxed) = out_msg.load() else {
                failed = Some(ACTION_INVALID);
                break;
            };
            let RelaxedMsgInfo::Int(info) = &relaxed.info else {
                continue;
            };
            let mut value: u128 = info.value.tokens.into_inner();
            let free = account.balance - reserved;
            if mode.contains(SendMsgFlags::ALL_BALANCE) {
                value = free;
            } else if mode.contains(SendMsgFlags::WITH_REMAINING_BALANCE) {
                value += remaining_in;
                remaining_in = 0;
            }
            if value > free {
                if mode.contains(SendMsgFlags::IGNORE_ERROR) {
                    continue;
                }
                failed = Some(ACTION_NO_FUNDS);
                break;
            }
            account.balance -= value;
            let full = OwnedMessage {
                info: MsgInfo::Int(IntMsgInfo {
                    ihr_disabled: info.ihr_disabled,
                    bounce: info.bounce,
                    bounced: info.bounced,
                    src: std_addr(dest),
                    dst: info.dst.clone(),
                    value: CurrencyCollection::new(value),
                    extra_flags: info.extra_flags,
                    fwd_fee: Tokens::ZERO,
                    created_lt: lt,
                    created_at: self.now,
                }),
                init: relaxed.init.clone(),
                body: relaxed.body.clone(),
                layout: None,
            };
            sends.push(Pending {
                src: Some(std_addr(dest)),
                msg: full,
                value,
            });
        }
        if let Some(code) = failed {
            // The action phase failed: nothing of this transaction stands.
            let (exit, gas) = (run.exit_code, run.gas_used);
            self.record(dest, lt, exit, gas, bounced, in_hash, &[], Some(code));
            self.accounts.insert(dest, before);
            return;
        }
        let (exit, gas) = (run.exit_code, run.gas_used);
        self.record(dest, lt, exit, gas, bounced, in_hash, &sends, Some(0));
        self.accounts.insert(dest, account);
        queue.extend(sends);
    }

    fn bounce_of(&self, p: &Pending, from: HashBytes) -> Pending {
        let body = CellSlice::apply(&p.msg.body).expect("ordinary body");
        let bits = body.size_bits().min(256);
        let mut b = CellBuilder::new();
        b.store_u32(0xffff_ffff).expect("fits");
        b.store_slice_data(body.get_prefix(bits, 0)).expect("fits");
        let bounce_body = b.build().expect("fits");
        let src = p.src.clone().expect("only internal messages bounce");
        let msg = OwnedMessage {
            info: MsgInfo::Int(IntMsgInfo {
                ihr_disabled: true,
                bounce: false,
                bounced: true,
                src: std_addr(from),
                dst: src,
                value: CurrencyCollection::new(p.value),
                created_lt: self.lt,
                created_at: self.now,
                ..IntMsgInfo::default()
            }),
            init: None,
            body: (
                tycho_types::cell::CellSliceRange::full(bounce_body.as_ref()),
                bounce_body,
            ),
            layout: None,
        };
        Pending {
            src: Some(std_addr(from)),
            msg,
            value: p.value,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        account: HashBytes,
        lt: u64,
        exit_code: i32,
        gas_used: u64,
        bounced: bool,
        in_msg_hash: HashBytes,
        sent: &[Pending],
        action_result: Option<i32>,
    ) {
        let out_msgs = sent
            .iter()
            .filter_map(|p| {
                let MsgInfo::Int(info) = &p.msg.info else {
                    return None;
                };
                // The same cell `deliver` rebuilds and hashes as the receiver's inbound message.
                let cell = CellBuilder::build_from(&p.msg).expect("a built message rebuilds");
                Some(OutMsg {
                    dst: hash_of(&info.dst),
                    hash: *cell.repr_hash(),
                })
            })
            .collect();
        self.history.push(Tx {
            account,
            lt,
            exit_code,
            gas_used,
            bounced,
            in_msg_hash,
            out_msgs,
            action_result,
        });
    }

    /// Runs a get-method by name with integer arguments; returns the integer results.
    pub fn get(
        &self,
        address: &HashBytes,
        method: &str,
        args: &[BigInt],
    ) -> Result<Vec<BigInt>, TonError> {
        let account = self
            .accounts
            .get(address)
            .filter(|a| a.code.is_some())
            .ok_or_else(|| TonError::Api(format!("account {address} is not active")))?;
        let mut stack: Vec<RcStackValue> = args
            .iter()
            .map(|a| RcStackValue::new_dyn_value(a.clone()))
            .collect();
        stack.push(RcStackValue::new_dyn_value(BigInt::from(method_id(method))));
        let run = self.run(
            account,
            *address,
            account.code.clone().expect("filtered"),
            stack,
            GasParams::getter(),
            None,
            0,
        );
        if run.exit_code != 0 && run.exit_code != 1 {
            return Err(TonError::GetMethod {
                method: method.to_owned(),
                exit_code: run.exit_code,
            });
        }
        run.stack
            .iter()
            .map(|v| {
                int(v).ok_or_else(|| TonError::Api(format!("{method} returned a non-integer")))
            })
            .collect()
    }

    /// Sets the chain's clock to `now` (Unix seconds), e.g. to pass a close delay.
    pub fn set_now(&mut self, now: u32) {
        self.now = now;
    }
}

struct Run {
    exit_code: i32,
    accepted: bool,
    gas_used: u64,
    committed: Option<(Cell, Cell)>,
    stack: Vec<RcStackValue>,
}

/// A get-method's id: CRC-16/XMODEM of its name, with bit 16 set (as FunC and Tolk assign).
pub fn method_id(name: &str) -> u32 {
    let mut crc: u16 = 0;
    for byte in name.bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    u32::from(crc) | 0x10000
}
