// A Megatron-Core distributed checkpoint (torch_dist) written from a megapatch checkpoint's global
// tensors, for tests and benchmarks of the importer: no Megatron or PyTorch 2.x is needed to make
// one. The tensors are stored as Megatron-Core stores them (stacked over layers and experts, keyed
// per layer, or keyed per layer and expert with a gated fc1 in halves), each cut in two along one
// dimension as TP=2 shards are, every chunk a torch.save blob in a .distcp file, the Metadata
// pickled under torch.distributed.checkpoint's class names.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Checkpoint } from '../checkpoint/index.js';
import { iterationDirName } from '../checkpoint/metadata.js';
import { DTYPE_SIZE, numelOf, type SafetensorsDtype } from '../safetensors/dtype.js';
import { PyGlobal, PyObject, PyTuple, pickle } from '../torch/pickle.js';
import { TorchFileWriter } from '../torch/torch-file.js';

/** How Megatron-Core keys the layers: `stacked` (homogeneous models), `per-layer`, or `singleton` (singleton_local_shards). */
export type MegatronDistForm = 'stacked' | 'per-layer' | 'singleton';

/** Options of {@link writeMegatronDistCheckpoint}. */
export interface MegatronDistWriteOptions {
  readonly form: MegatronDistForm;
  /** The iteration folder to write (default: the megapatch checkpoint's iteration). */
  readonly iteration?: number;
  /** Megatron's args saved in common.pt (attribute → value). */
  readonly args?: Readonly<Record<string, unknown>>;
  /** Number of .distcp files the chunks are dealt over (default 2). */
  readonly files?: number;
}

const META = 'torch.distributed.checkpoint.metadata';
const TORCH_NAME: Partial<Record<SafetensorsDtype, string>> = {
  BF16: 'bfloat16',
  F16: 'float16',
  F32: 'float32',
  F64: 'float64',
};
const size = (s: readonly number[]) => new PyObject('torch', 'Size', [new PyTuple(s)]);
const dataclass = (module: string, name: string, fields: [string, unknown][]) =>
  new PyObject(module, name, [], new Map(fields));

/** Megatron-Core's key and leading-axis index of a megapatch tensor, and whether it is stored in halves. */
export function megatronDistPlace(
  name: string,
  form: MegatronDistForm,
): { key: string; index: number[]; halves: boolean } {
  const m = /^(decoder|mtp)\.layers\.(\d+)\.(.*)$/.exec(name);
  if (!m) return { key: name, index: [], halves: false };
  const [, block, g, rest] = m;
  const stacked = form === 'stacked' && block === 'decoder';
  const e = /^(.*\bexperts\.)local_experts\.(\d+)\.(.+)$/.exec(rest);
  const at = stacked ? 'decoder.layers.' : `${block}.layers.${g}.`;
  const lead = stacked ? [Number(g)] : [];
  let key: string;
  let index: number[];
  if (e && form === 'singleton') [key, index] = [`${at}${e[1]}experts.${e[2]}.${e[3]}`, lead];
  else if (e) [key, index] = [`${at}${e[1]}experts.${e[3]}`, [...lead, Number(e[2])]];
  else [key, index] = [`${at}${rest}`, lead];
  return { key, index, halves: form === 'singleton' && /\.linear_fc1\.(weight|bias)$/.test(key) };
}

/** Rows-major bytes of `bytes` (shape `shape`) cut into `parts` along dimension `d`: part `c`. */
function cut(bytes: Uint8Array, shape: readonly number[], d: number, parts: number, c: number, esz: number) {
  const outer = numelOf(shape.slice(0, d));
  const run = numelOf(shape.slice(d)) * esz;
  const piece = run / parts;
  const out = new Uint8Array(outer * piece);
  for (let o = 0; o < outer; o++)
    out.set(bytes.subarray(o * run + c * piece, o * run + (c + 1) * piece), o * piece);
  return out;
}

/**
 * Writes the tensors of the megapatch checkpoint `input` as a Megatron-Core torch_dist checkpoint
 * under `output` (`iter_NNNNNNN/` with .metadata, __R_0.distcp, common.pt and metadata.json, and the
 * tracker file). The megapatch tensors are Megatron's global tensors with TP=1 names.
 */
