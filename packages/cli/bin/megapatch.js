#!/usr/bin/env node
// The megapatch command. main() prints errors itself and returns the exit code.
let cli;
try {
  cli = await import('../dist/index.js');
} catch (e) {
  if (e?.code !== 'ERR_MODULE_NOT_FOUND') throw e;
  console.error(
    `megapatch is not built (${e.message.split('\n')[0]}); run 'pnpm install && pnpm build' in the repository first`,
  );
  process.exit(1);
}
process.exit(await cli.main(process.argv.slice(2)));
