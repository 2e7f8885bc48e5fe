// What no message order may do to anyone's money, asserted on the scenarios' runs in the
// reference emulator. expected.json pins every figure; these say, independently of it, why the
// figures are right: a refused message loses nothing and changes nothing, a bounce undoes only
// what its own message did, no one is paid or charged twice, workers' share stays theirs, and
// the spare gas of every message goes back instead of piling up in a contract.
import { test } from "node:test";
import assert from "node:assert/strict";
import { runScenario, spec } from "./run.mjs";

const PRICE = spec.params.price_per_token;
const FEE = spec.params.worker_fee_per_token;
// What a contract keeps beyond its books for storage, in milliton (STORAGE_RESERVE).
const RESERVE_MTON = 10;

const runs = {};
async function run(name) {
  runs[name] ??= await runScenario(spec.scenarios[name]);
  return runs[name];
}
const step = (results, label) => {
  const i = results.findIndex((r) => r.step.includes(`(${label})`));
  assert.ok(i >= 0, `no step labelled ${label}`);
  return [results[i], results[i - 1]];
};

test("a bounced charge under a landed one: the client pays once for each token", async () => {
  const r = await run("bounces");
  const [batch] = step(r, "a refused charge under a landed one");
  const [client] = [batch.state.client];
  const deposit = 5_000_000_000;
  // balance = deposit - what the proxy took; it may take at most the counter's worth.
  assert.ok(deposit - client[2] <= client[4] * PRICE, `paid ${deposit - client[2]} for ${client[4]} tokens`);
  const [again] = step(r, "the landed charge again");
  assert.deepEqual(again.exits, [112], "the charge that landed cannot land again");
  const last = r.at(-1).state.client;
  assert.ok(deposit - last[2] <= last[4] * PRICE);
});

test("two claims in one request, the first refused: the worker is paid once, and in full", async () => {
  const r = await run("bounces");
  for (const label of ["two claims in one request, the first too large", "the same request again"]) {
    const [batch, before] = step(r, label);
    assert.deepEqual(batch.state.worker.slice(0, 2), before.state.worker.slice(0, 2), `${label}: nothing is paid`);
    assert.equal(batch.state.worker[2], 0, "no claim is left in flight");
  }
  const [claimed] = step(r, "the refused claim's range can be claimed");
  assert.equal(claimed.state.worker[0], 2000);
  assert.equal(claimed.state.worker[1], 2000 * FEE, "paid for every token once");
  const [replay] = step(r, "replay");
  assert.deepEqual(replay.exits, [112]);
});

test("a message with too little value is refused before it changes anything", async () => {
  const r = await run("low_value");
  const low = r.map((x, i) => [x, r[i - 1]]).filter(([x]) => x.step.includes("(too little value)"));
  assert.ok(low.length >= 9);
  for (const [x, prev] of low) {
    assert.deepEqual(x.exits, [117], x.step);
    assert.deepEqual(x.state, prev.state, `${x.step} changed the state`);
  }
});

test("the workers' share of a charge is not the proxy's to withdraw", async () => {
  const r = await run("workers_share");
  const [charged] = step(r, "the workers' share is not the proxy's");
  assert.deepEqual(charged.exits, [109]);
  const [above] = step(r, "one nanoton above its own share");
  assert.deepEqual(above.exits, [109]);
  const [paid] = step(r, "paid from what was held for workers");
  const proxy = paid.state.proxy;
  assert.equal(proxy[3], 10_000_000_000, "the stake is untouched while the held share covers the payout");
  assert.equal(paid.state.worker[1], 1000 * FEE);
});

test("no contract keeps more than its books and the storage reserve", async () => {
  for (const name of Object.keys(spec.scenarios)) {
    for (const x of await run(name)) {
      for (const who of ["proxy", "client", "client2", "worker"]) {
        const figures = x.state[who];
        if (!figures) continue;
        assert.ok(figures.at(-1) <= RESERVE_MTON, `${name} / ${x.step}: ${who} keeps ${figures.at(-1)} mTON beyond its books`);
      }
    }
  }
});
