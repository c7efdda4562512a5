// The example families (examples/<family>/) and what their folders hold.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

/** examples/ */
export const EXAMPLES_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/**
 * Pai-Megatron-Patch's layout for a real-size YAML (which must state it in its parallel section),
 * the data-parallel size it gives on the GPU count the README names, and the shared HF config of
 * the checkpoint it trains.
 */
export interface RealLayout {
  tp: number;
  pp: number;
  ep: number;
  /** Expert tensor parallelism, where it is not TP. */
  etp?: number;
  /** Data-parallel size on the GPU count the README names. */
  dp: number;
  /** Decoder layers on the first pipeline stage, where the stages are uneven. */
  firstStageLayers?: number;
  /** File under the shared folder's data/configs/ (null: not there). */
  sharedConfig: string | null;
  /** Pai's OPTIMIZER_OFFLOAD: the share of the optimizer states in host memory (default none). */
  optimizerOffload?: number;
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

/** One layout for a family's pre-training and SFT configs (`<prefix>pretrain.yaml`, `<prefix>sft.yaml`). */
const both = (layout: RealLayout, prefix = ''): Record<string, RealLayout> => ({
  [`${prefix}pretrain.yaml`]: layout,
  [`${prefix}sft.yaml`]: layout,
});

const dense = (tp: number, pp: number, dp: number, sharedConfig: string | null): RealLayout => ({
  tp,
  pp,
  ep: 1,
  dp,
  sharedConfig,
});

export const FAMILIES: Family[] = [
  {
    id: 'llama3',
    architecture: 'LlamaForCausalLM',
    // examples/llama3_1: mcore-tp4-pp2 on 8 GPUs
    real: both(dense(4, 2, 1, 'Llama-3.1-8B.json')),
    tiny: TINY,
    moe: false,
  },
  {
    id: 'qwen2.5',
    architecture: 'Qwen2ForCausalLM',
    // the auto-configurator's 7B row: TP2 on 8 GPUs at 8k
    real: both(dense(2, 1, 4, 'Qwen2.5-7B-Instruct.json')),
    tiny: TINY,
    moe: false,
  },
  {
    id: 'qwen3',
    architecture: 'Qwen3ForCausalLM',
    // run_8xH20.sh's 8B default: TP1 PP4 on 8 GPUs (Qwen3-8B's config is not in the shared folder)
    real: both(dense(1, 4, 2, null)),
    tiny: TINY,
    moe: false,
  },
  {
    id: 'qwen3-moe',
    architecture: 'Qwen3MoeForCausalLM',
    // examples/qwen3/README.md: TP4 PP2 ETP1 EP4 on 8 GPUs
    real: both({ tp: 4, pp: 2, ep: 4, etp: 1, dp: 1, sharedConfig: 'Qwen3-30B-A3B.json' }),
    tiny: TINY,
    moe: true,
  },
  {
    id: 'mixtral',
    architecture: 'MixtralForCausalLM',
    // examples/mistral/README.md: tp4-pp1-ep4 on 16 GPUs (ETP = TP, Megatron's default then)
    real: both({ tp: 4, pp: 1, ep: 4, dp: 4, sharedConfig: 'Mixtral-8x7B-v0.1.json' }),
    tiny: TINY,
    moe: true,
  },
  {
    id: 'deepseek-v3',
    architecture: 'DeepseekV3ForCausalLM',
    // examples/deepseek_v3/README.md: TP8 PP8 ETP1 EP16, MP_PP0_LAYERS=5, on 128 GPUs;
    // examples/moonlight/README.md: TP1 PP1 ETP1 EP8 on 8 GPUs
    real: {
      ...both({
        tp: 8,
        pp: 8,
        ep: 16,
        etp: 1,
        dp: 2,
        firstStageLayers: 5,
        sharedConfig: 'DeepSeek-V3.json',
        // run_mcore_deepseek.sh's OPTIMIZER_OFFLOAD=1.0
        optimizerOffload: 1,
      }),
      ...both(
        {
          tp: 1,
          pp: 1,
          ep: 8,
          etp: 1,
          dp: 8,
          sharedConfig: 'Moonlight-16B-A3B-Instruct.thirdparty-copy.json',
        },
        'moonlight-',
      ),
    },
    tiny: [
      { name: 'tiny', configDir: 'tiny-config', mtp: true },
      { name: 'tiny-moonlight', configDir: 'tiny-moonlight-config', mtp: false },
    ],
    moe: true,
  },
  {
    id: 'phi4',
    architecture: 'Phi3ForCausalLM',
    // no Pai-Megatron-Patch script: TP2 PP2 on 8 GPUs (TP must divide the 10 key/value heads; the
    // README gives the reasons; Phi-4's config is not in the shared folder)
    real: both(dense(2, 2, 2, null)),
    tiny: [
      ...TINY,
      // Phi-4-mini: partial rotary embeddings with longrope, tied embeddings
      { name: 'tiny-mini', configDir: 'tiny-mini-config', mtp: false },
    ],
    moe: false,
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
