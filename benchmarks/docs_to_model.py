"""From a folder of documents and no dataset to a served model that knows them, each step measured.

The path issue 16 asks for, run with the CLI as a user runs it, on models this machine can make:

1. **A teacher.** No capable model can be downloaded here, so one is made: a small Llama (random
   weights, real architecture, 2 layers 128 wide, a BPE tokenizer, ChatML) is taught with
   `llmdesk tune` the generic skill `synth docs` asks of a model, "passage -> one question it
   answers, and the answer", on 400 passages about OTHER festivals than the user's ("The Kelo
   festival is held in Bari every May. It was founded by Tamo. ..."), in `synth docs`'s own
   prompt. This small world has 60 names of festivals, 60 of towns and 60 of people, and every
   passage is a new draw of them: no festival's facts can be remembered from one passage to the
   next, so the teacher learns to read them off the passage. It is taught to ask where a festival
   is held (`--kinds place`): asked for three kinds of fact (`--kinds place,month,founder`), 400
   steps taught it to copy the festival's name into the question, but the answer was still one
   fixed name for every passage; a single kind is learnt in 300.
2. **The documents.** A folder of Markdown files about the user's 48 festivals (the same kind of
   sentences, facts the teacher never saw), and `llmdesk synth docs FOLDER -m teacher --n N`
   makes the Q/A set from them, each row keeping its passage.
3. **SFT.** The student (the untaught base) is tuned on that set: `llmdesk tune --gguf`. It is asked without the
   passage, so it must learn the documents' facts.
4. **GRPO.** The SFT model is sharpened with `llmdesk tune --method grpo --reward exact` on the
   set's questions and two rewordings of each ("Which town holds the X festival?"), the grader
   checking that the answer is the set's answer and nothing else (still no human label): the
   behaviour it sharpens is giving the fact, and only it, however the question is put.
5. **Measured** on held-out questions about the documents, asked in phrasings neither the teacher
   nor the Q/A set ever used ("Where does the X festival take place?"), with the documents' own
   facts as references: `llmdesk eval run --chat` (llama.cpp, greedy) for base, SFT and GRPO,
   `llmdesk eval compare` for the paired differences and their standard errors, `llmdesk arena
   auto --judge grader:exact` for win rates (SFT against base, GRPO against SFT).
6. **Served.** `llmdesk serve` the final GGUF and one held-out question through the official
   `openai` client.

    .venv/bin/python benchmarks/docs_to_model.py [--work DIR] [--festivals 48] [--kinds place] [--n 160]

Each stage is skipped when its output is there: a run cut short continues with the same --work.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FILLERS = ["People come from far away to see it and stay for days.",
           "Every year the streets are full of music, food and dancing.",
           "Families meet there and the whole town is busy for a week."]
# the teacher's phrasings (what it is taught to ask) and the held-out ones (never in any training row)
TEACH = {"place": ["Where is the {e} festival held?", "In which town is the {e} festival held?"],
         "month": ["When is the {e} festival held?", "In which month is the {e} festival held?"],
         "founder": ["Who founded the {e} festival?", "Who started the {e} festival?"]}
# GRPO's prompts: the set's questions and these rewordings of them (none is a held-out phrasing)
REWORD = {"place": ["Tell me where the {e} festival is held.", "Which town holds the {e} festival?"],
          "month": ["Tell me when the {e} festival is held.", "Which month has the {e} festival?"],
          "founder": ["Tell me who founded the {e} festival.", "Whose idea was the {e} festival?"]}
HELD = {"place": "Where does the {e} festival take place?",
        "month": "What month is the {e} festival in?",
        "founder": "Who was the founder of the {e} festival?"}
TASK = """name: festivals
kind: generate
data:
  files: {test: heldout.jsonl}
  columns: [question, answer]
text: "{{question}}"
target: "{{answer}}"
until: ["\\n", "<|im_end|>", "<|endoftext|>"]
max_tokens: 8
answer:
  extract: {strict: {regex: "^\\\\s*([A-Z][a-z]+)\\\\.?\\\\s*$"}}
