// Outputs are never destroyed by mistake, and nothing half-written is left behind: overwrite
// guards, the output lock, leftovers of killed runs, SIGINT/SIGTERM and a closed stdout — all
// through the real binary.
import * as fs from 'node:fs';
import * as os from 'node:os';
import { join } from 'node:path';
import { Checkpoint } from '@megapatch/convert';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '@megapatch/convert/testing';
import { IndexedDatasetBuilder } from '@megapatch/data';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  deadPid,
  finished,
  listTree,
  megapatch,
  oneLine,
  startMegapatch,
  tempDir,
  temporaries,
  waitFor,
} from './helpers.js';

const root = tempDir('outputs');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const config = (id: string) => SYNTHETIC_MODELS.find((m) => m.id === id)?.config as Record<string, unknown>;
const hf = join(root, 'hf');
const ckpt = join(root, 'ckpt');
/** A model big enough (about 230 MB in fp32) that a conversion is still running when we interrupt it. */
const bigHf = join(root, 'hf-big');

beforeAll(() => {
  writeSyntheticHfCheckpoint(hf, config('qwen2'), { seed: 5 });
  const r = megapatch(['convert', 'hf-to-megapatch', '--hf-dir', hf, '--out', ckpt, '--tp', '2']);
  expect(r.status, r.stderr).toBe(0);
  writeSyntheticHfCheckpoint(
    bigHf,
    {
      ...config('llama'),
      hidden_size: 512,
      intermediate_size: 1536,
      num_hidden_layers: 8,
      vocab_size: 32000,
    },
    { seed: 1, maxShardSize: 1 << 30 },
  );
}, 120_000);

/** Starts converting the big model into `out` in fp32 (a run that lasts long enough to interrupt). */
const startBigConversion = (out: string) =>
  startMegapatch(['convert', 'hf-to-megapatch', '--hf-dir', bigHf, '--out', out, '--dtype', 'fp32']);

/** A snapshot of a folder: every entry with its bytes, to show that a refused run changed nothing. */
function snapshot(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const p of listTree(dir))
    out[p] = p.endsWith('/') ? '' : fs.readFileSync(join(dir, p)).toString('base64');
  return out;
}

describe('an output never equals, sits inside or contains an input', () => {
  it('megapatch-to-hf --out equal to, above or inside --in is refused, even with --overwrite', () => {
    const before = snapshot(root);
    const cases: [string, string][] = [
      [ckpt, 'is the same path as --in'],
      [root, 'contains --in'],
      [join(ckpt, 'iter_0000000', 'hf'), 'is inside --in'],
      [join(ckpt, '..', 'ckpt'), 'is the same path as --in'],
    ];
    for (const [out, how] of cases) {
      const r = megapatch(['convert', 'megapatch-to-hf', '--in', ckpt, '--out', out, '--overwrite']);
      expect(r.status, out).toBe(2);
      expect(oneLine(r.stderr)).toContain(`--out ${out} ${how} ${ckpt}`);
    }
    expect(snapshot(root)).toEqual(before);
  });

  it('the same through a symbolic link', () => {
    const link = join(root, 'link-to-ckpt');
    fs.symlinkSync(ckpt, link);
    const r = megapatch(['convert', 'reshard', '--in', ckpt, '--out', link, '--overwrite']);
    expect(r.status).toBe(2);
    expect(oneLine(r.stderr)).toContain(`--out ${link} is the same path as --in ${ckpt}`);
    fs.unlinkSync(link);
  });

  it('hf-to-megapatch --out equal to --hf-dir is refused', () => {
    const before = snapshot(hf);
    const r = megapatch(['convert', 'hf-to-megapatch', '--hf-dir', hf, '--out', hf, '--overwrite']);
    expect(r.status).toBe(2);
    expect(oneLine(r.stderr)).toContain(`--out ${hf} is the same path as --hf-dir ${hf}`);
    expect(snapshot(hf)).toEqual(before);
  });

  it('preprocess outputs are refused inside the tokenizer folder', () => {
    const tok = join(root, 'tok');
    fs.mkdirSync(tok);
    fs.copyFileSync(join(hf, 'tokenizer.json'), join(tok, 'tokenizer.json'));
    fs.copyFileSync(join(hf, 'tokenizer_config.json'), join(tok, 'tokenizer_config.json'));
    const input = join(root, 'in.jsonl');
    fs.writeFileSync(input, '{"text": "hello"}\n');
    const r = megapatch([
      'preprocess',
      'pretrain',
      '--input',
      input,
      '--tokenizer',
      tok,
      '--output-prefix',
      join(tok, 'data'),
    ]);
    expect(r.status).toBe(2);
    expect(oneLine(r.stderr)).toContain(`is inside --tokenizer ${tok}`);
    expect(fs.readdirSync(tok).sort()).toEqual(['tokenizer.json', 'tokenizer_config.json']);
  });
});

