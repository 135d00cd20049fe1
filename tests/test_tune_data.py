"""Fine-tuning data (llmdesk.train.sft_data): reading every shape people have, every problem with
its file:line, and the loss on exactly the right tokens for real chat templates.

The chat templates are the real ones models ship (their tokenizer_config.json's `chat_template`),
not llmdesk's built-ins (runtime/templates.py's BUILTIN_TEMPLATES reproduce each family's layout
with their own Jinja, so they prove nothing about the originals); Llama 2's, Llama 3's and Gemma
2's are test_templates.py's copies, the others are here, each naming its model. The tokenizers are real byte-level
BPE tokenizers trained here with llmdesk's train_bpe, holding each model's special tokens as
specials, wrapped as transformers' PreTrainedTokenizerFast with the template, and adding BOS by
themselves where the model's tokenizer does.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# meta-llama/Llama-2-7b-chat-hf, meta-llama/Meta-Llama-3-8B-Instruct, google/gemma-7b-it (Gemma 1 and 2's:
# no system role): the real templates test_templates.py checks the renderer against
from test_templates import GEMMA as GEMMA2, LLAMA_2 as LLAMA2, LLAMA_3 as LLAMA3

from llmdesk.errors import LlmdeskError
from llmdesk.train.sft_data import (
    IGNORE,
    MAX_LISTED,
    Row,
    build_dataset,
    build_example,
    end_of_turn_token,
    inspect,
    read_rows,
)

# ---------------------------------------------------------------------------------------------
# The real templates
# ---------------------------------------------------------------------------------------------

# teknium/OpenHermes-2.5-Mistral-7B (ChatML); its tokenizer is Mistral's: BOS <s> added by itself
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# mistralai/Mistral-7B-Instruct-v0.3 (Mistral's "v3" template). Its system message goes in front of
# the LAST user turn, and only when the conversation ends with that user turn: rendering prefixes
# gives texts that are not prefixes of the whole conversation's.
MISTRAL = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# mistralai/Mistral-7B-Instruct-v0.1: EOS then a space after each answer; no system role
MISTRAL_V01 = (r"{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
               r"(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
               r"user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
               r"{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
               r"{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and "
               r"assistant roles are supported!') }}{% endif %}{% endfor %}")

# google/gemma-3-1b-it: the system message opens the first user turn
GEMMA = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"""

# microsoft/Phi-3-mini-4k-instruct: <|end|> closes every turn; EOS once, at the very end
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
        "{% endif %}")


# Qwen/Qwen3-0.6B (as llama.cpp keeps it, models/templates/Qwen-Qwen3-0.6B.jinja): the last answer after
# the last user turn gets a <think> block (empty, or the reasoning given in the content between
# <think> and </think>); earlier answers lose their reasoning
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
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
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

@dataclass(frozen=True)
class Family:
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    adds_bos: bool  # the model's tokenizer puts BOS in front of text by itself
    lead: str  # what the template writes right before an answer that a word's token takes with it
    end: str  # the trained end of an assistant turn


