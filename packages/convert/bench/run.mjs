// pnpm bench for @megapatch/convert: conversion throughput and peak memory of the streaming
// converters on a generated Llama-style BF16 checkpoint of about 2 GB, against a plain copy of
// the same bytes measured in the same run.
//
// Usage (build first: `pnpm --filter @megapatch/convert build`):
//   pnpm --filter @megapatch/convert bench [-- options] [case-name-substring ...]
//   node bench/run.mjs [options] [case-name-substring ...]
// Options:
//   --json <file>    also write the results as JSON
//   --reps <n>       timed runs per case (default 3); the table shows the best GB/s and the
//                    highest peak RSS over the runs
//   --layers <n>     decoder layers of the generated model (default 20: 2.07 GB of tensors)
//   --dir <dir>      work in <dir> and keep the generated HF checkpoint there (reused by a later
//                    run with the same --layers); outputs are still deleted
//   --keep           keep the temporary work directory (its path is printed)
//   --cpu-prof <dir> run every child with `node --cpu-prof --cpu-prof-dir=<dir>`
//
// What is measured:
//   copy-file      fs.copyFileSync of every HF shard file + fsync: the plain file copy, "the limit"
//                  of the issue (on Linux it may use copy_file_range, a copy inside the kernel);
//   copy-rw        a userspace read + write loop with one 64 MiB buffer + fsync: the honest limit
//                  of a converter, which must bring the bytes into userspace to transform them;
//   hf-to-megapatch-tp1pp1, hf-to-megapatch-tp2pp2: convertHfToMegapatch;
//   megapatch-to-hf: convertMegapatchToHf from the TP2 PP2 checkpoint (500 MB shards);
//   reshard-tp2pp2-to-tp1pp1: reshardCheckpoint;
//   megapatch-to-megatron-tp2pp2: convertMegapatchToMegatron (Megatron's torch format) from it;
//   megatron-to-megapatch: convertMegatronToMegapatch of that Megatron checkpoint;
//   torch-load-save: PyTorch (/usr/bin/python3, when it has torch) loading each of those
//                  Megatron files with torch.load and saving it with torch.save: the reference;
//   megatron-dist-to-megapatch: convertMegatronToMegapatch of the same model as a Megatron-Core
//                  torch_dist checkpoint (layers stacked, 2 chunks a tensor; written untimed from
//                  the TP2 PP2 checkpoint by @megapatch/convert/testing's writer);
//   megatron-dist-to-hf: convertMegatronToHf of it (straight to sharded safetensors);
//   torch-dcp-to-torch-save: PyTorch loading that distributed checkpoint into whole tensors (each
//                  chunk torch.load-ed and copied into place, as torch.distributed.checkpoint's
//                  dcp_to_torch_save does) and saving them with torch.save: its reference.
// Every case runs in its own child process (this script with --child), so peak RSS (VmHWM, or
// maxRSS where /proc is missing) is per case,
// and its wall time covers the conversion call only (fsyncs included, process start and the
// import of dist/ excluded). GB/s = tensor bytes written / wall seconds (copies: file bytes).
// The page cache is not dropped: before every timed run the source is read once, so every case
// reads from a warm cache alike and the figures are about the converter and the writes.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const script = fileURLToPath(import.meta.url);
// torch.load + torch.save of every model_optim_rng.pt under argv[1] into argv[2]; prints seconds,
// tensor bytes and peak RSS (fsync included, as for the converters).
const TORCH_LOAD_SAVE = `
import json, os, resource, sys, time, torch
src, dst = sys.argv[1], sys.argv[2]
t0 = time.perf_counter(); total = 0
for root, _, files in os.walk(src):
    for f in files:
        if not f.endswith('.pt'): continue
        sd = torch.load(os.path.join(root, f), map_location='cpu')
        total += sum(t.numel() * t.element_size() for c in sd if c.startswith('model') for t in sd[c].values() if torch.is_tensor(t))
        out = os.path.join(dst, os.path.relpath(root, src)); os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f), 'wb') as fh:
            torch.save(sd, fh); fh.flush(); os.fsync(fh.fileno())
        del sd
print(json.dumps({'seconds': time.perf_counter() - t0, 'bytes': total, 'maxRssKiB': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
`;
// dcp_to_torch_save of the distributed checkpoint under argv[1] (its iter_* folder) into argv[2]:
// torch 1.13 has no torch.distributed.checkpoint, so the Metadata classes are read as plain objects.
const TORCH_DCP_TO_TORCH_SAVE = `
import io, json, os, pickle, resource, sys, time, torch
src, dst = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
d = os.path.join(src, [n for n in os.listdir(src) if n.startswith('iter_')][0])
class Obj:
    def __setstate__(self, state): self.state = state
class Meta(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith('torch.distributed.checkpoint'): return type(name, (Obj,), {})
        return super().find_class(module, name)
with open(os.path.join(d, '.metadata'), 'rb') as f: meta = Meta(f).load().state
where = {(k.state['fqn'], tuple(k.state['offset'])): v.state for k, v in meta['storage_data'].items()}
files, out, total = {}, {}, 0
for key, m in meta['state_dict_metadata'].items():
    m = m.state
    t = torch.empty(tuple(m['size']), dtype=m['properties'].state[0])
    for c in m['chunks']:
        offsets, sizes = tuple(c.state['offsets']), tuple(c.state['sizes'])
        s = where[(key, offsets)]
        f = files.get(s['relative_path']) or files.setdefault(s['relative_path'], open(os.path.join(d, s['relative_path']), 'rb'))
        f.seek(s['offset'])
        x = torch.load(io.BytesIO(f.read(s['length'])))
        t[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))].copy_(x.view(sizes))
    out[key] = t
    total += t.numel() * t.element_size()
os.makedirs(dst, exist_ok=True)
with open(os.path.join(dst, 'model.pt'), 'wb') as fh:
    torch.save(out, fh); fh.flush(); os.fsync(fh.fileno())
print(json.dumps({'seconds': time.perf_counter() - t0, 'bytes': total, 'maxRssKiB': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
`;
const GB = 1e9;
const MB = 1e6;
const BUF = 64 << 20;

