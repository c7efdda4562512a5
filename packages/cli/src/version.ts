import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

/** The version field of an installed package's package.json, or undefined. */
export function packageVersion(name: string): string | undefined {
  try {
    const path = require.resolve(`${name}/package.json`);
    return (JSON.parse(readFileSync(path, 'utf8')) as { version?: string }).version;
  } catch {
    return undefined;
  }
}

export function readVersion(): string {
  return packageVersion('@megapatch/cli') ?? '0.0.0';
}
