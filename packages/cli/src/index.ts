// The megapatch command line: a thin layer that parses arguments, validates them and calls the
// libraries. Subcommands load lazily so that `megapatch info` never pays for training code.
import { defineCommand, runMain } from 'citty';
import { readVersion } from './version.js';

export const command = defineCommand({
  meta: {
    name: 'megapatch',
    version: readVersion(),
    description: 'LLM training in TypeScript, Megatron style',
  },
  subCommands: {
    info: () => import('./commands/info.js').then((m) => m.default),
    convert: () => import('./commands/convert.js').then((m) => m.default),
    ckpt: () => import('./commands/ckpt.js').then((m) => m.default),
    data: () => import('./commands/data.js').then((m) => m.default),
    model: () => import('./commands/model.js').then((m) => m.default),
    preprocess: () => import('./commands/preprocess.js').then((m) => m.default),
  },
});

/** Runs the CLI with the given arguments (without node and the script path). */
export async function main(argv: string[]): Promise<void> {
  await runMain(command, { rawArgs: argv });
}
