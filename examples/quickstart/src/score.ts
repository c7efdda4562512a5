// Scores the held-out stories: `megapatch generate --prompts ... --json` printed one completion per
// prompt; a story is answered when the completion starts with its answer (" hat is red.").
import { z } from 'zod';
import { QuickstartError } from './errors.js';
import type { Fact } from './facts.js';

/** One line of `megapatch generate --json` (the fields the quickstart reads). */
export const Completion = z.object({
  prompt: z.string(),
  completion: z.string(),
  finishReason: z.string(),
});
export type Completion = z.infer<typeof Completion>;

/** A held-out story with what the model wrote and whether it is right. */
export interface Scored {
  fact: Fact;
  completion: string;
  correct: boolean;
}

/** Accuracy over the held-out stories. */
export interface Score {
  /** Stories answered exactly (thing and colour). */
  correct: number;
  total: number;
  /** correct / total. */
  accuracy: number;
  /** Completions that name the right colour, whatever else they say. */
  colourCorrect: number;
  items: Scored[];
}

/** Parses the JSON lines of `megapatch generate --json`. */
export function parseCompletions(stdout: string): Completion[] {
  return stdout
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((line, i) => {
      const r = Completion.safeParse(JSON.parse(line));
      if (!r.success) {
        throw new QuickstartError(
          'STEP_FAILED',
          `megapatch generate --json line ${i + 1} is not a completion`,
        );
      }
      return r.data;
    });
}

/** Scores completions against the facts they continue (same order). */
export function scoreCompletions(facts: readonly Fact[], completions: readonly Completion[]): Score {
  if (completions.length !== facts.length) {
    throw new QuickstartError(
      'STEP_FAILED',
      `megapatch generate printed ${completions.length} completions for ${facts.length} prompts`,
    );
  }
  const items = facts.map((fact, i) => {
    const completion = completions[i].completion;
    return { fact, completion, correct: completion.startsWith(fact.answer) };
  });
  const correct = items.filter((s) => s.correct).length;
  const colourCorrect = items.filter((s) => new RegExp(` is ${s.fact.colour}\\b`).test(s.completion)).length;
  return { correct, total: items.length, accuracy: correct / items.length, colourCorrect, items };
}
