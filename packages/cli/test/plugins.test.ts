// --plugin: taken out of the command line before parsing, resolved by path or from node_modules.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { extractPlugins, loadPlugins, resolvePlugin } from '../src/plugins.js';

describe('--plugin', () => {
  it('is taken out wherever it stands before --, in both spellings', () => {
    expect(extractPlugins(['model', 'info', '--plugin', 'a', '--config', 'x', '--plugin=b'])).toEqual({
      argv: ['model', 'info', '--config', 'x'],
      plugins: ['a', 'b'],
    });
    // after `--` the words belong to a launched command
    expect(extractPlugins(['launch', '--', 'node', '--plugin', 'c'])).toEqual({
      argv: ['launch', '--', 'node', '--plugin', 'c'],
      plugins: [],
    });
    expect(() => extractPlugins(['model', '--plugin'])).toThrow(/--plugin needs a package name or path/);
    expect(() => extractPlugins(['model', '--plugin', '--config'])).toThrow(/--plugin needs/);
  });

  it('resolves a package folder, a file and a package in node_modules above the working directory', async () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-plugin-'));
    const pkg = path.join(root, 'node_modules', '@acme', 'plugin');
    fs.mkdirSync(path.join(pkg, 'dist'), { recursive: true });
    fs.writeFileSync(
      path.join(pkg, 'package.json'),
      JSON.stringify({
        name: '@acme/plugin',
        type: 'module',
        exports: { '.': { import: './dist/index.js' } },
      }),
    );
    fs.writeFileSync(
      path.join(pkg, 'dist', 'index.js'),
      'globalThis.__acmePluginLoaded = (globalThis.__acmePluginLoaded ?? 0) + 1;\n',
    );
    const deep = path.join(root, 'a', 'b');
    fs.mkdirSync(deep, { recursive: true });
    expect(resolvePlugin('@acme/plugin', deep)).toBe(path.join(pkg, 'dist', 'index.js'));
    expect(resolvePlugin(pkg, deep)).toBe(path.join(pkg, 'dist', 'index.js'));
    expect(resolvePlugin('./node_modules/@acme/plugin/dist/index.js', root)).toBe(
      path.join(pkg, 'dist', 'index.js'),
    );
    await loadPlugins(['@acme/plugin'], deep);
    expect((globalThis as { __acmePluginLoaded?: number }).__acmePluginLoaded).toBe(1);
    expect(() => resolvePlugin('@acme/missing', deep)).toThrow(/plugin @acme\/missing is not installed here/);
    fs.writeFileSync(path.join(root, 'bad.js'), 'throw new Error("boom");\n');
    await expect(loadPlugins(['./bad.js'], root)).rejects.toThrow(/plugin \.\/bad\.js failed to load: boom/);
    fs.rmSync(root, { recursive: true, force: true });
  });
});
