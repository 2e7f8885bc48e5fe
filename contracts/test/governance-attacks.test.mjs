// Adversarial review of the governance commit (ad77177) in the reference emulator: the two-step
// owner change, UnregisterProxy, ProxyAddStake, ProxyClosed and the re-open of a CLOSED proxy
// contract. Tests marked FINDING or FIXED state the safe outcome and failed on ad77177 (all are
// fixed: the root keeps an unregistered key's entry, so it still knows the key's contract is
// open, and a proxy's wallet cannot change while its contract is open); tests marked SAFE are
// attacks that were tried and held, kept because they assert the outcome (exit codes,
// unchanged figures, wallet balances).
import { test } from "node:test";
import assert from "node:assert/strict";
import { beginCell } from "@ton/core";
import { runScenario, spec } from "./run.mjs";

const TON = 1_000_000_000n;
const STAKE = 10n * TON;
const FEE = BigInt(spec.params.worker_fee_per_token);
const PRICE = BigInt(spec.params.price_per_token);
// What one operation may cost its sender in fees.
const FEES = TON / 20n;
// Indexes of run.mjs's NAMES, as state.root reports owners.
const WHO = { owner: 0, proxy: 1, client: 2, client2: 3, worker: 4, stranger: 5 };

const setup = [
  { do: "deploy_root" },
  { do: "register_proxy", from: "owner", proxy: "proxy" },
];
const open = [...setup, { do: "open_proxy", from: "proxy", proxy: "proxy", stake: Number(STAKE) }];
const closeAll = (label) => [
  { do: "proxy_close" },
  { do: "advance", seconds: spec.params.proxy_close_delay },
  { do: "proxy_finish_close", label },
];

const find = (r, label) => {
  const i = r.findIndex((x) => x.step.includes(`(${label})`));
  assert.ok(i >= 0, `no step labelled ${label}`);
  return [r[i], r[i - 1]];
};
const gain = (r, label, who) => {
  const [after, before] = find(r, label);
  return after.view.wallet[who] - before.view.wallet[who];
};
const custom = (label, from, to, body, value) => ({ do: "custom", label, from, to, body, value });
const op = (x, code) => x.c.body.op(code, x.qid);
const endpoint = () => beginCell().storeStringTail("proxy.example:8443").endCell();
const proxyClosed = (x) => op(x, 0x636f0106).storeUint(x.p.proxy.key, 256).endCell();
// The worker contract bound to the scenario's original parameters (before any SetParams).
const oldWorker = (x) => x.c.workerInit(x.proxy, x.p.worker.address, x.p.proxy.key, spec.params).address;

// ---------------------------------------------------------------------------------------------
// FINDING A (money held, refused op looks accepted): the owner unregisters and re-registers a
// proxy whose contract is still open (e.g. to change its endpoint the long way, or after a
// mistaken unregister). The new entry says "not opened", so the root accepts the proxy's next
// OpenProxy (exit 0) and forwards the stake, non-bounceable, to the existing contract, which
// refuses it (103: already open). The stake stays in the proxy contract unbooked: not stake,
// not withdrawable, returned only by the final close (ProxyFinishClose's carry-all). The root
// now says opened, so nothing looks wrong. Safe outcome: the root refuses the open (or the
// stake comes back at once).
test("FIXED: an OpenProxy after unregister + register of an open proxy does not swallow the stake", async () => {
  const r = await runScenario([
    ...open,
    { do: "unregister_proxy", from: "owner", proxy: "proxy" },
    { do: "register_proxy", from: "owner", proxy: "proxy" },
    { do: "open_proxy", from: "proxy", proxy: "proxy", stake: Number(STAKE), label: "open again while open" },
  ]);
  const [x] = find(r, "open again while open");
  assert.deepEqual(x.view.proxy, [0n, 0n, 0n, STAKE, 0n], "the second stake is not booked");
  const lost = -gain(r, "open again while open", "proxy");
  assert.ok(lost <= FEES,
    `exits ${x.exits}: the proxy's wallet lost ${lost} nanoton; the proxy contract holds ${x.state.proxy.at(-1)} milliton unbooked`);
});

