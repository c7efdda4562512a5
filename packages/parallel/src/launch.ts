// `@megapatch/parallel/launch`: the launcher and environment detection alone, without tensors or
// native addons, so that `megapatch launch` starts fast and works before anything is built.

export { DistributedError, type DistributedErrorCode } from './errors.js';
export {
  DEFAULT_MASTER_PORT,
  type DistributedEnvironment,
  detectEnvironment,
  type EnvironmentSource,
  expandHostlist,
  LOOPBACK_ADDR,
} from './launch/env.js';
export {
  freeLoopbackPort,
  type LaunchOptions,
  type LaunchResult,
  type LaunchSignal,
  launch,
  type WorkerExit,
} from './launch/launcher.js';