FAMILIES = {
    "chatml": Family(CHATML, ("<s>", "</s>", "<|im_start|>", "<|im_end|>"), "<s>", "<|im_end|>", True, "",
                     "<|im_end|>"),
    "llama-2": Family(LLAMA2, ("<s>", "</s>"), "<s>", "</s>", True, " ", " </s>"),
    "llama-3": Family(LLAMA3, ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eot_id|>"), "<|begin_of_text|>", "<|eot_id|>", True, "", "<|eot_id|>"),
    "mistral": Family(MISTRAL, ("<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", True, " ", "</s>"),
    "mistral-v0.1": Family(MISTRAL_V01, ("<s>", "</s>"), "<s>", "</s>", True, "", "</s>"),
    "gemma": Family(GEMMA, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", True, "",
                    "<end_of_turn>"),
    "gemma-2": Family(GEMMA2, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", True, "",
                      "<end_of_turn>"),
    "qwen3": Family(QWEN3, ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"), None,
                    "<|im_end|>", False, "", "<|im_end|>"),
    "phi-3": Family(PHI3, ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<s>",
                    "<|endoftext|>", False, "", "<|end|>"),
}

SYSTEM = "You are terse. Answer in one line."
CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Hello! Who are you?"},
    {"role": "assistant", "content": "I am a small model."},
    {"role": "user", "content": "What is two plus two? Say it in words."},
    {"role": "assistant", "content": "Four. And two plus two is four, always."},
    {"role": "user", "content": "And 3 + 4?"},
    {"role": "assistant", "content": "Seven (7)."},
]
CORPUS = [m["content"] for m in CHAT] * 20 + ["The sky is blue and the grass is green. " * 5] * 10


def make_tokenizer(name: str):
    """A byte-level BPE tokenizer with the family's specials, as transformers loads one."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from llmdesk.train.tokenizer import train_bpe

    fam = FAMILIES[name]
    tok = train_bpe(CORPUS, 400, specials=list(fam.specials))
    if fam.adds_bos:
        tok.post_processor = TemplateProcessing(single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B",
                                                special_tokens=[(fam.bos, tok.token_to_id(fam.bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos,
                                   chat_template=fam.template, clean_up_tokenization_spaces=False)


def trained_spans(tokenizer, ex) -> list[str]:
    """The decoded runs of consecutive trained tokens, in order."""
    runs: list[list[int]] = []
    previous = False
    for tid, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE:
            assert label == tid
            if not previous:
                runs.append([])
            runs[-1].append(tid)
        previous = label != IGNORE
    return [tokenizer.decode(run) for run in runs]


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ---------------------------------------------------------------------------------------------
# Trained tokens: exactly the answers and their terminators
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chatml", "llama-2", "llama-3", "mistral", "gemma", "phi-3", "qwen3"])
def test_trained_tokens_are_the_answers_and_their_terminators(name):
    fam, tok = FAMILIES[name], make_tokenizer(name)
    ex = build_example(Row("chat.jsonl:1", CHAT), tok)
    answers = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert trained_spans(tok, ex) == [fam.lead + a + fam.end for a in answers]
    # what the model is fed is what transformers renders with the same template, tokenized once,
    # with one BOS in front (the template's own, or the tokenizer's when the template writes none)
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    own = tok(rendered, add_special_tokens=False)["input_ids"]
    bos = tok.convert_tokens_to_ids(fam.bos) if fam.bos else None
    assert ex.input_ids == (own if own[0] == bos or not fam.adds_bos else [bos, *own])
    assert ex.input_ids[0] == bos if fam.adds_bos else ex.input_ids[0] != bos
    assert ex.input_ids[1] != bos


def test_reasoning_is_trained_where_the_template_keeps_it():
    """Qwen 3 keeps the reasoning of the answer after the last user turn (trained with it, as the
    model writes it) and drops the reasoning of earlier answers (only their answer is there to
    train); the empty <think></think> block it puts before a plain last answer is not trained."""
    tok = make_tokenizer("qwen3")
    think = "<think>\nTwo and two make four.\n</think>\n\n"
    chat = [*CHAT[:2], {"role": "assistant", "content": think + "I am a small model."}, *CHAT[3:6],
            {"role": "assistant", "content": think + "Seven (7)."}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text.count("<think>") == 1  # the first answer's reasoning is not rendered
    ex = build_example(Row("chat.jsonl:1", chat), tok)
    assert trained_spans(tok, ex) == ["I am a small model.<|im_end|>",
                                      "Four. And two plus two is four, always.<|im_end|>",
                                      think + "Seven (7).<|im_end|>"]
    plain = build_example(Row("chat.jsonl:2", CHAT), tok)
    assert "<think>\n\n</think>\n\n" in tok.decode(plain.input_ids)
    assert trained_spans(tok, plain)[-1] == "Seven (7).<|im_end|>"


@pytest.mark.parametrize("name", ["llama-2", "mistral"])
def test_sentencepiece_style_tokenizers_train_the_same_characters(name):
    """Llama 2's and Mistral's tokenizer.json: BPE over Metaspace pieces (`▁` for a space), byte
    fallback, BOS added by the tokenizer. The trained characters are the answers, the space the
    template writes before each (the answer's first piece, `▁I`, holds it) and the EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[name]
    sp = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    sp.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", *fam.specials],
        initial_alphabet=["▁", *(f"<0x{i:02X}>" for i in range(256))]))
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", sp.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  chat_template=fam.template, clean_up_tokenization_spaces=False)
    ex = build_example(Row("chat.jsonl:1", CHAT), tok)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ex.input_ids == enc["input_ids"]  # the template writes the BOS: not a second one
    runs: list[list[int]] = []
    for i, ((start, end), label) in enumerate(zip(enc["offset_mapping"], ex.labels)):
        if label != IGNORE:
            if i == 0 or ex.labels[i - 1] == IGNORE:
                runs.append([start, end])
            runs[-1][1] = end
    assert [text[a:b] for a, b in runs] == [fam.lead + m["content"] + fam.end for m in CHAT if m["role"] == "assistant"]


