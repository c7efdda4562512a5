// Tokenizer worker of preprocessPretrain and preprocessSft (a worker_threads script, run by the
// WorkerPool of pool.ts).
//
// It is plain JavaScript, not TypeScript, so that Node can start it both from src/ (under vitest,
// which does not transform worker threads) and from dist/ (tsup copies it next to index.js). It
// imports the package by its own name, which Node resolves through package.json "exports" to the
// built dist/index.js; so the package must be built (`npx tsup`) before workers > 1 can run.
//
// Protocol: workerData = {task, tokenizerDir, appendEod?}; the tokenizer (chat template included)
// is loaded here from its folder, only the path crosses the thread boundary. Every reply carries
// the message's id, its typed arrays are transferred rather than copied, and a failure of the
// whole batch is answered with {id, error}.
// - task "pretrain": {id, texts} -> {id, tokens, lengths}: the documents' ids concatenated in one
//   Int32Array (plus the EOD id after each when appendEod) and one length per document.
// - task "sft": {id, lines, chats} (parsed ChatSamples and their input lines) -> {id, ids, masks,
//   lengths, errors}: encodeSftBatch's result; a sample that fails to render is listed in errors
//   with its line, and the main thread applies truncation/drop rules in input order.
import { parentPort, workerData } from 'node:worker_threads';
import { encodePretrainBatch, encodeSftBatch, loadTokenizer } from '@megapatch/data';

const { task, tokenizerDir, appendEod } = workerData;
const tokenizer = await loadTokenizer(tokenizerDir);

parentPort.on('message', (msg) => {
  try {
    if (task === 'sft') {
      const r = encodeSftBatch(tokenizer, { lines: msg.lines, chats: msg.chats });
      parentPort.postMessage({ id: msg.id, ...r }, [r.ids.buffer, r.masks.buffer, r.lengths.buffer]);
    } else {
      const r = encodePretrainBatch(tokenizer, msg.texts, appendEod);
      parentPort.postMessage({ id: msg.id, ...r }, [r.tokens.buffer, r.lengths.buffer]);
    }
  } catch (e) {
    parentPort.postMessage({ id: msg.id, error: e instanceof Error ? e.message : String(e) });
  }
});
