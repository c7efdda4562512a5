// The report's charts as Vega-Lite specs: one per curve family (loss, lr, grad norm, throughput,
// iteration time, memory, MoE losses, expert load and its imbalance), built from the metrics alone.
// The same spec draws the chart in the page and in its PNG, so the two never disagree.
import type { TopLevelSpec } from 'vega-lite';
import type { RunMetrics, TrainMetricsLine } from './metrics.js';

/** One chart of the report. */
export interface ReportChart {
  /** File-name-safe id: the PNG is `<id>.png`, the page's container `chart-<id>`. */
  id: string;
  title: string;
  spec: TopLevelSpec;
}

/** A point of a line chart, in long format. */
interface Point {
  iteration: number;
  series: string;
  value: number;
}

/** Points per series above which a curve is averaged over buckets of consecutive iterations. */
export const MAX_POINTS = 2000;

const WIDTH = 680;
const HEIGHT = 240;
/** Fonts in order of preference: the same names in the page and in the PNG rasteriser. */
export const FONT = 'DejaVu Sans, Liberation Sans, Helvetica, Arial, sans-serif';
const GIB = 2 ** 30;

const CONFIG = {
  font: FONT,
  background: 'white',
  view: { stroke: '#ddd' },
  axis: { labelFontSize: 11, titleFontSize: 12, gridColor: '#eee' },
  title: { fontSize: 14, anchor: 'start', subtitleColor: '#666' },
  legend: { orient: 'top', labelFontSize: 11, title: null },
} as const;

/** At most `max` points: consecutive points averaged in equal buckets (iterations and values). */
export function thin(points: Point[], max = MAX_POINTS): Point[] {
  if (points.length <= max) return points;
  const size = Math.ceil(points.length / max);
  const out: Point[] = [];
  for (let i = 0; i < points.length; i += size) {
    const bucket = points.slice(i, i + size);
    const mean = (f: (p: Point) => number) => bucket.reduce((s, p) => s + f(p), 0) / bucket.length;
    out.push({ iteration: mean((p) => p.iteration), series: points[i].series, value: mean((p) => p.value) });
  }
  return out;
}

/** The finite values of `pick` over `records` as one series (nulls and non-finite values left out). */
function series<T extends { iteration: number }>(
  records: readonly T[],
  name: string,
  pick: (r: T) => number | null | undefined,
): Point[] {
  const points: Point[] = [];
  for (const r of records) {
    const value = pick(r);
    if (typeof value === 'number' && Number.isFinite(value))
      points.push({ iteration: r.iteration, series: name, value });
  }
  return thin(points);
}

/**
 * A line chart of one or more series against the iteration; `markers` names the series drawn with
 * a dot at every point (sparse ones such as validation). Drag to pan and scroll to zoom in the page.
 */
function lineChart(opts: {
  id: string;
  title: string;
  subtitle?: string;
  yTitle: string;
  series: Point[][];
  markers?: readonly string[];
  yFormat?: string;
  /** Start the y axis at zero (amounts such as memory) instead of fitting it to the data. */
  zero?: boolean;
}): ReportChart | null {
  const present = opts.series.filter((s) => s.length > 0);
  if (present.length === 0) return null;
  const names = present.map((s) => s[0].series);
  const markers = (opts.markers ?? []).filter((m) => names.includes(m));
  const points = present.flat();
  const x = { field: 'iteration', type: 'quantitative', title: 'iteration' } as const;
  const y = {
    field: 'value',
    type: 'quantitative',
    title: opts.yTitle,
    scale: { zero: opts.zero === true },
    axis: opts.yFormat ? { format: opts.yFormat } : {},
  } as const;
  // one series is named by the axis; a legend would only repeat it
  const color = {
    field: 'series',
    type: 'nominal',
    scale: { domain: names },
    ...(names.length === 1 ? { legend: null } : {}),
  } as const;
  const isMarked = markers.map((m) => `datum.series === ${JSON.stringify(m)}`).join(' || ') || 'false';
  const spec: TopLevelSpec = {
    title: opts.subtitle ? { text: opts.title, subtitle: opts.subtitle } : opts.title,
    width: WIDTH,
    height: HEIGHT,
    config: CONFIG,
    data: { values: points },
    encoding: { x, y, color },
    layer: [
      {
        mark: { type: 'line', strokeWidth: 1.5, clip: true },
        params: [{ name: 'zoom', select: 'interval', bind: 'scales' }],
      },
      {
        // Dots on the marked series; invisible elsewhere but still there for the hover tooltip.
        mark: { type: 'point', filled: true, size: 40, clip: true },
        encoding: {
          opacity: { condition: { test: isMarked, value: 1 }, value: 0 },
          tooltip: [
            { field: 'series', type: 'nominal' },
            { field: 'iteration', type: 'quantitative', format: ',.0f' },
            { field: 'value', type: 'quantitative', title: opts.yTitle, format: opts.yFormat ?? '.4~g' },
          ],
        },
      },
    ],
  };
  return { id: opts.id, title: opts.title, spec };
}

