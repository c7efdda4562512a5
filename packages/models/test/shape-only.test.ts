// The memory estimate counts, from shapes alone, exactly the parameters a rank's GPTModel holds:
// built here for rank 0 and 1 of TP = 2 and EP = 2 layouts (construction needs no collectives, so
// fake groups of two stand in for the real ones) and compared with theoreticalMemory.
import { type ProcessGroup, SingleProcessGroup } from '@megapatch/parallel';
import { describe, expect, it } from 'vitest';
import { GPTModel, loadModel, theoreticalMemory } from '../src/index.js';
import { FIXTURE_IDS, fixtureCheckpoint } from './helpers/fixtures.js';

/** A group of `size` for construction only: it knows its rank, and refuses any collective. */
function fakeGroup(size: number, rank: number): ProcessGroup {
  const g = new SingleProcessGroup('fake');
  return Object.assign(Object.create(Object.getPrototypeOf(g)), g, {
    size,
    rank,
    ranks: Array.from({ length: size }, (_, i) => i),
  }) as ProcessGroup;
}

describe.each(FIXTURE_IDS)('%s', (id) => {
  const { model, config } = loadModel(fixtureCheckpoint(id));
  model.dispose();
  const isMoe = config.moe !== null;

  it.each([{ tp: 1, ep: 1 }, { tp: 2, ep: 1 }, ...(isMoe ? [{ tp: 1, ep: 2 }] : [])])(
    'parameters per rank at tp=$tp ep=$ep',
    ({ tp, ep }) => {
      // Megatron needs sequence parallelism for MoE with tp > 1; it changes no parameter count
      const est = theoreticalMemory(config, {
        tp,
        ep,
        etp: tp,
        dp: ep,
        seqLength: 16,
        sequenceParallel: isMoe && tp > 1,
      });
      expect(est.stages.length).toBe(1);
      for (let rank = 0; rank < Math.max(tp, ep); rank++) {
        const tpGroup = tp > 1 ? fakeGroup(tp, rank) : new SingleProcessGroup();
        const epGroup = ep > 1 ? fakeGroup(ep, rank) : new SingleProcessGroup();
        const m = new GPTModel(config, { tpGroup, epGroup, etpGroup: tpGroup, performInitialization: false });
        expect(m.numParameters(), `rank ${rank}`).toBe(est.stages[0].parameters.total);
        m.dispose();
      }
    },
  );
});
