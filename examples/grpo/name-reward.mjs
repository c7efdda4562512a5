// The reward of examples/grpo/stories-grpo.yaml: 1 when the continuation names the prompt's hero
// again (the prompt line's "name"), else 0. A reward module's default export takes the response's
// text and its prompt line (the parsed JSON object) and returns a number (or a promise of one).
export default function reward(response, sample) {
  return response.includes(sample.name) ? 1 : 0;
}