metrics: [exact_match]
"""


# -- the world: names, the teacher's passages, the user's documents --------------------------------

def names(rng: random.Random, k: int, taken: set[str]) -> list[str]:
    """k new pronounceable names (CVCV or CVCCV), none in `taken`."""
    cons, vow = "bdfgklmnprstvz", "aeiou"
    out = []
    while len(out) < k:
        n = rng.choice(cons).upper() + rng.choice(vow) + rng.choice(cons) + (rng.choice(cons) if rng.random() < 0.3 else "") \
            + rng.choice(vow)
        if n not in taken:
            taken.add(n)
            out.append(n)
    return out


def world(rng: random.Random, teacher_n: int, user_n: int, words: int) -> tuple[list[dict], list[dict]]:
    """The teacher's festivals and the user's. Festivals, towns and founders each have their own
    `words` names (the words this small world has, as a language has words); every passage is a
    new draw of them, so no festival's facts can be remembered from one passage to the next: the
    teacher must read them from the passage, and the user's festivals are facts it never saw."""
    taken: set[str] = set()
    fest, towns, people = names(rng, words, taken), names(rng, words, taken), names(rng, words, taken)

    def draw(e: str) -> dict:
        return {"e": e, "place": rng.choice(towns), "month": rng.choice(MONTHS), "founder": rng.choice(people),
                "filler": rng.choice(FILLERS)}

    teacher = [draw(rng.choice(fest)) for _ in range(teacher_n)]
    user = [draw(e) for e in rng.sample(fest, user_n)]
    return teacher, user


def parse(question: str) -> tuple[str | None, str | None]:
    """(kind, festival) of a question in one of the teacher's phrasings, else (None, None)."""
    for kind, qs in TEACH.items():
        for q in qs:
            m = re.fullmatch(re.escape(q).replace(re.escape("{e}"), r"(\w+)"), question)
            if m:
                return kind, m[1]
    return None, None


def passage(f: dict) -> str:
    return f"The {f['e']} festival is held in {f['place']} every {f['month']}. It was founded by {f['founder']}. {f['filler']}"


def document(f: dict) -> str:
    return f"# The {f['e']} festival\n\n{passage(f)}\n"


def source(f: dict) -> str:  # as `synth docs` names a passage's source: file name (headings)
    return f"{f['e'].lower()}.md (The {f['e']} festival)"


# -- the base model ---------------------------------------------------------------------------------

