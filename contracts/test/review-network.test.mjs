// Review of "payment messages bound to their network" and the root's code upgrades, as attacks
// in the reference emulator. Each test names the threat it tries and asserts the safe outcome.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Blockchain } from "@ton/sandbox";
import { Cell, beginCell, contractAddress, external, internal, storeOutList, toNano } from "@ton/core";
import { sign } from "@ton/crypto";
import * as c from "./cocoon.mjs";
import { spec } from "./run.mjs";
import { GAS, STAKE, TON, network as chain, refusing, upgraded } from "./root-harness.mjs";

const params = spec.params;


const network = () => chain(["owner", "proxy", "client", "worker", "stranger"]);

/// Threat 3 (forged ProxyClosed): a stranger deploys the genuine proxy code with crafted data
/// (itself as owner, the victim's key, the real root, state CLOSING) and finishes its close, so
/// that the contract sends the root a ProxyClosed naming the victim's key while the victim's
/// contract is open. The root must refuse it (101) and keep the key open: otherwise the key
/// could open a second contract and the stake land on one that refuses it.
test("review: a ProxyClosed from a stranger's proxy-code contract with crafted data is refused", async () => {
  const x = await network();
  await x.deploy();
  await x.register("proxy");
  assert.deepEqual(await x.open("proxy"), [0, 0]);
  const identity = beginCell().storeAddress(x.root.address).storeAddress(x.p.stranger.address).storeUint(x.p.proxy.key, 256).endCell();
  const data = beginCell().storeRef(identity).storeUint(1, 2).storeUint(0, 32).storeCoins(0).storeCoins(0).storeCoins(0).storeBit(0).endCell();
  const init = { code: c.code.proxy, data };
  const forged = contractAddress(0, init);
  // Deploy with a top-up, then finish its "close": its ProxyClosed goes to the root.
  assert.deepEqual(await x.send("stranger", forged, beginCell().endCell(), { value: toNano("1"), init }), [0]);
  const codes = await x.send("stranger", forged, c.body.op(c.OP.proxyFinishClose, 0).endCell());
  assert.deepEqual(codes, [0, 101], "the forged contract ran, the root refused its notice");
  assert.equal(await x.status("proxy"), 1n, "the victim's key is still open");
  assert.deepEqual(await x.open("proxy"), [103], "and cannot open a second contract");
});

/// Threat 3 (a genuine ProxyClosed from the *current-code* address): after SetCodes, the address
/// where the key would open now (B, new code) differs from the one it opened (A). The stranger
/// deploys B with its genuine initial data (anyone can) and tries to make it close; nothing at B
/// can send a ProxyClosed (it never opened), and the root does not take B for the key's contract.
test("review: the key's new-code address, deployed by a stranger before it reopens, cannot close the key", async () => {
  const x = await network();
  const proxy2 = await upgraded("proxy");
  await x.deploy();
  await x.register("proxy");
  await x.open("proxy");
  const a = await x.proxyAt("proxy");
  assert.deepEqual(await x.setCodes("owner", c.codesCell(proxy2)), [0]);
  const b = c.proxyAddress(x.root.address, x.p.proxy.address, x.p.proxy.key, proxy2);
  const identity = beginCell().storeAddress(x.root.address).storeAddress(x.p.proxy.address).storeUint(x.p.proxy.key, 256).endCell();
  const data = beginCell().storeRef(identity).storeUint(3, 2).storeUint(0, 32).storeCoins(0).storeCoins(0).storeCoins(0).storeBit(0).endCell();
  const init = { code: proxy2, data };
  assert.ok(contractAddress(0, init).equals(b));
  assert.deepEqual(await x.send("stranger", b, beginCell().endCell(), { value: toNano("1"), init }), [0]);
  // Even the key's owner cannot close B (never opened), and the root still points at A.
  assert.deepEqual(await x.send("proxy", b, c.body.op(c.OP.proxyClose, 0).endCell()), [105]);
  assert.deepEqual(await x.send("proxy", b, c.body.op(c.OP.proxyFinishClose, 0).endCell()), [106]);
  assert.ok((await x.proxyAt("proxy")).equals(a));
  assert.equal(await x.status("proxy"), 1n);
  // When A closes, the key reopens at B, which the stranger pre-deployed: that is harmless (B
  // was UNOPENED, with the genuine data), the stake lands and B holds it.
  await x.close("proxy", a);
  assert.equal(await x.status("proxy"), 0n);
  assert.deepEqual(await x.open("proxy"), [0, 0]);
  assert.ok((await x.proxyAt("proxy")).equals(b));
  assert.deepEqual(await x.ints(b, "get_proxy"), [0n, 0n, 0n, STAKE, 0n]);
});

