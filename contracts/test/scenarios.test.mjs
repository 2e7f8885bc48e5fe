// The settlement scenarios in the reference emulator must equal expected.json, which the
// tycho-vm run (crates/cocoon-ton/tests/ton/scenarios.rs) is held to as well.
// UPDATE_EXPECTED=1 rewrites expected.json from this run instead.
import { test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { runScenario, spec } from "./run.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const expectedPath = path.join(here, "expected.json");

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
