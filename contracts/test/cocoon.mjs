// The cocoon contracts as @ton/core cells: storage layouts, message bodies and the wallet's
// signed external requests, mirroring src/*.tolk and crates/cocoon-ton.
import { Address, beginCell, Cell, contractAddress, Dictionary, storeMessageRelaxed, storeOutList, internal } from "@ton/core";
import { keyPairFromSeed, sign, sha256_sync } from "@ton/crypto";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const code = Object.fromEntries(
  ["wallet", "root", "proxy", "client", "worker"].map((n) => [n, Cell.fromBoc(fs.readFileSync(path.join(here, "..", "build", `${n}.boc`)))[0]]),
);

// The network the test roots are deployed for (cocoon-ton's LOCAL_NETWORK, "colc"), and the
// wallet id of cocoon wallets on it: "coco" XOR the network id, as layout::wallet_id.
export const NETWORK_ID = 0x636f6c63;
export const WALLET_ID = (0x636f636f ^ NETWORK_ID) | 0;
export const OP = {
  setParams: 0x636f0001, allowImage: 0x636f0002, revokeImage: 0x636f0003, allowModel: 0x636f0004,
  registerProxy: 0x636f0005, openProxy: 0x636f0006, proposeOwner: 0x636f0007, acceptOwner: 0x636f0008,
  revokeModel: 0x636f0009, unregisterProxy: 0x636f000a, setCodes: 0x636f000b, upgradeRoot: 0x636f000c,
  proxyAddStake: 0x636f0014,
  proxyWithdraw: 0x636f0010, proxyClose: 0x636f0011, proxyFinishClose: 0x636f0012, proxyRefundClient: 0x636f0013,
  clientDeposit: 0x636f0020, clientStake: 0x636f0021, clientWithdraw: 0x636f0022, clientClose: 0x636f0023,
  clientFinishClose: 0x636f0024, charge: 0x636f0025, payout: 0x636f0030, workerWithdraw: 0x636f0031,
  charged: 0x636f0102,
};
export const PAY = { chargeClient: 0x63687267, payWorker: 0x70617977 };

export function party(index) {
  const keys = keyPairFromSeed(Buffer.alloc(32, index));
  const data = beginCell().storeBit(1).storeUint(0, 32).storeInt(WALLET_ID, 32).storeBuffer(keys.publicKey).storeBit(0).endCell();
  const init = { code: code.wallet, data };
  return { keys, key: BigInt("0x" + keys.publicKey.toString("hex")), init, address: contractAddress(0, init), seqno: 0 };
}

export function paramsCell(p) {
  return beginCell()
    .storeCoins(p.price_per_token).storeCoins(p.worker_fee_per_token)
    .storeUint(p.prompt_multiplier, 32).storeUint(p.cached_multiplier, 32)
    .storeUint(p.completion_multiplier, 32).storeUint(p.reasoning_multiplier, 32)
    .storeCoins(p.min_client_stake).storeCoins(p.min_proxy_stake)
    .storeUint(p.client_close_delay, 32).storeUint(p.proxy_close_delay, 32)
    .endCell();
}

export function codesCell(proxy = code.proxy, client = code.client, worker = code.worker) {
  return beginCell().storeRef(proxy).storeRef(client).storeRef(worker).endCell();
}

export function rootInit(owner, params, networkId = NETWORK_ID) {
  const lists = beginCell().storeBit(0).storeBit(0).storeBit(0).endCell();
  const data = beginCell().storeAddress(owner).storeRef(paramsCell(params)).storeRef(lists).storeBit(0).storeRef(codesCell())
    .storeUint(0, 256).storeInt(networkId, 32).endCell();
  const init = { code: code.root, data };
  return { init, address: contractAddress(0, init) };
}

export function proxyAddress(root, ownerWallet, key, proxyCode = code.proxy) {
  const identity = beginCell().storeAddress(root).storeAddress(ownerWallet).storeUint(key, 256).endCell();
  const data = beginCell().storeRef(identity).storeUint(3, 2).storeUint(0, 32).storeCoins(0).storeCoins(0).storeCoins(0).storeBit(0).endCell();
  return contractAddress(0, { code: proxyCode, data });
}

function binding(proxy, owner, proxyKey, networkId) {
  return beginCell().storeAddress(proxy).storeAddress(owner).storeUint(proxyKey, 256).storeInt(networkId, 32).endCell();
}

export function clientInit(proxy, owner, proxyKey, p, { networkId = NETWORK_ID, clientCode = code.client } = {}) {
  const terms = beginCell().storeCoins(p.price_per_token).storeCoins(p.min_client_stake).storeUint(p.client_close_delay, 32).endCell();
  const data = beginCell().storeRef(binding(proxy, owner, proxyKey, networkId)).storeRef(terms)
    .storeUint(0, 2).storeUint(0, 32).storeCoins(0).storeCoins(0).storeUint(0, 64).endCell();
  const init = { code: clientCode, data };
  return { init, address: contractAddress(0, init) };
}

export function workerInit(proxy, owner, proxyKey, p, { networkId = NETWORK_ID, workerCode = code.worker } = {}) {
  const data = beginCell().storeRef(binding(proxy, owner, proxyKey, networkId)).storeCoins(p.worker_fee_per_token).storeUint(0, 64).storeCoins(0).storeBit(0).endCell();
  const init = { code: workerCode, data };
  return { init, address: contractAddress(0, init) };
}

// A proxy-signed payment message: 57 bytes (op, query id, tokens, network id, workchain,
// account id) and an Ed25519 signature over their SHA-256.
export function paymentMessage(op, queryId, tokens, contract, signer, { networkId = NETWORK_ID, workchain = contract.workChain } = {}) {
  const body = Buffer.alloc(57);
  body.writeUInt32BE(op, 0);
  body.writeBigUInt64BE(BigInt(queryId), 4);
  body.writeBigUInt64BE(BigInt(tokens), 12);
  body.writeInt32BE(networkId, 20);
  body.writeInt8(workchain, 24);
  contract.hash.copy(body, 25);
  return Buffer.concat([body, sign(sha256_sync(body), signer.keys.secretKey)]);
}

export const body = {
  op: (op, queryId = 0) => beginCell().storeUint(op, 32).storeUint(queryId, 64),
  signed: (op, message) => beginCell().storeUint(op, 32).storeBuffer(message).endCell(),
};

// The wallet's external request (wallet v5r1 format), signed by the party.
export function walletRequest(w, messages, validUntil) {
  const actions = messages.map((m) => ({ type: "sendMsg", mode: 3, outMsg: internal(m) }));
  const unsigned = beginCell().storeUint(0x7369676e, 32).storeInt(WALLET_ID, 32).storeUint(validUntil, 32).storeUint(w.seqno, 32)
    .storeMaybeRef(beginCell().store(storeOutList(actions)).endCell()).storeBit(0).endCell();
  const signature = sign(unsigned.hash(), w.keys.secretKey);
  return beginCell().storeSlice(unsigned.beginParse()).storeBuffer(signature).endCell();
}
export { Address, beginCell, Dictionary, storeMessageRelaxed };
