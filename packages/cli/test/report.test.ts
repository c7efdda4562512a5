// `megapatch report` through the real binary: a run folder's metrics.jsonl → <run-dir>/report (or
// --out) with index.html and PNGs, --json listing them, warnings on stderr, one-line errors.
import * as fs from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import type { ReportSummary } from '../src/commands/report.js';
import { listTree, megapatch, oneLine, tempDir, temporaries } from './helpers.js';

const root = tempDir('report');
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

/** A run folder of `iterations` training lines (2 MoE layers × 4 experts), validation every 10. */
function writeRun(name: string, iterations = 30, tail = ''): string {
  const dir = join(root, name);
  fs.mkdirSync(dir, { recursive: true });
  const lines: string[] = [];
  for (let it = 1; it <= iterations; it++) {
    const time = new Date(Date.UTC(2025, 0, 1, 0, 0, it)).toISOString();
    const lmLoss = 2 + 6 * Math.exp(-it / 10);
    lines.push(
      JSON.stringify({
        kind: 'train',
        iteration: it,
        consumedSamples: 4 * it,
        elapsedMs: 120,
        lr: 1e-4,
        lmLoss,
        gradNorm: 1 + 1 / it,
        skippedIterations: 0,
        tokensPerSecond: 4000,
        tflops: null,
        memory: { liveBytes: 2 ** 30, peakBytes: 2 ** 31 },
        moe: { auxLoss: 0.01, expertLoad: { '0': [10, 20, 30, 40], '1': [25, 25, 25, 25] } },
        time,
      }),
    );
    if (it % 10 === 0) {
      lines.push(
        JSON.stringify({
          kind: 'valid',
          iteration: it,
          consumedSamples: 4 * it,
          lmLoss,
          perplexity: Math.exp(lmLoss),
          time,
        }),
      );
    }
  }
  fs.writeFileSync(join(dir, 'metrics.jsonl'), `${lines.join('\n')}\n${tail}`);
  return dir;
}

describe('megapatch report', () => {
  it('writes <run-dir>/report/index.html and the PNGs, and names them', () => {
    const run = writeRun('run', 30, '{"kind":"train","itera');
    const r = megapatch(['report', run]);
    expect(r.status, r.stderr).toBe(0);
    const out = join(run, 'report');
    expect(r.stdout.split('\n')[0]).toBe(
      `read 30 training and 3 validation lines of ${join(run, 'metrics.jsonl')}`,
    );
    expect(r.stdout).toContain(`wrote ${join(out, 'index.html')} (9 charts)`);
    expect(r.stdout).toContain(`wrote ${join(out, 'loss.png')}`);
    expect(oneLine(r.stderr)).toBe(
      `warning: ${join(run, 'metrics.jsonl')} line 34: incomplete last line skipped (a run stopped while writing it)`,
    );
    expect(listTree(out)).toContain('expert-load.png');
    expect(fs.existsSync(`${out}.lock`)).toBe(false);
    expect(temporaries(run)).toEqual([]);
  });

  it('--json lists the files written; --out writes elsewhere; a second run replaces the report', () => {
    const run = writeRun('json');
    const out = join(root, 'elsewhere', 'report');
    for (let i = 0; i < 2; i++) {
      const r = megapatch(['report', run, '--out', out, '--json']);
      expect(r.status, r.stderr).toBe(0);
      expect(r.stderr).toBe('');
      const s = JSON.parse(r.stdout) as ReportSummary;
      expect(s.html).toBe(join(out, 'index.html'));
      expect(s.pngs.map((p) => p.slice(out.length + 1))).toEqual([
        'loss.png',
        'lr.png',
        'grad-norm.png',
        'throughput.png',
        'iteration-time.png',
        'memory.png',
        'moe-losses.png',
        'expert-load.png',
        'expert-imbalance.png',
      ]);
      expect([s.trainLines, s.validLines, s.warnings]).toEqual([30, 3, []]);
      for (const f of [s.html, ...s.pngs]) expect(fs.statSync(f).size, f).toBeGreaterThan(1000);
    }
    expect(fs.existsSync(join(run, 'report'))).toBe(false);
    expect(temporaries(join(root, 'elsewhere'))).toEqual([]);
  });

  it('bad input is one line: a missing run folder (exit 2), an empty or bad metrics file (exit 1)', () => {
    const missing = join(root, 'no-such-run');
    const a = megapatch(['report', missing]);
    expect(a.status).toBe(2);
    expect(oneLine(a.stderr)).toBe(
      `megapatch report: ${missing}: no such run folder; give the folder a training run writes metrics.jsonl to`,
    );
    expect(fs.existsSync(missing)).toBe(false);

    const empty = join(root, 'empty');
    fs.mkdirSync(empty);
    fs.writeFileSync(join(empty, 'metrics.jsonl'), '');
    const b = megapatch(['report', empty]);
    expect(b.status).toBe(1);
    expect(oneLine(b.stderr)).toBe(
      `megapatch report: ${join(empty, 'metrics.jsonl')} holds no training or validation lines yet; run the report after the first log interval`,
    );
    expect(listTree(empty)).toEqual(['metrics.jsonl']);

    const noMetrics = join(root, 'no-metrics');
    fs.mkdirSync(noMetrics);
    const c = megapatch(['report', noMetrics]);
    expect(c.status).toBe(1);
    expect(oneLine(c.stderr)).toBe(
      `megapatch report: ${noMetrics} has no metrics.jsonl; is it a megapatch run folder?`,
    );

    const bad = writeRun('bad', 3, '{"kind":"train","iteration":4}\n');
    const d = megapatch(['report', bad]);
    expect(d.status).toBe(1);
    expect(oneLine(d.stderr)).toMatch(
      new RegExp(
        `^megapatch report: ${join(bad, 'metrics.jsonl')} line 4: bad train line \\(consumedSamples: `,
      ),
    );
    expect(listTree(bad)).toEqual(['metrics.jsonl']);
  });

  it('refuses an --out that holds the run, and flags it takes no others', () => {
    const run = writeRun('inside');
    const a = megapatch(['report', run, '--out', run]);
    expect(a.status).toBe(2);
    expect(oneLine(a.stderr)).toContain(
      `megapatch report: --out ${run} contains <run-dir> ${join(run, 'metrics.jsonl')}`,
    );
    const b = megapatch(['report']);
    expect(b.status).toBe(2);
    expect(oneLine(b.stderr)).toBe(
      'megapatch report: missing <run-dir> (the run folder holding metrics.jsonl)',
    );
    const c = megapatch(['report', run, '--out', '']);
    expect(c.status).toBe(2);
    expect(oneLine(c.stderr)).toBe('megapatch report: --out: must not be empty');
    expect(listTree(run)).toEqual(['metrics.jsonl']);
  });

  it('has a help page', () => {
    const r = megapatch(['help', 'report']);
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('--out DIR');
    expect(r.stdout).toContain('self-contained');
  });
});
