// Adversarial review of the settlement contracts (issue 17 follow-up), in the reference emulator.
// Each test is an attack: the comment says what the attacker does and the safe outcome; the
// assertions state the safe outcome. Tests marked FINDING failed on the contracts of 494dd24:
// findings 2 and 4 are fixed (each contract keeps what it held before a message, and a refund's
// spare gas goes back to the proxy's owner); findings 1, 3, 5 and 6 are known limits, run as
// `todo` (reported, not failing) with the reason, and described in docs/contracts.md. Tests
// marked SAFE are attacks that were tried and held, kept because they assert something the
// other suites do not (wallet balances, strangers' messages, edge values).
import { test } from "node:test";
import assert from "node:assert/strict";
import { beginCell } from "@ton/core";
import { runScenario, spec } from "./run.mjs";

const PRICE = BigInt(spec.params.price_per_token);
const FEE = BigInt(spec.params.worker_fee_per_token);
const TON = 1_000_000_000n;
const STAKE = 10n * TON;
// What one operation may cost its sender in fees (docs/contracts.md measures <= 0.015 TON).
const FEES = TON / 20n;

const setup = [
  { do: "deploy_root" },
  { do: "register_proxy", from: "owner", proxy: "proxy" },
];
const open = [...setup, { do: "open_proxy", from: "proxy", proxy: "proxy", stake: Number(STAKE) }];

const find = (r, label) => {
  const i = r.findIndex((x) => x.step.includes(`(${label})`));
  assert.ok(i >= 0, `no step labelled ${label}`);
  return [r[i], r[i - 1]];
};
// How much a wallet gained (negative: lost) over a step.
const gain = (r, label, who) => {
  const [after, before] = find(r, label);
  return after.view.wallet[who] - before.view.wallet[who];
};
const custom = (label, from, to, body, value, init) => ({ do: "custom", label, from, to, body, value, init });
const empty = () => beginCell().endCell();

// ---------------------------------------------------------------------------------------------
// FINDING 1 (threat d): the workers' share and the proxy's stake are drained by the proxy itself
// through a worker contract it owns. The proxy's key (the node's own TLS/wallet key, per
// docs/contracts.md) signs worker payouts; nothing binds a payout to work a real worker did, so
// the proxy signs one for its own wallet's worker contract worth owed + balance + stake, claims
// it at once (no close delay) and withdraws. A real worker that holds a payout signed for work
// already charged to a client is then refused (109). Safe outcome: the payout signed to the
// real worker for charged work is honoured (owed and stake are not the proxy's to take while
// it is open).
test("FINDING: a proxy cannot drain owed + stake through a worker contract of its own", { todo: "known limit: whoever holds the proxy's signing key is trusted to sign payouts only for work done, as in COCOON; no contract can tell a genuine worker's claim from the key holder's own (docs/contracts.md)" }, async () => {
  const owedAfterCharge = 1000n * FEE;
  const total = 1000n * PRICE + STAKE; // owed + balance + stake after one charge of 1000 tokens
  assert.equal(total % FEE, 0n);
  const r = await runScenario([
    ...open,
    { do: "client_deposit", client: "client", amount: 5_000_000_000 },
    { do: "charge", client: "client", tokens: 1000, from: "proxy", label: "charged" },
    { do: "payout", worker: "proxy", tokens: Number(total / FEE), label: "sybil claim" },
    { do: "worker_withdraw", worker: "proxy", label: "sybil withdraw" },
    { do: "payout", worker: "worker", tokens: 1000, label: "real worker claims" },
  ]);
  const [charged] = find(r, "charged");
  assert.equal(charged.view.proxy[4], owedAfterCharge, "the workers' share is held");
  // The proxy's wallet gains the whole stake and the workers' share, right away.
  const taken = gain(r, "sybil claim", "proxy") + gain(r, "sybil withdraw", "proxy");
  const [paid] = find(r, "real worker claims");
  assert.deepEqual(paid.exits.slice(0, 2), [0, 0],
    `real worker refused (exits ${paid.exits}); the proxy took ${taken} nanoton (owed + stake) while open`);
  assert.equal(paid.view.workerOf.worker[1], owedAfterCharge, "the real worker is paid its share");
});