/** Tokens routed to each expert, by layer, summed over `records`. */
function expertTokens(records: readonly TrainMetricsLine[]): Map<string, number[]> {
  const sums = new Map<string, number[]>();
  for (const r of records) {
    for (const [layer, load] of Object.entries(r.moe?.expertLoad ?? {})) {
      const sum = sums.get(layer) ?? [];
      for (let e = 0; e < load.length; e++) sum[e] = (sum[e] ?? 0) + load[e];
      sums.set(layer, sum);
    }
  }
  return sums;
}

/** Layer names in numeric order when they are numbers, else as written. */
function sortLayers(layers: Iterable<string>): string[] {
  return [...layers].sort((a, b) => {
    const [x, y] = [Number(a), Number(b)];
    return Number.isFinite(x) && Number.isFinite(y) ? x - y : a.localeCompare(b);
  });
}

/** Max over mean of a load vector (1 = perfectly balanced); null without tokens. */
function imbalance(load: readonly number[]): number | null {
  const total = load.reduce((s, n) => s + n, 0);
  if (total <= 0 || load.length === 0) return null;
  return Math.max(...load) / (total / load.length);
}

/**
 * The expert-load heatmap: layer × expert, each cell the expert's share of its layer's tokens
 * relative to a perfectly even share (1 = balanced, 2 = twice its share), summed over the last
 * tenth of the logged iterations (at least one), where the router has settled.
 */
function expertLoadChart(withLoad: readonly TrainMetricsLine[]): ReportChart | null {
  if (withLoad.length === 0) return null;
  const tail = withLoad.slice(-Math.max(1, Math.ceil(withLoad.length / 10)));
  const sums = expertTokens(tail);
  const cells: { layer: string; expert: number; load: number; tokens: number }[] = [];
  const layers = sortLayers(sums.keys());
  let experts = 0;
  for (const layer of layers) {
    const load = sums.get(layer) as number[];
    const total = load.reduce((s, n) => s + (n ?? 0), 0);
    experts = Math.max(experts, load.length);
    for (const [expert, n = 0] of load.entries()) {
      cells.push({ layer, expert, tokens: n, load: total > 0 ? (n * load.length) / total : 0 });
    }
  }
  if (cells.length === 0) return null;
  const [from, to] = [tail[0].iteration, tail[tail.length - 1].iteration];
  const span = from === to ? `iteration ${from}` : `iterations ${from}–${to}`;
  const labels = experts <= 16 && layers.length <= 32;
  const color = {
    field: 'load',
    type: 'quantitative',
    title: 'load',
    scale: { scheme: 'blueorange', domainMid: 1 },
  } as const;
  const spec: TopLevelSpec = {
    title: {
      text: 'MoE expert load',
      subtitle: `tokens per expert over an even share (1 = balanced), ${span}`,
    },
    width: WIDTH,
    height: Math.min(600, Math.max(80, 24 * layers.length)),
    config: { ...CONFIG, legend: { ...CONFIG.legend, orient: 'right' } },
    data: { values: cells },
    encoding: {
      x: { field: 'expert', type: 'ordinal', title: 'expert', axis: { labelAngle: 0 } },
      y: { field: 'layer', type: 'ordinal', title: 'layer', sort: layers },
    },
    layer: [
      {
        mark: { type: 'rect' },
        encoding: {
          color,
          tooltip: [
            { field: 'layer', type: 'ordinal' },
            { field: 'expert', type: 'ordinal' },
            { field: 'tokens', type: 'quantitative', format: ',.0f' },
            { field: 'load', type: 'quantitative', format: '.3f' },
          ],
        },
      },
      ...(labels
        ? [
            {
              mark: { type: 'text', fontSize: 10 },
              encoding: { text: { field: 'load', type: 'quantitative', format: '.2f' } },
            } as const,
          ]
        : []),
    ],
  };
  return { id: 'expert-load', title: 'MoE expert load', spec };
}

