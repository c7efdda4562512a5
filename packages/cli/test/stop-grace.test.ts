// The grace a command gets after a first SIGINT/SIGTERM before it is cut short: 10 s by default;
// `train` none (it finishes its iteration and writes its checkpoint, however long a large model's
// save takes; a second signal stops it at once); MEGAPATCH_STOP_GRACE_S sets it for any command.
import { afterEach, describe, expect, it } from 'vitest';
import type { Command } from '../src/command.js';
import { commands, stopGraceFromEnv, stopGraceOf } from '../src/index.js';
import { megapatch } from './helpers.js';

afterEach(() => {
  delete process.env.MEGAPATCH_STOP_GRACE_S;
});

async function command(group: string, name?: string): Promise<Command> {
  const node = await commands.commands[group].load();
  if (!name) return node as Command;
  return (node as unknown as { commands: Record<string, { load(): Promise<Command> }> }).commands[
    name
  ].load();
}

describe('the grace after a first signal', () => {
  it('is 10 s for a command that names none, and no limit for train', async () => {
    expect(stopGraceOf((await command('preprocess', 'sft')).stopGraceMs)).toBe(10_000);
    expect(stopGraceOf((await command('convert', 'hf-to-megapatch')).stopGraceMs)).toBe(10_000);
    expect((await command('train')).stopGraceMs).toBeNull();
    // launch: the launcher's own --kill-grace-s ends its workers (SIGKILL), then it returns
    expect((await command('launch')).stopGraceMs).toBeNull();
    expect(stopGraceOf((await command('train')).stopGraceMs)).toBeNull();
  });

  it('MEGAPATCH_STOP_GRACE_S sets it for every command', () => {
    process.env.MEGAPATCH_STOP_GRACE_S = '120';
    expect(stopGraceOf(null)).toBe(120_000);
    expect(stopGraceOf(undefined)).toBe(120_000);
    process.env.MEGAPATCH_STOP_GRACE_S = '0.5';
    expect(stopGraceFromEnv()).toBe(500);
  });

  it('a value that is not a positive number of seconds is refused before the command runs (exit 2)', () => {
    for (const bad of ['0', '-3', 'soon']) {
      process.env.MEGAPATCH_STOP_GRACE_S = bad;
      expect(() => stopGraceFromEnv(), bad).toThrow(/must be a positive number of seconds/);
      const r = megapatch(['info'], { MEGAPATCH_STOP_GRACE_S: bad });
      expect(r.status, bad).toBe(2);
      expect(r.stderr).toContain(`MEGAPATCH_STOP_GRACE_S=${bad} must be a positive number of seconds`);
    }
  });
});
