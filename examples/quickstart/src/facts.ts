// The quickstart's data: short stories about who has which thing of which colour, and a question
// about each ("Anna has a red hat. The hat is red."). The answer is always in the story, so a model
// that has learned to read its context answers stories it never saw; 500 of them are held out.
/** People, colours and things, each one token of the 32,000-token SentencePiece vocabulary. */
// biome-ignore format: a table
export const NAMES = [
  'Anna', 'Ben', 'Carl', 'Emma', 'Frank', 'Grace', 'Hugo', 'Jack', 'Kate', 'Leo', 'Nick', 'Paul', 'Rosa',
  'Sam', 'Tom', 'Will', 'Max', 'Lily', 'Adam', 'Eva', 'Ryan', 'Nina', 'Lucy', 'Mark', 'Sara', 'Owen',
  'Ruth', 'Dan', 'Amy', 'Ivan', 'Jane', 'Hans',
] as const;
// biome-ignore format: a table
export const COLOURS = [
  'red', 'blue', 'green', 'yellow', 'black', 'white', 'pink', 'brown', 'gray', 'purple', 'gold', 'silver',
] as const;
// biome-ignore format: a table
export const THINGS = [
  'hat', 'cup', 'ball', 'box', 'car', 'bike', 'lamp', 'bag', 'coat', 'book', 'pen', 'chair', 'bowl',
  'boat', 'sock', 'ring', 'drum', 'flag', 'shoe', 'key', 'fork', 'clock', 'bed', 'desk', 'rug', 'door',
] as const;

/** One story: its parts, the prompt a model continues and the continuation it should write. */
export interface Fact {
  name: string;
  colour: string;
  thing: string;
  /** `Anna has a red hat. The` */
  prompt: string;
  /** ` hat is red.` */
  answer: string;
}

/** The training stories and the held-out ones (disjoint). */
export interface Facts {
  train: Fact[];
  heldOut: Fact[];
}

/** The story of (name, colour, thing). */
export function fact(name: string, colour: string, thing: string): Fact {
  return {
    name,
    colour,
    thing,
    prompt: `${name} has a ${colour} ${thing}. The`,
    answer: ` ${thing} is ${colour}.`,
  };
}

/** The whole text of a story: prompt + answer. */
export function factText(f: Fact): string {
  return f.prompt + f.answer;
}

/** mulberry32: a small seeded generator of uniform numbers in [0, 1). */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Every (name, colour, thing) story (32 × 12 × 26 = 9,984), shuffled with `seed`; the first
 * `heldOut` are held out of training.
 */
export function makeFacts(heldOut = 500, seed = 7): Facts {
  const all: Fact[] = [];
  for (const n of NAMES) for (const c of COLOURS) for (const t of THINGS) all.push(fact(n, c, t));
  const random = rng(seed);
  for (let i = all.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [all[i], all[j]] = [all[j], all[i]];
  }
  return { heldOut: all.slice(0, heldOut), train: all.slice(heldOut) };
}
