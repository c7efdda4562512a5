// Filled in by its own change; exported from src/index.ts.
export {};
