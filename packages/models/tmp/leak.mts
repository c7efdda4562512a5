import { AdamW, fromTypedArray, memoryStats, setDefaultDevice, synchronize, tidy, noGrad } from '@megapatch/tensor';
import { loadModel } from '../src/index.js';
import { fixtureCheckpoint } from '../test/helpers/fixtures.js';
await import('@megapatch/cuda/emulator');
const dev = process.argv[2] ?? 'cudaemu:0';
const id = process.argv[3] ?? 'mixtral';
const mode = process.argv[4] ?? 'full';
setDefaultDevice(dev);
const { model } = loadModel(fixtureCheckpoint(id), { moeAuxLossCoeff: Number(process.env.AUX ?? 0) } as any);
const ids = fromTypedArray(BigInt64Array.from([1, 5, 9, 33, 100, 7, 8, 9, 4, 77, 12, 3], BigInt), [2, 6]).to(dev);
const labels = fromTypedArray(BigInt64Array.from([5, 9, 33, 100, 7, 8, 9, 4, 77, 12, 3, 2], BigInt), [2, 6]).to(dev);
const opt = new AdamW(model.parameters(), { lr: 1e-3 });
for (let i = 0; i < 6; i++) {
  tidy(() => {
    const out = model.forward(ids, mode === 'nolabels' ? {} : { labels });
    if (mode === 'fwd') return;
    if (mode === 'nolabels') return;
    (out.loss as any).mean().backward();
  });
  if (mode === 'full') { opt.step(); opt.zeroGrad(); }
  if (mode === 'full') { const l = model.takeExpertLoad(); }
  synchronize();
  const s = memoryStats(dev);
  console.log(i, s.liveBytes, s.liveStorages ?? '');
}
