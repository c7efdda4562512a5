// `megapatch model info --config <config.json>`: the architecture, the TransformerConfig and the
// total and active (per token) parameter counts of a Hugging Face model config.
import { parameterCount, parseHfConfig, type TransformerConfig } from '@megapatch/convert';
import type { Command, CommandGroup } from '../command.js';

/** What `megapatch model info` reports, as data. */
export interface ModelInfo {
  architecture: string;
  transformerConfig: TransformerConfig;
  parameters: { total: number; activePerToken: number; embedding: number; mtp: number; totalWithMtp: number };
}

export function modelInfo(configPath: string): ModelInfo {
  const parsed = parseHfConfig(configPath);
  const count = parameterCount(parsed.transformerConfig);
  const hf = parsed.hfConfig as { architectures?: string[] };
  return {
    architecture: hf.architectures?.[0] ?? parsed.spec.architectures[0],
    transformerConfig: parsed.transformerConfig,
    parameters: {
      total: count.total,
      activePerToken: count.activePerToken,
      embedding: count.embedding,
      mtp: count.mtp,
      totalWithMtp: count.totalWithMtp,
    },
  };
}

const billions = (n: number): string => `${(n / 1e9).toFixed(2)}B (${n.toLocaleString('en-US')})`;

export function formatModelInfo(m: ModelInfo): string {
  const c = m.transformerConfig;
  const lines = [
    `architecture       ${m.architecture}`,
    `layers             ${c.numLayers}`,
    `hidden size        ${c.hiddenSize}`,
    `attention heads    ${c.numAttentionHeads} (${c.numQueryGroups} query groups, head dim ${c.kvChannels})`,
    `vocabulary         ${c.vocabSize}`,
  ];
  if (c.moe) lines.push(`experts            ${c.moe.numExperts}, top-${c.moe.routerTopk}`);
  if (c.mla)
    lines.push(
      `attention          MLA (kv LoRA rank ${c.mla.kvLoraRank}, q LoRA rank ${c.mla.qLoraRank ?? 'none'})`,
    );
  lines.push(`parameters         ${billions(m.parameters.total)}`);
  lines.push(`active per token   ${billions(m.parameters.activePerToken)}`);
  if (m.parameters.mtp > 0)
    lines.push(
      `MTP layers         ${billions(m.parameters.mtp)} more (total with MTP ${billions(m.parameters.totalWithMtp)})`,
    );
  return lines.join('\n');
}

export const info: Command = {
  name: 'model info',
  summary: 'architecture, TransformerConfig and parameter counts of a Hugging Face config',
  options: {
    config: {
      type: 'string',
      value: 'PATH',
      description: 'config.json, or the model folder holding it',
      required: true,
    },
    json: { type: 'boolean', description: 'print JSON' },
  },
  examples: ['model info --config Qwen3-30B-A3B/config.json'],
  run: ({ options, io }) => {
    const m = modelInfo(options.config as string);
    io.out.log(options.json ? JSON.stringify(m, null, 2) : formatModelInfo(m));
  },
};

const group: CommandGroup = {
  name: 'model',
  summary: 'inspect Hugging Face model configs',
  commands: { info: { summary: info.summary, load: async () => info } },
};
export default group;
