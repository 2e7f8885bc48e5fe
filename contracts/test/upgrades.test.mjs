// Code upgrades at the root (SetCodes for the contracts it deploys from then on, UpgradeRoot for
// its own code), in the reference emulator. The upgraded code is the committed code compiled
// with one more get-method (`version`, answering 2), so a test can tell which code runs.
import { test } from "node:test";
import assert from "node:assert/strict";
import * as c from "./cocoon.mjs";
import { hashOf, network as chain, upgraded } from "./root-harness.mjs";

const network = () => chain(["owner", "proxy", "proxy2", "client", "stranger"]);

test("only the owner sets the code new contracts get; open contracts keep theirs and still close", async () => {
  const x = await network();
  const [proxy2, client2, worker2] = [await upgraded("proxy"), await upgraded("client"), await upgraded("worker")];
  await x.deploy();
  await x.register("proxy");
  assert.deepEqual(await x.open("proxy"), [0, 0]);
  const before = await x.proxyAt("proxy");
  assert.ok(before.equals(c.proxyAddress(x.root.address, x.p.proxy.address, x.p.proxy.key)), "opened with the committed code");

  const codes = c.codesCell(proxy2, client2, worker2);
  assert.deepEqual(await x.setCodes("stranger", codes), [100], "a stranger cannot set the code");
  assert.deepEqual(await x.setCodes("proxy", codes), [100], "nor can a proxy");
  const [, proxyHash] = await x.ints(x.root.address, "get_network");
  assert.equal(proxyHash, hashOf(c.code.proxy), "the refused SetCodes changed nothing");
  assert.deepEqual(await x.setCodes("owner", codes), [0]);
  const [networkId, p2, c2, w2] = await x.ints(x.root.address, "get_network");
  assert.deepEqual([networkId, p2, c2, w2], [BigInt(c.NETWORK_ID), hashOf(proxy2), hashOf(client2), hashOf(worker2)]);

  // The open contract is where it was, with the code and terms it opened with.
  assert.ok((await x.proxyAt("proxy")).equals(before));
  assert.deepEqual(await x.ints(before, "get_terms"), [hashOf(c.code.client), hashOf(c.code.worker), BigInt(c.NETWORK_ID)]);

  // A proxy opening now gets the new code, at the address that code derives.
  await x.register("proxy2");
  assert.deepEqual(await x.open("proxy2"), [0, 0]);
  const fresh = await x.proxyAt("proxy2");
  assert.ok(fresh.equals(c.proxyAddress(x.root.address, x.p.proxy2.address, x.p.proxy2.key, proxy2)));
  assert.deepEqual(await x.ints(fresh, "version"), [2n]);
  assert.deepEqual(await x.ints(fresh, "get_terms"), [hashOf(client2), hashOf(worker2), BigInt(c.NETWORK_ID)]);

  // The proxy opened with the old code closes, and the root still recognises its notice (it
  // records the contract's address; it does not derive it from the code it holds now): the key
  // may open again, this time with the new code.
  assert.equal(await x.status("proxy"), 1n);
  await x.close("proxy", before);
  assert.equal(await x.status("proxy"), 0n, "the closed notice of the old-code contract was refused");
  assert.deepEqual(await x.open("proxy"), [0, 0]);
  const reopened = await x.proxyAt("proxy");
  assert.ok(!reopened.equals(before), "a re-open deploys the new code at its own address");
  assert.deepEqual(await x.ints(reopened, "version"), [2n]);
});

test("a forged closed notice from a contract the key never opened is refused", async () => {
  const x = await network();
  await x.deploy();
  await x.register("proxy");
  // Not opened yet: no contract is recorded, so no sender can pass for it.
  const notice = c.body.op(0x636f0106, 0).storeUint(x.p.proxy.key, 256).endCell();
  assert.deepEqual(await x.send("stranger", x.root.address, notice), [101]);
  await x.open("proxy");
  assert.deepEqual(await x.send("stranger", x.root.address, notice), [101]);
  assert.equal(await x.status("proxy"), 1n);
});

test("only the owner upgrades the root, and the registry survives the upgrade", async () => {
  const x = await network();
  const root2 = await upgraded("root");
  await x.deploy();
  await x.register("proxy");
  await x.open("proxy");
  const params = await x.ints(x.root.address, "get_params");
  const net = await x.ints(x.root.address, "get_network");
  await assert.rejects(x.ints(x.root.address, "version"), "the committed root has no version getter");

  assert.deepEqual(await x.upgradeRoot("stranger", root2), [100]);
  assert.deepEqual(await x.upgradeRoot("proxy", root2), [100]);
  await assert.rejects(x.ints(x.root.address, "version"), "a refused upgrade changed the code");
  assert.deepEqual(await x.upgradeRoot("owner", root2), [0]);
  assert.deepEqual(await x.ints(x.root.address, "version"), [2n]);
  assert.deepEqual(await x.ints(x.root.address, "get_params"), params);
  assert.deepEqual(await x.ints(x.root.address, "get_network"), net);
  assert.equal(await x.status("proxy"), 1n);
  // The owner is still the owner under the new code: it can upgrade back.
  assert.deepEqual(await x.upgradeRoot("owner", c.code.root), [0]);
  await assert.rejects(x.ints(x.root.address, "version"));
});