def test_eos_after_each_answer_is_trained_not_the_space_after_it():
    """Mistral v0.1 writes `answer</s> ` : the EOS is the end of the turn, the space is the next
    turn's formatting."""
    tok = make_tokenizer("mistral-v0.1")
    chat = CHAT[1:]
    ex = build_example(Row("chat.jsonl:1", chat), tok)
    assert trained_spans(tok, ex) == [m["content"] + "</s>" for m in chat if m["role"] == "assistant"]


def test_phi3_trains_end_of_turn_not_the_final_eos():
    """Phi-3 closes each turn with <|end|> (what it stops on) and the conversation with EOS: the
    newline and the EOS after the last <|end|> are not the answer's."""
    tok = make_tokenizer("phi-3")
    ex = build_example(Row("chat.jsonl:1", CHAT), tok)
    assert tok.decode(ex.input_ids[-3:]) == "<|end|>\n<|endoftext|>"
    assert ex.labels[-3:] == [tok.convert_tokens_to_ids("<|end|>"), IGNORE, IGNORE]


def test_a_template_without_special_terminators_trains_each_answer_only():
    """A template that ends turns with a newline and no special token: each answer is trained, and
    nothing of the turns after it."""
    tok = make_tokenizer("chatml")
    plain = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")
    ex = build_example(Row("chat.jsonl:1", CHAT), tok, chat_template=_jinja(plain))
    assert trained_spans(tok, ex) == [m["content"] for m in CHAT if m["role"] == "assistant"]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_end_of_turn_token_is_the_one_trained_after_each_answer(name):
    """end_of_turn_token (where GRPO's sampling stops) is the token SFT trains at the end of every
    answer: the template's own end of turn (<|im_end|>, <|eot_id|>, <end_of_turn>, Phi-3's <|end|>
    before its final EOS), or the EOS where the template ends turns with it (Llama 2, Mistral)."""
    fam, tok = FAMILIES[name], make_tokenizer(name)
    mark = end_of_turn_token(tok)
    assert mark == fam.end.strip()
    ex = build_example(Row("chat.jsonl:1", CHAT[1:]), tok)  # no system message: not every template takes one
    ends = [label for label, after in zip(ex.labels, [*ex.labels[1:], IGNORE]) if label != IGNORE and after == IGNORE]
    assert ends == [tok.convert_tokens_to_ids(mark)] * 3


def test_no_end_of_turn_token_without_one_in_the_template():
    """A template that ends turns with a newline, or no template at all: no token to stop on."""
    tok = make_tokenizer("chatml")
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_token(tok, _jinja(plain)) == ""
    tok.chat_template = None
    assert end_of_turn_token(tok) == ""
    assert end_of_turn_token(tok, "chatml") == "<|im_end|>"  # given by name


def _jinja(source: str) -> str:
    """A chat template given as a .jinja file (what --chat-template takes besides built-in names)."""
    import tempfile

    path = Path(tempfile.mkdtemp()) / "template.jinja"
    path.write_text(source)
    return str(path)


def test_train_on_all_trains_every_token():
    tok = make_tokenizer("llama-3")
    ex = build_example(Row("chat.jsonl:1", CHAT), tok, train_on="all")
    assert ex.labels == ex.input_ids


def test_a_template_given_by_name_replaces_the_tokenizers():
    tok = make_tokenizer("chatml")
    tok.chat_template = None
    with pytest.raises(LlmdeskError) as e:
        build_example(Row("chat.jsonl:1", CHAT), tok)
    assert "no chat template" in one_line(e)
    ex = build_example(Row("chat.jsonl:1", CHAT), tok, chat_template="chatml")
    assert trained_spans(tok, ex)[0] == "I am a small model.<|im_end|>"


