// A small harness for tests of the root's governance and code upgrades in the reference
// emulator: parties with funded wallets, the root's operations as one-message wallet requests,
// and the upgraded code the contracts' build writes (build/fixtures: the committed sources plus
// a `version` get-method, and a contract that refuses every message).
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Blockchain } from "@ton/sandbox";
import { Cell, beginCell, external, toNano } from "@ton/core";
import * as c from "./cocoon.mjs";
import { spec } from "./run.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
export const TON = 1_000_000_000n;
export const STAKE = 10n * TON;
export const GAS = toNano("0.1");

const fixture = (file) => Cell.fromBoc(fs.readFileSync(path.join(here, "..", "build", "fixtures", file)))[0];

// `name`.tolk with a `version` get-method appended: the same contract, told apart by code hash.
export async function upgraded(name) {
  return fixture(`${name}-v2.boc`);
}

// A contract that refuses every message (what a mistaken SetCodes might hand new proxies).
export async function refusing() {
  return fixture("refusing.boc");
}

export const hashOf = (cell) => BigInt("0x" + cell.hash().toString("hex"));

// A chain with the parties `names` (wallets funded, keys by index as run.mjs's) and the
// root's operations; nothing deployed yet.
export async function network(names) {
  const chain = await Blockchain.create();
  chain.now = 1700000000;
  const p = Object.fromEntries(names.map((n, i) => [n, c.party(i + 1)]));
  const fund = await chain.treasury("fund");
  for (const w of Object.values(p)) await fund.send({ to: w.address, value: toNano("1000"), bounce: false });
  const root = c.rootInit(p.owner.address, spec.params);
  const wallets = Object.values(p);
  // Sends one message from `from`'s wallet; the exit codes of the contracts' transactions
  // (wallets' left out), in order.
  async function send(from, to, body, { value = GAS, init } = {}) {
    const w = p[from];
    const request = c.walletRequest(w, [{ to, value, body, init, bounce: true }], chain.now + 60);
    const result = await chain.sendMessage(external({ to: w.address, init: w.seqno === 0 ? w.init : undefined, body: request }));
    w.seqno += 1;
    return result.transactions
      .filter((t) => !wallets.some((x) => t.inMessage?.info?.dest?.equals?.(x.address)))
      .map((t) => (t.description.computePhase.type === "vm" ? t.description.computePhase.exitCode : "skipped"));
  }
  const ints = async (at, method, args = []) =>
    (await chain.runGetMethod(at, method, args)).stack.map((e) => BigInt(e.value));
  const op = (code) => c.body.op(code, 0);
  return {
    chain, p, root, send, ints,
    balance: async (a) => (await chain.getContract(a)).balance,
    deploy: () => send("owner", root.address, beginCell().endCell(), { value: toNano("1"), init: root.init }),
    register: (who, wallet = p[who].address) => send("owner", root.address, op(c.OP.registerProxy).storeUint(p[who].key, 256).storeAddress(wallet)
      .storeRef(beginCell().storeStringTail("proxy.example:8443").endCell()).endCell()),
    unregister: (who) => send("owner", root.address, op(c.OP.unregisterProxy).storeUint(p[who].key, 256).endCell()),
    open: (who) => send(who, root.address, op(c.OP.openProxy).storeUint(p[who].key, 256).storeCoins(STAKE).endCell(), { value: STAKE + GAS }),
    setCodes: (from, codes) => send(from, root.address, op(c.OP.setCodes).storeRef(codes).endCell()),
    upgradeRoot: (from, code) => send(from, root.address, op(c.OP.upgradeRoot).storeRef(code).endCell()),
    // The proxy contract's address as the root reports it (what the TON backend reads).
    proxyAt: async (who) => {
      const [account] = await ints(root.address, "proxy_account", [{ type: "int", value: p[who].key }]);
      return new (root.address.constructor)(0, Buffer.from(account.toString(16).padStart(64, "0"), "hex"));
    },
    status: async (who) => (await ints(root.address, "proxy_status", [{ type: "int", value: p[who].key }]))[0],
    // Closes the proxy contract at `at` and finishes after the delay: both steps' exit codes.
    close: async (who, at) => {
      const a = await send(who, at, op(c.OP.proxyClose).endCell());
      chain.now += spec.params.proxy_close_delay;
      const b = await send(who, at, op(c.OP.proxyFinishClose).endCell());
      return [...a, ...b];
    },
  };
}