// ---------------------------------------------------------------------------------------------
// FINDING 2 (threats c/e): TON sent to the proxy contract without a body (a top-up, which the
// contract accepts) is not booked, and the next Charged sends everything beyond the books to
// the charge's deliverer, who may be anyone holding a signed charge (a stranger, a client
// delivering its own bill). Safe outcome: the deliverer gets back only its own excess; the
// top-up stays in the contract or goes to the proxy's owner.
test("FINDING: a top-up to the proxy contract is not swept to whoever delivers the next charge", async () => {
  const topUp = 5n * TON;
  const r = await runScenario([
    ...open,
    { do: "client_deposit", client: "client", amount: 5_000_000_000 },
    { do: "charge", client: "client", tokens: 1000, from: "proxy" },
    custom("owner tops up its proxy contract", "proxy", (x) => x.proxy, empty, topUp),
    { do: "charge", client: "client", tokens: 2000, from: "stranger", label: "stranger delivers a charge" },
  ]);
  const [topped] = find(r, "owner tops up its proxy contract");
  assert.ok(topped.state.proxy.at(-1) > 4000, "the top-up sits in the proxy contract, unbooked");
  const g = gain(r, "stranger delivers a charge", "stranger");
  assert.ok(g <= 0n, `the stranger gained ${g} nanoton by delivering one charge`);
});

// ---------------------------------------------------------------------------------------------
// FINDING 3 (threat c): the spare gas of a charge whose Charged bounces goes to the client's
// owner, not to whoever delivered (and paid for) the charge. The proxy's backend attaches 0.1
// TON to each charge; a deliverer that attaches more loses all of it. Safe outcome: the
// deliverer loses only fees; the client gets back exactly the cost.
test("FINDING: a bounced charge returns the deliverer's spare gas to the deliverer", { todo: "known limit: a bounce returns 256 bits, too few to name the deliverer; only a charge the proxy contract cannot take bounces (signed before it opened, or for a client bound to terms it no longer holds after re-opening)" }, async () => {
  const value = 2n * TON;
  const r = await runScenario([
    ...setup,
    { do: "client_deposit", client: "client", amount: 5_000_000_000 },
    { do: "charge", client: "client", tokens: 1000, from: "stranger", value: Number(value), label: "bounced charge" },
  ]);
  const [x] = find(r, "bounced charge");
  assert.equal(x.view.clientOf.client[2], 5n * TON, "the client keeps its balance");
  const lost = -gain(r, "bounced charge", "stranger");
  const clientGot = gain(r, "bounced charge", "client");
  assert.ok(lost <= FEES, `the deliverer lost ${lost} nanoton; the client's wallet got ${clientGot}`);
});

// ---------------------------------------------------------------------------------------------
// FINDING 4 (threat c): ProxyRefundClient's spare gas goes to the client's owner along with the
// refund (closeAndReturnAll sends the whole balance), not back to the proxy's owner who paid it.
// Safe outcome: the client's wallet gets its deposit back; the proxy's owner loses only fees.
test("FINDING: a refund by the proxy returns the proxy's spare gas to the proxy", async () => {
  const value = 2n * TON;
  const deposit = 3n * TON;
  const r = await runScenario([
    ...open,
    { do: "client_deposit", client: "client", amount: Number(deposit) },
    { do: "proxy_refund_client", client: "client", value: Number(value), label: "refund" },
  ]);
  const lost = -gain(r, "refund", "proxy");
  const clientGot = gain(r, "refund", "client");
  assert.ok(clientGot >= deposit, "the client gets its deposit back");
  assert.ok(lost <= FEES, `the proxy's owner lost ${lost} nanoton; the client got ${clientGot - deposit} beyond its deposit`);
});

// ---------------------------------------------------------------------------------------------
// FINDING 5 (threat e, message order): two charges in one request, both refused (the proxy
// contract is not open yet). Bounces come back in the order sent, so the first bounce sees the
// counter at the second charge's end and leaves it; the second restores it only to its own
// start. Both charges were refused, none landed, yet the counter ends at 1000: the first range
// can never be charged (the docs accept this only "if a later charge has landed on top").
// Safe outcome: two refused charges leave the counter where it was (0).
test("FINDING: two refused charges leave the client's counter where it was", { todo: "known limit: only a charge the proxy contract cannot take bounces (signed before it opened, or for a client bound to terms it no longer holds after re-opening); the lost range is the proxy's, never the client's" }, async () => {
  const r = await runScenario([
    ...setup,
    { do: "client_deposit", client: "client", amount: 5_000_000_000 },
    { do: "batch", from: "proxy", label: "two refused charges", steps: [
      { do: "charge", client: "client", tokens: 1000, from: "proxy" },
      { do: "charge", client: "client", tokens: 2000, from: "proxy" },
    ] },
    { do: "open_proxy", from: "proxy", proxy: "proxy", stake: Number(STAKE) },
    { do: "charge", client: "client", tokens: 2000, from: "proxy", label: "the proxy charges the range again" },
  ]);
  const [both] = find(r, "two refused charges");
  assert.equal(both.view.clientOf.client[2], 5n * TON, "both costs are refunded");
  const [again] = find(r, "the proxy charges the range again");
  const paid = 5n * TON - again.view.clientOf.client[2];
  assert.equal(both.view.clientOf.client[4], 0n,
    `counter left at ${both.view.clientOf.client[4]} after two refused charges; the client then pays ${paid} for 2000 tokens`);
});

