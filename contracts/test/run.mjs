// Runs a settlement scenario (a list of steps from scenarios.json) in the reference emulator
// (@ton/sandbox). Every step goes out from the acting party's wallet as a signed external
// request, as it would on chain; a "batch" step sends several messages in one request. After
// each step it records the exit codes of the contract transactions the step caused (wallet
// transactions left out), the contracts' book-kept figures and, last in each contract's list,
// what the contract holds beyond them (milliton), and the fees paid.
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Blockchain } from "@ton/sandbox";
import { Cell, beginCell, external, toNano } from "@ton/core";
import * as c from "./cocoon.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
export const spec = JSON.parse(fs.readFileSync(path.join(here, "scenarios.json"), "utf-8"));
const START = 1700000000;
const GAS = toNano("0.1");
const NAMES = ["owner", "proxy", "client", "client2", "worker", "stranger"];

// Code a step installs: the committed contract, or a fixture the build writes (`v2`: the
// committed source plus a `version` getter; `refusing`: refuses every message).
function fixture(name, contract) {
  if (name === "committed") return c.code[contract];
  const file = name === "refusing" ? "refusing.boc" : `${contract}-${name}.boc`;
  return Cell.fromBoc(fs.readFileSync(path.join(here, "..", "build", "fixtures", file)))[0];
}