/// Threat 3 (upgrade sequences, money created/lost/stuck): open at A (v1), SetCodes(v2),
/// unregister + register the key while A is open, close A, reopen at B (v2), SetCodes back to v1,
/// close B, reopen at A (a CLOSED contract reopening). Every close returns the stake to the
/// proxy's wallet; every open lands it on the contract the root records; nothing stays behind.
test("review: open/upgrade/unregister/register/close/reopen cycles move the stake exactly", async () => {
  const x = await network();
  const proxy2 = await upgraded("proxy");
  await x.deploy();
  await x.register("proxy");
  await x.open("proxy");
  const a = await x.proxyAt("proxy");
  assert.deepEqual(await x.setCodes("owner", c.codesCell(proxy2)), [0]);
  assert.deepEqual(await x.unregister("proxy"), [0]);
  assert.deepEqual(await x.open("proxy"), [102], "unregistered: no open");
  assert.deepEqual(await x.register("proxy", x.p.stranger.address), [103], "the wallet cannot change while open");
  assert.deepEqual(await x.register("proxy"), [0]);
  assert.deepEqual(await x.open("proxy"), [103], "still open at A");
  assert.ok((await x.proxyAt("proxy")).equals(a), "RegisterProxy kept the recorded contract");

  const wallet = async () => x.balance(x.p.proxy.address);
  let before = await wallet();
  assert.deepEqual(await x.close("proxy", a), [0, 0, 0]);
  let back = (await wallet()) - before;
  assert.ok(back > STAKE - GAS && back <= STAKE + GAS, `the stake came back from A: ${back}`);
  assert.ok((await x.balance(a)) === 0n, "A keeps nothing");
  assert.equal(await x.status("proxy"), 0n);

  assert.deepEqual(await x.open("proxy"), [0, 0]);
  const b = await x.proxyAt("proxy");
  assert.ok(b.equals(c.proxyAddress(x.root.address, x.p.proxy.address, x.p.proxy.key, proxy2)));
  assert.deepEqual(await x.ints(b, "get_proxy"), [0n, 0n, 0n, STAKE, 0n]);
  // A stale notice: A, closed, cannot close again, and so cannot close the key at B.
  assert.deepEqual(await x.send("proxy", a, c.body.op(c.OP.proxyFinishClose, 0).endCell()), [106]);
  assert.equal(await x.status("proxy"), 1n);

  assert.deepEqual(await x.setCodes("owner", c.codesCell()), [0]);
  before = await wallet();
  assert.deepEqual(await x.close("proxy", b), [0, 0, 0]);
  back = (await wallet()) - before;
  assert.ok(back > STAKE - GAS && back <= STAKE + GAS, `the stake came back from B: ${back}`);
  assert.equal(await x.status("proxy"), 0n, "B's notice was recognised");
  // Reopen with the committed code again: back at A, which reopens from CLOSED.
  assert.deepEqual(await x.open("proxy"), [0, 0]);
  assert.ok((await x.proxyAt("proxy")).equals(a));
  assert.deepEqual(await x.ints(a, "get_proxy"), [0n, 0n, 0n, STAKE, 0n]);
  assert.deepEqual((await x.ints(a, "get_terms")).slice(2), [BigInt(c.NETWORK_ID)]);
  const held = await x.balance(a);
  assert.ok(held >= STAKE && held < STAKE + GAS, `A holds the stake: ${held}`);
});

/// Threat 3 (stake sent to a contract that refuses it): the root deploys a proxy contract with
/// a non-bounceable message. If the proxy code in force refuses ProxyOpened (a mistaken
/// SetCodes; the owner is trusted, but nothing checks the code), the stake is credited to an
/// address with no working code and the key stays "opened" at the root for good: the stake
/// cannot come back and the key can never open again. Expected here: the refusal gives the
/// stake back (bounce to the root, which returns it and clears `opened`). FAILS: finding.
test("review: an open the proxy code refuses bounces: the stake comes back and the key may open again", async () => {
  const x = await network();
  const broken = await refusing();
  await x.deploy();
  await x.register("proxy");
  assert.deepEqual(await x.setCodes("owner", c.codesCell(broken)), [0]);
  const before = await x.balance(x.p.proxy.address);
  // The root, the refusing contract, the root again (the bounce).
  assert.deepEqual(await x.open("proxy"), [0, 999, 0]);
  const at = await x.proxyAt("proxy");
  const spent = before - (await x.balance(x.p.proxy.address));
  assert.ok(spent < GAS, `the stake came back to the proxy's wallet (it is down ${spent})`);
  assert.ok((await x.balance(at)) < GAS, "nothing is left at the refusing address");
  assert.equal(await x.status("proxy"), 0n, "the key may open again");
  // The owner sets working code again: the key opens, with its stake.
  assert.deepEqual(await x.setCodes("owner", c.codesCell()), [0]);
  assert.deepEqual(await x.open("proxy"), [0, 0]);
  assert.equal(await x.status("proxy"), 1n);
  const [, , , stake] = await x.ints(await x.proxyAt("proxy"), "get_proxy");
  assert.equal(stake, STAKE);
});