describe('--overwrite replaces only what megapatch wrote', () => {
  it('refuses an export folder holding other files, and keeps them', () => {
    const out = join(root, 'export');
    fs.mkdirSync(join(out, 'docs'), { recursive: true });
    fs.writeFileSync(join(out, 'thesis.pdf'), 'years of work');
    fs.writeFileSync(join(out, 'docs', 'notes.md'), 'notes');
    const before = snapshot(out);
    const r = megapatch(['convert', 'megapatch-to-hf', '--in', ckpt, '--out', out, '--overwrite']);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/thesis\.pdf/);
    expect(snapshot(out)).toEqual(before);
  });

  it('replaces an export it wrote itself, and refuses without --overwrite', () => {
    const out = join(root, 'export2');
    expect(megapatch(['convert', 'megapatch-to-hf', '--in', ckpt, '--out', out]).status).toBe(0);
    const again = megapatch(['convert', 'megapatch-to-hf', '--in', ckpt, '--out', out]);
    expect(again.status).toBe(1);
    expect(oneLine(again.stderr)).toMatch(/already exists/);
    const r = megapatch([
      'convert',
      'megapatch-to-hf',
      '--in',
      ckpt,
      '--out',
      out,
      '--overwrite',
      '--dtype',
      'fp32',
    ]);
    expect(r.status, r.stderr).toBe(0);
    expect(fs.readFileSync(join(out, 'config.json'), 'utf8')).toContain('float32');
    expect(temporaries(root)).toEqual([]);
  });

  it('refuses to replace an iteration folder that is not a megapatch checkpoint', () => {
    const out = join(root, 'megatron');
    fs.mkdirSync(join(out, 'iter_0000000'), { recursive: true });
    fs.writeFileSync(join(out, 'iter_0000000', 'common.pt'), 'a torch_dist checkpoint');
    const before = snapshot(out);
    const r = megapatch(['convert', 'hf-to-megapatch', '--hf-dir', hf, '--out', out, '--overwrite']);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/common\.pt/);
    expect(snapshot(out)).toEqual(before);
  });

  it('preprocess refuses existing outputs without --overwrite and replaces them with it', () => {
    const input = join(root, 'pp.jsonl');
    fs.writeFileSync(input, '{"text": "hello world"}\n{"text": "again"}\n');
    const args = [
      'preprocess',
      'pretrain',
      '--input',
      input,
      '--tokenizer',
      hf,
      '--output-prefix',
      join(root, 'pp'),
    ];
    expect(megapatch(args).status).toBe(0);
    const r = megapatch(args);
    expect(r.status).toBe(1);
    expect(oneLine(r.stderr)).toMatch(/already exists.*--overwrite/);
    expect(megapatch([...args, '--overwrite']).status).toBe(0);
  });
});

