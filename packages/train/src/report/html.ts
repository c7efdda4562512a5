// The report page: one self-contained HTML file (Vega's browser build, the chart specs and their
// data inline; nothing fetched) with the run's key facts on top and a chart per curve family. The
// page marks its state for tests and tools: `<body data-report="ok|error">` once every chart has
// been drawn (or failed), and `data-status="ok|error"` on each chart's figure.
import * as path from 'node:path';
import type { Spec } from 'vega';
import type { RunMetrics } from './metrics.js';

/** A chart as the page draws it. */
export interface PageChart {
  id: string;
  title: string;
  /** The compiled Vega spec, data included. */
  vega: Spec;
  /** The PNG's file name beside the page. */
  png: string;
}

/** What the page shows and inlines. */
export interface PageInput {
  metrics: RunMetrics;
  charts: readonly PageChart[];
  vega: { source: string; version: string };
  generated: Date;
}

const escapeHtml = (s: string) =>
  s.replace(
    /[&<>"']/g,
    (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c] as string,
  );

/** JSON that is safe inside a `<script>` element. */
const scriptJson = (v: unknown) =>
  JSON.stringify(v)
    .replace(/</g, '\\u003c')
    .replace(/\u2028/g, '\\u2028')
    .replace(/\u2029/g, '\\u2029');

const fmt = (x: number, digits = 4) =>
  Number.isInteger(x) ? x.toLocaleString('en-US') : x.toPrecision(digits);

function median(xs: number[]): number | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/** The run at a glance: iterations, losses, throughput, memory, time. */
export function runFacts(m: RunMetrics): [string, string][] {
  const facts: [string, string][] = [];
  const t = m.train;
  const last = t[t.length - 1];
  if (last) {
    facts.push([
      'iterations',
      `${fmt(t[0].iteration)} – ${fmt(last.iteration)} (${fmt(t.length)} log lines)`,
    ]);
    facts.push(['consumed samples', fmt(last.consumedSamples)]);
    if (last.lmLoss !== null)
      facts.push(['last training loss', `${fmt(last.lmLoss)} (iteration ${fmt(last.iteration)})`]);
  }
  const valid = m.valid.filter((v) => v.lmLoss !== null);
  if (valid.length > 0) {
    const best = valid.reduce((a, b) => ((b.lmLoss as number) < (a.lmLoss as number) ? b : a));
    const lastValid = valid[valid.length - 1];
    const ppl = (v: typeof best) => (v.perplexity === null ? '' : `, perplexity ${fmt(v.perplexity)}`);
    facts.push([
      'last validation loss',
      `${fmt(lastValid.lmLoss as number)}${ppl(lastValid)} (iteration ${fmt(lastValid.iteration)})`,
    ]);
    if (best !== lastValid)
      facts.push([
        'best validation loss',
        `${fmt(best.lmLoss as number)}${ppl(best)} (iteration ${fmt(best.iteration)})`,
      ]);
  }
  const test = m.test.filter((v) => v.lmLoss !== null).at(-1);
  if (test) {
    const ppl = test.perplexity === null ? '' : `, perplexity ${fmt(test.perplexity)}`;
    facts.push(['test loss', `${fmt(test.lmLoss as number)}${ppl} (iteration ${fmt(test.iteration)})`]);
  }
  const tps = median(t.map((r) => r.tokensPerSecond));
  if (tps !== null) facts.push(['median throughput', `${fmt(Math.round(tps))} tokens/s`]);
  const tflops = median(t.flatMap((r) => (r.tflops === null ? [] : [r.tflops])));
  if (tflops !== null) facts.push(['median TFLOP/s per GPU', fmt(tflops, 3)]);
  const ms = median(t.map((r) => r.elapsedMs));
  if (ms !== null) facts.push(['median iteration time', `${fmt(ms, 4)} ms`]);
  if (t.length > 0) {
    const peak = Math.max(...t.map((r) => r.memory.peakBytes));
    facts.push(['peak memory', `${(peak / 2 ** 30).toFixed(2)} GiB`]);
    const skipped = Math.max(...t.map((r) => r.skippedIterations));
    if (skipped > 0) facts.push(['skipped iterations', fmt(skipped)]);
  }
  const times = [...t, ...m.valid].map((r) => Date.parse(r.time)).filter(Number.isFinite);
  if (times.length > 0) {
    const [a, b] = [Math.min(...times), Math.max(...times)];
    facts.push([
      'logged',
      `${new Date(a).toISOString()} – ${new Date(b).toISOString()} (${duration(b - a)})`,
    ]);
  }
  return facts;
}

function duration(ms: number): string {
  const s = Math.round(ms / 1000);
  const [h, m] = [Math.floor(s / 3600), Math.floor((s % 3600) / 60)];
  return h > 0 ? `${h} h ${m} min` : m > 0 ? `${m} min ${s % 60} s` : `${s} s`;
}

/**
 * Key facts looked up in a free-form config: a label and the keys that give it, each a key name or
 * the end of a dotted path (`model.load`), matched in any case and with or without `_` or `-`.
 */
const CONFIG_KEYS: [label: string, keys: string[]][] = [
  ['model', ['model.load', 'model.config', 'architectures', 'architecture', 'modeltype']],
  ['layers', ['numlayers', 'numhiddenlayers']],
  ['hidden size', ['hiddensize']],
  ['attention heads', ['numattentionheads']],
  ['experts', ['nummoeexperts', 'numexperts', 'numroutedexperts']],
  ['sequence length', ['seqlength', 'seqlen', 'maxseqlength']],
  ['micro batch size', ['microbatchsize']],
  ['global batch size', ['globalbatchsize']],
  ['training iterations', ['trainiters', 'trainiterations']],
  ['learning rate', ['lr', 'learningrate']],
  ['lr schedule', ['lrdecaystyle']],
  ['precision', ['dtype', 'precision', 'paramsdtype']],
];

/** Parallel sizes, shown together as `tp=2 pp=1 ...`. */
const LAYOUT_KEYS: [label: string, keys: string[]][] = [
  ['tp', ['tp', 'tensormodelparallelsize']],
  ['pp', ['pp', 'pipelinemodelparallelsize']],
  ['cp', ['cp', 'contextparallelsize']],
  ['ep', ['ep', 'expertmodelparallelsize']],
  ['etp', ['etp', 'experttensorparallelsize']],
  ['dp', ['dp', 'dataparallelsize']],
];

const normaliseKey = (k: string) => k.toLowerCase().replace(/[-_]/g, '');

/** Scalar leaves of a JSON value, depth first, with their normalised dotted path. */
function leaves(v: unknown, at = '', out: [string, string][] = [], depth = 0): [string, string][] {
  if (depth > 8) return out;
  if (Array.isArray(v)) {
    // `"architectures": ["Qwen3ForCausalLM"]`
    if (v.length > 0 && v.every((x) => typeof x === 'string')) out.push([at, v.join(', ')]);
    else for (const x of v) leaves(x, at, out, depth + 1);
  } else if (typeof v === 'object' && v !== null) {
    for (const [k, x] of Object.entries(v))
      leaves(x, at ? `${at}.${normaliseKey(k)}` : normaliseKey(k), out, depth + 1);
  } else if (['string', 'number', 'boolean'].includes(typeof v) && at !== '') out.push([at, String(v)]);
  return out;
}

/** The key facts of a run config (the first match of each), with the layout on one line. */
export function configFacts(config: unknown): [string, string][] {
  const all = leaves(config);
  const matches = (p: string, key: string) => p === key || p.endsWith(`.${key}`);
  const find = (keys: string[]) => {
    for (const key of keys) {
      const hit = all.find(([p]) => matches(p, key));
      if (hit) return hit[1];
    }
    return undefined;
  };
  const facts: [string, string][] = [];
  for (const [label, keys] of CONFIG_KEYS) {
    const v = find(keys);
    if (v !== undefined) facts.push([label, v]);
  }
  const layout = LAYOUT_KEYS.flatMap(([label, keys]) => {
    const v = find(keys);
    return v === undefined ? [] : [`${label}=${v}`];
  });
  if (layout.length > 0) facts.push(['layout', layout.join(' ')]);
  return facts;
}

const table = (rows: [string, string][]) =>
  `<table>${rows.map(([k, v]) => `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(v)}</td></tr>`).join('')}</table>`;