export function writeMegatronDistCheckpoint(
  input: string,
  output: string,
  opts: MegatronDistWriteOptions,
): string {
  using ck = Checkpoint.open(input);
  const iteration = opts.iteration ?? ck.metadata.iteration;
  const iter = path.join(output, iterationDirName(iteration));
  fs.mkdirSync(iter, { recursive: true });
  const files = Array.from({ length: opts.files ?? 2 }, (_, r) => ({
    name: `__${r}_0.distcp`,
    fd: fs.openSync(path.join(iter, `__${r}_0.distcp`), 'w'),
    at: 0,
  }));
  const blobFile = path.join(output, 'chunk.pt.tmp');
  const keys = new Map<
    string,
    { dtype: SafetensorsDtype; inner: number[]; lead: number[]; chunks: unknown[] }
  >();
  const storage = new Map<unknown, unknown>();
  let turn = 0;
  const store = (
    key: string,
    dtype: SafetensorsDtype,
    index: number[],
    inner: number[],
    bytes: Uint8Array,
  ) => {
    const k = keys.get(key) ?? { dtype, inner, lead: index.map(() => 0), chunks: [] };
    index.forEach((i, d) => {
      k.lead[d] = Math.max(k.lead[d], i + 1);
    });
    keys.set(key, k);
    const esz = DTYPE_SIZE[dtype];
    // two chunks along dim 0 (column-parallel) or the last dim (row-parallel), as TP=2 shards
    const d = inner.length === 1 || keys.size % 2 === 0 ? 0 : inner.length - 1;
    const parts = inner.length > 0 && inner[d] % 2 === 0 ? 2 : 1;
    for (let c = 0; c < parts; c++) {
      const sizes = [...index.map(() => 1), ...inner];
      const offsets = [...index, ...inner.map(() => 0)];
      if (parts === 2) {
        sizes[index.length + d] /= 2;
        offsets[index.length + d] = c * sizes[index.length + d];
      }
      const w = new TorchFileWriter(blobFile);
      const ref = w.tensor(dtype, sizes);
      w.writeRoot(ref);
      w.write(ref, parts === 2 ? cut(bytes, inner, d, 2, c, esz) : bytes);
      w.finish();
      const blob = fs.readFileSync(blobFile);
      const f = files[turn++ % files.length];
      fs.writeSync(f.fd, blob, 0, blob.byteLength, f.at);
      storage.set(
        dataclass(META, 'MetadataIndex', [
          ['fqn', key],
          ['offset', size(offsets)],
          ['index', null],
        ]),
        dataclass('torch.distributed.checkpoint.filesystem', '_StorageInfo', [
          ['relative_path', f.name],
          ['offset', f.at],
          ['length', blob.byteLength],
          ['transform_descriptors', null],
        ]),
      );
      f.at += blob.byteLength;
      k.chunks.push(
        dataclass(META, 'ChunkStorageMetadata', [
          ['offsets', size(offsets)],
          ['sizes', size(sizes)],
        ]),
      );
    }
  };
  try {
    for (const n of ck.tensorNames()) {
      const { dtype, globalShape } = ck.info(n);
      const p = megatronDistPlace(n, opts.form);
      const data = ck.read(n);
      if (p.halves) {
        const half = [globalShape[0] / 2, ...globalShape.slice(1)];
        store(`${p.key}_w`, dtype, p.index, half, data.subarray(0, data.byteLength / 2));
        store(`${p.key}_v`, dtype, p.index, half, data.subarray(data.byteLength / 2));
      } else store(p.key, dtype, p.index, globalShape, data);
    }
  } finally {
    for (const f of files) fs.closeSync(f.fd);
    fs.rmSync(blobFile, { force: true });
  }
  const sdm = new Map<unknown, unknown>();
  for (const [key, k] of keys) {
    const dtypeName = TORCH_NAME[k.dtype];
    if (!dtypeName) throw new Error(`no torch dtype for ${k.dtype}`);
    // TensorProperties pickles through __getstate__: (dtype, layout, requires_grad, memory format, pin_memory)
    const props = new PyObject(
      META,
      'TensorProperties',
      [],
      new PyTuple([new PyGlobal('torch', dtypeName), null, false, null, false]),
    );
    sdm.set(
      key,
      dataclass(META, 'TensorStorageMetadata', [
        ['properties', props],
        ['size', size([...k.lead, ...k.inner])],
        ['chunks', k.chunks],
      ]),
    );
  }
  const meta = dataclass(META, 'Metadata', [
    ['state_dict_metadata', sdm],
    ['planner_data', null],
    ['storage_data', storage],
  ]);
  fs.writeFileSync(path.join(iter, '.metadata'), pickle(meta));
  const common = new TorchFileWriter(path.join(iter, 'common.pt'));
  common.writeRoot(
    new Map<string, unknown>([
      ['args', new PyObject('argparse', 'Namespace', [], new Map(Object.entries(opts.args ?? {})))],
      ['checkpoint_version', 3],
      ['iteration', iteration],
    ]),
  );
  common.finish();
  fs.writeFileSync(path.join(iter, 'metadata.json'), JSON.stringify({ sharded_backend: 'torch_dist' }));
  fs.writeFileSync(path.join(output, 'latest_checkpointed_iteration.txt'), String(iteration));
  return iter;
}