// ---------------------------------------------------------------------------------------------
// Child mode: run one case and print one JSON line {seconds, bytes, maxRssKiB}.
// ---------------------------------------------------------------------------------------------

if (process.argv[2] === '--child') {
  const job = JSON.parse(process.argv[3]);
  const D = await import('../dist/index.js');
  const t0 = performance.now();
  let bytes;
  if (job.kind === 'copy-file') {
    fs.mkdirSync(job.output, { recursive: true });
    bytes = 0;
    for (const f of job.files) {
      const to = join(job.output, f);
      fs.copyFileSync(join(job.input, f), to);
      const fd = fs.openSync(to, 'r+');
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      bytes += fs.statSync(to).size;
    }
  } else if (job.kind === 'copy-rw') {
    fs.mkdirSync(job.output, { recursive: true });
    const buf = Buffer.allocUnsafe(BUF);
    bytes = 0;
    for (const f of job.files) {
      const src = fs.openSync(join(job.input, f), 'r');
      const dst = fs.openSync(join(job.output, f), 'w');
      for (;;) {
        const n = fs.readSync(src, buf, 0, BUF, null);
        if (n === 0) break;
        let done = 0;
        while (done < n) done += fs.writeSync(dst, buf, done, n - done);
        bytes += n;
      }
      fs.fsyncSync(dst);
      fs.closeSync(dst);
      fs.closeSync(src);
    }
  } else if (job.kind === 'hf-to-megapatch') {
    bytes = (await D.convertHfToMegapatch({ hfDir: job.input, output: job.output, layout: job.layout }))
      .bytes;
  } else if (job.kind === 'megapatch-to-hf') {
    bytes = (await D.convertMegapatchToHf({ input: job.input, output: job.output, maxShardSize: '500MB' }))
      .bytes;
  } else if (job.kind === 'reshard') {
    bytes = (await D.reshardCheckpoint({ input: job.input, output: job.output, layout: job.layout })).bytes;
  } else if (job.kind === 'megapatch-to-megatron') {
    bytes = (await D.convertMegapatchToMegatron({ input: job.input, output: job.output, layout: job.layout }))
      .bytes;
  } else if (job.kind === 'megatron-to-megapatch') {
    bytes = (await D.convertMegatronToMegapatch({ input: job.input, hfDir: job.hfDir, output: job.output }))
      .bytes;
  } else if (job.kind === 'megatron-to-hf') {
    bytes = (
      await D.convertMegatronToHf({
        input: job.input,
        hfDir: job.hfDir,
        output: job.output,
        maxShardSize: '500MB',
      })
    ).bytes;
  } else if (job.kind === 'write-megatron-dist') {
    const T = await import('../dist/testing/index.js');
    T.writeMegatronDistCheckpoint(job.input, job.output, { form: 'stacked', args: job.args });
    bytes = listFiles(job.output).reduce((s, f) => s + fs.statSync(join(job.output, f)).size, 0);
  } else if (job.kind === 'torch-load-save' || job.kind === 'torch-dcp-to-torch-save') {
    // the reference: PyTorch itself loads every rank file and saves it again (what a Python
    // converter does at least), timed inside Python
    const code = job.kind === 'torch-load-save' ? TORCH_LOAD_SAVE : TORCH_DCP_TO_TORCH_SAVE;
    const r = spawnSync('/usr/bin/python3', ['-c', code, job.input, job.output], {
      encoding: 'utf8',
    });
    if (r.status !== 0) throw new Error(`torch load/save failed: ${r.stderr}`);
    const out = JSON.parse(r.stdout.trim().split('\n').pop());
    console.log(JSON.stringify({ ...out, maxRssKiB: out.maxRssKiB }));
    process.exit(0);
  } else {
    throw new Error(`unknown case kind ${job.kind}`);
  }
  const seconds = (performance.now() - t0) / 1000;
  // Peak RSS of this process. On Linux, getrusage's maxRSS survives exec and so starts at the
  // RSS of the forked parent; VmHWM belongs to the new address space only, so prefer it.
  const hwm = /^VmHWM:\s+(\d+) kB/m.exec(
    fs.existsSync('/proc/self/status') ? fs.readFileSync('/proc/self/status', 'utf8') : '',
  );
  const maxRssKiB = hwm ? Number(hwm[1]) : process.resourceUsage().maxRSS;
  console.log(
    JSON.stringify({ seconds, bytes, maxRssKiB, getrusageMaxRssKiB: process.resourceUsage().maxRSS }),
  );
  process.exit(0);
}

