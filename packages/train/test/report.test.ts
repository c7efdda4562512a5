// The run report: a generated run folder → index.html and PNGs; the PNGs are real images, the page
// draws every chart in headless Chromium with no network, and bad run folders are one-line errors.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ReportError, type RunReport, readRunMetrics, writeRunReport } from '../src/index.js';
import { buildCharts, thin } from '../src/report/charts.js';
import { configFacts } from '../src/report/html.js';
import { writeSampleRun } from './fixtures/report/sample-run.js';

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'mp-report-'));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

const CHROMIUM = '/usr/bin/chromium';
const hasChromium = fs.existsSync(CHROMIUM);

/** Width and height of a PNG, from its signature and IHDR chunk. */
function pngSize(file: string): { width: number; height: number } {
  const b = fs.readFileSync(file);
  expect(b.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])), file).toBe(
    true,
  );
  expect(b.subarray(12, 16).toString('latin1'), file).toBe('IHDR');
  return { width: b.readUInt32BE(16), height: b.readUInt32BE(20) };
}

/** A line-per-record metrics file in a fresh run folder. */
function runWith(name: string, text: string): string {
  const dir = path.join(root, name);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'metrics.jsonl'), text);
  return dir;
}

/** The error `f` throws, checked to be a one-line ReportError. */
function reportError(f: () => unknown): ReportError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(ReportError);
    expect((e as Error).message).not.toContain('\n');
    return e as ReportError;
  }
  throw new Error('expected a ReportError');
}

const trainLine = (iteration: number, extra: Record<string, unknown> = {}) =>
  JSON.stringify({
    kind: 'train',
    iteration,
    consumedSamples: iteration * 4,
    elapsedMs: 100,
    lr: 1e-4,
    lmLoss: 5 - iteration / 100,
    gradNorm: 1,
    skippedIterations: 0,
    tokensPerSecond: 1000,
    tflops: null,
    memory: { liveBytes: 1, peakBytes: 2 },
    time: '2025-01-01T00:00:00.000Z',
    ...extra,
  });

describe('the memory chart', () => {
  /** The memory chart's points of a run whose lines carry `memory`, by series name. */
  const memorySeries = (name: string, memory: (i: number) => Record<string, number>) => {
    const dir = runWith(name, [1, 2].map((i) => `${trainLine(i, { memory: memory(i) })}\n`).join(''));
    const chart = buildCharts(readRunMetrics(dir)).find((c) => c.id === 'memory');
    const values = JSON.stringify(chart?.spec);
    const points = (JSON.parse(values).data?.values ?? JSON.parse(values).datasets?.points ?? []) as {
      series: string;
      value: number;
    }[];
    const out = new Map<string, number[]>();
    for (const p of points) out.set(p.series, [...(out.get(p.series) ?? []), p.value]);
    return out;
  };

  it('draws the reserved memory (live + the caching allocator reserve) where the lines log cachedBytes', () => {
    const GIB = 2 ** 30;
    const s = memorySeries('memory-cached', (i) => ({
      liveBytes: i * GIB,
      peakBytes: 4 * GIB,
      cachedBytes: GIB,
    }));
    expect(s.get('reserved')).toEqual([2, 3]);
    expect(s.get('live')).toEqual([1, 2]);
    expect(s.get('peak')).toEqual([4, 4]);
    // runs written before cachedBytes was logged: no reserved series
    const old = memorySeries('memory-old', () => ({ liveBytes: GIB, peakBytes: 2 * GIB }));
    expect(old.has('reserved')).toBe(false);
    expect(old.get('live')).toEqual([1, 1]);
  });
});

