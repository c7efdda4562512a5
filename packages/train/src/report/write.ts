// `writeRunReport`: metrics.jsonl → `<run-dir>/report/index.html` and one PNG per chart. Every file
// is written under `<name>.tmp-<pid>` and renamed into place once all are complete, so a reader
// never sees half a report; a failure or an abort removes the temporaries.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { buildCharts } from './charts.js';
import { ReportError } from './errors.js';
import { renderPage } from './html.js';
import { readRunMetrics } from './metrics.js';
import { compileChart, renderPng, vegaBrowserBuild } from './render.js';

/** The folder a report goes to when no `outDir` is given, inside the run folder. */
export const REPORT_DIR = 'report';
export const REPORT_PAGE = 'index.html';

/** Options of {@link writeRunReport}. */
export interface RunReportOptions {
  /** Where to write; default `<runDir>/report`. Created if missing; files of the same names are replaced. */
  outDir?: string;
  /** Stops between charts; the temporaries are removed and the signal's reason is thrown. */
  signal?: AbortSignal;
}

/** What {@link writeRunReport} wrote. */
export interface RunReport {
  /** The page, `<outDir>/index.html`. */
  html: string;
  /** One PNG per chart, in report order. */
  pngs: string[];
  /** Lines of metrics.jsonl that were skipped (an incomplete last line, unknown kinds). */
  warnings: string[];
  /** Training and validation lines read. */
  trainLines: number;
  validLines: number;
}

/** Writes the run report of `runDir` (see metrics.ts for the run folder) and returns its files. */
export async function writeRunReport(runDir: string, opts: RunReportOptions = {}): Promise<RunReport> {
  const metrics = readRunMetrics(runDir);
  const outDir = opts.outDir ?? path.join(runDir, REPORT_DIR);
  if (fs.existsSync(outDir) && !fs.statSync(outDir).isDirectory()) {
    throw new ReportError('BAD_OUTPUT', `${outDir} is a file; the report needs a folder there`);
  }
  const created = fs.mkdirSync(outDir, { recursive: true });
  const written: { tmp: string; file: string }[] = [];
  let done = false;
  const write = (name: string, data: string | Buffer) => {
    const file = path.join(outDir, name);
    const tmp = `${file}.tmp-${process.pid}`;
    written.push({ tmp, file });
    fs.writeFileSync(tmp, data);
    return file;
  };
  try {
    const charts = [];
    const pngs: string[] = [];
    for (const chart of buildCharts(metrics)) {
      opts.signal?.throwIfAborted();
      const vega = await compileChart(chart.spec);
      const png = `${chart.id}.png`;
      pngs.push(write(png, await renderPng(vega)));
      charts.push({ id: chart.id, title: chart.title, vega, png });
    }
    opts.signal?.throwIfAborted();
    const page = renderPage({ metrics, charts, vega: vegaBrowserBuild(), generated: new Date() });
    const html = write(REPORT_PAGE, page);
    // the page last, so that it never links to a PNG that is not there yet
    for (const w of written) fs.renameSync(w.tmp, w.file);
    written.length = 0;
    done = true;
    return {
      html,
      pngs,
      warnings: metrics.warnings,
      trainLines: metrics.train.length,
      validLines: metrics.valid.length,
    };
  } finally {
    for (const w of written) fs.rmSync(w.tmp, { force: true });
    if (!done && created !== undefined) removeEmptyDirs(outDir, created);
  }
}

/** rmdir `dir` and its parents up to and including `top` while they are empty. */
function removeEmptyDirs(dir: string, top: string): void {
  for (let d = path.resolve(dir); ; d = path.dirname(d)) {
    try {
      fs.rmdirSync(d);
    } catch {
      return;
    }
    if (d === path.resolve(top)) return;
  }
}
