// Tokenizer worker of preprocessPretrain (a worker_threads script).
//
// It is plain JavaScript, not TypeScript, so that Node can start it both from src/ (under vitest,
// which does not transform worker threads) and from dist/ (tsup copies it next to index.js). It
// imports the package by its own name, which Node resolves through package.json "exports" to the
// built dist/index.js; so the package must be built (`npx tsup`) before workers > 1 can run.
//
// Protocol: workerData = {tokenizerDir, appendEod}. Each message {id, texts} is answered with
// {id, tokens, lengths}: the documents' ids concatenated in one Int32Array plus one length per
// document, with both buffers transferred rather than copied; or {id, error} if encoding failed.
import { parentPort, workerData } from 'node:worker_threads';
import { loadTokenizer } from '@megapatch/data';

const { tokenizerDir, appendEod } = workerData;
// The tokenizer is loaded here from its folder; only the path crosses the thread boundary.
const tokenizer = await loadTokenizer(tokenizerDir);
const eod = tokenizer.eodId;

parentPort.on('message', (msg) => {
  try {
    const encoded = tokenizer.encodeBatch(msg.texts, { addSpecialTokens: false });
    const lengths = new Int32Array(encoded.length);
    let total = 0;
    for (let i = 0; i < encoded.length; i++) {
      lengths[i] = encoded[i].length + (appendEod ? 1 : 0);
      total += lengths[i];
    }
    const tokens = new Int32Array(total);
    let at = 0;
    for (const ids of encoded) {
      tokens.set(ids, at);
      at += ids.length;
      if (appendEod) tokens[at++] = eod;
    }
    parentPort.postMessage({ id: msg.id, tokens, lengths }, [tokens.buffer, lengths.buffer]);
  } catch (e) {
    parentPort.postMessage({ id: msg.id, error: e instanceof Error ? e.message : String(e) });
  }
});