describe('readRunMetrics', () => {
  const run = path.join(root, 'sample');
  writeSampleRun(run);

  it('reads training, validation and test lines, keeps unknown fields and skips an incomplete last line', () => {
    const m = readRunMetrics(run);
    expect(m.train).toHaveLength(200);
    expect(m.valid.map((v) => v.iteration)).toEqual([50, 100, 150, 200]);
    expect(m.test.map((v) => [v.iteration, v.lmLoss])).toEqual([[200, 2.25]]);
    expect(m.train[0].lossScale).toBe(65536);
    expect(Object.keys(m.train[9].moe?.expertLoad ?? {})).toEqual(['0', '1']);
    expect(m.warnings).toEqual([
      `${path.join(run, 'metrics.jsonl')} line 206: incomplete last line skipped (a run stopped while writing it)`,
    ]);
    expect(configFacts(m.config)).toEqual([
      ['model', 'Qwen3MoeForCausalLM'],
      ['layers', '2'],
      ['hidden size', '64'],
      ['experts', '4'],
      ['sequence length', '1024'],
      ['micro batch size', '2'],
      ['global batch size', '8'],
      ['training iterations', '200'],
      ['learning rate', '0.0003'],
      ['layout', 'tp=2 pp=1 ep=2'],
    ]);
  });

  it("finds the key facts of the trainer's RunConfig", () => {
    const runConfig = {
      model: { load: null, config: 'hf/Qwen3-MoE-tiny', dtype: 'bf16', moeAuxLossCoeff: 0.01 },
      data: { dataPath: ['c4_text_document'], seqLength: 256 },
      training: { microBatchSize: 2, globalBatchSize: 16, trainIters: 500 },
      optimizer: { lr: 3e-4, lrDecayStyle: 'cosine' },
      parallel: { tensorModelParallelSize: 2, expertModelParallelSize: 1 },
      checkpoint: { load: 'ckpt', save: 'ckpt' },
    };
    expect(configFacts(runConfig)).toEqual([
      ['model', 'hf/Qwen3-MoE-tiny'],
      ['sequence length', '256'],
      ['micro batch size', '2'],
      ['global batch size', '16'],
      ['training iterations', '500'],
      ['learning rate', '0.0003'],
      ['lr schedule', 'cosine'],
      ['precision', 'bf16'],
      ['layout', 'tp=2 ep=1'],
    ]);
  });

  it('takes the later line of an iteration logged twice (a resumed run) and skips other kinds', () => {
    const dir = runWith(
      'resumed',
      [
        trainLine(1),
        trainLine(2, { lmLoss: 9 }),
        JSON.stringify({ kind: 'checkpoint', iteration: 2 }),
        trainLine(2),
        trainLine(3, { lmLoss: null, gradNorm: null }),
        '',
      ].join('\n'),
    );
    const m = readRunMetrics(dir);
    expect(m.train.map((t) => [t.iteration, t.lmLoss])).toEqual([
      [1, 4.99],
      [2, 4.98],
      [3, null],
    ]);
    expect(m.warnings).toEqual([
      `${path.join(dir, 'metrics.jsonl')}: 1 line(s) of kind "checkpoint" ignored (first at line 3); the report knows "train", "valid" and "test"`,
    ]);
    expect(m.config).toBeNull();
  });

  it('bad input is a one-line error naming the file and line', () => {
    const missing = path.join(root, 'no-such-run');
    expect(reportError(() => readRunMetrics(missing)).message).toBe(`${missing}: no such run folder`);
    const noMetrics = path.join(root, 'no-metrics');
    fs.mkdirSync(noMetrics);
    expect(reportError(() => readRunMetrics(noMetrics)).code).toBe('NO_METRICS');
    const empty = runWith('empty', '');
    expect(reportError(() => readRunMetrics(empty)).message).toBe(
      `${path.join(empty, 'metrics.jsonl')} holds no training or validation lines yet; run the report after the first log interval`,
    );
    const cases: [string, string][] = [
      [`${trainLine(1)}\n{"kind":\n${trainLine(3)}\n`, 'line 2: not valid JSON'],
      // a bad last line that did end with a newline was written whole: an error, not a truncation
      [`${trainLine(1)}\n{"kind":"train"\n`, 'line 2: not valid JSON'],
      [`${trainLine(1)}\n[1, 2]\n`, 'line 2: expected a JSON object'],
      [`${trainLine(1)}\n{"iteration": 2}\n`, 'line 2: no "kind" ("train", "valid" or "test")'],
      [`${trainLine(1, { lr: 'high' })}\n`, 'line 1: bad train line (lr: '],
      [`${trainLine(1, { memory: {} })}\n`, 'line 1: bad train line (memory.liveBytes: '],
      [`${trainLine(1, { iteration: -1 })}\n`, 'line 1: bad train line (iteration: '],
      [`${trainLine(1, { time: 'yesterday' })}\n`, 'line 1: bad train line (time: '],
    ];
    cases.forEach(([text, message], i) => {
      const dir = runWith(`bad-${i}`, text);
      const e = reportError(() => readRunMetrics(dir));
      expect(e.code).toBe('BAD_METRICS');
      expect(e.message).toContain(`${path.join(dir, 'metrics.jsonl')} ${message}`);
    });
    const badConfig = runWith('bad-config', `${trainLine(1)}\n`);
    fs.writeFileSync(path.join(badConfig, 'config.json'), '{');
    expect(reportError(() => readRunMetrics(badConfig)).code).toBe('BAD_CONFIG');
  });

  it('long runs are averaged down to at most 2000 points per curve', () => {
    const points = Array.from({ length: 5001 }, (_, i) => ({ iteration: i + 1, series: 's', value: i % 2 }));
    const thinned = thin(points);
    expect(thinned.length).toBeLessThanOrEqual(2000);
    expect(thinned[0]).toEqual({ iteration: 2, series: 's', value: 1 / 3 });
    expect(thinned[thinned.length - 1].iteration).toBeLessThanOrEqual(5001);
  });
});

