// The weights of a Hugging Face model folder in either form transformers saves: safetensors
// (`model.safetensors`, or the shards `model.safetensors.index.json` lists) or PyTorch pickles
// (`pytorch_model.bin`, or the shards `pytorch_model.bin.index.json` lists: torch.save files of a
// state dict, as `save_pretrained(..., safe_serialization=False)` and older transformers write
// them). The pickles are read without running any of their code: only the tensor classes of
// torch.save are built, as `torch.load(weights_only=True)` would. Safetensors win when a folder
// holds both, as in transformers.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ConvertError } from '../errors.js';
import { byteLengthOf } from '../safetensors/dtype.js';
import type { TensorData } from '../safetensors/file.js';
import {
  readSafetensorsIndex,
  SAFETENSORS_INDEX_FILE,
  SAFETENSORS_SINGLE_FILE,
  ShardedSafetensors,
  type ShardedTensorInfo,
} from '../safetensors/sharded.js';
import { TorchFile, TorchTensor } from '../torch/torch-file.js';

/** transformers' single-file PyTorch weights. */
export const PYTORCH_SINGLE_FILE = 'pytorch_model.bin';
/** transformers' index of sharded PyTorch weights (the same JSON as the safetensors index). */
export const PYTORCH_INDEX_FILE = 'pytorch_model.bin.index.json';

/** Read access to the tensors of an HF folder, whatever files hold them. */
export interface HfWeights {
  /** The folder. */
  readonly dir: string;
  /** Tensor names (index order, or the file's order for a single file). */
  keys(): string[];
  /** Weight file names. */
  files(): string[];
  has(name: string): boolean;
  /** Dtype, shape, byte length and weight file of `name`. */
  info(name: string): ShardedTensorInfo;
  /** The whole of `name`, row-major. */
  read(name: string): TensorData;
  /** Rows [start, start + count) along dim 0 of `name`, row-major. */
  readRows(name: string, start: number, count: number): TensorData;
  close(): void;
  [Symbol.dispose](): void;
}

/** The state dict a torch.save file holds: name → tensor; anything else is refused with what it is. */
function stateDictOf(root: unknown, file: string): Map<string, TorchTensor> {
  const fail = (why: string) =>
    new ConvertError(
      'INVALID_FORMAT',
      `${why}: not a model's state dict (save_pretrained's weights map each parameter name to a tensor)`,
      file,
    );
  if (!(root instanceof Map)) throw fail('does not hold a dict');
  const out = new Map<string, TorchTensor>();
  for (const [k, v] of root as Map<unknown, unknown>) {
    if (typeof k !== 'string') throw fail(`holds the key ${String(k)}, not a parameter name`);
    if (!(v instanceof TorchTensor)) {
      const what = v instanceof Map ? 'a dict' : Array.isArray(v) ? 'a list' : typeof v;
      throw fail(`its entry ${JSON.stringify(k)} is ${what}, not a tensor`);
    }
    out.set(k, v);
  }
  return out;
}

/** An HF folder's PyTorch weights: `pytorch_model.bin`, or the shards its index lists. */
export class TorchBinWeights implements HfWeights {
  private constructor(
    readonly dir: string,
    private readonly shards: Map<string, TorchFile>,
    private readonly location: Map<string, { file: string; tensor: TorchTensor }>,
  ) {}