// ---------------------------------------------------------------------------------------------
// Parent mode.
// ---------------------------------------------------------------------------------------------

const D = await import('../dist/index.js');

const args = process.argv.slice(2);
const opt = { reps: 3, layers: 20, json: null, dir: null, keep: false, cpuProf: null };
const filters = [];
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === '--json') opt.json = args[++i];
  else if (a === '--reps') opt.reps = Number(args[++i]);
  else if (a === '--layers') opt.layers = Number(args[++i]);
  else if (a === '--dir') opt.dir = args[++i];
  else if (a === '--keep') opt.keep = true;
  else if (a === '--cpu-prof') opt.cpuProf = args[++i];
  else if (a.startsWith('--')) throw new Error(`unknown option ${a}`);
  else filters.push(a);
}
if (!(Number.isInteger(opt.reps) && opt.reps > 0)) throw new Error('--reps takes a positive integer');
if (!(Number.isInteger(opt.layers) && opt.layers > 0)) throw new Error('--layers takes a positive integer');
const want = (name) => filters.length === 0 || filters.some((f) => name.includes(f));

const work = opt.dir ?? fs.mkdtempSync(join(os.tmpdir(), 'mp-convert-bench-'));
fs.mkdirSync(work, { recursive: true });
const hfDir = join(work, `hf-llama-${opt.layers}l`);
const mpSrc = join(work, 'mp-tp2pp2');
const megatronSrc = join(work, 'megatron-tp2pp2');
const distSrc = join(work, 'megatron-dist');
const hasTorch = spawnSync('/usr/bin/python3', ['-c', 'import torch'], { stdio: 'ignore' }).status === 0;
const outDir = join(work, 'out');

// Llama-style model: hidden 2048, GQA 32/8 heads, SwiGLU 5632, vocab 32000, untied head.
const config = {
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  hidden_size: 2048,
  intermediate_size: 5632,
  num_hidden_layers: opt.layers,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  hidden_act: 'silu',
  rms_norm_eps: 1e-5,
  rope_theta: 10000,
  vocab_size: 32000,
  max_position_embeddings: 4096,
  tie_word_embeddings: false,
  attention_bias: false,
  mlp_bias: false,
  torch_dtype: 'bfloat16',
  bos_token_id: 1,
  eos_token_id: 2,
};
const parsed = D.parseHfConfig(config);
const tensors = parsed.spec.expectedHfTensors(parsed.transformerConfig).map((t) => ({ ...t, dtype: 'BF16' }));
const tensorBytes = (t) => t.shape.reduce((a, b) => a * b, 1) * 2;
const totalBytes = tensors.reduce((s, t) => s + tensorBytes(t), 0);
const largest = tensors.reduce((m, t) => (tensorBytes(t) > tensorBytes(m) ? t : m));
const largestBytes = tensorBytes(largest);
const rssLimit = GB + largestBytes;

