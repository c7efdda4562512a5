// torch.save files: the pickle format, the zip container, and the reader and writer over both.

export * from './dcp.js';
export * from './pickle.js';
export * from './torch-file.js';