/** The charts the metrics have data for, in report order. */
export function buildCharts(m: RunMetrics): ReportChart[] {
  const t = m.train;
  const withLoad = t.filter((r) => r.moe?.expertLoad && Object.keys(r.moe.expertLoad).length > 0);
  const layers = sortLayers(new Set(withLoad.flatMap((r) => Object.keys(r.moe?.expertLoad ?? {}))));
  const thinned =
    t.length > MAX_POINTS ? `; averaged over every ${Math.ceil(t.length / MAX_POINTS)} log lines` : '';
  const rl = t.some((r) => r.rl !== undefined);
  const dpo = t.some((r) => r.dpo !== undefined);
  const charts = [
    lineChart({
      id: 'reward',
      title: 'Reward',
      subtitle: `mean, minimum and maximum of each iteration's responses; validation: held-out prompts${thinned}`,
      yTitle: 'reward',
      series: [
        series(t, 'max', (r) => r.rl?.rewardMax),
        series(t, 'mean', (r) => r.rl?.rewardMean),
        series(t, 'min', (r) => r.rl?.rewardMin),
        series(m.valid, 'validation', (r) => r.rl?.rewardMean),
      ],
      markers: ['validation'],
    }),
    lineChart({
      id: 'rl-losses',
      title: 'GRPO losses',
      subtitle:
        'policy-gradient loss, KL loss against the reference model (unweighted), approximate KL to the rollout policy',
      yTitle: 'loss',
      series: [
        series(t, 'policy gradient', (r) => r.rl?.pgLoss),
        series(t, 'KL', (r) => r.rl?.klLoss),
        series(t, 'approx KL', (r) => r.rl?.approxKl),
      ],
    }),
    lineChart({
      id: 'response-length',
      title: 'Response length',
      yTitle: 'tokens',
      series: [series(t, 'mean response length', (r) => r.rl?.responseLength)],
      zero: true,
    }),
    lineChart({
      id: 'dpo-accuracy',
      title: 'DPO accuracy',
      subtitle: "pairs whose chosen reply's implicit reward beats the rejected one's",
      yTitle: 'accuracy',
      series: [
        series(t, 'training', (r) => r.dpo?.accuracy),
        series(m.valid, 'validation', (r) => r.dpo?.accuracy),
      ],
      markers: ['validation'],
    }),
    lineChart({
      id: 'dpo-rewards',
      title: 'DPO implicit rewards',
      subtitle: 'β (log π − log π_ref) of the chosen and rejected replies, and their margin',
      yTitle: 'reward',
      series: [
        series(t, 'chosen', (r) => r.dpo?.chosenReward),
        series(t, 'rejected', (r) => r.dpo?.rejectedReward),
        series(t, 'margin', (r) => r.dpo?.margin),
      ],
    }),
    lineChart({
      id: 'loss',
      title: rl ? 'GRPO objective' : dpo ? 'DPO loss' : 'LM loss',
      subtitle: rl
        ? 'policy-gradient loss + KL coefficient × KL loss'
        : dpo
          ? `training (+ ftx × the chosen replies' NLL) and held-out pairs${thinned}`
          : `training and validation${thinned}`,
      yTitle: rl ? 'objective' : dpo ? 'loss' : 'lm loss',
      series: [series(t, 'training', (r) => r.lmLoss), series(m.valid, 'validation', (r) => r.lmLoss)],
      // a dot per evaluation while they stay apart
      markers: m.valid.length <= 200 ? ['validation'] : [],
    }),
    lineChart({
      id: 'lr',
      title: 'Learning rate',
      yTitle: 'learning rate',
      series: [series(t, 'learning rate', (r) => r.lr)],
      yFormat: '.3~e',
    }),
    lineChart({
      id: 'grad-norm',
      title: 'Gradient norm',
      subtitle: 'before clipping; skipped iterations left out',
      yTitle: 'grad norm',
      series: [series(t, 'grad norm', (r) => r.gradNorm)],
    }),
    lineChart({
      id: 'throughput',
      title: 'Throughput',
      yTitle: 'tokens/s',
      series: [series(t, 'tokens/s', (r) => r.tokensPerSecond)],
      yFormat: ',.4~s',
      zero: true,
    }),
    lineChart({
      id: 'tflops',
      title: 'Model TFLOP/s per GPU',
      yTitle: 'TFLOP/s',
      series: [series(t, 'TFLOP/s', (r) => r.tflops)],
      zero: true,
    }),
    lineChart({
      id: 'iteration-time',
      title: 'Iteration time',
      yTitle: 'ms per iteration',
      series: [series(t, 'ms per iteration', (r) => r.elapsedMs)],
      zero: true,
    }),
    lineChart({
      id: 'memory',
      title: 'Memory',
      subtitle: 'live, peak and reserved (live + the caching allocator reserve), GiB',
      yTitle: 'GiB',
      series: [
        series(t, 'reserved', (r) =>
          r.memory.cachedBytes === undefined ? undefined : (r.memory.liveBytes + r.memory.cachedBytes) / GIB,
        ),
        series(t, 'peak', (r) => r.memory.peakBytes / GIB),
        series(t, 'live', (r) => r.memory.liveBytes / GIB),
      ],
      yFormat: '.3~f',
      zero: true,
    }),
    lineChart({
      id: 'moe-losses',
      title: 'MoE losses',
      yTitle: 'loss',
      series: [
        series(t, 'load-balancing (aux)', (r) => r.moe?.auxLoss),
        series(t, 'router z', (r) => r.moe?.zLoss),
        series(t, 'MTP', (r) => r.moe?.mtpLoss),
      ],
    }),
    expertLoadChart(withLoad),
    lineChart({
      id: 'expert-imbalance',
      title: 'MoE load imbalance',
      subtitle: 'tokens of the busiest expert over the mean, per layer (1 = balanced)',
      yTitle: 'max / mean',
      series: layers.map((layer) =>
        series(withLoad, `layer ${layer}`, (r) => {
          const load = r.moe?.expertLoad?.[layer];
          return load ? imbalance(load) : null;
        }),
      ),
    }),
  ];
  return charts.filter((c): c is ReportChart => c !== null);
}