// ---------------------------------------------------------------------------------------------
// FINDING 6 (threat e): a charge lowers the client's stake (stake = min(stake, balance)); its
// bounce refunds the balance but not the stake. A client that staked everything and whose
// charge bounced can withdraw everything at once, leaving the proxy no guarantee. Safe outcome:
// a refused charge changes nothing: balance and stake are as before, the withdrawal is 110.
test("FINDING: a refused charge restores the client's stake", { todo: "known limit: only a charge the proxy contract cannot take bounces (signed before it opened, or for a client bound to terms it no longer holds after re-opening); the proxy loses its stake guarantee, the client nothing" }, async () => {
  const r = await runScenario([
    ...setup,
    { do: "client_deposit", client: "client", amount: 5_000_000_000 },
    { do: "client_stake", client: "client", amount: 5_000_000_000, label: "staked" },
    { do: "charge", client: "client", tokens: 250_000_000, from: "proxy", label: "a charge of the whole balance, refused" },
    { do: "client_withdraw", client: "client", amount: 5_000_000_000, label: "withdraw the stake" },
  ]);
  const [staked] = find(r, "staked");
  const [bounced] = find(r, "a charge of the whole balance, refused");
  assert.deepEqual(bounced.state.client.slice(0, 5), staked.state.client.slice(0, 5),
    `a refused charge changed the client's figures: ${staked.state.client} -> ${bounced.state.client}`);
  const [w] = find(r, "withdraw the stake");
  assert.deepEqual(w.exits, [110], "the stake cannot be withdrawn while open");
});

// =============================================================================================
// SAFE: attacks that held.

// Strangers send every internal message a contract trusts only from a peer: RequestPayout to
// the proxy (claiming the whole stake for a worker that is their own wallet), PayoutFunds to a
// worker, Refund to a client, ProxyOpened to a proxy contract the stranger deployed itself, a
// Charged claiming a big cost. Each is refused (101), no figure moves, and the stranger gets
// its TON back less fees (the refusal bounces).
test("SAFE: strangers' RequestPayout, PayoutFunds, Refund, ProxyOpened and Charged are refused", async () => {
  const op = (code, x) => beginCell().storeUint(code, 32).storeUint(0, 64);
  const proxyInit = (x) => {
    const identity = beginCell().storeAddress(x.root.address).storeAddress(x.p.proxy.address).storeUint(x.p.proxy.key, 256).endCell();
    const data = beginCell().storeRef(identity).storeUint(3, 2).storeUint(0, 32).storeCoins(0).storeCoins(0).storeCoins(0).storeBit(0).endCell();
    return { code: x.c.code.proxy, data };
  };
  const r = await runScenario([
    ...setup,
    custom("stranger deploys the proxy contract", "stranger", (x) => x.proxy, empty, TON / 2n, proxyInit),
    custom("fake ProxyOpened", "stranger", (x) => x.proxy,
      (x) => op(0x636f0101).storeCoins(STAKE).storeRef(empty()).endCell(), TON),
    { do: "open_proxy", from: "proxy", proxy: "proxy", stake: Number(STAKE), label: "the real open" },
    { do: "client_deposit", client: "client", amount: 5_000_000_000 },
    { do: "charge", client: "client", tokens: 1000, from: "proxy" },
    { do: "payout", worker: "worker", tokens: 100 },
    custom("fake RequestPayout", "stranger", (x) => x.proxy,
      (x) => op(0x636f0103).storeUint(0, 64).storeUint(10n ** 12n, 64).storeCoins(STAKE).storeAddress(x.p.stranger.address).endCell(), TON),
    custom("fake PayoutFunds", "stranger", (x) => x.worker("worker").address,
      (x) => op(0x636f0104).storeCoins(5n * TON).endCell(), TON),
    custom("fake Refund", "stranger", (x) => x.client("client").address, (x) => op(0x636f0105).endCell(), TON),
    custom("fake Charged", "stranger", (x) => x.proxy,
      (x) => op(0x636f0102).storeUint(0, 64).storeUint(1000, 64).storeCoins(100n * TON)
        .storeAddress(x.p.client.address).storeAddress(x.p.stranger.address).endCell(), TON),
  ]);
  const [opened] = find(r, "the real open");
  assert.deepEqual(opened.view.proxy, [0n, 0n, 0n, STAKE, 0n], "the pre-deployed contract still opens, stake booked");
  for (const label of ["fake ProxyOpened", "fake RequestPayout", "fake PayoutFunds", "fake Refund", "fake Charged"]) {
    const [x, before] = find(r, label);
    assert.deepEqual(x.exits, [101], label);
    assert.deepEqual(x.state, before.state, `${label} changed a contract's figures`);
    assert.ok(-gain(r, label, "stranger") <= FEES, `${label}: the stranger's TON is lost`);
  }
});

