"""Chat templates: the built-in formats, real models' own templates rendered exactly as
transformers' apply_chat_template renders them, the sandbox, and the limits on hostile ones."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmdesk.errors import TemplateError
from llmdesk.runtime import templates
from llmdesk.runtime.templates import (
    BUILTIN_TEMPLATES,
    DEFAULT_TEMPLATE,
    ChatTemplate,
    guess_builtin,
    resolve_template,
)

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]
NO_SYSTEM = CONVERSATION[1:]


def render(source: str, messages=CONVERSATION, *, bos: str = "", eos: str = "", **kwargs) -> str:
    return ChatTemplate(source, "model", "test", bos_token=bos, eos_token=eos, model_name="m.gguf").render(
        messages, **kwargs
    )


def transformers_reference(source: str, **variables) -> str:
    """Rendered the way transformers' chat_template_utils._compile_jinja_template sets Jinja up
    (without our meters): a second opinion that the instrumentation changes no output."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source).render(**variables)


# ---------------------------------------------------------------------------------------------
# Built-in templates: system + user + assistant + user, with the generation prompt
# ---------------------------------------------------------------------------------------------

BUILTIN_EXPECTED = {  # name -> (bos_token, eos_token, expected text)
    "chatml": (
        "",
        "<|im_end|>",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "llama-2": (
        "<s>",
        "</s>",
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHello! [/INST] Hi! How can I help? </s>"
        "<s>[INST] What is 2+2? [/INST]",
    ),
    "llama-3": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "mistral": (
        "<s>",
        "</s>",
        "<s>[INST] You are a helpful assistant.\n\nHello! [/INST]Hi! How can I help?</s>[INST] What is 2+2? [/INST]",
    ),
    "gemma": (
        "<bos>",
        "<eos>",
        "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nHello!<end_of_turn>\n"
        "<start_of_turn>model\nHi! How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n",
    ),
    "phi-3": (
        "<s>",
        "<|endoftext|>",
        "<|system|>\nYou are a helpful assistant.<|end|>\n"
        "<|user|>\nHello!<|end|>\n"
        "<|assistant|>\nHi! How can I help?<|end|>\n"
        "<|user|>\nWhat is 2+2?<|end|>\n"
        "<|assistant|>\n",
    ),
    "alpaca": (
        "<s>",
        "</s>",
        "You are a helpful assistant.\n\n"
        "### Instruction:\nHello!\n\n"
        "### Response:\nHi! How can I help?</s>\n\n"
        "### Instruction:\nWhat is 2+2?\n\n"
        "### Response:\n",
    ),
    "vicuna": (
        "<s>",
        "</s>",
        "You are a helpful assistant. USER: Hello! ASSISTANT: Hi! How can I help?</s>USER: What is 2+2? ASSISTANT:",
    ),
}


def test_every_builtin_has_an_expected_rendering():
    assert set(BUILTIN_EXPECTED) == set(BUILTIN_TEMPLATES)
    assert DEFAULT_TEMPLATE == "chatml"


@pytest.mark.parametrize("name", list(BUILTIN_EXPECTED))
def test_builtin_reproduces_its_family_format(name):
    bos, eos, expected = BUILTIN_EXPECTED[name]
    template = resolve_template(None, name, bos_token=bos, eos_token=eos)
    assert template.name == name
    assert template.render(CONVERSATION, add_generation_prompt=True) == expected
    # and a plain transformers-style Jinja setup agrees
    assert transformers_reference(
        BUILTIN_TEMPLATES[name], messages=CONVERSATION, add_generation_prompt=True, bos_token=bos, eos_token=eos
    ) == expected


def test_builtins_read_openai_style_content_parts():
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "image_url"}, {"type": "text", "text": "there"}]}]
    assert render(BUILTIN_TEMPLATES["chatml"], parts) == (
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    )
    assistant_without_content = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]
    assert render(BUILTIN_TEMPLATES["chatml"], assistant_without_content, add_generation_prompt=False) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
    )


def test_builtin_defaults_without_a_system_message():
    assert render(BUILTIN_TEMPLATES["alpaca"], NO_SYSTEM[:1], eos="</s>") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nHello!\n\n### Response:\n"
    )
    assert render(BUILTIN_TEMPLATES["vicuna"], NO_SYSTEM[:1], eos="</s>") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hello! ASSISTANT:"
    )
    assert render(BUILTIN_TEMPLATES["gemma"], NO_SYSTEM[:1], bos="<bos>") == (
        "<bos><start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n"
    )