  /** Opens `dir` (its `pytorch_model.bin.index.json` first, else `pytorch_model.bin`). */
  static open(dir: string): TorchBinWeights {
    const shards = new Map<string, TorchFile>();
    const location = new Map<string, { file: string; tensor: TorchTensor }>();
    const load = (name: string, listed: boolean) => {
      const file = path.join(dir, name);
      if (listed && !fs.existsSync(file)) {
        throw new ConvertError('MISSING_FILE', `no such file (listed in ${PYTORCH_INDEX_FILE})`, name);
      }
      const tf = TorchFile.open(file);
      shards.set(name, tf);
      return stateDictOf(tf.root, name);
    };
    try {
      if (fs.existsSync(path.join(dir, PYTORCH_INDEX_FILE))) {
        const index = readSafetensorsIndex(dir, PYTORCH_INDEX_FILE);
        const dicts = new Map(index.files.map((f) => [f, load(f, true)]));
        for (const [name, f] of index.weightMap) {
          const tensor = dicts.get(f)?.get(name);
          if (!tensor) {
            throw new ConvertError(
              'MISSING_TENSOR',
              `tensor ${JSON.stringify(name)} listed in ${PYTORCH_INDEX_FILE} is absent`,
              f,
            );
          }
          location.set(name, { file: f, tensor });
        }
      } else {
        for (const [name, tensor] of load(PYTORCH_SINGLE_FILE, false)) {
          location.set(name, { file: PYTORCH_SINGLE_FILE, tensor });
        }
      }
      return new TorchBinWeights(dir, shards, location);
    } catch (e) {
      for (const s of shards.values()) s.close();
      throw e;
    }
  }

  keys(): string[] {
    return [...this.location.keys()];
  }

  files(): string[] {
    return [...this.shards.keys()];
  }

  has(name: string): boolean {
    return this.location.has(name);
  }

  info(name: string): ShardedTensorInfo {
    const { file, tensor } = this.at(name);
    return {
      dtype: tensor.dtype,
      shape: tensor.shape,
      byteLength: byteLengthOf(tensor.dtype, tensor.shape, name),
      file,
    };
  }

  read(name: string): TensorData {
    const { file, tensor } = this.at(name);
    return { dtype: tensor.dtype, shape: tensor.shape, data: this.shard(file).read(tensor) };
  }

  readRows(name: string, start: number, count: number): TensorData {
    const { file, tensor } = this.at(name);
    const data = this.shard(file).readRows(tensor, start, count);
    return { dtype: tensor.dtype, shape: [count, ...tensor.shape.slice(1)], data };
  }

  close(): void {
    for (const s of this.shards.values()) s.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  private at(name: string): { file: string; tensor: TorchTensor } {
    const l = this.location.get(name);
    if (!l)
      throw new ConvertError('MISSING_TENSOR', `no tensor ${JSON.stringify(name)}`, path.basename(this.dir));
    return l;
  }

  private shard(file: string): TorchFile {
    return this.shards.get(file) as TorchFile;
  }
}

const has = (dir: string, f: string) => fs.existsSync(path.join(dir, f));

/**
 * Opens the weights of the HF folder `hfDir`: safetensors when it has them, else PyTorch
 * pickles; MISSING_FILE naming both forms when it has neither.
 */
export function openHfWeights(hfDir: string): HfWeights {
  if (has(hfDir, SAFETENSORS_INDEX_FILE) || has(hfDir, SAFETENSORS_SINGLE_FILE)) {
    return ShardedSafetensors.open(hfDir);
  }
  if (has(hfDir, PYTORCH_INDEX_FILE) || has(hfDir, PYTORCH_SINGLE_FILE)) return TorchBinWeights.open(hfDir);
  if (!fs.existsSync(hfDir)) throw new ConvertError('MISSING_FILE', 'no such folder', hfDir);
  const others = fs.readdirSync(hfDir).filter((f) => /\.(bin|pt|pth|ckpt)$/.test(f));
  throw new ConvertError(
    'MISSING_FILE',
    `no ${SAFETENSORS_SINGLE_FILE}, ${SAFETENSORS_INDEX_FILE}, ${PYTORCH_SINGLE_FILE} or ${PYTORCH_INDEX_FILE}` +
      (others.length > 0
        ? ` (${others.slice(0, 3).join(', ')} ${others.length === 1 ? 'is' : 'are'} not a Hugging Face model's weights: convert them with transformers first)`
        : ''),
    path.basename(hfDir),
  );
}
