// Pipeline parallelism on 2 and 4 real processes (Gloo, float32): a residual Linear+SiLU stack
// with tied (or untied) embeddings, split into 1F1B stages or interleaved virtual stages, trained
// for a few SGD steps over several microbatches, gives the losses and weights of one process
// running the same microbatches with gradient accumulation (tied embeddings summed over the
// embedding group); each rank runs exactly the steps of its schedule; memory is flat from step to
// step; and with every rank delayed at random before each send, receive and step (seeded
// jitter), the schedule still completes with bit-identical results.
import { describePipelineSuite, type PipelineCase } from './helpers/pipeline.js';

const suites: { pp: number; cases: PipelineCase[] }[] = [
  {
    pp: 2,
    cases: [
      { name: '1f1b', vpp: null, numMicrobatches: 4, layers: 4, steps: 3, tied: true },
      { name: 'interleaved', vpp: 2, numMicrobatches: 4, layers: 4, steps: 3, tied: true },
      {
        name: 'interleaved m5 g3 untied',
        vpp: 2,
        numMicrobatches: 5,
        groupSize: 3,
        layers: 4,
        steps: 2,
        tied: false,
      },
      { name: '1f1b jitter', vpp: null, numMicrobatches: 4, layers: 4, steps: 3, tied: true, jitter: 1 },
      { name: 'interleaved jitter', vpp: 2, numMicrobatches: 4, layers: 4, steps: 3, tied: true, jitter: 2 },
    ],
  },
  {
    pp: 4,
    cases: [
      { name: '1f1b', vpp: null, numMicrobatches: 6, layers: 8, steps: 3, tied: true },
      { name: 'interleaved', vpp: 2, numMicrobatches: 4, layers: 8, steps: 3, tied: true },
      { name: '1f1b jitter', vpp: null, numMicrobatches: 6, layers: 8, steps: 3, tied: true, jitter: 3 },
      { name: 'interleaved jitter', vpp: 2, numMicrobatches: 4, layers: 8, steps: 3, tied: true, jitter: 4 },
    ],
  },
];

for (const { pp, cases } of suites) describePipelineSuite(pp, cases);
