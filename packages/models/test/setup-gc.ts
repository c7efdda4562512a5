// Before the next test starts, frees what a test dropped without dispose(): otherwise the garbage
// collector may free it in the middle of a later test, whose flat-memory check then fails. The
// package is imported when the hook first runs, so a test file still loads it first (after setting
// the environment variables it reads at load).
import { collectGarbage } from '@megapatch/test-support';
import { afterEach } from 'vitest';

afterEach(async () => {
  const { memoryStats } = await import('@megapatch/tensor');
  if (memoryStats('cpu').liveBytes > 0) await collectGarbage();
});
