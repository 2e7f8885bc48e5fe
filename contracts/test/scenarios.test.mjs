// The settlement scenarios in the reference emulator (@ton/sandbox). Every step goes out from
// the acting party's wallet as a signed external request, as it would on chain. The exit codes
// of the contract transactions each step causes and the contracts' book-kept balances after it
// must equal expected.json, which the tycho-vm run (crates/cocoon-ton/tests/scenarios.rs) is
// held to as well. UPDATE_EXPECTED=1 rewrites expected.json from this run instead.
import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Blockchain } from "@ton/sandbox";
import { beginCell, external, toNano } from "@ton/core";
import * as c from "./cocoon.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const spec = JSON.parse(fs.readFileSync(path.join(here, "scenarios.json"), "utf-8"));
const expectedPath = path.join(here, "expected.json");
const START = 1700000000;
const GAS = toNano("0.1");
const NAMES = ["owner", "proxy", "client", "client2", "worker", "stranger"];

export async function runScenario(steps) {
  const chain = await Blockchain.create();
  chain.now = START;
  const p = Object.fromEntries(NAMES.map((n, i) => [n, c.party(i + 1)]));
  const wallets = new Set(Object.values(p).map((w) => w.address.toRawString()));
  const fund = await chain.treasury("fund");
  for (const w of Object.values(p)) await fund.send({ to: w.address, value: toNano("100000"), bounce: false });

  const params = spec.params;
  const root = c.rootInit(p.owner.address, params);
  const proxy = c.proxyAddress(root.address, p.proxy.address, p.proxy.key);
  const client = (n) => c.clientInit(proxy, p[n].address, p.proxy.key, params);
  const worker = (n) => c.workerInit(proxy, p[n].address, p.proxy.key, params);

  async function send(from, to, value, body, init) {
    const w = p[from];
    const request = c.walletRequest(w, [{ to, value: BigInt(value), bounce: true, body, init }], chain.now + 60);
    const result = await chain.sendMessage(external({ to: w.address, init: w.seqno === 0 ? w.init : undefined, body: request }));
    w.seqno += 1;
    return result.transactions;
  }

  async function state() {
    const out = {};
    const active = async (a) => (await chain.getContract(a)).accountState?.type === "active";
    const ints = async (a, method, args = []) => (await chain.runGetMethod(a, method, args)).stack.map((e) => Number(e.value));
    if (await active(root.address)) out.root = await ints(root.address, "proxy_status", [{ type: "int", value: p.proxy.key }]);
    if (await active(proxy)) out.proxy = await ints(proxy, "get_proxy");
    for (const n of ["client", "client2"]) if (await active(client(n).address)) out[n] = await ints(client(n).address, "get_client");
    if (await active(worker("worker").address)) out.worker = await ints(worker("worker").address, "get_worker");
    return out;
  }

  const results = [];
  for (const s of steps) {
    const op = (code) => c.body.op(code, results.length);
    let txs = [];
    switch (s.do) {
      case "deploy_root": txs = await send("owner", root.address, toNano("1"), beginCell().endCell(), root.init); break;
      case "set_params":
        txs = await send(s.from, root.address, GAS, op(c.OP.setParams).storeRef(c.paramsCell({ ...params, worker_fee_per_token: s.worker_fee_per_token })).endCell());
        break;
      case "allow_image": case "revoke_image":
        txs = await send(s.from, root.address, GAS, op(s.do === "allow_image" ? c.OP.allowImage : c.OP.revokeImage).storeUint(s.role, 8).storeUint(BigInt("0x" + s.hash), 256).endCell());
        break;
      case "allow_model": txs = await send(s.from, root.address, GAS, op(c.OP.allowModel).storeUint(BigInt("0x" + s.hash), 256).endCell()); break;
      case "register_proxy":
        txs = await send(s.from, root.address, GAS, op(c.OP.registerProxy).storeUint(p[s.proxy].key, 256).storeAddress(p[s.proxy].address)
          .storeRef(beginCell().storeStringTail("proxy.example:8443").endCell()).endCell());
        break;
      case "open_proxy":
        txs = await send(s.from, root.address, BigInt(s.stake) + GAS, op(c.OP.openProxy).storeUint(p[s.proxy].key, 256).storeCoins(s.stake).endCell());
        break;
      case "proxy_withdraw": txs = await send("proxy", proxy, GAS, op(c.OP.proxyWithdraw).storeCoins(s.amount).endCell()); break;
      case "proxy_close": txs = await send("proxy", proxy, GAS, op(c.OP.proxyClose).endCell()); break;
      case "proxy_finish_close": txs = await send("proxy", proxy, GAS, op(c.OP.proxyFinishClose).endCell()); break;
      case "proxy_refund_client": txs = await send("proxy", proxy, GAS, op(c.OP.proxyRefundClient).storeAddress(p[s.client].address).endCell()); break;
      case "client_deposit": {
        const k = client(s.client);
        txs = await send(s.client, k.address, BigInt(s.amount) + GAS, op(c.OP.clientDeposit).storeCoins(s.amount).endCell(), k.init);
        break;
      }
      case "client_stake": case "client_withdraw": {
        const code = s.do === "client_stake" ? c.OP.clientStake : c.OP.clientWithdraw;
        txs = await send(s.client, client(s.client).address, GAS, op(code).storeCoins(s.amount).endCell());
        break;
      }
      case "client_close": case "client_finish_close": {
        const code = s.do === "client_close" ? c.OP.clientClose : c.OP.clientFinishClose;
        txs = await send(s.client, client(s.client).address, GAS, op(code).endCell());
        break;
      }
      case "charge": {
        const named = client(s.names ?? s.client).address;
        const message = c.paymentMessage(c.PAY.chargeClient, s.tokens, s.tokens, named, p[s.signer ?? "proxy"]);
        txs = await send(s.from, client(s.client).address, GAS, c.body.signed(c.OP.charge, message));
        break;
      }
      case "fake_charged":
        txs = await send(s.from, proxy, GAS, c.body.op(c.OP.charged, 0).storeUint(0, 64).storeCoins(1000).storeAddress(p[s.client].address).endCell());
        break;
      case "payout": {
        const k = worker(s.worker);
        const named = s.names ? client(s.names).address : k.address;
        const message = c.paymentMessage(c.PAY.payWorker, s.tokens, s.tokens, named, p[s.signer ?? "proxy"]);
        txs = await send(s.worker, k.address, GAS, c.body.signed(c.OP.payout, message), k.init);
        break;
      }
      case "worker_withdraw": txs = await send(s.worker, worker(s.worker).address, GAS, op(c.OP.workerWithdraw).endCell()); break;
      case "advance": chain.now += s.seconds; break;
      default: throw new Error(`unknown step ${s.do}`);
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
    results.push({ step: s.do + (s.label ? ` (${s.label})` : ""), exits, state: await state(), fees: fees.toString() });
  }
  return results;
}

test("scenarios in @ton/sandbox match expected.json", async () => {
  const actual = {};
  const fees = {};
  for (const [name, steps] of Object.entries(spec.scenarios)) {
    const results = await runScenario(steps);
    actual[name] = results.map(({ step, exits, state }) => ({ step, exits, state }));
    fees[name] = results.map(({ step, fees }) => ({ step, fees }));
  }
  fs.mkdirSync(path.join(here, "..", "build", "report"), { recursive: true });
  fs.writeFileSync(path.join(here, "..", "build", "report", "sandbox-fees.json"), JSON.stringify(fees, null, 1) + "\n");
  if (process.env.UPDATE_EXPECTED) {
    fs.writeFileSync(expectedPath, JSON.stringify(actual, null, 1) + "\n");
    return;
  }
  const expected = JSON.parse(fs.readFileSync(expectedPath, "utf-8"));
  for (const name of Object.keys(expected)) {
    expected[name].forEach((e, i) => assert.deepEqual(actual[name][i], e, `${name} step ${i}: ${e.step}`));
  }
  assert.deepEqual(Object.keys(actual), Object.keys(expected));
});