// SAFE (the limit of finding A): the swallowed stake is not lost for good, nor swept to
// anyone else: the final close returns it to the proxy's owner, and the root lets it open again.
test("FIXED A: after unregister + register of an open proxy, a second open is refused at the root and the stake comes back", async () => {
  const r = await runScenario([
    ...open,
    { do: "unregister_proxy", from: "owner", proxy: "proxy" },
    { do: "register_proxy", from: "owner", proxy: "proxy" },
    { do: "open_proxy", from: "proxy", proxy: "proxy", stake: Number(STAKE), label: "second open" },
    ...closeAll("finish"),
    { do: "open_proxy", from: "proxy", proxy: "proxy", stake: Number(STAKE), label: "reopen" },
  ]);
  const [second] = find(r, "second open");
  assert.deepEqual(second.exits, [103], "the root still knows the contract is open");
  assert.ok(gain(r, "second open", "proxy") > -FEES, "the stake came back");
  const back = gain(r, "finish", "proxy");
  assert.ok(back >= STAKE - FEES && back < STAKE + FEES, `the final close returned ${back}`);
  const [finish] = find(r, "finish");
  assert.equal(finish.state.root[0], 0, "the root lets the proxy open again");
  const [reopen] = find(r, "reopen");
  assert.deepEqual(reopen.view.proxy, [0n, 0n, 0n, STAKE, 0n]);
});

// ---------------------------------------------------------------------------------------------
// FINDING B (a key locked out): RegisterProxy on a registered key keeps `opened` and replaces
// the wallet (a key rotation of the proxy's wallet, or a typo fixed). The open contract was
// deployed for the old wallet; when it finishes closing, its ProxyClosed is checked against the
// address derived from the NEW wallet, refused (101) and, being non-bounceable, dropped. The
// root says "opened" forever: neither wallet can open a contract for that key again (103)
// until the owner unregisters and re-registers it. Safe outcome: the genuine contract's notice
// is honoured (the root remembers which contract it deployed).
test("FIXED B: a proxy's wallet cannot change while its contract is open; after the close it can, and the new wallet opens", async () => {
  const reRegister = (label) => custom(label, "owner", (x) => x.root.address,
    (x) => op(x, x.c.OP.registerProxy).storeUint(x.p.proxy.key, 256).storeAddress(x.p.stranger.address).storeRef(endpoint()).endCell());
  const r = await runScenario([
    ...open,
    reRegister("another wallet while open"),
    ...closeAll("finish"),
    reRegister("another wallet once closed"),
    { do: "open_proxy", from: "stranger", proxy: "proxy", stake: Number(STAKE), label: "the new wallet opens" },
  ]);
  const [refused] = find(r, "another wallet while open");
  assert.deepEqual(refused.exits, [103]);
  const [finish] = find(r, "finish");
  assert.equal(finish.state.root[0], 0, `exits ${finish.exits}: the genuine contract's notice is honoured`);
  const [opened] = find(r, "the new wallet opens");
  assert.deepEqual(opened.exits.slice(0, 1), [0], `the new wallet cannot open: exits ${opened.exits}`);
});

