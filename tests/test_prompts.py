"""Prompt templates: files in $LLMDESK_HOME/prompts, rendered into conversations, linted, and run
on a real model (the bundled demo model) directly, by vote and from perspectives."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest

from llmdesk.demo import default_model_path
from llmdesk.errors import LlmdeskError
from llmdesk.tools import prompts
from llmdesk.tools.prompts import PromptTemplate, answer_key, lint, load_prompt, save_prompt

from conftest import llmdesk_exe

CAPITAL = """\
description: The capital of a country
persona: a geography teacher
system: Answer briefly.
task: What is the capital of {{ country }}?
context: "Countries in scope: {{ scope }}"
format: one word
tone: plain
exemplars:
  - input: What is the capital of France?
    output: Paris
variables:
  country: {description: a country}
  scope: {default: Europe}
sampling: {temperature: 0.7, max_tokens: 16}
"""


def parse(text: str) -> PromptTemplate:
    return PromptTemplate.parse(text, name="t", where="t.yaml")


def test_messages_have_each_part_in_its_place():
    t = parse(CAPITAL)
    msgs = t.messages({"country": "Spain"})
    assert msgs[0] == {"role": "system", "content": "Answer briefly.\n\nYou are a geography teacher."}
    assert msgs[1:3] == [{"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "Paris"}]
    assert msgs[3]["role"] == "user"
    assert msgs[3]["content"] == ("What is the capital of Spain?\n\nContext:\nCountries in scope: Europe\n\n"
                                  "Answer format: one word\n\nTone: plain")
    # a given value wins over the default
    assert "Countries in scope: Asia" in t.messages({"country": "Japan", "scope": "Asia"})[-1]["content"]
    assert t.options(temperature=None, max_tokens=4) == {"temperature": 0.7, "max_tokens": 4}


def test_input_is_always_a_variable():
    t = parse("task: Translate to French.\nformat: one line\n")
    assert t.messages(input="good morning")[-1]["content"] == "Translate to French.\n\ngood morning\n\nAnswer format: one line"
    t2 = parse("task: 'Translate to French: {{ input }}'\n")
    assert t2.messages(input="hello")[-1]["content"] == "Translate to French: hello"
    with pytest.raises(LlmdeskError, match="needs an input"):
        t2.messages()


@pytest.mark.parametrize("text, message", [
    ("task: [unclosed\n", r"t.yaml: not valid YAML at line 2: expected ',' or ']'"),
    ("- a list\n", "a YAML mapping"),
    ("task: x\nformt: y\n", "unknown key 'formt'"),
    ("task: x\nexemplars:\n  - input: a\n", r"exemplars\[1\] must have exactly an input and an output"),
    ("task: x\nsampling: {temperature: -1}\n", "sampling: "),
    ("task: x\nsampling: {tempreature: 1}\n", "unknown setting 'tempreature'"),
    ("task: x\nschema: {type: objekt}\n", "not a valid JSON Schema"),
    ("task: '{{ x'\n", "task: template error"),
    ("task: x\nvariables: {'bad name': 1}\n", "a name is letters"),
])
def test_bad_templates_are_one_line(text, message):
    with pytest.raises(LlmdeskError, match=message) as e:
        parse(text)
    assert "\n" not in str(e.value)


def test_unknown_and_missing_variables():
    t = parse(CAPITAL)
    with pytest.raises(LlmdeskError, match=r"no variable 'contry' \(its variables: country, scope\)"):
        t.messages({"contry": "Spain"})
    with pytest.raises(LlmdeskError, match=r"variable 'country' has no value; give it with -v country=VALUE \(a country\)"):
        t.messages({})


def test_lint_names_what_is_missing_or_contradicts():
    t = parse("""\
task: ""
format: one word
exemplars:
  - {input: a, output: Paris}
  - {input: b, output: The capital is Rome.}
variables: {unused: 1}
context: "{{ undeclared }}"
""")
    found = [str(f) for f in lint(t)]
    assert found == [
        "error: no task: say what the model is to do (task: ...)",
        "error: variable 'undeclared' is used but not declared under variables: every run must then pass it, "
        "and nothing says what it is",
        "error: exemplars[2].output is not one word, but the format asks for it ('one word')",
        "warning: variable 'unused' is declared but never used",
    ]
    schema = parse("""\
task: Extract the city.
schema: {type: object, properties: {city: {type: string}}, required: [city]}
exemplars:
  - {input: I live in Oslo, output: '{"city": "Oslo"}'}
  - {input: I live in Rome, output: '{"town": "Rome"}'}
  - {input: x, output: 'not json'}
