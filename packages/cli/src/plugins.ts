// `--plugin <package>`: a global flag that imports a plugin package before the command runs. A
// plugin registers its architecture spec (@megapatch/convert) and its model family
// (@megapatch/models) on import, through the same registries the built-in families use, so
// `convert`, `model info`, `generate` and `eval` then know its architecture.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';
import { CliError, UsageError } from './errors.js';

/** Takes every `--plugin X` / `--plugin=X` out of the words before `--`; returns the rest and the plugins. */
export function extractPlugins(argv: readonly string[]): { argv: string[]; plugins: string[] } {
  const dashes = argv.indexOf('--');
  const own = dashes < 0 ? argv : argv.slice(0, dashes);
  const out: string[] = [];
  const plugins: string[] = [];
  for (let i = 0; i < own.length; i++) {
    const w = own[i];
    if (w === '--plugin') {
      const v = own[i + 1];
      if (v === undefined || v.startsWith('-')) throw new UsageError('--plugin needs a package name or path');
      plugins.push(v);
      i++;
    } else if (w.startsWith('--plugin=')) {
      const v = w.slice('--plugin='.length);
      if (!v) throw new UsageError('--plugin needs a package name or path');
      plugins.push(v);
    } else out.push(w);
  }
  return { argv: [...out, ...(dashes < 0 ? [] : argv.slice(dashes))], plugins };
}

/** The ESM entry file of a package folder, from its package.json (exports ".", module, main). */
function entryOf(dir: string, spec: string): string {
  const pj = path.join(dir, 'package.json');
  if (!fs.existsSync(pj)) return path.join(dir, 'index.js');
  let pkg: { exports?: unknown; module?: string; main?: string };
  try {
    pkg = JSON.parse(fs.readFileSync(pj, 'utf8'));
  } catch (e) {
    throw new CliError('PLUGIN', `plugin ${spec}: ${pj} is not valid JSON (${(e as Error).message})`);
  }
  let exp = pkg.exports as unknown;
  if (exp && typeof exp === 'object' && '.' in (exp as Record<string, unknown>))
    exp = (exp as Record<string, unknown>)['.'];
  if (exp && typeof exp === 'object') {
    const c = exp as Record<string, unknown>;
    exp = c.import ?? c.default ?? c.node;
    if (exp && typeof exp === 'object') exp = (exp as Record<string, unknown>).default;
  }
  const rel = typeof exp === 'string' ? exp : (pkg.module ?? pkg.main ?? 'index.js');
  return path.join(dir, rel);
}

/**
 * Where a plugin lives: a path (absolute or starting with `.`: a folder with package.json, or a
 * file), or a package name found in node_modules of the working directory or any folder above it.
 */
export function resolvePlugin(spec: string, cwd = process.cwd()): string {
  if (spec.startsWith('.') || path.isAbsolute(spec)) {
    const p = path.resolve(cwd, spec);
    if (!fs.existsSync(p)) throw new CliError('PLUGIN', `plugin ${spec}: no such file or folder (${p})`);
    return fs.statSync(p).isDirectory() ? entryOf(p, spec) : p;
  }
  for (let dir = path.resolve(cwd); ; dir = path.dirname(dir)) {
    const candidate = path.join(dir, 'node_modules', spec);
    if (fs.existsSync(candidate)) return entryOf(candidate, spec);
    if (path.dirname(dir) === dir) break;
  }
  throw new CliError(
    'PLUGIN',
    `plugin ${spec} is not installed here (looked in node_modules from ${cwd} upwards); install it or give its path`,
  );
}

/** Imports each plugin (in order); a plugin that fails to load is a one-line error naming it. */
export async function loadPlugins(plugins: readonly string[], cwd = process.cwd()): Promise<void> {
  for (const spec of plugins) {
    const file = resolvePlugin(spec, cwd);
    if (!fs.existsSync(file)) {
      throw new CliError(
        'PLUGIN',
        `plugin ${spec}: its entry ${file} does not exist (is the package built?)`,
      );
    }
    try {
      await import(pathToFileURL(file).href);
    } catch (e) {
      throw new CliError('PLUGIN', `plugin ${spec} failed to load: ${(e as Error).message.split('\n')[0]}`);
    }
  }
}