// ---------------------------------------------------------------------------------------------
// SAFE: a forged ProxyClosed cannot mark an open (or closing) proxy as closed: from a stranger,
// from the proxy's own wallet, with the proxy's key; the root's figures do not change and the
// sender's TON comes back (bounce).
test("SAFE: a forged ProxyClosed does not re-open an open or closing proxy", async () => {
  const r = await runScenario([
    ...open,
    custom("stranger", "stranger", (x) => x.root.address, proxyClosed),
    custom("proxy wallet", "proxy", (x) => x.root.address, proxyClosed),
    { do: "open_proxy", from: "proxy", proxy: "proxy", stake: Number(STAKE), label: "open after forged notices" },
    { do: "proxy_close" },
    custom("stranger while closing", "stranger", (x) => x.root.address, proxyClosed),
    custom("proxy wallet while closing", "proxy", (x) => x.root.address, proxyClosed),
    { do: "open_proxy", from: "proxy", proxy: "proxy", stake: Number(STAKE), label: "open while closing" },
  ]);
  for (const label of ["stranger", "proxy wallet", "stranger while closing", "proxy wallet while closing"]) {
    const [x, before] = find(r, label);
    assert.deepEqual(x.exits, [101], label);
    assert.deepEqual(x.state, before.state, label);
    const from = label.startsWith("stranger") ? "stranger" : "proxy";
    assert.ok(-gain(r, label, from) <= FEES, `${label}: the sender's TON is lost`);
  }
  for (const label of ["open after forged notices", "open while closing"]) {
    const [x] = find(r, label);
    assert.deepEqual(x.exits, [103], label);
    assert.ok(-gain(r, label, "proxy") <= FEES, `${label}: the stake is not returned`);
  }
});

// ---------------------------------------------------------------------------------------------
// SAFE: the two-step owner change. A stranger cannot propose or accept; the proposed owner has
// no power before accepting; AcceptOwner cannot be replayed; a new proposal cancels the old
// one; after the change the old owner cannot act, propose, or take the network back.
test("SAFE: owner change: strangers, the old owner and replays are refused", async () => {
  const r = await runScenario([
    { do: "deploy_root" },
    { do: "propose_owner", from: "stranger", to: "stranger", label: "stranger proposes" },
    { do: "accept_owner", from: "stranger", label: "stranger accepts nothing" },
    { do: "propose_owner", from: "owner", to: "client" },
    { do: "set_params", from: "client", worker_fee_per_token: 10, label: "proposed owner before accepting" },
    { do: "accept_owner", from: "stranger", label: "stranger accepts" },
    { do: "propose_owner", from: "owner", to: "client2", label: "re-proposal" },
    { do: "accept_owner", from: "client", label: "the first proposed accepts after re-proposal" },
    { do: "accept_owner", from: "client2", label: "accept" },
    { do: "accept_owner", from: "client2", label: "replayed accept" },
    { do: "accept_owner", from: "owner", label: "old owner accepts" },
    { do: "set_params", from: "owner", worker_fee_per_token: 10, label: "old owner acts" },
    { do: "propose_owner", from: "owner", to: "owner", label: "old owner proposes itself" },
    { do: "unregister_proxy", from: "owner", proxy: "proxy", label: "old owner unregisters" },
    { do: "register_proxy", from: "owner", proxy: "proxy", label: "old owner registers" },
    { do: "register_proxy", from: "client2", proxy: "proxy", label: "new owner registers" },
  ]);
  for (const label of ["stranger proposes", "stranger accepts nothing", "proposed owner before accepting", "stranger accepts",
    "the first proposed accepts after re-proposal", "replayed accept", "old owner accepts", "old owner acts",
    "old owner proposes itself", "old owner registers"]) {
    const [x, before] = find(r, label);
    assert.deepEqual(x.exits, [100], label);
    assert.deepEqual(x.state, before.state, label);
  }
  assert.deepEqual(find(r, "re-proposal")[0].state.root.slice(2), [WHO.owner, WHO.client2]);
  assert.deepEqual(find(r, "accept")[0].state.root.slice(2), [WHO.client2, -1]);
  assert.deepEqual(find(r, "replayed accept")[0].state.root.slice(2), [WHO.client2, -1]);
  const [x] = find(r, "old owner unregisters");
  assert.deepEqual(x.exits, [100], "the old owner cannot unregister");
  assert.deepEqual(find(r, "new owner registers")[0].exits, [0]);
});