/** The longest config.json shown in the page, in characters. */
const MAX_CONFIG_CHARS = 200_000;

const STYLE = `
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1640px; padding: 16px 24px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 0 0 8px; }
.path { color: #666; font-size: 13px; margin: 0 0 16px; word-break: break-all; }
.facts { display: flex; flex-wrap: wrap; gap: 16px 48px; margin-bottom: 16px; }
table { border-collapse: collapse; font-size: 13px; }
th { text-align: left; font-weight: 600; padding: 2px 16px 2px 0; color: #444; vertical-align: top; }
td { padding: 2px 0; font-variant-numeric: tabular-nums; }
details { font-size: 13px; margin-top: 8px; } pre { background: #f6f6f6; padding: 8px; overflow: auto; max-height: 480px; }
.warnings { background: #fff6e0; border: 1px solid #f0d48a; padding: 8px 12px; font-size: 13px; margin-bottom: 16px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(780px, 1fr)); gap: 16px; }
figure.chart { margin: 0; padding: 8px; border: 1px solid #e4e4e4; border-radius: 4px; overflow-x: auto; }
figure.chart figcaption { font-size: 12px; text-align: right; }
figure.chart figcaption a { color: #666; }
.chart-error .plot { color: #b00020; font-size: 13px; padding: 16px; }
`;