def test_a_template_that_refuses_the_conversation_is_one_line_with_the_row(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    rows = read_rows([data])
    with pytest.raises(LlmdeskError) as e:
        build_dataset(rows, make_tokenizer("gemma-2"), seq_len=512)
    assert one_line(e).startswith(f"{data}:1: ")
    assert "System role not supported" in str(e.value)
    # without the system message, Gemma 2's template renders it, and trains the answers
    ex = build_example(Row("x:1", CHAT[1:]), make_tokenizer("gemma-2"))
    assert trained_spans(make_tokenizer("gemma-2"), ex)[-1] == "Seven (7).<end_of_turn>"


# ---------------------------------------------------------------------------------------------
# The shapes people have
# ---------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_every_shape_reads_to_messages_or_text(tmp_path):
    data = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": CHAT},
        {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello."}]},
        {"prompt": "What is 2 + 2?", "completion": "4"},
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
         "completion": [{"role": "assistant", "content": "Hello."}]},
        {"text": "The sky is blue."},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                      {"role": "assistant", "content": "Hello."}]},
        {"instruction": "Translate to English.", "input": "merci", "output": "thank you"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ])
    rows = read_rows([data])
    assert [r.source for r in rows] == [f"{data}:{n}" for n in range(1, 9)]
    assert rows[6].messages == [{"role": "user", "content": "Translate to English.\n\nmerci"},
                                {"role": "assistant", "content": "thank you"}]
    assert rows[7].messages == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert rows[0].messages == CHAT
    sharegpt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    assert rows[1].messages == sharegpt and rows[3].messages == sharegpt
    assert rows[2].messages == [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    assert rows[4].messages is None and rows[4].text == "The sky is blue."
    assert rows[5].messages[0] == {"role": "user", "content": "Hi there"}


def test_prompt_completion_trains_the_completion_and_its_terminator(tmp_path):
    tok = make_tokenizer("llama-3")
    rows = read_rows([write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Who are you?", "completion": "A model."}])])
    ex = build_example(rows[0], tok)
    assert trained_spans(tok, ex) == ["A model.<|eot_id|>"]


def test_text_rows_train_every_token_and_an_eos():
    tok = make_tokenizer("gemma")
    ex = build_example(Row("t.jsonl:1", None, "The sky is blue."), tok)
    bos, eos = tok.convert_tokens_to_ids("<bos>"), tok.convert_tokens_to_ids("<eos>")
    assert ex.input_ids[0] == bos and ex.input_ids[-1] == eos
    assert tok.decode(ex.input_ids[1:]) == "The sky is blue.<eos>"
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]


def test_json_array_rows_know_their_lines(tmp_path):
    data = tmp_path / "rows.json"
    data.write_text('[\n  {"text": "one"},\n  {"text":\n     "two"},\n\n  {"text": "three"}\n]\n')
    assert [r.source for r in read_rows([data])] == [f"{data}:2", f"{data}:3", f"{data}:6"]
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name, as `datasets`' to_json writes them
    lines.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert [r.source for r in read_rows([lines])] == [f"{lines}:1", f"{lines}:2"]
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "one"},\n  {"text": "two",}\n]\n')
    with pytest.raises(LlmdeskError) as e:
        read_rows([broken])
    assert one_line(e).startswith(f"{broken}:3: not JSON")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"text": "one"}, {"text": "two"}]}))
    assert [r.text for r in read_rows([wrapped])] == ["one", "two"]


def test_csv_reads_columns_and_json_lists(tmp_path):
    data = tmp_path / "rows.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        w.writerow(["What is 2 + 2?", "Four,\nsaid on two lines"])
        w.writerow(["Hi", "Hello."])
    rows = read_rows([data])
    assert [r.source for r in rows] == [f"{data}:2", f"{data}:4"]
    assert rows[0].messages[1]["content"] == "Four,\nsaid on two lines"
    chats = tmp_path / "chats.csv"
    with open(chats, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerow([json.dumps(CHAT)])
    assert read_rows([chats])[0].messages == CHAT


def test_parquet_reads_nested_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}, {"messages": CHAT[1:3]}]), chats)
    texts = tmp_path / "texts.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "one", "id": 1}, {"text": "two", "id": 2}]), texts)
    rows = read_rows([chats, texts])
    assert [r.source for r in rows] == [f"{chats}:1", f"{chats}:2", f"{texts}:1", f"{texts}:2"]
    assert rows[0].messages == CHAT and rows[1].messages == CHAT[1:3]
    assert [r.text for r in rows[2:]] == ["one", "two"]


