// What the CUDA build and the machine offer, before the long checks of gpu/run.sh: cudaInfo()
// (build, toolkit, runtime, driver, NCCL, GPUs), gemmEngine() (cuBLASLt and its version), and a
// few ops on the device against the CPU. Prints the info as JSON, then one line
// `INFO OK|FAIL: <summary>`; exits 1 when the device cannot be used as a cuda:N device should be.
// On cudaemu:N it checks the emulator's registration and ops instead (cudaInfo() is only shown).
// usage (repository root; needs packages/tensor/dist): tsx packages/cuda/gpu/info-check.mts [cuda:0 | cudaemu:0]
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const root = process.env.MEGAPATCH_ROOT ?? process.cwd();
const device = process.argv[2] ?? 'cuda:0';
const emu = device.startsWith('cudaemu');
const url = (p: string) => pathToFileURL(resolve(root, p)).href;
const problems: string[] = [];

const { cudaInfo } = await import(url('packages/cuda/src/info.ts'));
const info = cudaInfo();
console.log(JSON.stringify(info, null, 2));
const gpu = info.devices[0];
let summary = emu
  ? `emulator; cudaInfo: ${info.reason}`
  : gpu
    ? `${gpu.name} sm_${gpu.computeCapability.replace('.', '')} ${(gpu.totalMemory / 2 ** 30).toFixed(0)} GiB ` +
      `${gpu.multiProcessors} SMs; toolkit ${info.toolkit} runtime ${info.runtime} driver ${info.driver} nccl ${info.nccl}`
    : `cudaInfo: ${info.reason}`;
if (!emu) {
  if (!info.available) problems.push(`not available: ${info.reason}`);
  else if (gpu.computeCapability !== '9.0')
    problems.push(`compute capability ${gpu.computeCapability}, not 9.0 (Hopper)`);
}

let C: any = null;
try {
  C = await import(url(emu ? 'packages/cuda/src/emulator.ts' : 'packages/cuda/src/index.ts'));
} catch (e: any) {
  problems.push(`import: ${e?.message ?? e}`);
}
if (C && !emu) {
  const engine = C.gemmEngine();
  summary += `; gemmEngine() = ${engine}`;
  if (!/^cuBLASLt \d+\.\d+\.\d+$/.test(engine)) problems.push(`gemmEngine() = ${engine}, not cuBLASLt`);
}
if (C) {
  // a few ops on the device against the CPU: a copy, an elementwise op, a reduction, a matmul
  const T: any = await import(url('packages/tensor/dist/index.js'));
  const a = T.randn([67, 129]);
  const b = T.randn([129, 33]);
  const want = a.exp().sum().item() + a.matmul(b).abs().sum().item();
  const da = a.to(device),
    db = b.to(device);
  const got = da.exp().sum().item() + da.matmul(db).abs().sum().item();
  const rel = Math.abs(got - want) / Math.abs(want);
  const ops = `ops on ${device} vs cpu: rel. error ${rel.toExponential(1)}`;
  summary = emu ? `${ops}; ${summary}` : `${summary}; ${ops}`;
  if (!(rel < 1e-4)) problems.push(`ops on ${device}: ${got} against the CPU's ${want}`);
}
console.log(
  `INFO ${problems.length ? 'FAIL' : 'OK'}: ${summary}${problems.length ? ` | ${problems.join('; ')}` : ''}`,
);
process.exit(problems.length ? 1 : 0);