def test_without_the_generation_prompt():
    assert render(BUILTIN_TEMPLATES["llama-3"], NO_SYSTEM[:2], add_generation_prompt=False) == (
        "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi! How can I help?<|eot_id|>"
    )
    assert render(BUILTIN_TEMPLATES["phi-3"], NO_SYSTEM[:1], eos="<|endoftext|>", add_generation_prompt=False) == (
        "<|user|>\nHello!<|end|>\n<|endoftext|>"
    )


def test_builtin_stop_strings():
    stops = {name: resolve_template(None, name, eos_token="</s>").stop_strings for name in BUILTIN_TEMPLATES}
    assert stops["chatml"] == ["<|im_end|>"]
    assert stops["llama-3"] == ["<|eot_id|>"]
    assert stops["gemma"] == ["<end_of_turn>"]
    assert stops["phi-3"] == ["<|end|>", "</s>"]
    assert stops["llama-2"] == ["[INST]", "</s>"]
    assert stops["mistral"] == ["[INST]", "</s>"]
    assert stops["alpaca"] == ["### Instruction:", "</s>"]
    assert stops["vicuna"] == ["USER:", "</s>"]


# ---------------------------------------------------------------------------------------------
# Real models' templates, as published in their tokenizer_config.json
# ---------------------------------------------------------------------------------------------

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA_3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-2-7b-chat-hf
LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# mistralai/Mistral-7B-Instruct-v0.2 (the v0.1 layout: no system role)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen/Qwen2-7B-Instruct: ChatML with a default system prompt
QWEN_2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# google/gemma-7b-it
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# microsoft/Phi-3-mini-4k-instruct (first release: system messages are dropped)
PHI_3_MINI = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)