/// Threat 2 (is the signature over exactly the bytes parsed): a genuine charge followed by
/// extra bits in the Charge body applies once, as the plain one would (the extra bits are
/// neither signed nor read); a body one bit short is refused before anything changes.
test("review: bits after the signed charge change nothing; a short charge is refused", async () => {
  const x = await network();
  await x.deploy();
  await x.register("proxy");
  await x.open("proxy");
  const proxy = await x.proxyAt("proxy");
  const client = c.clientInit(proxy, x.p.client.address, x.p.proxy.key, params);
  assert.deepEqual(await x.send("client", client.address, c.body.op(c.OP.clientDeposit, 0).storeCoins(5n * TON).endCell(),
    { value: 5n * TON + GAS, init: client.init }), [0]);
  const msg = c.paymentMessage(c.PAY.chargeClient, 1, 100, client.address, x.p.proxy);
  const padded = beginCell().storeUint(c.OP.charge, 32).storeBuffer(msg).storeUint(0xff, 8).endCell();
  assert.deepEqual(await x.send("stranger", client.address, padded), [0, 0]);
  const tokensUsed = async () => (await x.ints(client.address, "get_client"))[4];
  assert.equal(await tokensUsed(), 100n, "the padded charge applied, for its signed counter");
  // The same message again (plain) is a replay: refused, counter unchanged.
  assert.deepEqual(await x.send("stranger", client.address, c.body.signed(c.OP.charge, msg)), [112]);
  const short = beginCell().storeUint(c.OP.charge, 32).storeBits(
    beginCell().storeBuffer(msg).endCell().beginParse().loadBits(967)).endCell();
  const refused = await x.send("stranger", client.address, short);
  assert.notEqual(refused[0], 0, `a 967-bit charge was accepted (${refused})`);
  assert.equal(await tokensUsed(), 100n, "nothing changed");
});

/// Threat 2 (sign extension): the network id is an int32 on both sides. A proxy contract of a
/// root deployed for a negative id (mainnet's -239) hands it to its client contracts; a charge
/// signed with -239 applies, one signed with the same low byte as a positive id (0x11 = 17,
/// 0xffffff11 read unsigned) or with the id's u32 bit pattern shifted is refused with 122.
test("review: a negative network id round-trips; look-alike ids are refused (122)", async () => {
  const chain = await Blockchain.create();
  chain.now = 1700000000;
  const names = ["owner", "proxy", "client", "stranger"];
  const p = Object.fromEntries(names.map((n, i) => [n, c.party(i + 1)]));
  const fund = await chain.treasury("fund");
  for (const w of Object.values(p)) await fund.send({ to: w.address, value: toNano("1000"), bounce: false });
  const root = c.rootInit(p.owner.address, params, -239);
  async function send(from, to, body, { value = GAS, init } = {}) {
    const w = p[from];
    const request = c.walletRequest(w, [{ to, value, body, init, bounce: true }], chain.now + 60);
    const result = await chain.sendMessage(external({ to: w.address, init: w.seqno === 0 ? w.init : undefined, body: request }));
    w.seqno += 1;
    return result.transactions
      .filter((t) => !Object.values(p).some((x) => t.inMessage?.info?.dest?.equals?.(x.address)))
      .map((t) => (t.description.computePhase.type === "vm" ? t.description.computePhase.exitCode : "skipped"));
  }
  await send("owner", root.address, beginCell().endCell(), { value: toNano("1"), init: root.init });
  await send("owner", root.address, c.body.op(c.OP.registerProxy, 0).storeUint(p.proxy.key, 256).storeAddress(p.proxy.address)
    .storeRef(beginCell().storeStringTail("p").endCell()).endCell());
  assert.deepEqual(await send("proxy", root.address, c.body.op(c.OP.openProxy, 0).storeUint(p.proxy.key, 256).storeCoins(STAKE).endCell(),
    { value: STAKE + GAS }), [0, 0]);
  const proxy = c.proxyAddress(root.address, p.proxy.address, p.proxy.key);
  const [net] = (await chain.runGetMethod(root.address, "get_network", [])).stack.map((e) => BigInt(e.value));
  assert.equal(net, -239n);
  const [, , terms] = (await chain.runGetMethod(proxy, "get_terms", [])).stack.map((e) => BigInt(e.value));
  assert.equal(terms, -239n);
  const client = c.clientInit(proxy, p.client.address, p.proxy.key, params, { networkId: -239 });
  assert.deepEqual(await send("client", client.address, c.body.op(c.OP.clientDeposit, 0).storeCoins(5n * TON).endCell(),
    { value: 5n * TON + GAS, init: client.init }), [0]);
  const charge = (tokens, networkId) => c.body.signed(c.OP.charge,
    c.paymentMessage(c.PAY.chargeClient, tokens, tokens, client.address, p.proxy, { networkId }));
  assert.deepEqual(await send("stranger", client.address, charge(10, 0x11)), [122]);
  assert.deepEqual(await send("stranger", client.address, charge(10, -3)), [122]);
  assert.deepEqual(await send("stranger", client.address, charge(10, c.NETWORK_ID)), [122]);
  assert.deepEqual(await send("stranger", client.address, charge(10, -239)), [0, 0]);
});

