// Compiles every contract in src/ with the pinned Tolk compiler and writes build/NAME.boc
// (the code cell) and build/hashes.json (code hashes and the compiler version), and the code
// the upgrade tests install (build/fixtures/: root, proxy, client and worker with a `version`
// getter added, and a contract that refuses every message). With --check it writes nothing and fails
// if a recompile would change any committed file.
import { runTolkCompiler, getTolkCompilerVersion } from "@ton/tolk-js";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const contracts = (process.env.ONLY ?? "wallet,root,proxy,client,worker").split(",");
const check = process.argv.includes("--check");

const version = await getTolkCompilerVersion();
const hashes = { tolk: version, code: {} };
const outputs = {};
for (const name of contracts) {
  const result = await runTolkCompiler({
    entrypointFileName: `${name}.tolk`,
    fsReadCallback: (p) => fs.readFileSync(path.join(root, "src", p), "utf-8"),
  });
  if (result.status === "error") {
    console.error(`${name}.tolk: ${result.message}`);
    process.exit(1);
  }
  outputs[`${name}.boc`] = Buffer.from(result.codeBoc64, "base64");
  hashes.code[name] = result.codeHashHex.toLowerCase();
}
outputs["hashes.json"] = Buffer.from(JSON.stringify(hashes, null, 2) + "\n");

// Test fixtures: not deployed by anything but the tests (scenarios `upgrades`, both TVMs).
const fixtures = {
  "root-v2": ["root.tolk", "\nget fun version(): int { return 2; }\n"],
  "proxy-v2": ["proxy.tolk", "\nget fun version(): int { return 2; }\n"],
  "client-v2": ["client.tolk", "\nget fun version(): int { return 2; }\n"],
  "worker-v2": ["worker.tolk", "\nget fun version(): int { return 2; }\n"],
  refusing: ["refusing.tolk", null],
};
if (!process.env.ONLY) {
  for (const [name, [entry, suffix]] of Object.entries(fixtures)) {
    const result = await runTolkCompiler({
      entrypointFileName: entry,
      fsReadCallback: (p) => {
        if (suffix === null) return "fun onInternalMessage(in: InMessage) { throw 999; }\n";
        const text = fs.readFileSync(path.join(root, "src", p), "utf-8");
        return p === entry ? text + suffix : text;
      },
    });
    if (result.status === "error") {
      console.error(`fixture ${name}: ${result.message}`);
      process.exit(1);
    }
    outputs[`fixtures/${name}.boc`] = Buffer.from(result.codeBoc64, "base64");
  }
}

let stale = [];
for (const [file, bytes] of Object.entries(outputs)) {
  const at = path.join(root, "build", file);
  if (check) {
    if (!fs.existsSync(at) || !fs.readFileSync(at).equals(bytes)) stale.push(file);
  } else {
    fs.mkdirSync(path.dirname(at), { recursive: true });
    fs.writeFileSync(at, bytes);
  }
}
if (check && stale.length) {
  console.error(`contracts/build is stale (${stale.join(", ")}): run \`npm run build\` in contracts/ and commit the result`);
  process.exit(1);
}
console.log(`Tolk ${version}: ${contracts.map((c) => `${c} ${hashes.code[c].slice(0, 12)}`).join(", ")}${check ? " (up to date)" : ""}`);
