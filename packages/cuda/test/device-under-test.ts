// The device a test file runs on: the emulator's cudaemu:0, or with MEGAPATCH_TEST_DEVICE=cuda:N a
// GPU (gpu/run.sh's steps): the addon that serves it, why it cannot be used (empty when it can), and
// the import that registers its device type.
import { type BackendAddon, loadAddon, loadEmulatorAddon } from '../src/native.js';

export interface DeviceUnderTest {
  /** cudaemu:0, or the GPU MEGAPATCH_TEST_DEVICE names (cuda:N). */
  device: string;
  onGpu: boolean;
  /** The addon (null when it did not load). */
  addon: BackendAddon | null;
  /** Why the addon did not load (empty when it did). */
  skip: string;
  /** Registers the device type (@megapatch/cuda, or its emulator). */
  register(): Promise<unknown>;
}

export function deviceUnderTest(): DeviceUnderTest {
  const env = process.env.MEGAPATCH_TEST_DEVICE;
  const device = env?.startsWith('cuda:') ? env : 'cudaemu:0';
  const onGpu = device.startsWith('cuda:');
  const built = onGpu ? loadAddon() : loadEmulatorAddon();
  return {
    device,
    onGpu,
    addon: 'error' in built ? null : (built.addon as BackendAddon),
    skip: 'error' in built ? built.error : '',
    register: () => import(onGpu ? '../src/index.js' : '../src/emulator.js'),
  };
}