def build_base(folder: Path, texts: list[str], vocab: int, width: int = 128, layers: int = 4) -> Path:
    """A random-weight Llama (128 wide, 4 layers, 512 positions) with tied embeddings, so that
    writing a name read from the passage is the same vector going in and coming out; the tokenizer
    is trained on the texts of this world (each name one token)."""
    import torch
    import transformers

    from llmdesk.train.tokenizer import EOS, save_hf_tokenizer, train_bpe

    tok = train_bpe(texts, vocab)
    eos = tok.token_to_id(EOS)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True, initializer_range=0.05)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    save_hf_tokenizer(tok, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": eos}))
    return folder


# -- running the CLI --------------------------------------------------------------------------------

EXE = str(Path(sys.executable).with_name("llmdesk"))
TIMES: dict[str, float] = {}


def cli(stage: str, *args: str, show: bool = True) -> str:
    print("$ llmdesk " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([EXE, *args], capture_output=True, text=True)
    TIMES[stage] = TIMES.get(stage, 0.0) + time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"llmdesk {args[0]} failed:\n{r.stderr}")
    if show:
        tail = [x for x in r.stdout.splitlines() if x.strip()][-3:]
        print("".join(f"  {x}\n" for x in tail), end="", flush=True)
    return r.stdout


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def win_rate(votes: list[dict], m: str, other: str, rng: random.Random, rounds: int = 1000) -> tuple[int, int, int, float, float, float]:
    """W/T/L of m against other, its win rate (a tie half a win, as the arena counts it) and a 95%
    bootstrap interval over the battles."""
    score = []
    for v in votes:
        if {v["model_a"], v["model_b"]} != {m, other}:
            continue
        w = v["winner"]
        score.append(0.5 if w not in ("a", "b") else float(v[f"model_{w}"] == m))
    n = len(score)
    boot = sorted(sum(rng.choice(score) for _ in range(n)) / n for _ in range(rounds))
    return (score.count(1.0), score.count(0.5), score.count(0.0), sum(score) / n,
            boot[int(0.025 * rounds)], boot[int(0.975 * rounds) - 1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--teacher-festivals", type=int, default=400, help="festivals the teacher is taught on")
    ap.add_argument("--festivals", type=int, default=48, help="the user's documents, one festival each")
    ap.add_argument("--words", type=int, default=60, help="names of festivals, of towns and of founders")
    ap.add_argument("--vocab", type=int, default=1200)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--phrasings", type=int, default=2, help="the teacher's phrasings of each kind of question")
    ap.add_argument("--kinds", default="place", help="the facts asked about: place, month, founder (comma-separated)")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--teacher-lr", type=float, default=3e-3)
    ap.add_argument("--n", type=int, default=160, help="synth docs: Q/A rows to generate")
    ap.add_argument("--synth-temperature", type=float, default=0.7)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--grpo-steps", type=int, default=80)
    ap.add_argument("--grpo-lr", type=float, default=1e-3)
    ap.add_argument("--grpo-temperature", type=float, default=1.0)
    a = ap.parse_args()

    work = a.work or Path(tempfile.mkdtemp(prefix="docs-to-model-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LLMDESK_HOME"] = str(work / "home")
    from llmdesk.train.synth import DOCS_PROMPT  # what `synth docs` asks: the teacher is taught on it

    rng = random.Random(0)
    teach_facts, user_facts = world(rng, a.teacher_festivals, a.festivals, a.words)
    kinds = a.kinds.split(",")
    docs = work / "documents"
    docs.mkdir(exist_ok=True)
    for f in user_facts:
        (docs / f"{f['e'].lower()}.md").write_text(document(f))

    teacher_rows = []
    for f in teach_facts:
        prompt = DOCS_PROMPT.format(source=source(f), passage=passage(f))
        for kind in kinds:
            for q in TEACH[kind][:a.phrasings]:
                teacher_rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content":
                                                  f"Question: {q.format(e=f['e'])}\nAnswer: {f[kind]}"}]})
    rng.shuffle(teacher_rows)
    jsonl(work / "teacher.jsonl", teacher_rows)
    held = [{"id": f"{f['e']}-{kind}", "question": HELD[kind].format(e=f["e"]), "answer": f[kind]}
            for f in user_facts for kind in kinds]
    jsonl(work / "heldout.jsonl", held)
    (work / "festivals.yaml").write_text(TASK)

    t0 = time.perf_counter()
    if not (work / "base" / "config.json").is_file():
        texts = [r["messages"][0]["content"] + "\n" + r["messages"][1]["content"] for r in teacher_rows[:400]]
        texts += [DOCS_PROMPT.format(source=source(f), passage=passage(f)) for f in teach_facts + user_facts] * 2
        texts += [f"{f[k]}\n" for f in user_facts for k in HELD] * 4  # an answer at the start of a turn
        texts += [q.format(e=f["e"]) for f in user_facts for qs in TEACH.values() for q in qs]
        texts += [r["question"] for r in held]
        build_base(work / "base", texts, a.vocab, a.width, a.layers)
    TIMES["base"] = time.perf_counter() - t0
    from llmdesk.train.tokenizer import load_tokenizer

    tok = load_tokenizer(work / "base")
    single = sum(len(tok.encode(" " + f[k]).ids) == 1 for f in user_facts + teach_facts for k in ("e", "place", "founder"))
    lengths = {len(tok.encode(DOCS_PROMPT.format(source=source(f), passage=passage(f))).ids) for f in teach_facts + user_facts}
    print(f"base: {tok.get_vocab_size()} tokens; {single} of {3 * len(user_facts + teach_facts)} names are one token; "
          f"synth's prompts are {min(lengths)} to {max(lengths)} tokens")
    if not (work / "base.gguf").is_file():
        cli("base", "convert", str(work / "base"), "-o", str(work / "base.gguf"), "--type", "f32", "--name", "dtm-base:f32")

    # 1. the teacher
    if not (work / "teacher" / "model-f32.gguf").is_file():
        cli("teacher", "tune", str(work / "base"), str(work / "teacher.jsonl"), "-o", str(work / "teacher"), "--method",
            "full", "--steps", str(a.teacher_steps), "--lr", str(a.teacher_lr), "--batch", "16", "--val-split", "0",
            "--seq-len", "512", "--gguf", "f32", "--name", "dtm-teacher")

    # 2. synth docs: the Q/A set, from the user's documents
    qa = work / "qa.jsonl"
    if not qa.is_file():
        cli("synth", "synth", "docs", str(docs), "-o", str(qa), "-m", "dtm-teacher:f32", "--n", str(a.n),
            "-t", str(a.synth_temperature), "--max-tokens", "32")
    rows = read_jsonl(qa)
    truth = {f"{f['e'].lower()}.md": f for f in user_facts}
    right = 0
    for r in rows:  # a question about the passage's festival, answered with the passage's fact?
        kind, e = parse(r["messages"][0]["content"])
        f = truth[Path(r["provenance"]["passage"]["path"]).name]
        right += bool(kind and e == f["e"] and r["messages"][1]["content"] == f[kind])
    covered = {(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows}
    print(f"synth docs: {len(rows)} rows kept; {right} are a question in the teacher's phrasings whose answer is the "
          f"passage's fact; {len(covered)} distinct")

    # 3. SFT on the synth set
    if not (work / "sft" / "model-f32.gguf").is_file():
        cli("sft", "tune", str(work / "base"), str(qa), "-o", str(work / "sft"), "--method", "full", "--steps",
            str(a.sft_steps), "--lr", str(a.sft_lr), "--batch", "16", "--val-split", "0", "--gguf", "f32",
            "--name", "dtm-sft")

    # 4. GRPO on the set's questions, reworded as a user may ask them, the grader checking that the
    # answer is the set's answer and nothing else
    grpo_rows = []
    for r in rows:
        kind, e = parse(r["messages"][0]["content"])
        if kind:
            grpo_rows += [{"prompt": q.format(e=e), "answer": r["messages"][1]["content"]}
                          for q in [r["messages"][0]["content"]] + REWORD[kind]]
    prompts = jsonl(work / "prompts.jsonl", grpo_rows)
    if not (work / "grpo" / "model-f32.gguf").is_file():
        cli("grpo", "tune", str(work / "sft" / "merged"), str(prompts), "-o", str(work / "grpo"), "--method", "grpo",
            "--reward", "exact", "--generations", "8", "--max-completion", "8", "--temperature",
            str(a.grpo_temperature), "--steps", str(a.grpo_steps), "--batch", "16", "--lr", str(a.grpo_lr),
            "--rank", "8", "--gguf", "f32", "--name", "dtm-grpo")

    # 5. measured: eval on held-out phrasings, paired differences, the arena
    models = ["dtm-base:f32", "dtm-sft:f32", "dtm-grpo:f32"]
    task = str(work / "festivals.yaml")
    res = {x["model"]: x["metrics"]["exact_match"]
           for x in json.loads(cli("eval", "eval", "run", *models, "--task", task, "--chat", "--json", show=False))}
    cmp1 = cli("eval", "eval", "compare", models[0], models[1], "--task", task, show=False)
    cmp2 = cli("eval", "eval", "compare", models[1], models[2], "--task", task, show=False)
    cli("arena", "arena", "auto", *models, "--judge", "grader:exact", "--questions", str(work / "heldout.jsonl"),
        "--max-tokens", "8")
    votes = json.loads(cli("arena", "arena", "votes", "--source", "auto", "--json", "-n", "100000", show=False))
    votes = votes["votes"] if isinstance(votes, dict) else votes

    # 6. served: the final GGUF, one held-out question through the openai client
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"$ llmdesk serve -m dtm-grpo:f32 --port {port}", flush=True)
    server = subprocess.Popen([EXE, "serve", "-m", "dtm-grpo:f32", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for _ in range(600):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if server.poll() is not None:
                    sys.exit(f"llmdesk serve stopped:\n{server.stderr.read()}")
                time.sleep(0.2)
        ask = held[0]
        reply = client.chat.completions.create(model="dtm-grpo:f32", messages=[{"role": "user", "content": ask["question"]}],
                                               max_tokens=8, temperature=0)
        served = reply.choices[0].message.content
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"\nwork folder: {work}")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in TIMES.items()))
    print(cmp1 + cmp2, end="")
    diffs = {models[1]: _diff(cmp1, models[1]), models[2]: _diff(cmp2, models[2])}
    brng = random.Random(0)
    print(f"\nheld-out questions: {len(held)} ({a.festivals} festivals x {len(kinds)} kind(s) of fact: {a.kinds}; phrasings never trained on); "
          f"llama.cpp, greedy")
    print(f"{'step':<26}{'exact match':>16}{'diff vs previous':>20}   arena vs previous (grader:exact)")
    for i, m in enumerate(models):
        em = res[m]
        row = f"{['base', 'SFT on synth docs', 'GRPO (grader exact)'][i]:<26}{em['value']:>8.3f} +- {em['stderr']:.3f}"
        if i:
            w, t, l, p, lo, hi = win_rate(votes, m, models[i - 1], brng)
            row += f"{diffs[m]:>20}   W/T/L {w}/{t}/{l}, win rate {p:.3f} (95% CI {lo:.3f} to {hi:.3f})"
        print(row)
    print(f"served dtm-grpo:f32, asked {ask['question']!r} through the openai client: {served!r} "
          f"(the documents say {ask['answer']!r})")
    return 0


def _diff(compare_out: str, model: str) -> str:
    """The paired difference and its standard error from `eval compare`'s row of `model`."""
    for line in compare_out.splitlines():
        m = re.search(r"([+-]\d+\.\d+) ± (\d+\.\d+)", line) if line.startswith(model + " ") else None
        if m:
            return f"{float(m[1]):+.3f} +- {float(m[2]):.3f}"
    return "?"

if __name__ == "__main__":
    sys.exit(main())
