"""Chat templates of the model families align is tested on (`align.models.families`), as Jinja text.

Each follows its family's published format closely enough that the quirks align has to handle are the
real ones: Llama 3's header tokens and `<|eot_id|>` with the BOS written by the template; Qwen2.5's ChatML
with a default system prompt when there is none; Qwen3's ChatML with an empty `<think>` block before the
last answer; Gemma 2's `<start_of_turn>`/`<end_of_turn>` turns, `model` for the assistant, and no system
role (the template raises on one); Mistral's `[INST] ... [/INST]` with `</s>` after each answer; Phi-3's
`<|user|>`/`<|assistant|>`/`<|end|>` with the tokenizer's EOS after the last turn. They are written here,
not copied: tool calls, dates and multimodal parts are left out.
"""

from __future__ import annotations

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN2_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN2 = (
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\n" + QWEN2_DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' or not loop.first %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The last message, when it is an answer after the last user turn, gets the empty reasoning block the
# real template writes for a reply without reasoning; earlier answers are rendered without one.
QWEN3 = (
    "{% set ns = namespace(last_query=-1) %}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% if loop.last and loop.index0 > ns.last_query %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>assistant\n' + message['content'] | trim + '<|im_end|>\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# The system prompt goes before the first user message, inside its [INST] block.
MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
    "{% for message in turns %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('After the optional system message, roles must alternate user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{% if loop.first and system is defined %}"
    "{{ '[INST] ' + system + '\n\n' + message['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