""")
    msgs = [str(f) for f in lint(schema)]
    assert msgs[0].startswith("error: exemplars[2].output does not match the schema: 'city' is a required property")
    assert msgs[1].startswith("error: exemplars[3].output does not match the schema: not JSON")
    assert len(msgs) == 2  # a schema is a format: no "no format" warning
    assert [str(f) for f in lint(parse(CAPITAL))] == []
    assert "no format" in str(lint(parse("task: x\nexemplars: [{input: a, output: b}]\n"))[0])


def test_answer_key():
    assert answer_key("  Paris. ") == answer_key("paris") == "paris"
    assert answer_key("so 3 + 4 = 7.", "number") == answer_key("The answer is 7", "number") == "7"
    assert answer_key("1,234 apples", "number") == "1234"
    assert answer_key('{"b": 1, "a": 2}', "json") == answer_key('{"a":2,"b":1}', "json")
    assert answer_key("no json", "json") == ""
    with pytest.raises(LlmdeskError, match="text, number or json"):
        answer_key("x", "letters")


def test_the_prompts_folder(user_dir):
    p = save_prompt("capital", CAPITAL)
    assert p == user_dir / "prompts" / "capital.yaml" and p.read_text() == CAPITAL
    assert [t.name for t in prompts.list_prompts()] == ["capital"]
    assert load_prompt("capital").task == "What is the capital of {{ country }}?"
    with pytest.raises(LlmdeskError, match="exists"):
        save_prompt("capital", CAPITAL)
    with pytest.raises(LlmdeskError, match="not valid YAML"):
        save_prompt("broken", "task: [x\n")
    assert not (user_dir / "prompts" / "broken.yaml").exists()  # nothing written
    with pytest.raises(LlmdeskError, match=r"no prompt named 'nope' .* \(have: capital\); create it with 'llmdesk prompt new nope'"):
        load_prompt("nope")
    with pytest.raises(LlmdeskError, match="is not a prompt name"):
        load_prompt("my prompt")
    with pytest.raises(LlmdeskError, match="no such prompt file"):
        load_prompt("../etc")
    (user_dir / "prompts" / "bad.yaml").write_text("task: [x\n")
    listed = prompts.list_prompts()
    assert isinstance(listed[0], LlmdeskError) and listed[1].name == "capital"
    prompts.remove_prompt("capital")
    assert prompts.list_names() == ["bad"]


@pytest.fixture(scope="module")
def demo():
    import llmdesk

    m = llmdesk.load(str(default_model_path()), ctx=1024)
    yield m
    m.close()


def test_vote_counts_the_samples(demo):
    t = parse(CAPITAL)
    r = t.run(demo, {"country": "Spain"}, samples=6, seed=3, temperature=1.0, max_tokens=8)
    assert len(r.samples) == 6
    keys = [answer_key(s) for s in r.samples]
    counts = Counter(k for k in keys if k)
    assert r.counts == dict(counts)
    top = max(counts.values())
    assert r.agreement == top / 6 and counts[r.key] == top
    assert r.answer == r.samples[keys.index(r.key)]
    # seeded: the same samples again, and each one is what a single request with that seed answers
    assert t.run(demo, {"country": "Spain"}, samples=6, seed=3, temperature=1.0, max_tokens=8).samples == r.samples
    one = demo.respond(t.messages({"country": "Spain"}), seed=5, temperature=1.0, max_tokens=8).text
    assert r.samples[2] == one
    with pytest.raises(LlmdeskError, match="temperature above 0"):
        t.run(demo, {"country": "Spain"}, samples=3, temperature=0)


def test_perspectives_then_a_synthesis(demo):
    t = parse("task: Should I learn Rust or Go first?\nformat: two sentences\n")
    r = t.run(demo, perspectives=["a systems programmer", "a web developer"], temperature=0, max_tokens=12)
    assert list(r.answers) == ["a systems programmer", "a web developer"]
    alone = demo.respond([{"role": "system", "content": "Answer from the perspective of a web developer."},
                          *t.messages()], temperature=0, max_tokens=12).text
    assert r.answers["a web developer"] == alone
    assert r.synthesis.strip()
    with pytest.raises(LlmdeskError, match="at least two"):
        t.run(demo, perspectives=["one"])


def test_schema_answer_is_a_checked_value(demo):
    t = parse("""\