/** Draws every chart with Vega's SVG renderer and marks the page's and each chart's state. */
const RENDER = `
(function () {
  var specs = JSON.parse(document.getElementById('report-specs').textContent);
  var failed = 0;
  function fail(figure, e) {
    failed++;
    figure.setAttribute('data-status', 'error');
    figure.classList.add('chart-error');
    figure.querySelector('.plot').textContent = 'This chart could not be drawn: ' + (e && e.message ? e.message : e);
  }
  var drawn = specs.map(function (c) {
    var figure = document.getElementById('chart-' + c.id);
    try {
      if (typeof vega === 'undefined') throw new Error('the Vega library did not load');
      var view = new vega.View(vega.parse(c.spec), {
        renderer: 'svg',
        container: figure.querySelector('.plot'),
        hover: true,
      });
      return view.runAsync().then(
        function () { figure.setAttribute('data-status', 'ok'); },
        function (e) { fail(figure, e); }
      );
    } catch (e) {
      fail(figure, e);
      return Promise.resolve();
    }
  });
  Promise.all(drawn).then(function () {
    document.body.setAttribute('data-report', failed ? 'error' : 'ok');
  });
})();
`;

/** The report page as HTML text. */
export function renderPage(p: PageInput): string {
  const m = p.metrics;
  const name = path.basename(path.resolve(m.runDir));
  const config = m.config === null ? [] : configFacts(m.config);
  const configJson = m.config === null ? '' : JSON.stringify(m.config, null, 2);
  const shownConfig =
    configJson.length > MAX_CONFIG_CHARS
      ? `${configJson.slice(0, MAX_CONFIG_CHARS)}\n… (${configJson.length - MAX_CONFIG_CHARS} more characters in config.json)`
      : configJson;
  const figures = p.charts
    .map(
      (c) =>
        `<figure class="chart" id="chart-${escapeHtml(c.id)}" data-chart="${escapeHtml(c.id)}" data-status="pending">` +
        `<div class="plot" aria-label="${escapeHtml(c.title)}"></div>` +
        `<figcaption><a href="${escapeHtml(c.png)}">${escapeHtml(c.png)}</a></figcaption></figure>`,
    )
    .join('\n');
  const specs = p.charts.map((c) => ({ id: c.id, spec: c.vega }));
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="megapatch run report">
<title>${escapeHtml(`Run report: ${name}`)}</title>
<style>${STYLE}</style>
</head>
<body data-report="rendering">
<header>
<h1>Run report: ${escapeHtml(name)}</h1>
<p class="path">${escapeHtml(path.resolve(m.runDir))} · written ${escapeHtml(p.generated.toISOString())}</p>
</header>
<section class="facts">
<div><h2>Run</h2>${table(runFacts(m))}</div>
${config.length > 0 ? `<div><h2>Config</h2>${table(config)}</div>` : ''}
</section>
${m.config === null ? '' : `<details><summary>config.json</summary><pre>${escapeHtml(shownConfig)}</pre></details>`}
${m.warnings.length > 0 ? `<section class="warnings">${m.warnings.map((w) => `<div>${escapeHtml(w)}</div>`).join('')}</section>` : ''}
<main class="charts">
${figures}
</main>
<noscript>The charts need JavaScript; the PNG images beside this page show the same curves.</noscript>
<script>/*! vega ${escapeHtml(p.vega.version)} | BSD-3-Clause | https://github.com/vega/vega */
${p.vega.source.replace(/<\/script/gi, '<\\/script')}</script>
<script type="application/json" id="report-specs">${scriptJson(specs)}</script>
<script>${RENDER}</script>
</body>
</html>
`;
}