export async function runScenario(steps) {
  const chain = await Blockchain.create();
  chain.now = START;
  const p = Object.fromEntries(NAMES.map((n, i) => [n, c.party(i + 1)]));
  const wallets = new Set(Object.values(p).map((w) => w.address.toRawString()));
  const fund = await chain.treasury("fund");
  for (const w of Object.values(p)) await fund.send({ to: w.address, value: toNano("100000"), bounce: false });

  const params = spec.params;
  const root = c.rootInit(p.owner.address, params);
  // Where the proxy's contract is, as the root reports it (`proxy_account`), as the TON backend
  // reads it: after a code upgrade a proxy re-opens at another address.
  let proxy = c.proxyAddress(root.address, p.proxy.address, p.proxy.key);
  async function readProxy() {
    try {
      const [account] = (await chain.runGetMethod(root.address, "proxy_account", [{ type: "int", value: p.proxy.key }])).stack;
      return new (root.address.constructor)(0, Buffer.from(BigInt(account.value).toString(16).padStart(64, "0"), "hex"));
    } catch {
      return proxy; // no root, or the key is not registered yet
    }
  }
  // Client and worker contracts are bound to the terms the proxy contract holds (its
  // get_params), which may differ from the root's after a SetParams and a re-open: read them as
  // the TON backend does, before each step.
  let terms = params;
  const names = ["price_per_token", "worker_fee_per_token", "prompt_multiplier", "cached_multiplier",
    "completion_multiplier", "reasoning_multiplier", "min_client_stake", "min_proxy_stake",
    "client_close_delay", "proxy_close_delay"];
  async function readTerms() {
    if ((await chain.getContract(proxy)).accountState?.type !== "active") return params;
    try {
      const got = await chain.runGetMethod(proxy, "get_params", []);
      return Object.fromEntries(got.stack.map((e, i) => [names[i], Number(e.value)]));
    } catch {
      return params; // not open: no terms yet
    }
  }
  // And to the client and worker code the proxy contract was opened with (its get_terms
  // hashes), the committed code or an upgrade's.
  let codes = { client: c.code.client, worker: c.code.worker };
  async function readCodes() {
    if ((await chain.getContract(proxy)).accountState?.type !== "active") return codes;
    try {
      const [client, worker] = (await chain.runGetMethod(proxy, "get_terms", [])).stack.map((e) => BigInt(e.value));
      const known = (contract, hash) => ["committed", "v2"].map((n) => fixture(n, contract))
        .find((k) => BigInt("0x" + k.hash().toString("hex")) === hash) ?? codes[contract];
      return { client: known("client", client), worker: known("worker", worker) };
    } catch {
      return codes; // no get_terms: not a proxy contract of ours
    }
  }
  const client = (n) => c.clientInit(proxy, p[n].address, p.proxy.key, terms, { clientCode: codes.client });
  const worker = (n) => c.workerInit(proxy, p[n].address, p.proxy.key, terms, { workerCode: codes.worker });
  // A contract of upgraded code answers `version`: its figures end with the version.
  const version = async (a) => (await answers(a, "version")) ? [Number((await chain.runGetMethod(a, "version", [])).stack[0].value)] : [];

  async function send(from, messages) {
    const w = p[from];
    const request = c.walletRequest(w, messages.map((m) => ({ ...m, value: BigInt(m.value), bounce: true })), chain.now + 60);
    const result = await chain.sendMessage(external({ to: w.address, init: w.seqno === 0 ? w.init : undefined, body: request }));
    w.seqno += 1;
    return result.transactions;
  }

  const answers = (a, method) => chain.runGetMethod(a, method, []).then(() => true, () => false);

  // What a contract holds beyond what its records book, in milliton: after every operation it
  // should be only the storage reserve (the excess of each message goes back to its sender).
  async function spare(a, booked) {
    const balance = (await chain.getContract(a)).balance;
    return Math.round(Number(balance - BigInt(booked)) / 1e6);
  }

  async function state() {
    const out = {};
    const active = async (a) => (await chain.getContract(a)).accountState?.type === "active";
    const ints = async (a, method, args = []) => (await chain.runGetMethod(a, method, args)).stack.map((e) => Number(e.value));
    if (await active(root.address)) {
      // The proxy's status, whether model 33 is allowed, and who owns the root and who is
      // proposed (as indexes into NAMES, -1 for nobody).
      const status = await ints(root.address, "proxy_status", [{ type: "int", value: p.proxy.key }]);
      const model = await ints(root.address, "model_allowed", [{ type: "int", value: 0x33n }]);
      const owners = (await chain.runGetMethod(root.address, "get_owner", [])).stack.map((e) => BigInt(e.value));
      const who = (h) => NAMES.findIndex((n) => BigInt("0x" + p[n].address.hash.toString("hex")) === h);
      out.root = [...status, ...model, who(owners[0]), who(owners[1])];
    }
    // A contract whose code has no get_proxy (one that refuses every message) is not a proxy
    // contract to report.
    if (await active(proxy) && await answers(proxy, "get_proxy")) {
      const v = await ints(proxy, "get_proxy");
      out.proxy = [...v, await spare(proxy, v[2] + v[3] + v[4])];
    }
    for (const n of ["client", "client2"]) {
      const a = client(n).address;
      if (await active(a)) {
        const v = await ints(a, "get_client");
        out[n] = [...v, await spare(a, v[2]), ...(await version(a))];
      }
    }
    const wa = worker("worker").address;
    if (await active(wa)) {
      const v = await ints(wa, "get_worker");
      out.worker = [...v, await spare(wa, v[1]), ...(await version(wa))];
    }
    return out;
  }

  // Not compared with expected.json (for adversarial tests): the chain balance (nanoton, as
  // BigInt) of every wallet and contract, and the figures of client and worker contracts of
  // every party, not only those state() records.
  async function view() {
    const bal = async (a) => (await chain.getContract(a)).balance;
    const active = async (a) => (await chain.getContract(a)).accountState?.type === "active";
    const ints = async (a, method) => (await chain.runGetMethod(a, method, [])).stack.map((e) => BigInt(e.value));
    const out = { wallet: {}, clientOf: {}, workerOf: {}, balance: {} };
    for (const n of NAMES) {
      out.wallet[n] = await bal(p[n].address);
      const ca = client(n).address, wa = worker(n).address;
      if (await active(ca)) { out.clientOf[n] = await ints(ca, "get_client"); out.balance["client:" + n] = await bal(ca); }
      if (await active(wa)) { out.workerOf[n] = await ints(wa, "get_worker"); out.balance["worker:" + n] = await bal(wa); }
    }
    if (await active(proxy) && await answers(proxy, "get_proxy")) { out.proxy = await ints(proxy, "get_proxy"); out.balance.proxy = await bal(proxy); }
    out.balance.root = await bal(root.address);
    return out;
  }

  // The network a charge or payout is signed for: the root's, unless the step names another
  // network id or workchain (a message signed elsewhere, replayed here).
  const signedFor = (s) => ({ networkId: s.network_id ?? c.NETWORK_ID, workchain: s.workchain ?? 0 });

  // The message a step sends: who sends it and what (an advance sends nothing).
  function message(s, qid) {
    const op = (code) => c.body.op(code, qid);
    const m = (from, to, value, body, init) => ({ from, to, value: s.value ?? value, body, init });
    switch (s.do) {
      case "deploy_root": return m("owner", root.address, toNano("1"), beginCell().endCell(), root.init);
      case "set_params":
        return m(s.from, root.address, GAS, op(c.OP.setParams).storeRef(c.paramsCell({ ...params, worker_fee_per_token: s.worker_fee_per_token })).endCell());
      case "allow_image": case "revoke_image":
        return m(s.from, root.address, GAS, op(s.do === "allow_image" ? c.OP.allowImage : c.OP.revokeImage).storeUint(s.role, 8).storeUint(BigInt("0x" + s.hash), 256).endCell());
      case "allow_model": return m(s.from, root.address, GAS, op(c.OP.allowModel).storeUint(BigInt("0x" + s.hash), 256).endCell());
      case "revoke_model": return m(s.from, root.address, GAS, op(c.OP.revokeModel).storeUint(BigInt("0x" + s.hash), 256).endCell());
      case "propose_owner": return m(s.from, root.address, GAS, op(c.OP.proposeOwner).storeAddress(p[s.to].address).endCell());
      case "accept_owner": return m(s.from, root.address, GAS, op(c.OP.acceptOwner).endCell());
      case "unregister_proxy": return m(s.from, root.address, GAS, op(c.OP.unregisterProxy).storeUint(p[s.proxy].key, 256).endCell());
      case "set_codes":
        return m(s.from, root.address, GAS, op(c.OP.setCodes).storeRef(c.codesCell(fixture(s.proxy_code ?? "committed", "proxy"),
          fixture(s.client_code ?? "committed", "client"), fixture(s.worker_code ?? "committed", "worker"))).endCell());
      case "upgrade_root": return m(s.from, root.address, GAS, op(c.OP.upgradeRoot).storeRef(fixture(s.code, "root")).endCell());
      case "proxy_add_stake": return m("proxy", proxy, BigInt(s.amount) + GAS, op(c.OP.proxyAddStake).storeCoins(s.amount).endCell());
      case "register_proxy":
        return m(s.from, root.address, GAS, op(c.OP.registerProxy).storeUint(p[s.proxy].key, 256).storeAddress(p[s.proxy].address)
          .storeRef(beginCell().storeStringTail("proxy.example:8443").endCell()).endCell());
      case "open_proxy":
        return m(s.from, root.address, BigInt(s.stake) + GAS, op(c.OP.openProxy).storeUint(p[s.proxy].key, 256).storeCoins(s.stake).endCell());
      case "proxy_withdraw": return m("proxy", proxy, GAS, op(c.OP.proxyWithdraw).storeCoins(s.amount).endCell());
      case "proxy_close": return m("proxy", proxy, GAS, op(c.OP.proxyClose).endCell());
      case "proxy_finish_close": return m("proxy", proxy, GAS, op(c.OP.proxyFinishClose).endCell());
      case "proxy_refund_client": return m("proxy", proxy, GAS, op(c.OP.proxyRefundClient).storeAddress(p[s.client].address).endCell());
      case "client_deposit": {
        const k = client(s.client);
        return m(s.client, k.address, BigInt(s.amount) + GAS, op(c.OP.clientDeposit).storeCoins(s.amount).endCell(), k.init);
      }
      case "client_stake": case "client_withdraw": {
        const code = s.do === "client_stake" ? c.OP.clientStake : c.OP.clientWithdraw;
        return m(s.client, client(s.client).address, GAS, op(code).storeCoins(s.amount).endCell());
      }
      case "client_close": case "client_finish_close": {
        const code = s.do === "client_close" ? c.OP.clientClose : c.OP.clientFinishClose;
        return m(s.client, client(s.client).address, GAS, op(code).endCell());
      }
      case "charge": {
        const named = client(s.names ?? s.client).address;
        const message = c.paymentMessage(c.PAY.chargeClient, s.tokens, s.tokens, named, p[s.signer ?? "proxy"], signedFor(s));
        return m(s.from, client(s.client).address, GAS, c.body.signed(c.OP.charge, message));
      }
      case "fake_charged":
        return m(s.from, proxy, GAS, c.body.op(c.OP.charged, 0).storeUint(0, 64).storeUint(50, 64).storeCoins(1000)
          .storeAddress(p[s.client].address).storeAddress(p[s.from].address).endCell());
      case "payout": {
        const k = worker(s.worker);
        const named = s.names ? client(s.names).address : k.address;
        const message = c.paymentMessage(c.PAY.payWorker, s.tokens, s.tokens, named, p[s.signer ?? "proxy"], signedFor(s));
        return m(s.worker, k.address, GAS, c.body.signed(c.OP.payout, message), k.init);
      }
      case "worker_withdraw": return m(s.worker, worker(s.worker).address, GAS, op(c.OP.workerWithdraw).endCell());
      // For adversarial tests: any message from any party's wallet. `to` and `body` are
      // functions of the scenario's context (parties, contract addresses, the cells module).
      case "custom": {
        const ctx = { p, root, proxy, client, worker, c, qid, GAS };
        return m(s.from, s.to(ctx), GAS, s.body(ctx), s.init ? s.init(ctx) : undefined);
      }
      default: throw new Error(`unknown step ${s.do}`);
    }
  }

  const results = [];
  for (const s of steps) {
    proxy = await readProxy();
    terms = await readTerms();
    codes = await readCodes();
    let txs = [];
    if (s.do === "advance") {
      chain.now += s.seconds;
    } else {
      // A batch is one wallet request carrying several messages, as a party may send them.
      const messages = (s.do === "batch" ? s.steps : [s]).map((sub) => message(sub, results.length));
      const from = messages[0].from;
      assert.ok(messages.every((m) => m.from === from), "a batch comes from one wallet");
      txs = await send(from, messages.map(({ to, value, body, init }) => ({ to, value, body, init })));
    }
    const exits = [];
    let fees = 0n;
    for (const tx of txs) {
      fees += tx.totalFees.coins;
      const dest = tx.inMessage?.info?.dest;
      if (!dest || wallets.has(dest.toRawString())) continue;
      const d = tx.description;
      let code = d.computePhase.type === "vm" ? d.computePhase.exitCode : "skipped";
      if (d.actionPhase && d.actionPhase.resultCode !== 0) code = `action ${d.actionPhase.resultCode}`;
      exits.push(code);
    }
    proxy = await readProxy();
    terms = await readTerms();
    codes = await readCodes();
    results.push({ step: s.do + (s.label ? ` (${s.label})` : ""), exits, state: await state(), fees: fees.toString(), view: await view(), txs });
  }
  return results;
}