// Closes racing charges: a client delivers its own charge and finishes its close in the same
// request, while the proxy contract is not open, so the Charged bounces into a closed contract.
// Safe outcome: the client's wallet ends with everything it put in, less fees; the client
// contract keeps nothing.
test("SAFE: a bounce that reaches a closed client contract goes to the client", async () => {
  const r = await runScenario([
    ...setup,
    { do: "client_deposit", client: "client", amount: 3_000_000_000, label: "deposit" },
    { do: "client_stake", client: "client", amount: 2_000_000_000 },
    { do: "client_close", client: "client" },
    { do: "advance", seconds: 100 },
    { do: "batch", from: "client", label: "charge and finish close", steps: [
      { do: "charge", client: "client", tokens: 1000, from: "client" },
      { do: "client_finish_close", client: "client" },
    ] },
  ]);
  const [dep, pre] = find(r, "deposit");
  const last = r.at(-1);
  assert.equal(last.view.clientOf.client[0], 2n, "closed");
  assert.ok(last.view.balance["client:client"] < TON / 1000n, "the closed contract keeps nothing");
  const spent = pre.view.wallet.client - last.view.wallet.client;
  assert.ok(spent <= 5n * FEES / 2n, `the client lost ${spent} nanoton beyond fees`);
});

// Huge counters: a charge and a payout for 2^64-1 tokens. The charge is refused (109), the
// claim is refused by the proxy and its bounce restores the counter and clears the flight;
// nothing is paid and the signed messages for real counts still work afterwards.
test("SAFE: 2^64-1 tokens are refused without moving a counter", async () => {
  const max = (1n << 64n) - 1n;
  const r = await runScenario([
    ...open,
    { do: "client_deposit", client: "client", amount: 5_000_000_000 },
    { do: "charge", client: "client", tokens: max.toString(), from: "proxy", label: "huge charge" },
    { do: "payout", worker: "worker", tokens: 100 },
    { do: "payout", worker: "worker", tokens: max.toString(), label: "huge claim" },
    { do: "charge", client: "client", tokens: 1000, from: "proxy" },
    { do: "payout", worker: "worker", tokens: 1000, label: "a real claim afterwards" },
  ]);
  const [charge, c0] = find(r, "huge charge");
  assert.deepEqual(charge.exits, [109]);
  assert.deepEqual(charge.state, c0.state);
  const [claim, w0] = find(r, "huge claim");
  assert.deepEqual(claim.exits, [0, 109, 0]);
  assert.deepEqual(claim.state.worker, w0.state.worker, "counter restored, nothing in flight");
  const [real] = find(r, "a real claim afterwards");
  assert.equal(real.view.workerOf.worker[0], 1000n);
  assert.equal(real.view.workerOf.worker[1], 1000n * FEE);
});

