// Where conversions may write: never over, inside or around their input (by real path), and with
// overwrite only over what megapatch produced. Every refusal leaves the refused folder byte-identical.
import fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  Checkpoint,
  convertHfToMegapatch,
  convertMegapatchToHf,
  HF_EXPORT_MARKER_FILE,
  HfExportMarker,
  pathRelation,
  readHfExportMarker,
  reshardCheckpoint,
} from '../src/index.js';
import { SYNTHETIC_MODELS, writeSyntheticHfCheckpoint } from '../src/testing/index.js';
import { convertError, scratch, snapshot, temporaries } from './helpers.js';

const tmp = scratch('guard');
const llama = SYNTHETIC_MODELS.find((m) => m.id === 'llama')?.config as Record<string, unknown>;

describe('pathRelation', () => {
  const base = tmp('paths');
  fs.mkdirSync(path.join(base, 'a', 'b'), { recursive: true });
  fs.mkdirSync(path.join(base, 'c'));
  fs.symlinkSync(path.join(base, 'a'), path.join(base, 'link-to-a'));

  it('tells same, inside, contains and apart, for paths that exist or not', () => {
    const p = (...s: string[]) => path.join(base, ...s);
    expect(pathRelation(p('a'), p('a'))).toBe('same');
    expect(pathRelation(p('a', 'b'), p('a'))).toBe('inside');
    expect(pathRelation(p('a', 'b', 'not', 'yet'), p('a'))).toBe('inside');
    expect(pathRelation(p('a'), p('a', 'b', 'new'))).toBe('contains');
    expect(pathRelation(p('a'), p('c'))).toBe('apart');
    // A sibling whose name starts like the other is not inside it.
    expect(pathRelation(p('ab'), p('a'))).toBe('apart');
    expect(pathRelation(p('a..b'), p('a'))).toBe('apart');
  });

  it('sees through `..` and symbolic links, also below a path that does not exist yet', () => {
    const p = (...s: string[]) => path.join(base, ...s);
    expect(pathRelation(`${p('a')}/../a`, p('a'))).toBe('same');
    expect(pathRelation(p('link-to-a'), p('a'))).toBe('same');
    expect(pathRelation(p('link-to-a', 'b', 'out'), p('a'))).toBe('inside');
    expect(pathRelation(p('c'), p('link-to-a'))).toBe('apart');
    const rel = path.relative(process.cwd(), p('a', 'b'));
    expect(pathRelation(rel, p('link-to-a'))).toBe('inside');
  });
});

describe('outputs never overlap inputs', () => {
  const hfDir = tmp('hf');
  writeSyntheticHfCheckpoint(hfDir, llama, { seed: 2 });
  const ckpt = tmp('ckpt');
  const ready = convertHfToMegapatch({ hfDir, output: ckpt });

  it('hf-to-megapatch refuses an output that is, lies inside or contains the HF folder', async () => {
    const before = snapshot(hfDir);
    const link = tmp('hf-link');
    fs.symlinkSync(hfDir, link);
    const cases: [string, string][] = [
      [hfDir, 'is the same as'],
      [`${hfDir}/../${path.basename(hfDir)}`, 'is the same as'],
      [path.join(hfDir, 'megapatch'), 'is inside'],
      [path.dirname(hfDir), 'contains'],
      [path.join(link, 'out'), 'is inside'],
    ];
    for (const [output, how] of cases) {
      await convertError(
        () => convertHfToMegapatch({ hfDir, output, overwrite: true }),
        'INVALID_ARGUMENT',
        `output ${output} ${how} the input ${hfDir}`,
      );
    }
    await convertError(
      () => convertHfToMegapatch({ hfDir, output: path.join(link, 'out') }),
      'INVALID_ARGUMENT',
      '(after resolving symbolic links); pick an output outside the input',
    );
    expect(snapshot(hfDir)).toEqual(before);
  });

  it('megapatch-to-hf refuses an output inside or equal to the checkpoint', async () => {
    await ready;
    const before = snapshot(ckpt);
    await convertError(
      () => convertMegapatchToHf({ input: ckpt, output: path.join(ckpt, 'hf') }),
      'INVALID_ARGUMENT',
      `output ${path.join(ckpt, 'hf')} is inside the input ${ckpt}; pick an output outside the input`,
    );
    await convertError(
      () => convertMegapatchToHf({ input: ckpt, output: ckpt, overwrite: true }),
      'INVALID_ARGUMENT',
      'is the same as the input',
    );
    expect(snapshot(ckpt)).toEqual(before);
    expect(temporaries(path.dirname(ckpt))).toEqual([]);
  });

  it('reshard refuses `in/..`-style and containing outputs', async () => {
    await ready;
    const before = snapshot(ckpt);
    await convertError(
      () =>
        reshardCheckpoint({ input: ckpt, output: `${ckpt}/../${path.basename(ckpt)}`, layout: { tp: 2 } }),
      'INVALID_ARGUMENT',
      'is the same as the input',
    );
    await convertError(
      () =>
        reshardCheckpoint({ input: ckpt, output: path.dirname(ckpt), layout: { tp: 2 }, overwrite: true }),
      'INVALID_ARGUMENT',
      `contains the input ${ckpt}; pick an output that does not hold the input`,
    );
    expect(snapshot(ckpt)).toEqual(before);
  });
});