/** A 64 MiB block of xorshift32 noise (never all zero, so no file is sparse). */
function noise() {
  const words = new Uint32Array(BUF / 4);
  let x = 0x9e3779b9;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  return new Uint8Array(words.buffer);
}

/** Writes the HF checkpoint tensor by tensor through SafetensorsWriter (low memory). */
function generate() {
  const marker = join(hfDir, '.bench-complete');
  if (fs.existsSync(marker)) return false;
  fs.rmSync(hfDir, { recursive: true, force: true });
  fs.mkdirSync(hfDir, { recursive: true });
  fs.writeFileSync(join(hfDir, 'config.json'), `${JSON.stringify(config, null, 2)}\n`);
  fs.writeFileSync(
    join(hfDir, 'generation_config.json'),
    `${JSON.stringify({ bos_token_id: 1, eos_token_id: 2, _from_model_config: true }, null, 2)}\n`,
  );
  const pool = noise();
  const shards = D.planShards(tensors, '500MB', { format: 'pt' });
  const weightMap = new Map();
  let rotate = 0;
  shards.forEach((shard, i) => {
    const file = D.shardFileName(i + 1, shards.length);
    const w = new D.SafetensorsWriter(join(hfDir, file), shard, { metadata: { format: 'pt' } });
    for (const t of w.order) {
      let left = tensorBytes(t);
      // Start each tensor somewhere else in the pool so that tensors differ from each other.
      rotate = (rotate + 7_340_033 * 2) % BUF;
      let at = rotate;
      while (left > 0) {
        const n = Math.min(left, BUF - at);
        w.write(t.name, pool.subarray(at, at + n));
        left -= n;
        at = (at + n) % BUF;
      }
      weightMap.set(t.name, file);
    }
    w.finish();
  });
  D.writeSafetensorsIndex(hfDir, weightMap, totalBytes);
  fs.writeFileSync(marker, '');
  return true;
}

/** Files (recursively, relative paths) under a directory. */
function listFiles(dir, prefix = '') {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const rel = prefix ? join(prefix, e.name) : e.name;
    return e.isDirectory() ? listFiles(join(dir, e.name), rel) : [rel];
  });
}

/** Reads every file under `dir` once, so that it sits in the page cache. */
function warm(dir) {
  const buf = Buffer.allocUnsafe(BUF);
  for (const f of listFiles(dir)) {
    const fd = fs.openSync(join(dir, f), 'r');
    while (fs.readSync(fd, buf, 0, BUF, null) > 0);
    fs.closeSync(fd);
  }
}

/** Runs one case in a child process; returns {seconds, bytes, maxRssKiB}. */
function child(job) {
  const flags = opt.cpuProf ? ['--cpu-prof', `--cpu-prof-dir=${opt.cpuProf}`] : [];
  const r = spawnSync(process.execPath, [...flags, script, '--child', JSON.stringify(job)], {
    stdio: ['ignore', 'pipe', 'inherit'],
    encoding: 'utf8',
    maxBuffer: 1 << 20,
  });
  if (r.status !== 0) throw new Error(`case ${job.kind} failed (exit ${r.status ?? r.signal})`);
  return JSON.parse(r.stdout.trim().split('\n').pop());
}

const hfShardFiles = () => fs.readdirSync(hfDir).filter((f) => f.endsWith('.safetensors'));