describe('writeRunReport', () => {
  const run = path.join(root, 'report-run');
  let written: Promise<RunReport>;
  beforeAll(() => {
    writeSampleRun(run);
    written = writeRunReport(run);
    // awaited by the tests; this keeps a failure from counting as unhandled before they run
    written.catch(() => {});
  });

  it('writes index.html and a PNG per chart into <run-dir>/report, leaving no temporaries', async () => {
    const r = await written;
    const out = path.join(run, 'report');
    expect(r.html).toBe(path.join(out, 'index.html'));
    expect(r.pngs.map((p) => path.basename(p))).toEqual([
      'loss.png',
      'lr.png',
      'grad-norm.png',
      'throughput.png',
      'tflops.png',
      'iteration-time.png',
      'memory.png',
      'moe-losses.png',
      'expert-load.png',
      'expert-imbalance.png',
    ]);
    expect(r.trainLines).toBe(200);
    expect(r.validLines).toBe(4);
    expect(r.warnings).toHaveLength(1);
    expect(fs.readdirSync(out).sort()).toEqual(['index.html', ...r.pngs.map((p) => path.basename(p))].sort());
  });

  it('the PNGs are real images of a sensible size', async () => {
    const r = await written;
    for (const png of r.pngs) {
      const { width, height } = pngSize(png);
      // 2 device pixels per CSS pixel of a ~700 px wide chart
      expect(width, png).toBeGreaterThan(1200);
      expect(width, png).toBeLessThan(2400);
      expect(height, png).toBeGreaterThan(150);
      expect(height, png).toBeLessThan(1600);
      expect(fs.statSync(png).size, png).toBeGreaterThan(10_000);
    }
  });

  it('the page is self-contained: Vega and the data inline, nothing to fetch', async () => {
    const html = fs.readFileSync((await written).html, 'utf8');
    expect(html).not.toMatch(/<script[^>]+src=/i);
    expect(html).not.toMatch(/<link[^>]+href=/i);
    expect(html).toContain('/*! vega 6.');
    expect(html).toContain('Qwen3MoeForCausalLM');
    // the test evaluation among the facts
    expect(html).toContain('<th>test loss</th><td>2.250, perplexity 9.488 (iteration 200)</td>');
    expect(html).toContain('incomplete last line skipped');
    expect((html.match(/<figure class="chart"/g) ?? []).length).toBe(10);
    expect(html.length).toBeLessThan(2_000_000);
  });

  it('a dense run without validation gets the charts it has data for, in another folder', async () => {
    const dense = path.join(root, 'dense');
    writeSampleRun(dense, { experts: 0, validEvery: 1000, truncateLast: false, config: false });
    const out = path.join(root, 'dense-report');
    const r = await writeRunReport(dense, { outDir: out });
    expect(r.html).toBe(path.join(out, 'index.html'));
    expect(r.pngs.map((p) => path.basename(p, '.png'))).toEqual([
      'loss',
      'lr',
      'grad-norm',
      'throughput',
      'tflops',
      'iteration-time',
      'memory',
    ]);
    expect(r.warnings).toEqual([]);
  });

  it('a failed report leaves nothing behind', async () => {
    const out = path.join(root, 'failed', 'report');
    await expect(writeRunReport(path.join(root, 'empty'), { outDir: out })).rejects.toThrow(ReportError);
    const ac = new AbortController();
    ac.abort(new Error('stopped'));
    await expect(writeRunReport(run, { outDir: out, signal: ac.signal })).rejects.toThrow('stopped');
    // the folders it made for the report are gone again
    expect(fs.existsSync(path.join(root, 'failed'))).toBe(false);
  });
});