/// Threat 3 (who may upgrade): the proposed owner, before it accepts, may not set codes or
/// upgrade the root; neither may the proxy contract's owner nor a stranger; a malformed SetCodes
/// from a stranger changes nothing.
test("review: only the current owner upgrades, not the proposed one", async () => {
  const x = await network();
  const proxy2 = await upgraded("proxy");
  await x.deploy();
  await x.register("proxy");
  await x.open("proxy");
  const net = await x.ints(x.root.address, "get_network");
  assert.deepEqual(await x.send("owner", x.root.address, c.body.op(c.OP.proposeOwner, 0).storeAddress(x.p.stranger.address).endCell()), [0]);
  assert.deepEqual(await x.setCodes("stranger", c.codesCell(proxy2)), [100], "the proposed owner before accepting");
  assert.deepEqual(await x.upgradeRoot("stranger", proxy2), [100]);
  const a = await x.proxyAt("proxy");
  assert.deepEqual(await x.send("proxy", a, c.body.op(c.OP.setCodes, 0).storeRef(c.codesCell(proxy2)).endCell()), [0xffff],
    "the proxy contract knows no SetCodes");
  const malformed = await x.send("stranger", x.root.address, c.body.op(c.OP.setCodes, 0).endCell());
  assert.notEqual(malformed[0], 0);
  assert.deepEqual(await x.ints(x.root.address, "get_network"), net, "nothing changed");
});

/// Threat 1 (wallet external messages across networks): the same key's wallet on mainnet has
/// wallet id "coco" ^ -239 (another address). A request signed for the local network's wallet
/// (id "coco" ^ "colc"), delivered to the mainnet wallet, is refused before the wallet accepts
/// it (no gas bought, nothing sent); the mainnet wallet's own request passes.
test("review: a wallet request signed for another network's wallet id is refused", async () => {
  const chain = await Blockchain.create();
  chain.now = 1700000000;
  const w = c.party(9);
  const mainnetId = (0x636f636f ^ -239) | 0;
  const data = beginCell().storeBit(1).storeUint(0, 32).storeInt(mainnetId, 32).storeBuffer(w.keys.publicKey).storeBit(0).endCell();
  const init = { code: c.code.wallet, data };
  const at = contractAddress(0, init);
  assert.ok(!at.equals(w.address), "another address on another network");
  const fund = await chain.treasury("fund");
  await fund.send({ to: at, value: toNano("10"), bounce: false });
  const to = c.party(10).address;
  // The local-network request (c.walletRequest signs with c.WALLET_ID) sent to the mainnet wallet.
  const local = c.walletRequest({ ...w, seqno: 0 }, [{ to, value: toNano("1"), bounce: false }], chain.now + 60);
  await assert.rejects(chain.sendMessage(external({ to: at, init, body: local })), "the mainnet wallet accepted a local-network request");
  assert.equal((await chain.getContract(to)).balance, 0n, "nothing was sent");
  // Control: the same request with the mainnet wallet id passes.
  const actions = [{ type: "sendMsg", mode: 3, outMsg: internal({ to, value: toNano("1"), bounce: false }) }];
  const unsigned = beginCell().storeUint(0x7369676e, 32).storeInt(mainnetId, 32).storeUint(chain.now + 60, 32).storeUint(0, 32)
    .storeMaybeRef(beginCell().store(storeOutList(actions)).endCell()).storeBit(0).endCell();
  const signed = beginCell().storeSlice(unsigned.beginParse()).storeBuffer(sign(unsigned.hash(), w.keys.secretKey)).endCell();
  await chain.sendMessage(external({ to: at, init, body: signed }));
  assert.ok((await chain.getContract(to)).balance > 0n, "the mainnet request went through");
});