def test_a_folder_reads_its_data_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "b.jsonl", [{"text": "two"}])
    (tmp_path / "notes.txt").write_text("not data")
    assert [r.text for r in read_rows([tmp_path])] == ["one", "two"]


# ---------------------------------------------------------------------------------------------
# Bad input: every problem, with its file:line, in one pass
# ---------------------------------------------------------------------------------------------

BAD = [
    ('{"messages": [', "not JSON"),
    ({"question": "Hi", "answer": "Hello"}, "no 'messages', 'conversations', 'prompt'/'completion', "
                                            "'instruction'/'output' or 'text'"),
    ({"instruction": " ", "input": "", "output": "Hello"}, "'instruction' is empty"),
    ({"prompt": "Hi"}, "has 'prompt' but no 'completion'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "Hi"}]}, "messages[1] has no 'content'"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "Hi"}]},
     "messages[1] has the unknown role 'tool'"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[1] has the unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "Hi"}]},
     "messages[1] (user) is empty"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."},
                   {"role": "assistant", "content": "Hi"}]}, "turn 2 is a system message"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi?"},
                   {"role": "assistant", "content": "Hi"}]}, "turn 2 is 'user' where 'assistant' was expected"),
    ({"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "Hi"}]},
     "the first turn after the system message is 'assistant' where 'user' was expected"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                   {"role": "user", "content": "Bye"}]}, "ends with a user turn"),
    ({"messages": []}, "'messages' is an empty list"),
    ({"text": ""}, "'text' is empty"),
    ({"completion": "x", "prompt": 3}, "'prompt' is a number"),
    ([1, 2], "a row is a JSON object, not a list"),
]


def test_every_problem_is_listed_with_its_line(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, *[row for row, _ in BAD]])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LlmdeskError) as e:
        read_rows([data, empty, tmp_path / "missing.jsonl"])
    lines = str(e.value).splitlines()
    assert lines[0] == f"{len(BAD) + 2} problems in the training data; fix them and run again:"
    for n, (_, what) in enumerate(BAD, 2):
        assert any(line.strip().startswith(f"{data}:{n}: ") and what in line for line in lines), (n, what, lines)
    assert f"  {empty}: empty file" in "\n".join(lines)
    assert f"  {tmp_path / 'missing.jsonl'}: no such file" in lines
    (tmp_path / "notes.txt").write_text("a note")
    (tmp_path / "none").mkdir()
    with pytest.raises(LlmdeskError) as e:
        read_rows([tmp_path / "notes.txt", tmp_path / "none"])
    assert str(e.value).splitlines()[1:] == [
        f"  {tmp_path / 'notes.txt'}: not a data file: give .jsonl, .json, .csv, .parquet",
        f"  {tmp_path / 'none'}: a folder with no data files in it (.jsonl, .json, .csv, .parquet)"]
    assert not any(f"{data}:1:" in line for line in lines)


def test_one_problem_is_one_line(tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", [{"messages": CHAT}, {"text": "ok"}, {"messages": CHAT[:2]}])
    with pytest.raises(LlmdeskError) as e:
        read_rows([data])
    assert one_line(e) == (f"{data}:3: the conversation ends with a user turn: end it with the assistant's answer "
                           f"(that is what is trained)")


def test_many_problems_are_listed_up_to_a_limit_then_counted(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", ["not json"] * 30)
    with pytest.raises(LlmdeskError) as e:
        read_rows([data])
    lines = str(e.value).splitlines()
    assert lines[0].startswith("30 problems")
    assert len(lines) == 1 + MAX_LISTED + 1 and lines[-1].strip() == f"... and {30 - MAX_LISTED} more"
    assert lines[MAX_LISTED].strip().startswith(f"{data}:{MAX_LISTED}: not JSON")


def test_csv_and_parquet_problems_have_their_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text('prompt,completion\nHi,Hello\nHi,Hello,extra\n"",x\n')
    bad_parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "fine"}, {"text": "  "}]), bad_parquet)
    with pytest.raises(LlmdeskError) as e:
        read_rows([bad_csv, bad_parquet])
    text = str(e.value)
    assert f"{bad_csv}:3: 3 fields, the header names 2" in text
    assert f"{bad_csv}:4: 'prompt' is empty" in text
    assert f"{bad_parquet}:2: 'text' is empty" in text


