// Vega-Lite specs into what the report writes: the Vega spec the page draws, and a PNG drawn from
// the same spec in Node (Vega's SVG renderer, pure JS, rasterised by resvg). The plotting libraries
// load on first use, so importing @megapatch/train never pays for them.
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import type { Spec } from 'vega';
import type { TopLevelSpec } from 'vega-lite';

/** Device pixels per CSS pixel of the PNGs: sharp on high-density screens and in documents. */
export const PNG_SCALE = 2;

/** Vega-Lite compiled to Vega (done once, in Node, so that the page needs Vega only). */
export async function compileChart(spec: TopLevelSpec): Promise<Spec> {
  const { compile } = await import('vega-lite');
  const { $schema: _, ...vega } = compile(spec).spec;
  return vega;
}

/** The chart as a PNG of {@link PNG_SCALE}× its size in CSS pixels, on white. */
export async function renderPng(spec: Spec): Promise<Buffer> {
  const [vega, { Resvg }] = await Promise.all([import('vega'), import('@resvg/resvg-js')]);
  const view = new vega.View(vega.parse(spec), { renderer: 'none' });
  try {
    const svg = await view.toSVG();
    const resvg = new Resvg(svg, {
      fitTo: { mode: 'zoom', value: PNG_SCALE },
      background: 'white',
      // the first installed family of the chart's font list (FONT); without any, text is left out
      font: { loadSystemFonts: true },
    });
    return resvg.render().asPng();
  } finally {
    view.finalize();
  }
}

/** Vega's browser build (the page inlines it) and its version. */
export function vegaBrowserBuild(): { source: string; version: string } {
  // vega's package exports only its module entry; the browser build sits beside it.
  const entry = createRequire(import.meta.url).resolve('vega');
  const build = path.dirname(entry);
  const version = (
    JSON.parse(fs.readFileSync(path.join(build, '..', 'package.json'), 'utf8')) as { version: string }
  ).version;
  return { source: fs.readFileSync(path.join(build, 'vega.min.js'), 'utf8'), version };
}
