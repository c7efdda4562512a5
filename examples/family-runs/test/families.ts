// The example families (examples/<family>/) and what their folders hold.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

/** examples/ */
export const EXAMPLES_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/**
 * What a real-size YAML cannot say about Pai-Megatron-Patch's layout (the trainer has no pipeline,
 * expert-tensor or context parallelism yet), and the shared HF config of the checkpoint it trains.
 */
export interface RealLayout {
  pp: number;
  etp?: number;
  /** Data-parallel size on the GPU count the README names. */
  dp: number;
  firstStageLayers?: number;
  /** File under the shared folder's data/configs/ (null: not there). */
  sharedConfig: string | null;
}

/** A tiny model of a family: `<name>-pretrain.yaml`, `<name>-sft.yaml` and its HF config folder. */
export interface TinyVariant {
  name: string;
  /** Folder of its config.json, inside the family folder. */
  configDir: string;
  mtp: boolean;
}

/** One family folder. */
export interface Family {
  /** Folder name under examples/. */
  id: string;
  /** The HF architecture of its models. */
  architecture: string;
  /** The real-size configs and the rest of their layouts. */
  real: Record<string, RealLayout>;
  tiny: TinyVariant[];
  moe: boolean;
}

const TINY: TinyVariant[] = [{ name: 'tiny', configDir: 'tiny-config', mtp: false }];

const dense = (pp: number, dp: number, sharedConfig: string | null): RealLayout => ({ pp, dp, sharedConfig });

export const FAMILIES: Family[] = [
  {
    id: 'llama3',
    architecture: 'LlamaForCausalLM',
    // examples/llama3_1: mcore-tp4-pp2 on 8 GPUs
    real: { 'pretrain.yaml': dense(2, 1, 'Llama-3.1-8B.json'), 'sft.yaml': dense(2, 1, 'Llama-3.1-8B.json') },
    tiny: TINY,
    moe: false,
  },
  {
    id: 'qwen2.5',
    architecture: 'Qwen2ForCausalLM',
    // the auto-configurator's 7B row: TP2 on 8 GPUs at 8k
    real: {
      'pretrain.yaml': dense(1, 4, 'Qwen2.5-7B-Instruct.json'),
      'sft.yaml': dense(1, 4, 'Qwen2.5-7B-Instruct.json'),
    },
    tiny: TINY,
    moe: false,
  },
  {
    id: 'qwen3',
    architecture: 'Qwen3ForCausalLM',
    // run_8xH20.sh's 8B default: TP1 PP4 on 8 GPUs (Qwen3-8B's config is not in the shared folder)
    real: { 'pretrain.yaml': dense(4, 2, null), 'sft.yaml': dense(4, 2, null) },
    tiny: TINY,
    moe: false,
  },
  {
    id: 'qwen3-moe',
    architecture: 'Qwen3MoeForCausalLM',
    // examples/qwen3/README.md: TP4 PP2 ETP1 EP4 on 8 GPUs
    real: {
      'pretrain.yaml': { pp: 2, etp: 1, dp: 1, sharedConfig: 'Qwen3-30B-A3B.json' },
      'sft.yaml': { pp: 2, etp: 1, dp: 1, sharedConfig: 'Qwen3-30B-A3B.json' },
    },
    tiny: TINY,
    moe: true,
  },
  {
    id: 'mixtral',
    architecture: 'MixtralForCausalLM',
    // examples/mistral/README.md: tp4-pp1-ep4 on 16 GPUs (ETP = TP, Megatron's default then)
    real: {
      'pretrain.yaml': { pp: 1, dp: 4, sharedConfig: 'Mixtral-8x7B-v0.1.json' },
      'sft.yaml': { pp: 1, dp: 4, sharedConfig: 'Mixtral-8x7B-v0.1.json' },
    },
    tiny: TINY,
    moe: true,
  },
  {
    id: 'deepseek-v3',
    architecture: 'DeepseekV3ForCausalLM',
    // examples/deepseek_v3/README.md: TP8 PP8 ETP1 EP16, MP_PP0_LAYERS=5, on 128 GPUs;
    // examples/moonlight/README.md: TP1 PP1 ETP1 EP8 on 8 GPUs
    real: {
      'pretrain.yaml': { pp: 8, etp: 1, dp: 2, firstStageLayers: 5, sharedConfig: 'DeepSeek-V3.json' },
      'sft.yaml': { pp: 8, etp: 1, dp: 2, firstStageLayers: 5, sharedConfig: 'DeepSeek-V3.json' },
      'moonlight-pretrain.yaml': {
        pp: 1,
        etp: 1,
        dp: 8,
        sharedConfig: 'Moonlight-16B-A3B-Instruct.thirdparty-copy.json',
      },
      'moonlight-sft.yaml': {
        pp: 1,
        etp: 1,
        dp: 8,
        sharedConfig: 'Moonlight-16B-A3B-Instruct.thirdparty-copy.json',
      },
    },
    tiny: [
      { name: 'tiny', configDir: 'tiny-config', mtp: true },
      { name: 'tiny-moonlight', configDir: 'tiny-moonlight-config', mtp: false },
    ],
    moe: true,
  },
];

/** Absolute path of a family's folder. */
export function familyDir(f: Family): string {
  return path.join(EXAMPLES_DIR, f.id);
}

/** Files of a family's folder that its tiny runs read. */
export function tinyFiles(f: Family): string[] {
  return f.tiny.flatMap((t) => [t.configDir, `${t.name}-pretrain.yaml`, `${t.name}-sft.yaml`]);
}

/** The YAML run configs in a family's folder. */
export function yamlFiles(f: Family): string[] {
  return fs
    .readdirSync(familyDir(f))
    .filter((n) => n.endsWith('.yaml'))
    .sort();
}