// ---------------------------------------------------------------------------------------------
// SAFE: ProxyAddStake from a stranger, with too little value, of zero, while closing and once
// closed is refused, books nothing, and the sender's TON comes back.
test("SAFE: ProxyAddStake refused from a stranger, short of value, zero, closing, closed", async () => {
  const addStake = (amount) => (x) => op(x, x.c.OP.proxyAddStake).storeCoins(amount).endCell();
  const r = await runScenario([
    ...open,
    custom("stranger", "stranger", (x) => x.proxy, addStake(TON), 2n * TON),
    { do: "proxy_add_stake", amount: Number(TON), value: Number(TON), label: "value = amount, no gas" },
    { do: "proxy_add_stake", amount: Number(TON), value: Number(TON + TON / 20n), label: "value short of the minimum" },
    { do: "proxy_add_stake", amount: 0, label: "zero" },
    { do: "proxy_add_stake", amount: Number(TON), label: "while open" },
    { do: "proxy_close" },
    { do: "proxy_add_stake", amount: Number(TON), label: "closing" },
    { do: "advance", seconds: spec.params.proxy_close_delay },
    { do: "proxy_finish_close" },
    { do: "proxy_add_stake", amount: Number(TON), label: "closed" },
  ]);
  const refused = { stranger: 101, "value = amount, no gas": 117, "value short of the minimum": 117, zero: 108, closing: 104, closed: 104 };
  for (const [label, code] of Object.entries(refused)) {
    const [x, before] = find(r, label);
    assert.deepEqual(x.exits, [code], label);
    assert.deepEqual(x.state, before.state, label);
    const from = label === "stranger" ? "stranger" : "proxy";
    assert.ok(-gain(r, label, from) <= FEES, `${label}: the sender lost ${-gain(r, label, from)}`);
  }
  assert.equal(find(r, "while open")[0].view.proxy[3], STAKE + TON);
});

// ---------------------------------------------------------------------------------------------
// SAFE: a re-open with new terms (a new worker fee) against contracts of the old ones. The old
// worker contract's claim for work it was signed for before the close is refused by the
// re-opened contract (101) and bounces: its counter goes back, no claim stays in flight, and
// what it already earned is still withdrawable. A late charge of a client (terms unchanged) is
// booked at the new fee; the re-opened contract's books start from the new stake only.
test("SAFE: a re-opened proxy with a new worker fee neither pays nor strands the old worker contract's books", async () => {
  const payoutOld = (tokens) => (x) => x.c.body.signed(x.c.OP.payout,
    x.c.paymentMessage(x.c.PAY.payWorker, tokens, tokens, oldWorker(x), x.p.proxy));
  const r = await runScenario([
    ...open,
    { do: "client_deposit", client: "client", amount: 2_000_000_000 },
    { do: "charge", client: "client", tokens: 1000, from: "proxy" },
    { do: "payout", worker: "worker", tokens: 500, label: "paid before the close" },
    { do: "set_params", from: "owner", worker_fee_per_token: 10 },
    ...closeAll("finish"),
    { do: "open_proxy", from: "proxy", proxy: "proxy", stake: Number(STAKE), label: "reopen" },
    custom("old worker claims after the re-open", "worker", oldWorker, payoutOld(1000)),
    custom("old worker withdraws", "worker", oldWorker, (x) => op(x, x.c.OP.workerWithdraw).endCell()),
    { do: "charge", client: "client", tokens: 2000, from: "proxy", label: "late charge" },
  ]);
  const [reopen] = find(r, "reopen");
  assert.deepEqual(reopen.view.proxy, [0n, 0n, 0n, STAKE, 0n], "books start from the new stake");
  const [claim, before] = find(r, "old worker claims after the re-open");
  assert.deepEqual(claim.exits, [0, 101, 0], "refused by the re-opened contract, bounced back");
  assert.deepEqual(claim.view.proxy, before.view.proxy, "the re-opened contract pays nothing");
  assert.ok(-gain(r, "old worker claims after the re-open", "worker") <= FEES);
  assert.ok(gain(r, "old worker withdraws", "worker") >= 500n * FEE - FEES, "the old earnings are still withdrawable");
  const [late] = find(r, "late charge");
  assert.deepEqual(late.view.proxy, [0n, 0n, 1000n * (PRICE - 10n), STAKE, 1000n * 10n]);
});
