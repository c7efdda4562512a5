// A process group of one: every collective is the identity (or a copy), completed at once. Models
// built on the tensor-parallel layers use it when they run on a single process without
// initProcessGroup, so the same code serves one process and many.
import { noGrad, type Tensor } from '@megapatch/tensor';
import { DistributedError } from './errors.js';
import type { ProcessGroup, Work } from './process-group.js';

const DONE: Work = {
  wait: () => Promise.resolve(),
  waitSync: () => {},
  isCompleted: () => true,
};

function copyInto(dst: Tensor, src: Tensor): Work {
  if (dst.storage !== src.storage || dst.offset !== src.offset) noGrad(() => dst.copy_(src));
  return DONE;
}

/** A group holding only this process: size 1, rank 0, collectives complete immediately. */
export class SingleProcessGroup implements ProcessGroup {
  readonly backend = 'none';
  readonly rank = 0;
  readonly size = 1;
  readonly ranks: readonly number[] = [0];
  readonly timeoutMs = 0;

  constructor(readonly name = 'single') {}

  allReduce(): Work {
    return DONE;
  }
  allGather(outputs: readonly Tensor[], input: Tensor): Work {
    return copyInto(outputs[0], input);
  }
  allGatherIntoTensor(output: Tensor, input: Tensor): Work {
    return copyInto(output, input);
  }
  reduceScatter(output: Tensor, inputs: readonly Tensor[]): Work {
    return copyInto(output, inputs[0]);
  }
  reduceScatterTensor(output: Tensor, input: Tensor): Work {
    return copyInto(output, input);
  }
  broadcast(): Work {
    return DONE;
  }
  send(): Work {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `group ${this.name} has one process: there is no peer to send to`,
    );
  }
  recv(): Work {
    throw new DistributedError(
      'INVALID_ARGUMENT',
      `group ${this.name} has one process: there is no peer to receive from`,
    );
  }
  allToAll(output: Tensor, input: Tensor): Work {
    return copyInto(output, input);
  }
  barrier(): Work {
    return DONE;
  }
  destroy(): void {}
}
