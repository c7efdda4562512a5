// pnpm test:heavy: pipeline parallelism over more layouts, microbatches and steps than the default
// tests: 2, 3 and 4 real processes, 1F1B and interleaved with 2 or 3 chunks and group sizes other
// than pp, a last partial microbatch group, tied and untied embeddings, each also under seeded
// random delays; same losses and weights as one process with gradient accumulation.
import { describePipelineSuite, type PipelineCase } from '../helpers/pipeline.js';

const jittered = (cases: PipelineCase[], seed: number): PipelineCase[] =>
  cases.flatMap((c, i) => [c, { ...c, name: `${c.name} jitter`, jitter: seed + i }]);

describePipelineSuite(
  2,
  jittered(
    [
      { name: '1f1b m8', vpp: null, numMicrobatches: 8, layers: 6, steps: 6, tied: true },
      {
        name: 'interleaved vpp3 m6 g3',
        vpp: 3,
        numMicrobatches: 6,
        groupSize: 3,
        layers: 6,
        steps: 5,
        tied: true,
      },
      {
        name: 'interleaved vpp2 m7 g4',
        vpp: 2,
        numMicrobatches: 7,
        groupSize: 4,
        layers: 8,
        steps: 5,
        tied: false,
      },
    ],
    10,
  ),
  240_000,
);

describePipelineSuite(
  3,
  jittered(
    [
      { name: '1f1b m5', vpp: null, numMicrobatches: 5, layers: 6, steps: 5, tied: true },
      {
        name: '1f1b m2 (fewer microbatches than stages)',
        vpp: null,
        numMicrobatches: 2,
        layers: 3,
        steps: 4,
        tied: true,
      },
      { name: 'interleaved vpp2 m6', vpp: 2, numMicrobatches: 6, layers: 6, steps: 5, tied: true },
      {
        name: 'interleaved vpp2 m7 g4',
        vpp: 2,
        numMicrobatches: 7,
        groupSize: 4,
        layers: 12,
        steps: 4,
        tied: true,
      },
    ],
    20,
  ),
  240_000,
);

describePipelineSuite(
  4,
  jittered(
    [
      { name: '1f1b m12', vpp: null, numMicrobatches: 12, layers: 8, steps: 5, tied: true },
      {
        name: 'interleaved vpp2 m12 g6',
        vpp: 2,
        numMicrobatches: 12,
        groupSize: 6,
        layers: 8,
        steps: 4,
        tied: true,
      },
      { name: 'interleaved vpp3 m8', vpp: 3, numMicrobatches: 8, layers: 12, steps: 3, tied: false },
    ],
    30,
  ),
  300_000,
);
