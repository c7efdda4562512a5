// One failure per mode; the worker prints `RESULT {"code", "message", "ms"}` for the error it saw.
import { tensor, zeros } from '@megapatch/tensor';
import { destroyProcessGroup, initProcessGroup } from '../../src/distributed.js';
import type { DistributedError } from '../../src/errors.js';

const mode = process.argv[2];
const rank = Number(process.env.RANK ?? -1);
const t0 = Date.now();
function report(e: unknown): void {
  const err = e as DistributedError;
  console.log(
    `RESULT ${JSON.stringify({ rank, code: err.code ?? null, message: err.message, ms: Date.now() - t0 })}`,
  );
}

// device modes: the tensors on the emulated CUDA devices, so collectives go through its NCCL
if (mode.startsWith('device-')) {
  const { setDefaultDevice } = await import('@megapatch/tensor');
  await import('@megapatch/cuda/emulator');
  setDefaultDevice(`cudaemu:${process.env.LOCAL_RANK ?? 0}`);
}

try {
  const g = await initProcessGroup({
    timeoutMs: mode === 'throw-in-flight' ? 60_000 : 1500,
    rendezvousTimeoutMs: 2000,
  });
  const t = zeros([rank === 1 && mode === 'mismatch' ? 12 : 10]);
  if (mode === 'timeout') {
    if (rank === 1) await new Promise((r) => setTimeout(r, 4000));
    else g.allReduce(t).waitSync();
  } else if (mode === 'dead-peer') {
    if (rank === 1) process.exit(7);
    g.allReduce(t).waitSync();
  } else if (mode === 'device-dead-peer') {
    // the communicator is joined by both ranks; then rank 1 dies before the next collective
    g.allReduce(t).waitSync();
    if (rank === 1) process.exit(7);
    g.allReduce(t).waitSync();
  } else if (mode === 'mismatch') {
    try {
      g.allReduce(t).waitSync();
    } catch (e) {
      report(e);
      // the group survives a size mismatch: a correct collective still works afterwards
      const ok = tensor([1]);
      g.allReduce(ok).waitSync();
      console.log(`RESULT ${JSON.stringify({ rank, after: ok.item() })}`);
      await destroyProcessGroup();
      process.exit(0);
    }
  } else if (mode === 'a2a-mismatch') {
    const out = zeros([rank === 0 ? 3 : 2]);
    g.allToAll(out, zeros([2]), rank === 0 ? [2, 1] : [1, 1], [1, 1]).waitSync();
  } else if (mode === 'recv-mismatch') {
    if (rank === 0)
      g.send(zeros([5]), 1)
        .wait()
        .catch(() => {});
    else g.recv(zeros([4]), 0).waitSync();
  } else if (mode === 'ok') {
    g.barrier().waitSync();
  } else if (mode === 'no-destroy') {
    // leaves without destroyProcessGroup(): the process must still exit cleanly
    g.allReduce(tensor([1])).waitSync();
    console.log(`RESULT ${JSON.stringify({ rank, left: true })}`);
    process.exit(0);
  } else if (mode === 'throw-in-flight') {
    // rank 0 fails while a collective waits for rank 1: it must exit at once, not after the timeout
    if (rank === 1) {
      await new Promise((r) => setTimeout(r, 8000));
      process.exit(0);
    }
    g.allReduce(tensor([1]));
    await new Promise((r) => setTimeout(r, 200));
    throw new Error('rank 0 fails while a collective is in flight');
  } else if (mode === 'sum') {
    // started by srun or mpirun: the rank comes from their variables, not RANK
    const t = tensor([g.rank]);
    g.allReduce(t).waitSync();
    console.log(`RESULT ${JSON.stringify({ rank: g.rank, size: g.size, sum: t.item() })}`);
  }
  console.log(`RESULT ${JSON.stringify({ rank, code: null })}`);
  await destroyProcessGroup();
} catch (e) {
  report(e);
  process.exit(3);
}