task: Give a city.
schema: {type: object, properties: {city: {type: string, maxLength: 12}}, required: [city], additionalProperties: false}
sampling: {temperature: 0, max_tokens: 40}
""")
    r = t.run(demo)
    value = t.parse_answer(r.text)
    assert set(value) == {"city"} and isinstance(value["city"], str)
    with pytest.raises(LlmdeskError, match="does not match the schema"):
        t.parse_answer('{"town": 1}')


def cli(*args, env=None, stdin=subprocess.DEVNULL):
    return subprocess.run([llmdesk_exe(), *args], capture_output=True, text=True, env=env, stdin=stdin, timeout=120)


def test_cli(user_dir, tmp_path):
    import os

    env = {**os.environ, "LLMDESK_HOME": str(user_dir)}
    r = cli("prompt", "new", "capital", "-d", "capitals", env=env)
    assert r.returncode == 0, r.stderr
    (user_dir / "prompts" / "capital.yaml").write_text(CAPITAL)
    r = cli("prompt", "list", "--json", env=env)
    assert json.loads(r.stdout) == [{"name": "capital", "description": "The capital of a country", "model": None,
                                     "variables": ["country", "scope"]}]
    r = cli("prompt", "show", "capital", "--render", "-v", "country=Peru", "-v", "scope=@" + str(tmp_path / "nope"), env=env)
    assert r.returncode == 1 and r.stderr.startswith("error: -v scope=@") and r.stderr.count("\n") == 1
    (tmp_path / "scope.txt").write_text("South America")
    r = cli("prompt", "show", "capital", "--render", "-v", "country=Peru", "-v", f"scope=@{tmp_path / 'scope.txt'}", env=env)
    assert "What is the capital of Peru?" in r.stdout and "Countries in scope: South America" in r.stdout
    r = cli("prompt", "lint", "capital", env=env)
    assert (r.returncode, r.stdout) == (0, "capital: ok\n")
    (user_dir / "prompts" / "bad.yaml").write_text("task: x\nformat: one word\nexemplars: [{input: a, output: two words}]\n")
    r = cli("prompt", "lint", env=env)
    assert r.returncode == 1 and "bad: error: exemplars[1].output is not one word" in r.stdout and "capital: ok" in r.stdout
    demo_model = str(default_model_path())
    r = cli("prompt", "run", "capital", "-m", demo_model, "-v", "country=Peru", "-t", "0", "--json", "--no-log", env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["prompt"] == "capital" and d["completion_tokens"] <= 16 and d["text"]
    r = cli("prompt", "run", "capital", "-m", demo_model, "-v", "country=Peru", "--samples", "3", "--json", env=env)
    v = json.loads(r.stdout)
    assert len(v["samples"]) == 3 and 0 < v["agreement"] <= 1
    r = cli("prompt", "run", "capital", "-v", "nope=1", env=env)
    assert (r.returncode, r.stderr) == (1, "error: prompt capital: no variable 'nope' (its variables: country, scope)\n")
    r = cli("prompt", "rm", "capital", env=env)
    assert r.returncode == 0 and not (user_dir / "prompts" / "capital.yaml").exists()
    editor = tmp_path / "ed.sh"
    editor.write_text("#!/bin/sh\nprintf 'task: Say hi.\\nformat: one word\\n' > \"$1\"\n")
    editor.chmod(0o755)
    r = cli("prompt", "edit", "hello", env={**env, "EDITOR": str(editor)})
    assert r.returncode == 0, r.stderr
    assert "no exemplars" in r.stderr and load_prompt("hello").task == "Say hi."


def test_run_and_chat_take_a_template(user_dir):
    import os

    env = {**os.environ, "LLMDESK_HOME": str(user_dir)}
    save_prompt("short", "system: Be brief.\ntask: Say something about {{ topic }}.\nformat: one line\n"
                         "variables: {topic: {default: llamas}}\nsampling: {temperature: 0, max_tokens: 3}\n")
    demo_model = str(default_model_path())
    r = cli("run", "-p", "short", "-m", demo_model, "--json", "--no-log", env=env)
    d = json.loads(r.stdout)
    assert d["prompt"] == "short" and d["completion_tokens"] <= 3  # the template's settings
    r = cli("run", "-p", "short", "-m", demo_model, "-n", "5", "-v", "topic=GGUF", "--json", "--no-log", env=env)
    d2 = json.loads(r.stdout)
    assert 3 < d2["completion_tokens"] <= 5  # the command line's over the template's
    r = cli("run", "-v", "topic=x", "hi", env=env)
    assert (r.returncode, r.stderr) == (1, "error: -v, --samples and --perspectives go with a prompt template: -p NAME\n")
    r = subprocess.run([llmdesk_exe(), "chat", "-p", "short", "-m", demo_model, "--no-log"], input="llamas\n/show\n",
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stderr[r.stderr.index("{"): r.stderr.rindex("}") + 1])
    assert shown["system"] == "Be brief." and shown["max_tokens"] == 3 and shown["temperature"] == 0