describe('overwrite replaces only what megapatch produced', () => {
  const hfDir = tmp('hf');
  writeSyntheticHfCheckpoint(hfDir, llama, { seed: 4 });

  /** A Megatron torch_dist checkpoint's iteration folder, as Megatron-LM names its files. */
  function torchDist(root: string): string {
    const dir = path.join(root, 'iter_0000000');
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, '.metadata'), 'torch.distributed.checkpoint metadata');
    fs.writeFileSync(path.join(dir, '__0_0.distcp'), Buffer.alloc(64, 7));
    fs.writeFileSync(path.join(dir, '__1_0.distcp'), Buffer.alloc(64, 8));
    fs.writeFileSync(path.join(dir, 'common.pt'), 'pickle');
    fs.writeFileSync(path.join(dir, 'metadata.json'), '{"sharded_backend": "torch_dist"}');
    fs.writeFileSync(path.join(root, 'latest_checkpointed_iteration.txt'), '0');
    return dir;
  }

  it('refuses to replace a Megatron torch_dist iteration folder, naming up to 3 of its entries', async () => {
    const root = tmp('torch-dist');
    const dir = torchDist(root);
    const before = snapshot(root);
    const e = await convertError(
      () => convertHfToMegapatch({ hfDir, output: root, overwrite: true }),
      'INVALID_ARGUMENT',
      `checkpoint ${dir} holds ".metadata", "__0_0.distcp", "__1_0.distcp" (and 2 more), which megapatch did not write ` +
        '(metadata.json is not megapatch metadata); overwrite replaces only a megapatch checkpoint: remove them or pick another output',
    );
    expect(e.message).not.toContain('\n');
    // Without overwrite too: the message does not suggest an overwrite that would be refused.
    const e2 = await convertError(() => convertHfToMegapatch({ hfDir, output: root }), 'INVALID_ARGUMENT');
    expect(e2.message).toBe(e.message);
    expect(snapshot(root)).toEqual(before);
    expect(temporaries(root)).toEqual([]);
  });

  it('refuses a megapatch checkpoint with a stray file, or an unlisted side file, and replaces a clean one', async () => {
    const root = tmp('stray');
    await convertHfToMegapatch({ hfDir, output: root });
    const dir = path.join(root, 'iter_0000000');
    fs.writeFileSync(path.join(dir, 'notes.txt'), 'my notes');
    let before = snapshot(root);
    await convertError(
      () => convertHfToMegapatch({ hfDir, output: root, overwrite: true, layout: { tp: 2 } }),
      'INVALID_ARGUMENT',
      `checkpoint ${dir} holds "notes.txt", which megapatch did not write; overwrite replaces only a megapatch checkpoint: remove it or pick another output`,
    );
    expect(snapshot(root)).toEqual(before);
    fs.rmSync(path.join(dir, 'notes.txt'));
    fs.mkdirSync(path.join(dir, 'huggingface', 'extra'));
    fs.writeFileSync(path.join(dir, 'huggingface', 'README.md'), 'hi');
    before = snapshot(root);
    await convertError(
      () => convertHfToMegapatch({ hfDir, output: root, overwrite: true }),
      'INVALID_ARGUMENT',
      'holds "huggingface/README.md", "huggingface/extra/", which megapatch did not write',
    );
    expect(snapshot(root)).toEqual(before);
    fs.rmSync(path.join(dir, 'huggingface', 'extra'), { recursive: true });
    fs.rmSync(path.join(dir, 'huggingface', 'README.md'));
    // Without overwrite it is refused as before; with it, the megapatch checkpoint is replaced.
    await convertError(
      () => convertHfToMegapatch({ hfDir, output: root }),
      'INVALID_ARGUMENT',
      'already exists (pass overwrite to replace it)',
    );
    await convertHfToMegapatch({ hfDir, output: root, overwrite: true, layout: { tp: 2 } });
    using ck = Checkpoint.open(root);
    expect(ck.metadata.layout.tp).toBe(2);
    expect(temporaries(root)).toEqual([]);
  });

  it('reshard replaces its own earlier output, but not a torch_dist folder', async () => {
    const src = tmp('reshard-src');
    await convertHfToMegapatch({ hfDir, output: src, layout: { tp: 2 } });
    const out = tmp('reshard-out');
    await reshardCheckpoint({ input: src, output: out, layout: { tp: 1 } });
    await reshardCheckpoint({ input: src, output: out, layout: { tp: 2, pp: 2 }, overwrite: true });
    using ck = Checkpoint.open(out);
    expect(ck.metadata.layout).toMatchObject({ tp: 2, pp: 2 });
    const foreign = tmp('reshard-foreign');
    torchDist(foreign);
    const before = snapshot(foreign);
    await convertError(
      () => reshardCheckpoint({ input: src, output: foreign, layout: { tp: 1 }, overwrite: true }),
      'INVALID_ARGUMENT',
      'which megapatch did not write',
    );
    expect(snapshot(foreign)).toEqual(before);
  });

  it('megapatch-to-hf writes a marker, and replaces only a folder holding it and the files it lists', async () => {
    const src = tmp('export-src');
    await convertHfToMegapatch({ hfDir, output: src });
    const out = tmp('export-out');
    await convertMegapatchToHf({ input: src, output: out, maxShardSize: 100_000 });
    const marker = readHfExportMarker(out) as HfExportMarker;
    expect(
      HfExportMarker.parse(JSON.parse(fs.readFileSync(path.join(out, HF_EXPORT_MARKER_FILE), 'utf8'))),
    ).toEqual(marker);
    expect(marker).toMatchObject({
      format: 'megapatch-hf-export',
      version: 1,
      source: { checkpoint: path.resolve(src), iteration: 0 },
    });
    expect([...marker.files, HF_EXPORT_MARKER_FILE].sort()).toEqual(fs.readdirSync(out).sort());
    expect(marker.files).toContain('model.safetensors.index.json');
    expect(marker.files).toContain('config.json');
    // The marker is not a side file: converting the export again does not carry it.
    const again = tmp('export-again');
    const s = await convertHfToMegapatch({ hfDir: out, output: again });
    expect(s.carried).not.toContain(HF_EXPORT_MARKER_FILE);

    await convertError(
      () => convertMegapatchToHf({ input: src, output: out }),
      'INVALID_ARGUMENT',
      `output folder ${out} already exists (pass overwrite to replace it)`,
    );
    await convertMegapatchToHf({ input: src, output: out, overwrite: true, maxShardSize: '1GB' });
    expect(fs.existsSync(path.join(out, 'model.safetensors'))).toBe(true);
    expect(fs.existsSync(path.join(out, 'model.safetensors.index.json'))).toBe(false);

    fs.writeFileSync(path.join(out, 'thesis.pdf'), '%PDF');
    fs.mkdirSync(path.join(out, 'docs'));
    const before = snapshot(out);
    await convertError(
      () => convertMegapatchToHf({ input: src, output: out, overwrite: true }),
      'INVALID_ARGUMENT',
      `output folder ${out} holds "docs/", "thesis.pdf", which megapatch did not write; ` +
        'overwrite replaces only a folder megapatch exported: remove them or pick another output',
    );
    await convertError(
      () => convertMegapatchToHf({ input: src, output: out }),
      'INVALID_ARGUMENT',
      'holds "docs/", "thesis.pdf", which megapatch did not write',
    );
    expect(snapshot(out)).toEqual(before);
    expect(temporaries(path.dirname(out))).toEqual([]);
  });

  it('megapatch-to-hf refuses a folder it did not export, writes into an empty one, and refuses a file', async () => {
    const src = tmp('export-src2');
    await convertHfToMegapatch({ hfDir, output: src });
    const before = snapshot(hfDir);
    await convertError(
      () => convertMegapatchToHf({ input: src, output: hfDir, overwrite: true }),
      'INVALID_ARGUMENT',
      `(it has no ${HF_EXPORT_MARKER_FILE}, so megapatch did not export it)`,
    );
    expect(snapshot(hfDir)).toEqual(before);
    const empty = tmp('empty');
    fs.mkdirSync(empty);
    await convertMegapatchToHf({ input: src, output: empty });
    expect(readHfExportMarker(empty)?.files).toContain('model.safetensors');
    const file = tmp('a-file');
    fs.writeFileSync(file, 'x');
    await convertError(
      () => convertMegapatchToHf({ input: src, output: file, overwrite: true }),
      'INVALID_ARGUMENT',
      `output ${file} exists and is not a folder`,
    );
    expect(fs.readFileSync(file, 'utf8')).toBe('x');
  });
});