/** The DOM of `page` after its scripts ran, from headless Chromium with every host unreachable. */
function dumpDom(page: string): string {
  const profile = fs.mkdtempSync(path.join(root, 'chromium-'));
  const r = spawnSync(
    CHROMIUM,
    [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      `--user-data-dir=${profile}`,
      // no network: every host name fails to resolve, and any proxy use fails to connect
      '--host-resolver-rules=MAP * ~NOTFOUND',
      '--proxy-server=127.0.0.1:9',
      '--virtual-time-budget=15000',
      '--dump-dom',
      `file://${page}`,
    ],
    { encoding: 'utf8', timeout: 90_000, maxBuffer: 1 << 28 },
  );
  expect(r.error, r.stderr).toBeUndefined();
  expect(r.status, r.stderr.slice(-2000)).toBe(0);
  return r.stdout;
}

/** Each chart figure of a dumped page: its id, status and whether its plot holds a drawn SVG. */
function figures(dom: string): { id: string; status: string; svg: boolean }[] {
  return dom
    .split('<figure')
    .slice(1)
    .map((f) => ({
      id: /data-chart="([^"]+)"/.exec(f)?.[1] ?? '?',
      status: /data-status="([^"]+)"/.exec(f)?.[1] ?? '?',
      svg: /<div class="plot"[^>]*>\s*<svg[^>]*class="marks"[\s\S]*<\/svg>/.test(f.split('</figure>')[0]),
    }));
}

const chromiumTitle = hasChromium
  ? 'headless Chromium draws every chart with no network'
  : `headless Chromium draws every chart (skipped: ${CHROMIUM} is not installed; apt-get install chromium)`;

describe.skipIf(!hasChromium)('the page in a browser', () => {
  it(chromiumTitle, async () => {
    const r = await writeRunReport(path.join(root, 'report-run'), { outDir: path.join(root, 'browser') });
    const dom = dumpDom(r.html);
    expect(dom).toContain('data-report="ok"');
    const found = figures(dom);
    expect(found.map((f) => f.id)).toEqual(r.pngs.map((p) => path.basename(p, '.png')));
    for (const f of found) expect(f, f.id).toEqual({ id: f.id, status: 'ok', svg: true });
    // the lines and the heatmap's cells are there, not just empty axes
    expect(dom).toMatch(/class="mark-line role-mark[^"]*"/);
    expect(dom).toMatch(/class="mark-rect role-mark[^"]*"/);
  });

  it('a page whose library did not load says so on every chart', async () => {
    const r = await writeRunReport(path.join(root, 'report-run'), { outDir: path.join(root, 'broken') });
    const html = fs.readFileSync(r.html, 'utf8');
    fs.writeFileSync(r.html, html.replace(/<script>\/\*! vega[\s\S]*?<\/script>/, ''));
    const dom = dumpDom(r.html);
    expect(dom).toContain('data-report="error"');
    expect(figures(dom).every((f) => f.status === 'error' && !f.svg)).toBe(true);
    expect(dom).toContain('This chart could not be drawn: the Vega library did not load');
  });
});