// The root's returnExcess: an owner operation with 5 TON attached leaves the root's balance as
// it was (less storage) and returns the rest to the owner; a stranger's refused operation and a
// stranger's plain top-up cannot move the root's TON to anyone.
test("SAFE: the root returns an owner's excess and keeps what it held", async () => {
  const r = await runScenario([
    { do: "deploy_root" },
    { do: "register_proxy", from: "owner", proxy: "proxy", value: Number(5n * TON), label: "owner op with 5 TON" },
    custom("stranger tops up the root", "stranger", (x) => x.root.address, empty, 2n * TON),
    { do: "set_params", from: "stranger", worker_fee_per_token: 10, value: Number(TON), label: "stranger's op" },
    { do: "set_params", from: "owner", worker_fee_per_token: 10, label: "owner op after the top-up" },
  ]);
  const [x, before] = find(r, "owner op with 5 TON");
  assert.ok(before.view.balance.root - x.view.balance.root < 1_000_000n, "the root keeps what it held");
  assert.ok(x.view.balance.root <= before.view.balance.root, "the root keeps none of the excess");
  assert.ok(-gain(r, "owner op with 5 TON", "owner") <= FEES, "the owner gets the excess back");
  const [s, s0] = find(r, "stranger's op");
  assert.deepEqual(s.exits, [100]);
  assert.ok(s.view.balance.root >= s0.view.balance.root - 1_000_000n);
  const [o, o0] = find(r, "owner op after the top-up");
  assert.ok(o.view.balance.root >= o0.view.balance.root - 1_000_000n, "the owner does not sweep the root's top-up either");
});

// Low value on the operations the low_value scenario does not cover: a refund, the final
// closes, a deposit that is exactly the amount. Each is refused (117) before anything changes.
test("SAFE: low-value refund, final closes and an exact-amount deposit change nothing", async () => {
  const low = 5_000_000;
  const r = await runScenario([
    ...open,
    { do: "client_deposit", client: "client", amount: 2_000_000_000 },
    { do: "client_deposit", client: "client", amount: 1_000_000_000, value: 1_000_000_000, label: "low" },
    { do: "proxy_refund_client", client: "client", value: low, label: "low" },
    { do: "client_close", client: "client" },
    { do: "proxy_close" },
    { do: "advance", seconds: 200 },
    { do: "client_finish_close", client: "client", value: low, label: "low" },
    { do: "proxy_finish_close", value: low, label: "low" },
  ]);
  const lows = r.map((x, i) => [x, r[i - 1]]).filter(([x]) => x.step.includes("(low)"));
  assert.equal(lows.length, 4);
  for (const [x, prev] of lows) {
    assert.deepEqual(x.exits, [117], x.step);
    assert.deepEqual(x.state, prev.state, `${x.step} changed the state`);
  }
});

// A claim racing the proxy's final close within one request is impossible (two wallets), but a
// worker holding an unclaimed payout while the proxy finishes its close: the claim is refused
// (104), its counter restored, and the worker's TON comes back less fees. (The workers' share is
// then the owner's: documented, after the close delay.) Also: a Charged reaching the closed
// proxy goes to the proxy's owner and the deliverer's spare to the deliverer.
test("SAFE: after the proxy's final close a claim is undone and a charge pays its owner", async () => {
  const r = await runScenario([
    ...open,
    { do: "client_deposit", client: "client", amount: 2_000_000_000 },
    { do: "charge", client: "client", tokens: 1000, from: "proxy" },
    { do: "payout", worker: "worker", tokens: 100 },
    { do: "proxy_close" },
    { do: "advance", seconds: 200 },
    { do: "proxy_finish_close" },
    { do: "payout", worker: "worker", tokens: 1000, label: "claim after close" },
    { do: "charge", client: "client", tokens: 2000, from: "stranger", label: "charge after close" },
  ]);
  const [claim, c0] = find(r, "claim after close");
  assert.deepEqual(claim.exits, [0, 104, 0]);
  assert.deepEqual(claim.state.worker, c0.state.worker);
  assert.ok(-gain(r, "claim after close", "worker") <= FEES);
  const cost = 1000n * PRICE;
  assert.ok(-gain(r, "charge after close", "stranger") <= FEES, "the deliverer gets its spare back");
  assert.equal(gain(r, "charge after close", "proxy"), cost, "the proxy's owner gets exactly the cost");
});

// A claim sent before the proxy contract exists: the request bounces from the empty address,
// the counter goes back and no claim is left in flight, so the same message is claimed in full
// once the proxy opens.
test("SAFE: a claim before the proxy opens is undone and can be claimed later", async () => {
  const r = await runScenario([
    ...setup,
    { do: "payout", worker: "worker", tokens: 100, label: "claim before open" },
    { do: "open_proxy", from: "proxy", proxy: "proxy", stake: Number(STAKE) },
    { do: "payout", worker: "worker", tokens: 100, label: "claimed after open" },
  ]);
  const [before] = find(r, "claim before open");
  assert.deepEqual(before.view.workerOf.worker, [0n, 0n, 0n]);
  const [after] = find(r, "claimed after open");
  assert.deepEqual(after.view.workerOf.worker, [100n, 100n * FEE, 0n]);
  assert.equal(after.view.proxy[3], STAKE - 100n * FEE);
});