# microsoft/Phi-3-small-8k-instruct
PHI_3_SMALL = (
    "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + "
    "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# HuggingFaceH4/zephyr-7b-beta: newlines between tags, so trim_blocks/lstrip_blocks matter
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# Qwen/Qwen2.5-7B-Instruct: tools as `tool | tojson`, tool calls and tool responses
QWEN_2_5 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# meta-llama/Llama-3.2-1B-Instruct: tools as `t | tojson(indent=4)`, the date from strftime_now
LLAMA_3_2 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather <now> in a city (°C)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

WHITESPACE = [  # how templates treat surrounding whitespace differs (trim / strip / as is)
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Who are you?"},
]

REAL_MODELS = {  # name -> (source, messages, bos, eos, expected)
    "llama-3": (
        LLAMA_3,
        CONVERSATION,
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi! How can I help?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "llama-3 (trims content)": (
        LLAMA_3,
        WHITESPACE,
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "llama-2": (
        LLAMA_2,
        CONVERSATION,
        "<s>",
        "</s>",
        "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nHello! [/INST] Hi! How can I help? </s>"
        "<s>[INST] What is 2+2? [/INST]",
    ),
    "mistral": (
        MISTRAL,
        WHITESPACE,
        "<s>",
        "</s>",
        "<s>[INST] Hello! [/INST]   I am an assistant   </s>[INST] Who are you? [/INST]",
    ),
    "qwen2 (default system prompt)": (
        QWEN_2,
        NO_SYSTEM,
        "",
        "<|im_end|>",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "qwen2 (own system prompt)": (
        QWEN_2,
        CONVERSATION[:2],
        "",
        "<|im_end|>",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "gemma": (
        GEMMA,
        WHITESPACE,
        "<bos>",
        "<eos>",
        "<bos><start_of_turn>user\nHello!<end_of_turn>\n"
        "<start_of_turn>model\nI am an assistant<end_of_turn>\n"
        "<start_of_turn>user\nWho are you?<end_of_turn>\n"
        "<start_of_turn>model\n",
    ),
    "phi-3-mini": (
        PHI_3_MINI,
        CONVERSATION,
        "<s>",
        "<|endoftext|>",
        "<s><|user|>\nHello!<|end|>\n<|assistant|>\nHi! How can I help?<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n",
    ),
    "phi-3-small": (
        PHI_3_SMALL,
        CONVERSATION,
        "<|endoftext|>",
        "<|endoftext|>",
        "<|endoftext|><|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nHello!<|end|>\n"
        "<|assistant|>\nHi! How can I help?<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n",
    ),
    "zephyr": (
        ZEPHYR,
        CONVERSATION,
        "<s>",
        "</s>",
        "<|system|>\nYou are a helpful assistant.</s>\n<|user|>\nHello!</s>\n"
        "<|assistant|>\nHi! How can I help?</s>\n<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n",
    ),
    "qwen2.5 (no tools)": (
        QWEN_2_5,
        NO_SYSTEM[:1],
        "",
        "<|im_end|>",
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama-3.2 (no tools, date given)": (
        LLAMA_3_2,
        CONVERSATION[:2],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
}


@pytest.mark.parametrize("case", list(REAL_MODELS))
def test_real_model_template_renders_like_transformers(case):
    source, messages, bos, eos, expected = REAL_MODELS[case]
    extra = {"date_string": "26 Jul 2024"} if source is LLAMA_3_2 else {}
    assert render(source, messages, bos=bos, eos=eos, **extra) == expected
    assert transformers_reference(
        source, messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos, tools=None, **extra
    ) == expected


def test_raise_exception_in_the_template_becomes_a_template_error():
    with pytest.raises(TemplateError) as info:
        render(GEMMA, CONVERSATION, bos="<bos>")
    assert str(info.value) == "chat template of m.gguf: System role not supported"
    with pytest.raises(TemplateError, match="Conversation roles must alternate user/assistant"):
        render(MISTRAL, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TemplateError) as info:
        render("{{ raise_exception('first line\nsecond line') }}")
    assert str(info.value) == "chat template of m.gguf: first line second line"  # one line


def test_tools_rendered_with_tojson_qwen():
    messages = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "22 °C, sunny"},
    ]
    expected = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n"
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> in a city (°C)", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n22 °C, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render(QWEN_2_5, messages, tools=[WEATHER_TOOL]) == expected
    assert transformers_reference(QWEN_2_5, messages=messages, tools=[WEATHER_TOOL], add_generation_prompt=True) == expected


def test_tools_rendered_with_tojson_indent_llama_3_2():
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are a helpful assistant.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its proper "
        "arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
        'value}.Do not use variables.\n\n'
        "{\n"
        '    "type": "function",\n'
        '    "function": {\n'
        '        "name": "get_weather",\n'
        '        "description": "Weather <now> in a city (°C)",\n'
        '        "parameters": {\n'
        '            "type": "object",\n'
        '            "properties": {\n'
        '                "city": {\n'
        '                    "type": "string"\n'
        "                }\n"
        "            },\n"
        '            "required": [\n'
        '                "city"\n'
        "            ]\n"
        "        }\n"
        "    }\n"
        "}\n\n"
        "What is the weather in Paris?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    got = render(LLAMA_3_2, messages, bos="<|begin_of_text|>", tools=[WEATHER_TOOL], date_string="26 Jul 2024")
    assert got == expected


def test_strftime_now_gives_todays_date():
    before = datetime.now().strftime("%d %b %Y")
    got = render(LLAMA_3_2, CONVERSATION[1:2], bos="<|begin_of_text|>")
    after = datetime.now().strftime("%d %b %Y")
    assert any(
        got.startswith(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            f"Cutting Knowledge Date: December 2023\nToday Date: {day}\n\n<|eot_id|>"
        )
        for day in (before, after)
    )
    assert render("{{ strftime_now('%Y') }}") == str(datetime.now().year) or datetime.now().month == 1


def test_variables_extras_documents_and_jinja_features():
    assert render("{{ tools is none }} {{ documents is none }}") == "True True"
    assert render("{{ documents | map(attribute='title') | join(', ') }}", documents=[{"title": "a"}, {"title": "b"}]) == "a, b"
    assert render("{{ enable_thinking }}", enable_thinking=False) == "False"
    assert render("{{ bos_token }}|{{ eos_token }}", bos="<s>", eos="</s>") == "<s>|</s>"
    assert render("{{ bos_token }}", bos="<s>", bos_token="[override]") == "[override]"
    # loop controls, namespace, the {% generation %} tag of training templates
    assert render("{% for i in range(9) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "012"
    assert render("{% for i in range(5) %}{% if i % 2 %}{% continue %}{% endif %}{{ i }}{% endfor %}") == "024"
    assert render("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}") == "4"
    assert render("{% generation %}{{ messages[0].role }}{% endgeneration %}") == "system"
    # tojson keeps non-ASCII and HTML characters as they are; indent and sort_keys work
    assert render("{{ {'b': '<é>', 'a': 1} | tojson }}") == '{"b": "<é>", "a": 1}'
    assert render("{{ {'b': 1, 'a': 2} | tojson(indent=2, sort_keys=true) }}") == '{\n  "a": 2,\n  "b": 1\n}'
    # the caller's messages are never changed
    messages = [dict(m) for m in CONVERSATION]
    render(QWEN_2_5, messages)
    assert messages == CONVERSATION


JINJA_FEATURES = [  # what real templates use; metering must not change a character of it
    "{{ ['a', 'b'] | map('upper') | list }}{{ {'b': 1, 'a': 2} | dictsort }}{{ x | default([]) }}",
    "{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(5) }}",
    "{% macro w() %}[{{ caller() }}]{% endmacro %}{% call w() %}inner {{ messages | length }}{% endcall %}",
    "{% filter upper %}{% for m in messages %}{{ m.role }} {% endfor %}{% endfilter %}",
    "{% for m in messages %}{{ loop.cycle('a', 'b') }}{{ loop.length }}{{ loop.revindex }}{{ loop.last }}{% endfor %}",
    "{% for m in messages if m.role == 'user' %}{{ loop.index }}{{ loop.last }}{% endfor %}",
    "{% for m in [] %}x{% else %}empty{% endfor %}",
    "{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | join('|') }}",
    "{% for role, ms in messages | groupby('role') %}{{ role }}={{ ms | length }};{% endfor %}",
    "{% for k, v in messages[0] | items %}{{ k }}:{{ v }};{% endfor %}{% set x %}b {{ k }}{% endset %}{{ x | upper }}",
    "{{ messages[::-1][0].content }}{{ messages[-1].role }}{{ messages is sequence }}",
    "{% set a, b = 1, 2 %}{{ a + b }}{{ (1, 2) }}{{ [1, 2] + [3] }}{{ {'a': [1]} }}{{ 'a' ~ 1 ~ none }}",
    "{{ '%s-%05d' % ('x', 42) }}{{ '{}/{:>4}'.format('a', 'b') }}{{ '%(a)s' % {'a': 1700000000} }}",
    "{{ 'a b c'.split() | reverse | join }}{{ 'x'.center(5) }}|{{ 'ab' | center(6) }}|{{ 'a\nb' | indent(2, first=true) }}",
    "{% set t = [{'n': 'x', 'c': [{'n': 'y', 'c': []}]}] %}{% for i in t recursive %}{{ i.n }}({{ loop(i.c) }}){% endfor %}",
    "{{ range(5) | sum }}{{ [3, 1, 2] | sort }}{{ [1, 2, 3] | batch(2) | list }}{{ 'Hello World' | wordwrap(5) }}",
    "{{ 2 ** 10 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ 1.5 * 2 }} {{ 'ab' * 3 }} {{ [0] * 3 }} {{ messages | tojson }}",
    "{% for i in range(3) %}{% for j in range(2) %}{{ i }}{% if j %}{% break %}{% endif %}{% endfor %}{% endfor %}",
]


@pytest.mark.parametrize("source", JINJA_FEATURES)
def test_jinja_features_render_as_in_transformers(source):
    expected = transformers_reference(source, messages=CONVERSATION, add_generation_prompt=True)
    assert render(source) == expected


def test_rendering_errors_are_one_line_template_errors():
    cases = {
        "{{ messages[0].nope.deeper }}": "chat template of m.gguf failed: 'dict object' has no attribute 'nope'",
        "{{ 1 / 0 }}": "chat template of m.gguf failed: ZeroDivisionError: division by zero",
        "{{ messages[0].content + 1 }}": "chat template of m.gguf failed: TypeError:",
        "{% include 'other.jinja' %}": "chat template of m.gguf failed:",
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}": "chat template of m.gguf failed: it recursed too deeply",
    }
    for source, message in cases.items():
        with pytest.raises(TemplateError) as info:
            render(source)
        assert str(info.value).startswith(message), source
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# The sandbox: templates come from downloaded files
# ---------------------------------------------------------------------------------------------

ATTACKS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{{ messages.__len__() }}",
    "{{ messages._private }}",
    "{{ messages[0]._private }}",
    "{{ ''['__class__'] }}",
    "{{ '' | attr('__class__') }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '{x.__class__}'.format_map({'x': 1}) }}",
    "{{ '%s' | format(''.__class__) }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{% set y = messages.append({'role': 'x'}) %}",
    "{% set y = messages[0].update({'role': 'x'}) %}",
    "{{ messages.pop() }}",
    "{{ messages[0].clear() }}",
    "{{ messages.sort() }}",
]


@pytest.mark.parametrize("source", ATTACKS)
def test_sandbox_refuses_access_to_python_internals(source):
    messages = [dict(m) for m in CONVERSATION]
    with pytest.raises(TemplateError) as info:
        ChatTemplate(source, "model", "from the model's metadata", model_name="evil.gguf").render(messages)
    message = str(info.value)
    assert message.startswith("chat template of evil.gguf tried to access an unsafe attribute and was refused")
    assert "\n" not in message
    assert messages == CONVERSATION  # nothing was changed


def test_lipsum_is_not_offered():
    # Jinja's lorem-ipsum generator builds text of any length; no prompt needs it
    with pytest.raises(TemplateError, match="'lipsum' is undefined"):
        render("{{ lipsum(100000) }}")


def test_attacks_never_execute(tmp_path):
    """The shapes of CVE-2024-34359 and friends, aimed at creating a file: none may run, not at
    load time (compiling) and not at render time."""
    target = tmp_path / "pwned"
    payloads = [
        f"{{{{ cycler.__init__.__globals__.os.popen('touch {target}').read() }}}}",
        f"{{{{ joiner.__init__.__globals__.os.system('touch {target}') }}}}",
        f"{{{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch {target}') }}}}",
        f"{{{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch {target}') }}}}",
        # llama-cpp-python's CVE-2024-34359 proof of concept
        "{% for x in ().__class__.__base__.__subclasses__() %}{% if \"warning\" in x.__name__ %}"
        f"{{{{ x()._module.__builtins__['__import__']('os').popen(\"touch {target}\") }}}}{{% endif %}}{{% endfor %}}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
        f"{{{{ c(['touch', '{target}']) }}}}{{% endif %}}{{% endfor %}}",
        f"{{{{ ('{{0.__init__.__globals__[os].system}}'.format(cycler))('touch {target}') }}}}",
        f"{{{{ lipsum.__globals__['os'].popen('touch {target}').read() }}}}",
    ]
    # the payloads are real: plain (unsandboxed) Jinja runs the first one
    jinja2.Environment().from_string(payloads[0]).render()
    assert target.exists()
    target.unlink()
    for payload in payloads:
        template = resolve_template(payload, model_name="evil.gguf")  # compiling runs nothing
        with pytest.raises(TemplateError, match="tried to access an unsafe attribute and was refused"):
            template.render(CONVERSATION)
        assert not target.exists(), payload
    assert not target.exists()


# ---------------------------------------------------------------------------------------------
# Limits: output size, value size, steps, time
# ---------------------------------------------------------------------------------------------

LIMITS = {
    # output
    "{% for i in range(100000) %}{% for j in range(100000) %}" + "x" * 100 + "{% endfor %}{% endfor %}": "rendered more than",
    # work that prints nothing
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": "ran more than 1,000,000 steps",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = j %}{% endfor %}{% endfor %}": "steps",
    # single operations that would allocate gigabytes
    "{{ 'x' * 10000000000 }}": "would build a value of more than",
    "{{ ['x' * 1000000] * 100 }}": "would build a value of more than",
    "{{ 2 ** (10 ** 9) }}": "computed a number of more than 4096 bits",
    "{{ 'x' | center(1000000000) }}": "would build a value of more than",
    "{{ 'x'.center(1000000000) }}": "would build a value of more than",
    "{{ 'x'.zfill(1000000000) }}": "would build a value of more than",
    "{{ (1).to_bytes(1000000000, 'big') }}": "would build a value of more than",
    "{{ '%01000000000d' % 1 }}": "would format a field of more than",
    "{{ '%0*d' % (1000000000, 1) }}": "would build a value of more than",
    "{{ '{:>1000000000}'.format(1) }}": "would format a field of more than",
    "{{ '{:>{}}'.format(1, 1000000000) }}": "would build a value of more than",
    "{{ '%01000000000d' | format(1) }}": "would format a field of more than",
    "{% set s = 'x' * 1000000 %}{{ s.join(s) }}": "would build a value of more than",
    "{% set s = 'x' * 1000000 %}{{ s | join(s) }}": "would build a value of more than",
    "{% set s = 'x' * 1000000 %}{{ s.replace('', s) }}": "would build a value of more than",
    "{% set s = 'x' * 1000000 %}{{ s | replace('x', s) }}": "would build a value of more than",
    "{% set s = 'x\n' * 1000000 %}{{ s | indent(100) }}": "would build a value of more than",
    "{% set s = '\t' * 1000000 %}{{ s.expandtabs(1000) }}": "would build a value of more than",
    "{{ [1] | batch(1000000000, 'x') | list }}": "would build a value of more than",
    "{{ tools | tojson(indent=1000000000) }}": "JSON indent of more than 64",
    # values that double in a loop
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}": "built a value of more than",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}": "built a value of more than",
    "{% set ns = namespace(l=[0]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}": "built a value of more than",
    "{% set ns = namespace(n=3) %}{% for i in range(60) %}{% set ns.n = ns.n * ns.n %}{% endfor %}": "computed a number",
    # cheap to build, costly to print: many references to one big string
    "{% set s = 'x' * 1000000 %}{% set l = [s, s, s, s, s, s, s, s, s, s] %}{{ [l, l] }}": "built a value of more than",
    "{% set s = 'x' * 5000000 %}{% set ns = namespace(a=s, b=s, c=s) %}{{ ns }}": "more than",
    "{% set s = 'x' * 5000000 %}{{ (s, s, s) | string }}": "more than",
    # output buffered by a macro or a block, never printed
    "{% set s = 'x' * 9000000 %}{% macro m() %}{% for i in range(10) %}{{ s }}{% endfor %}{% endmacro %}{% set y = m() %}": "produced more than",
    "{% set s = 'x' * 9000000 %}{% set y %}{% for i in range(10) %}{{ s }}{% endfor %}{% endset %}": "produced more than",
}


@pytest.mark.parametrize("source", list(LIMITS))
def test_hostile_templates_are_stopped(source):
    with pytest.raises(TemplateError) as info:
        ChatTemplate(source, "model", "x", model_name="evil.gguf").render(CONVERSATION, tools=[WEATHER_TOOL])
    message = str(info.value)
    assert message.startswith("chat template of evil.gguf was stopped: it "), message
    assert LIMITS[source] in message
    assert "\n" not in message


def test_exponential_macro_recursion_is_stopped(monkeypatch):
    monkeypatch.setattr(templates, "MAX_STEPS", 20_000)
    source = "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}"
    with pytest.raises(TemplateError, match="ran more than 20,000 steps"):
        render(source)


def test_render_time_is_bounded(monkeypatch):
    monkeypatch.setattr(templates, "MAX_RENDER_SECONDS", 0.0)
    with pytest.raises(TemplateError, match="ran for more than 0 seconds"):
        render("{% for m in messages %}{{ m.role }}{% endfor %}")


def test_limits_leave_long_real_conversations_alone():
    messages = [CONVERSATION[0]] + [
        {"role": ("user", "assistant")[i % 2], "content": f"message {i} " + "lorem ipsum " * 200}
        for i in range(3000)
    ]
    for source in (LLAMA_3_2, QWEN_2_5, BUILTIN_TEMPLATES["gemma"], BUILTIN_TEMPLATES["llama-2"]):
        text = render(source, messages, tools=[WEATHER_TOOL] if source is QWEN_2_5 else None, date_string="x")
        assert text.count("message 2999 lorem") == 1
        assert len(text) > 3000 * 2400


def test_renders_in_threads_have_their_own_budgets():
    template = resolve_template(None, "llama-3")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: template.render(CONVERSATION), range(64)))
    assert set(results) == {BUILTIN_EXPECTED["llama-3"][2].removeprefix("<|begin_of_text|>")}