# ---------------------------------------------------------------------------------------------
# The dataset: lengths against --seq-len
# ---------------------------------------------------------------------------------------------


def test_rows_longer_than_seq_len_are_an_error_unless_truncated(tmp_path):
    tok = make_tokenizer("chatml")
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"prompt": "Hi", "completion": "Hello."},
                                              {"messages": CHAT}])
    rows = read_rows([data])
    full = build_dataset(rows, tok, seq_len=4096)
    n_long = full.lengths[0]
    assert full.lengths == [n_long, full.lengths[1], n_long] and full.lengths[1] < 40 < n_long
    assert full.too_long == [] and full.total_tokens == sum(full.lengths)
    assert full.trained_tokens == sum(len([x for x in e.labels if x != IGNORE]) for e in full.examples)
    share = round(100 * full.trained_tokens / full.total_tokens)
    assert full.summary() == (f"3 rows, {full.total_tokens} tokens, {full.trained_tokens} trained ({share}%); "
                              f"tokens a row as read: min {full.lengths[1]} / median {n_long} / p95 {n_long} / "
                              f"max {n_long}")
    first = next(i for i, x in enumerate(full.examples[0].labels) if x != IGNORE)  # the first answer's start
    assert full.lengths[1] <= first
    with pytest.raises(LlmdeskError) as e:
        build_dataset(rows, tok, seq_len=first + 3)
    assert one_line(e) == (f"2 rows are longer than --seq-len {first + 3} (the longest {n_long} tokens): {data}:1 "
                           f"({n_long} tokens), {data}:3 ({n_long} tokens); raise --seq-len, or cut them with "
                           f"--truncate")
    cut = build_dataset(rows, tok, seq_len=first + 3, truncate=True)
    assert [len(e.input_ids) for e in cut.examples] == [first + 3, full.lengths[1], first + 3]
    assert cut.examples[0].input_ids == full.examples[0].input_ids[:first + 3]
    assert cut.examples[0].labels == full.examples[0].labels[:first + 3]
    assert cut.too_long == [(f"{data}:1", n_long), (f"{data}:3", n_long)]
    assert cut.notices == [f"2 rows are longer than --seq-len {first + 3} (the longest {n_long} tokens): {data}:1 "
                           f"({n_long} tokens), {data}:3 ({n_long} tokens); they are cut to that length (--truncate)"]
    # cut before the first answer: nothing to train, so the row is left out and said so
    none = build_dataset(rows, tok, seq_len=first, truncate=True)
    assert [e.source for e in none.examples] == [f"{data}:2"]
    assert none.notices[1] == (f"2 rows left no token to train after truncation and are left out ({data}:1, "
                               f"{data}:3)")


# ---------------------------------------------------------------------------------------------
# --inspect
# ---------------------------------------------------------------------------------------------


def test_inspect_shows_lengths_and_lights_the_trained_tokens(tmp_path):
    tok = make_tokenizer("chatml")
    rows = read_rows([write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, {"text": "The sky is blue."}] * 3)])
    page = tmp_path / "inspect.html"
    out = inspect(rows, tok, n=2, html=page, seq_len=40)
    lengths = build_dataset(rows, tok, seq_len=4096).lengths
    assert f"6 rows[/bold] (3 chat, 3 text), {sum(lengths):,} tokens" in out
    assert f"tokens a row: min {min(lengths)} / median" in out and f"max {max(lengths)}" in out
    assert "longer than --seq-len 40: 3 rows" in out
    assert "[reverse green]I am a small model.<|im_end|>[/reverse green]" in out
    assert "[dim]<s>" in out  # the BOS the tokenizer adds, not trained
    assert f"[bold]── {tmp_path / 'd.jsonl'}:2[/bold]" in out
    assert "[reverse green]The sky is blue.<|im_end|>[/reverse green]" in out  # text rows: all, and EOS
    html = page.read_text()
    assert "<span class='t'>I am a small model.&lt;|im_end|&gt;</span>" in html
    assert f"{tmp_path / 'd.jsonl'}:1" in html


def test_importing_the_data_module_loads_no_ml_library():
    code = ("import sys, llmdesk.train.sft_data; "
            "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