const TP1PP1 = { tp: 1, pp: 1 };
const TP2PP2 = { tp: 2, pp: 2 };
const cases = [
  {
    name: 'copy-file',
    job: () => ({ kind: 'copy-file', input: hfDir, output: outDir, files: hfShardFiles() }),
    src: () => hfDir,
  },
  {
    name: 'copy-rw',
    job: () => ({ kind: 'copy-rw', input: hfDir, output: outDir, files: hfShardFiles() }),
    src: () => hfDir,
  },
  {
    name: 'hf-to-megapatch-tp1pp1',
    job: () => ({ kind: 'hf-to-megapatch', input: hfDir, output: outDir, layout: TP1PP1 }),
    src: () => hfDir,
  },
  {
    name: 'hf-to-megapatch-tp2pp2',
    job: () => ({ kind: 'hf-to-megapatch', input: hfDir, output: outDir, layout: TP2PP2 }),
    src: () => hfDir,
    // the last run's output is the source of the two cases below
    keep: mpSrc,
  },
  {
    name: 'megapatch-to-hf',
    job: () => ({ kind: 'megapatch-to-hf', input: mpSrc, output: outDir }),
    src: () => mpSrc,
  },
  {
    name: 'reshard-tp2pp2-to-tp1pp1',
    job: () => ({ kind: 'reshard', input: mpSrc, output: outDir, layout: TP1PP1 }),
    src: () => mpSrc,
  },
  {
    name: 'megapatch-to-megatron-tp2pp2',
    job: () => ({ kind: 'megapatch-to-megatron', input: mpSrc, output: outDir, layout: TP2PP2 }),
    src: () => mpSrc,
    // the last run's output is the source of the cases below
    keep: megatronSrc,
  },
  {
    name: 'megatron-to-megapatch',
    job: () => ({ kind: 'megatron-to-megapatch', input: megatronSrc, hfDir, output: outDir }),
    src: () => megatronSrc,
  },
  ...(hasTorch
    ? [
        {
          name: 'torch-load-save (PyTorch, the Megatron files)',
          job: () => ({ kind: 'torch-load-save', input: megatronSrc, output: outDir }),
          src: () => megatronSrc,
        },
      ]
    : []),
  {
    name: 'write torch_dist source',
    job: () => ({
      kind: 'write-megatron-dist',
      input: mpSrc,
      output: outDir,
      args: { tensor_model_parallel_size: 2, pipeline_model_parallel_size: 2 },
    }),
    src: () => mpSrc,
    untimed: true,
    keep: distSrc,
  },
  {
    name: 'megatron-dist-to-megapatch',
    job: () => ({ kind: 'megatron-to-megapatch', input: distSrc, hfDir, output: outDir }),
    src: () => distSrc,
  },
  {
    name: 'megatron-dist-to-hf',
    job: () => ({ kind: 'megatron-to-hf', input: distSrc, hfDir, output: outDir }),
    src: () => distSrc,
  },
  ...(hasTorch
    ? [
        {
          name: 'torch-dcp-to-torch-save (PyTorch, the torch_dist files)',
          job: () => ({ kind: 'torch-dcp-to-torch-save', input: distSrc, output: outDir }),
          src: () => distSrc,
        },
      ]
    : []),
];

const rm = (p) => fs.rmSync(p, { recursive: true, force: true });
const fmt = (x, d = 2) => (Number.isFinite(x) ? x.toFixed(d) : 'n/a');
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

let exitCode = 0;
const results = [];
try {
  console.log(
    `model: LlamaForCausalLM, hidden 2048, ffn 5632, ${opt.layers} layers, 32/8 heads, vocab 32000, untied, BF16`,
  );
  console.log(
    `tensors: ${tensors.length}, ${totalBytes} bytes (${fmt(totalBytes / GB, 3)} GB); ` +
      `largest ${largest.name} [${largest.shape.join(', ')}] ${fmt(largestBytes / MB, 1)} MB`,
  );
  const tg = performance.now();
  const made = generate();
  const hfFiles = hfShardFiles();
  const hfFileBytes = hfFiles.reduce((s, f) => s + fs.statSync(join(hfDir, f)).size, 0);
  console.log(
    `${made ? 'generated' : 'reused'} ${hfDir}: ${hfFiles.length} shards + index, ${hfFileBytes} file bytes` +
      (made ? ` in ${fmt((performance.now() - tg) / 1000, 1)} s` : ''),
  );
  console.log(`work dir: ${work}; ${opt.reps} timed run(s) per case, each in a child process\n`);

  const needs = (src) => cases.some((c) => want(c.name) && c.src() === src);
  const needsMp = needs(mpSrc) || needs(megatronSrc) || needs(distSrc);
  for (const c of cases) {
    const run =
      want(c.name) || (c.keep && (c.keep === mpSrc ? needsMp : needs(c.keep)) && !fs.existsSync(c.keep));
    if (!run) continue;
    const timed = want(c.name) && !c.untimed;
    const runs = [];
    for (let i = 0; i < (timed ? opt.reps : 1); i++) {
      rm(outDir);
      warm(c.src());
      // Flush what earlier steps left dirty (deletions, generated files) so no run pays for it.
      spawnSync('sync');
      runs.push(child(c.job()));
      process.stderr.write(
        `  ${c.name} run ${i + 1}: ${fmt(runs.at(-1).bytes / GB / runs.at(-1).seconds)} GB/s, ` +
          `${fmt((runs.at(-1).maxRssKiB * 1024) / MB, 0)} MB RSS${timed ? '' : ' (untimed, source of later cases)'}\n`,
      );
    }
    if (c.keep) {
      rm(c.keep);
      fs.renameSync(outDir, c.keep);
    }
    rm(outDir);
    if (!timed) continue;
    const rates = runs.map((r) => r.bytes / GB / r.seconds);
    results.push({
      name: c.name,
      bytes: runs[0].bytes,
      runs,
      bestGBps: Math.max(...rates),
      medianGBps: median(rates),
      peakRssBytes: Math.max(...runs.map((r) => r.maxRssKiB * 1024)),
    });
  }
} catch (e) {
  console.error(e);
  exitCode = 1;
} finally {
  rm(outDir);
  rm(mpSrc);
  rm(megatronSrc);
  rm(distSrc);
  if (!opt.keep && !opt.dir) rm(work);
  else if (!opt.dir) console.log(`kept ${work}`);
}