# ---------------------------------------------------------------------------------------------
# resolve_template, guess_builtin, stop strings
# ---------------------------------------------------------------------------------------------


def test_resolve_uses_the_models_own_template():
    template = resolve_template(LLAMA_3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", model_name="l3.gguf")
    assert (template.name, template.origin, template.source) == ("model", "from the model's metadata", LLAMA_3)
    assert template.render(CONVERSATION) == REAL_MODELS["llama-3"][4]
    assert template.stop_strings == ["<|eot_id|>"]


def test_resolve_override_by_name():
    template = resolve_template(LLAMA_3, "chatml", model_name="l3.gguf")
    assert (template.name, template.origin) == ("chatml", "built-in 'chatml' (--template)")
    assert template.source == BUILTIN_TEMPLATES["chatml"]
    assert resolve_template(None, "Llama3").name == "llama-3"  # case and a common alias


def test_resolve_unknown_name_lists_the_valid_ones():
    with pytest.raises(TemplateError) as info:
        resolve_template(LLAMA_3, "llama-9")
    message = str(info.value)
    assert "'llama-9'" in message and "\n" not in message
    for name in BUILTIN_TEMPLATES:
        assert name in message


def test_resolve_without_a_template_falls_back_to_the_default():
    for missing in (None, "", "  \n"):
        template = resolve_template(missing, model_name="bare.gguf")
        assert template.name == DEFAULT_TEMPLATE == "chatml"
        assert template.origin == "default 'chatml' (the model has no chat template)"
        assert template.render(NO_SYSTEM[:1]) == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"


def test_resolve_reports_a_syntax_error_at_load_time():
    broken = "{% for message in messages %}{{ message.content }}\n{% if %}{% endfor %}"
    with pytest.raises(TemplateError) as info:
        resolve_template(broken, model_name="broken.gguf")
    message = str(info.value)
    assert message.startswith("chat template of broken.gguf has a syntax error on line 2:")
    assert "\n" not in message
    with pytest.raises(TemplateError, match="syntax error on line 1"):
        resolve_template("{{ messages", model_name="broken.gguf")


def test_resolve_override_from_a_file(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(QWEN_2, encoding="utf-8")
    template = resolve_template(LLAMA_3, str(path), model_name="l3.gguf")
    assert template.source == QWEN_2
    assert template.origin == f"file {path} (--template)"
    assert template.render(NO_SYSTEM[:1]).startswith("<|im_start|>system\nYou are a helpful assistant.")
    with pytest.raises(TemplateError, match="not found"):
        resolve_template(None, str(tmp_path / "missing.jinja"))
    (tmp_path / "broken.jinja").write_text("{% if %}", encoding="utf-8")
    with pytest.raises(TemplateError, match="syntax error on line 1"):
        resolve_template(None, str(tmp_path / "broken.jinja"))


def test_guess_builtin_recognises_real_templates():
    assert guess_builtin(LLAMA_3) == "llama-3"
    assert guess_builtin(LLAMA_3_2) == "llama-3"
    assert guess_builtin(LLAMA_2) == "llama-2"
    assert guess_builtin(MISTRAL) == "mistral"
    assert guess_builtin(QWEN_2) == "chatml"
    assert guess_builtin(QWEN_2_5) == "chatml"
    assert guess_builtin(GEMMA) == "gemma"
    assert guess_builtin(PHI_3_MINI) == "phi-3"
    assert guess_builtin(ZEPHYR) is None
    assert guess_builtin("{{ messages }}") is None
    for name, source in BUILTIN_TEMPLATES.items():
        assert guess_builtin(source) == name


def test_stop_strings_of_model_templates_are_guessed_from_the_source():
    def stops(source, eos=""):
        return ChatTemplate(source, "model", "x", eos_token=eos).stop_strings

    assert stops(QWEN_2_5, "<|im_end|>") == ["<|im_end|>"]
    assert stops(LLAMA_3_2, "<|eot_id|>") == ["<|eot_id|>"]
    assert stops(GEMMA, "<eos>") == ["<end_of_turn>"]
    assert stops(PHI_3_MINI, "<|endoftext|>") == ["<|end|>"]
    assert stops(ZEPHYR, "</s>") == ["</s>"]
    assert stops(MISTRAL, "</s>") == ["</s>"]
    assert stops("{{ messages[0].content }}") == []


def test_template_is_compiled_once_per_source():
    templates._compile.cache_clear()
    for _ in range(3):
        resolve_template(QWEN_2).render(CONVERSATION)
    assert templates._compile.cache_info().misses == 1


def test_module_is_cheap_to_import():
    code = (
        "import sys; import llmdesk.runtime.templates; "
        "heavy = [m for m in ('llama_cpp', 'torch', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