describe('one run at a time writes to an output', () => {
  it('a lock held by a running process is refused; a dead one is taken over with a note', () => {
    const out = join(root, 'locked');
    fs.writeFileSync(
      `${out}.lock`,
      JSON.stringify({ pid: process.pid, host: os.hostname(), command: 'convert reshard', started: 'now' }),
    );
    const held = megapatch(['convert', 'reshard', '--in', ckpt, '--out', out]);
    expect(held.status).toBe(1);
    expect(oneLine(held.stderr)).toContain(
      `${out} is being written by megapatch convert reshard (pid ${process.pid}`,
    );
    expect(oneLine(held.stderr)).toContain(`delete ${out}.lock if that run is gone`);
    expect(fs.existsSync(out)).toBe(false);

    const dead = deadPid();
    fs.writeFileSync(
      `${out}.lock`,
      JSON.stringify({ pid: dead, host: os.hostname(), command: 'convert reshard', started: 'then' }),
    );
    const r = megapatch(['convert', 'reshard', '--in', ckpt, '--out', out]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toContain(
      `removed the stale lock ${out}.lock of megapatch convert reshard (pid ${dead}, no longer running)`,
    );
    expect(fs.existsSync(`${out}.lock`)).toBe(false);
  });

  it('two conversions into one output at once: the second is refused while the first runs', async () => {
    const out = join(root, 'race');
    const first = startBigConversion(out);
    const done = finished(first);
    await waitFor(() => fs.existsSync(`${out}.lock`), 30_000, 'the first run to take the lock');
    const second = megapatch(['convert', 'hf-to-megapatch', '--hf-dir', hf, '--out', out]);
    const r1 = await done;
    expect(r1.status, r1.stderr).toBe(0);
    expect(second.status).toBe(1);
    expect(oneLine(second.stderr)).toContain(
      `${out} is being written by megapatch convert hf-to-megapatch (pid ${first.pid}`,
    );
    const c = Checkpoint.open(out);
    expect(c.metadata.architecture).toBe('LlamaForCausalLM');
    c.close();
  }, 120_000);
});

describe('interrupts and a closed stdout leave nothing half-written', () => {
  for (const [signal, code] of [
    ['SIGINT', 130],
    ['SIGTERM', 143],
  ] as const) {
    it(`${signal} during a conversion exits ${code} and removes its temporaries and lock`, async () => {
      const out = join(root, `interrupted-${signal}`);
      const child = startMegapatch([
        'convert',
        'hf-to-megapatch',
        '--hf-dir',
        bigHf,
        '--out',
        out,
        '--dtype',
        'fp32',
      ]);
      const done = finished(child);
      await waitFor(() => temporaries(out).length > 0, 30_000, 'the conversion to start writing');
      child.kill(signal);
      const r = await done;
      expect(r.status, r.stderr).toBe(code);
      expect(oneLine(r.stderr)).toBe(
        `megapatch convert hf-to-megapatch: interrupted by ${signal}; its temporary files were removed`,
      );
      expect(fs.existsSync(out)).toBe(false);
      expect(fs.existsSync(`${out}.lock`)).toBe(false);
    }, 120_000);
  }

  it('SIGINT during preprocessing with workers leaves no partial dataset', async () => {
    const input = join(root, 'long.jsonl');
    const line = JSON.stringify({ text: 'the quick brown fox jumps over the lazy dog '.repeat(40) });
    fs.writeFileSync(input, `${Array.from({ length: 20000 }, () => line).join('\n')}\n`);
    const prefix = join(root, 'long');
    const child = startMegapatch([
      'preprocess',
      'pretrain',
      '--input',
      input,
      '--tokenizer',
      hf,
      '--output-prefix',
      prefix,
      '--workers',
      '2',
    ]);
    const done = finished(child);
    await waitFor(
      () => fs.readdirSync(root).some((n) => n.startsWith('long_text_document.bin.tmp-')),
      60_000,
      'the dataset to start',
    );
    child.kill('SIGINT');
    const r = await done;
    expect(r.status, r.stderr).toBe(130);
    expect(fs.readdirSync(root).filter((n) => n.startsWith('long_') || n === 'long.lock')).toEqual([]);
  }, 120_000);

  it('a closed stdout ends data samples quietly (exit 141, no EPIPE stack)', async () => {
    const prefix = join(root, 'docs_text_document');
    const b = new IndexedDatasetBuilder(prefix, { dtype: 'uint16' });
    for (let d = 0; d < 200; d++) b.addDocument(Array.from({ length: 50 }, (_, p) => (d * 50 + p) % 60000));
    b.finalize();
    const child = startMegapatch([
      'data',
      'samples',
      '--data-path',
      prefix,
      '--seq-length',
      '16',
      '--train-samples',
      '100000',
      '--count',
      '100000',
    ]);
    const done = finished(child);
    await new Promise<void>((resolve) => child.stdout?.once('data', () => resolve()));
    child.stdout?.destroy();
    const r = await done;
    expect(r.status).toBe(141);
    expect(r.stderr).toBe('');
  }, 60_000);

  it('a conversion whose stdout is closed stops and removes its temporaries', async () => {
    const out = join(root, 'epipe');
    const child = startBigConversion(out);
    child.stdout?.destroy();
    const r = await finished(child);
    expect(r.status).toBe(141);
    expect(r.stderr).toBe('');
    expect(fs.existsSync(out)).toBe(false);
    expect(fs.existsSync(`${out}.lock`)).toBe(false);
  }, 60_000);
});

describe('leftovers of killed runs', () => {
  it('the next run into the output removes them and says so; ckpt inspect lists them', () => {
    const out = join(root, 'killed');
    expect(megapatch(['convert', 'reshard', '--in', ckpt, '--out', out]).status).toBe(0);
    const dead = deadPid();
    const leftover = join(out, `iter_0000000.tmp-${dead}`);
    fs.mkdirSync(leftover);
    fs.writeFileSync(join(leftover, 'model_rank_tp0_pp0_ep0.safetensors'), Buffer.alloc(1 << 20));
    fs.writeFileSync(join(out, `latest_checkpointed_iteration.txt.tmp-${dead}`), '0');

    const shown = megapatch(['ckpt', 'inspect', out]);
    expect(shown.status).toBe(0);
    expect(shown.stdout).toContain(
      `temporary          iter_0000000.tmp-${dead} (left by process ${dead}, no longer running; the next run writing here removes it)`,
    );

    const r = megapatch(['convert', 'reshard', '--in', ckpt, '--out', out, '--overwrite']);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toContain(`removed ${leftover}, left by process ${dead} (no longer running)`);
    expect(r.stderr).toContain(`removed ${join(out, `latest_checkpointed_iteration.txt.tmp-${dead}`)}`);
    expect(temporaries(out)).toEqual([]);
  });

  it('a folder moved aside by a run killed mid-replace is put back', () => {
    const out = join(root, 'swapped');
    expect(megapatch(['convert', 'reshard', '--in', ckpt, '--out', out]).status).toBe(0);
    const dead = deadPid();
    fs.renameSync(join(out, 'iter_0000000'), join(out, `iter_0000000.old-${dead}`));
    const r = megapatch(['convert', 'reshard', '--in', ckpt, '--out', out, '--overwrite', '--tp', '1']);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toContain(`restored ${join(out, 'iter_0000000')} from iter_0000000.old-${dead}`);
    expect(megapatch(['ckpt', 'inspect', out, '--verify']).status).toBe(0);
  });
});