if (results.length > 0) {
  const ref = (name) => results.find((r) => r.name === name)?.bestGBps ?? Number.NaN;
  const copyFile = ref('copy-file');
  const copyRw = ref('copy-rw');
  for (const r of results) {
    r.ratioVsCopyFile = r.bestGBps / copyFile;
    r.ratioVsCopyRw = r.bestGBps / copyRw;
    r.rssUnderLimit = r.peakRssBytes < rssLimit;
    r.halfCopySpeed = r.ratioVsCopyFile >= 0.5;
  }
  console.log(
    '| case | GB | best GB/s | median GB/s | vs copy-file (the limit) | vs copy-rw | peak RSS MB | largest tensor MB | RSS < 1 GB + largest | >= 0.5x copy |',
  );
  console.log('|---|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|');
  for (const r of results) {
    const isCopy = r.name.startsWith('copy-');
    console.log(
      `| ${r.name} | ${fmt(r.bytes / GB, 3)} | ${fmt(r.bestGBps)} | ${fmt(r.medianGBps)} | ` +
        `${fmt(r.ratioVsCopyFile)} | ${fmt(r.ratioVsCopyRw)} | ${fmt(r.peakRssBytes / MB, 0)} | ` +
        `${fmt(largestBytes / MB, 1)} | ${r.rssUnderLimit ? 'yes' : 'NO'} | ${isCopy ? '-' : Number.isNaN(r.ratioVsCopyFile) ? 'n/a' : r.halfCopySpeed ? 'yes' : 'NO'} |`,
    );
  }
  console.log(
    `\nNotes: GB = 1e9 bytes, MB = 1e6 bytes. best = highest GB/s of ${opt.reps} run(s); peak RSS = highest VmHWM ` +
      `of the runs (the child's own peak; Node's own ~50 MB included). Wall time includes fsync of every output file.\n` +
      `Warm cache: the page cache was not dropped; every run's source was read once just before it, so all ` +
      `cases read from memory alike and the numbers bound write + transform speed, not cold disk reads.\n` +
      `copy-file (fs.copyFileSync, may be copy_file_range inside the kernel) is "the limit" of the issue; ` +
      `copy-rw (64 MiB userspace read/write) is the limit for anything that must touch the bytes.\n` +
      `Targets: >= 0.5x copy-file speed; peak RSS < 1 GB + largest tensor = ${fmt(rssLimit / MB, 0)} MB.`,
  );
  console.log(
    `node ${process.version}, ${os.cpus().length} CPUs (${os.cpus()[0]?.model ?? '?'}), ${fmt(os.totalmem() / GB, 1)} GB RAM`,
  );
}

if (opt.json) {
  fs.writeFileSync(
    opt.json,
    `${JSON.stringify(
      {
        model: {
          ...config,
          tensors: tensors.length,
          tensorBytes: totalBytes,
          largest: { name: largest.name, shape: largest.shape, bytes: largestBytes },
        },
        reps: opt.reps,
        statistic: 'best GB/s; peak RSS = max over runs',
        cache: 'warm (source read once before each run; page cache not dropped)',
        limit: 'copy-file',
        rssLimitBytes: rssLimit,
        node: process.version,
        cpus: os.cpus().length,
        results,
      },
      null,
      2,
    )}\n`,
  );
  console.log(`wrote ${opt.json}`);
}
process.exitCode = exitCode;
