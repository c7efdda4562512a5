/** Absolute path of the shared folder (with its `data/`), or null when it is not there. */
export declare const SHARED_DIR: string | null;
/** Whether the shared folder is there. */
export declare const hasShared: boolean;
/** The one-line reason printed when tests that need the shared folder are skipped. */
export declare const SHARED_SKIP_REASON: string;
/** Absolute path of `rel` inside the shared folder (the would-be path when it is absent). */
export declare function sharedPath(rel: string): string;
/** Prints the skip reason once per test file (`who`: `import.meta.url`) and returns whether to skip. */
export declare function skipWithoutShared(who: string): boolean;
/** Runs a full garbage collection and waits for the finalizers it queued (FinalizationRegistry). */
export declare function collectGarbage(): Promise<void>;
/** A Megatron-LM checkpoint fixture of @megapatch/convert's tests: its folder, HF weights and checkpoint. */
export declare function megatronFixture(name: string): { dir: string; hf: string; megatron: string };
/** A Hugging Face folder of @megapatch/convert's tests whose weights are PyTorch pickles (pytorch_model*.bin). */
export declare function hfBinFixture(name: string): string;
