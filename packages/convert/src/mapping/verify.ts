// Checking a megapatch checkpoint as a whole: every piece is there with its bytes intact, and the
// metadata lists every tensor the recorded architecture needs for the recorded model config.
import { CHECKPOINT_METADATA_FILE } from '../checkpoint/metadata.js';
import type { Checkpoint } from '../checkpoint/reader.js';
import { ConvertError } from '../errors.js';
import { byteLengthOf, type SafetensorsDtype } from '../safetensors/dtype.js';
import { getArchitectureSpec } from '../specs/registry.js';
import { makeTransformerConfig } from '../transformer-config.js';
import { type MegatronTensorPlan, planConversion } from './plan.js';

/** What {@link verifyCheckpoint} checked. */
export interface CheckpointVerification {
  /** Logical tensors in metadata.json. */
  readonly tensors: number;
  /** Stored pieces. */
  readonly pieces: number;
  /** Bytes of all pieces. */
  readonly bytes: number;
  /** Pieces whose SHA-256 was checked (all of them from format version 2 on). */
  readonly checksummedPieces: number;
  /** The architecture whose tensor list was checked, or null when metadata records none. */
  readonly architectureChecked: string | null;
}

/**
 * Checks that a stored tensor has the plan's global shape (dim 0 of a vocabulary tensor may be
 * padded, to at least the real vocabulary) and returns its dtype; SHAPE_MISMATCH otherwise.
 */
export function checkStored(ckpt: Checkpoint, t: MegatronTensorPlan): SafetensorsDtype {
  const info = ckpt.info(t.name);
  const same =
    info.globalShape.length === t.globalShape.length &&
    info.globalShape.every((d, i) => d === t.globalShape[i] || (i === 0 && t.partition === 'vocab'));
  const realRows = t.rows.reduce((s, r) => s + (r.source ? r.count : 0), 0);
  if (!same || (t.partition === 'vocab' && info.globalShape[0] < realRows)) {
    throw new ConvertError(
      'SHAPE_MISMATCH',
      `tensor ${t.name} has global shape [${info.globalShape.join(',')}], the model config implies ` +
        `[${t.globalShape.join(',')}]${t.partition === 'vocab' ? ` (dim 0 padded, at least ${realRows})` : ''}; ` +
        'the checkpoint does not match its modelConfig: save or convert it again',
      CHECKPOINT_METADATA_FILE,
    );
  }
  return info.dtype;
}

/**
 * Verifies a whole checkpoint: when metadata.json records an architecture, that it lists every
 * Megatron tensor the architecture's plan needs for the recorded modelConfig, with the planned
 * global shape (MISSING_TENSOR / SHAPE_MISMATCH, from the metadata alone, so it fails fast); then
 * {@link Checkpoint.verify}: every piece present with its dtype, shape and SHA-256.
 */
export function verifyCheckpoint(ckpt: Checkpoint): CheckpointVerification {
  const m = ckpt.metadata;
  const arch = m.architecture ?? null;
  if (arch !== null) {
    const spec = getArchitectureSpec(arch);
    const cfg = makeTransformerConfig(m.modelConfig as never, CHECKPOINT_METADATA_FILE);
    const plan = planConversion(spec, cfg, {});
    const missing = plan.tensors.filter((t) => !Object.hasOwn(m.tensors, t.name)).map((t) => t.name);
    if (missing.length > 0) {
      const more = missing.length > 1 ? ` (and ${missing.length - 1} more)` : '';
      throw new ConvertError(
        'MISSING_TENSOR',
        `checkpoint lacks tensor ${JSON.stringify(missing[0])}${more} that ${arch} needs with the ` +
          'modelConfig it records; the checkpoint is incomplete: save or convert it again',
        CHECKPOINT_METADATA_FILE,
      );
    }
    for (const t of plan.tensors) checkStored(ckpt, t);
  }
  ckpt.verify();
  let pieces = 0;
  let bytes = 0;
  let checksummedPieces = 0;
  for (const t of Object.values(m.tensors)) {
    for (const p of t.pieces) {
      pieces++;
      bytes += byteLengthOf(t.dtype, p.shape);
      if (p.sha256 !== undefined) checksummedPieces++;
    }
  }
  return {
    tensors: Object.keys(m.tensors).length,
    pieces,
    bytes,
    checksummedPieces,
    architectureChecked: arch,
  };
}
