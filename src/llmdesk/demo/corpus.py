"""The demo model's corpus, written here (license-clean): facts about llmdesk and local LLMs.

Each fact has training questions, held-out questions (never in the corpus: the measurement),
answers (several wordings) and key terms (what a good answer must mention: the metric is key-term
recall). The corpus is ChatML conversations, many paraphrases per fact, built deterministically
from a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SYSTEM = "You are the llmdesk demo assistant. You answer short questions about llmdesk and local LLMs."


@dataclass
class Fact:
    questions: list[str]  # training phrasings
    heldout: list[str]  # evaluation phrasings, never in the corpus
    answers: list[str]
    keys: list[str]  # lower-case terms a correct answer contains


# how people ask for a task; "{t}" is the task in their words
TASK_TEMPLATES = ["How do I {t}?", "How can I {t}?", "Which llmdesk command do I use to {t}?",
                  "What's the command to {t}?", "I want to {t}. What should I run?", "Can llmdesk {t}?",
                  "how to {t} with llmdesk", "What is the best way to {t}?"]


def _cmd(name: str, what: str, example: str, keys: list[str], topics: list[str], held: str) -> Fact:
    qs = [f"What does llmdesk {name} do?", f"What is the {name} command for?", f"Explain llmdesk {name}.",
          f"what does {name} do in llmdesk", f"Tell me about the {name} command.",
          f"What is llmdesk {name}?", f"When should I use llmdesk {name}?"]
    qs += [tpl.format(t=t) for t in topics for tpl in TASK_TEMPLATES]
    ans = [f"llmdesk {name} {what} Example: {example}",
           f"Use llmdesk {name}: it {what} For example: {example}",
           f"The {name} command {what} Try: {example}"]
    return Fact(qs, [held], ans, keys)


FACTS: list[Fact] = [
    # -- llmdesk commands ------------------------------------------------------------------------
    _cmd("pull", "downloads a GGUF model from Hugging Face into your local store.",
         "llmdesk pull hf:OWNER/REPO/model.gguf", ["pull", "download"], ["download a model", "get a model from Hugging Face", "grab a GGUF from the Hub"],
         "How can I fetch a model from Hugging Face with llmdesk?"),
    _cmd("import", "adds a GGUF file you already have to the local store.",
         "llmdesk import ./model.gguf", ["import", "gguf"], ["add a GGUF file I already have", "use a local .gguf file", "register a model file from my disk"],
         "I have a .gguf file on disk. How do I add it to llmdesk?"),
    _cmd("list", "shows the models in your local store with their size and type.",
         "llmdesk list", ["list", "models"], ["see which models I have", "list my models", "view the models that are installed"],
         "Which command shows all my installed models?"),
    _cmd("show", "prints the details of one model: architecture, parameters, quantization and context length.",
         "llmdesk show NAME", ["show", "details"], ["see the details of a model", "look at the metadata of a model", "check the quantization type of a model"],
         "How can I inspect a model's architecture and quantization?"),
    _cmd("rm", "removes a model from the local store.", "llmdesk rm NAME", ["rm", "remove"],
         ["delete a model", "remove a model from the store", "free disk space used by a model"], "How do I get rid of a model I no longer need?"),
    _cmd("run", "answers one prompt and streams the text.", "llmdesk run -m MODEL \"Hello\"",
         ["run", "prompt"], ["answer a single prompt", "ask a model one question", "generate text from a prompt"], "What is the command to send one prompt to a model?"),
    _cmd("chat", "starts a conversation with a model in the terminal.", "llmdesk chat -m MODEL",
         ["chat", "conversation"], ["talk with a model in the terminal", "chat with a model", "start an interactive chat"],
         "How do I have a conversation with a model in my terminal?"),
    _cmd("logs", "shows the conversations llmdesk recorded.", "llmdesk logs", ["logs", "conversations"],
         ["see my past conversations", "read the chat history", "find an old answer from a model"], "Where can I look at my earlier chats?"),
    _cmd("convert", "converts a Hugging Face checkpoint to a GGUF file.", "llmdesk convert ./hf-model -o model.gguf",
         ["convert", "gguf"], ["turn a Hugging Face model into GGUF", "convert safetensors to GGUF", "make a GGUF from a transformers model"],
         "How can I change a Hugging Face checkpoint into a GGUF file?"),
    _cmd("train", "pretrains a small Llama model from scratch on your text files.",
         "llmdesk train notes.txt -o out --preset 1m", ["train", "scratch"], ["train a small model on my own text", "pretrain a model from scratch", "make a tiny language model from text files"],
         "Can llmdesk build a tiny model from my own text files?"),
    _cmd("fit", "estimates whether a model fits in your memory and how fast it will run.",
         "llmdesk fit MODEL", ["fit", "memory"], ["check if a model fits on my machine", "estimate the memory a model needs", "know if I have enough RAM for a model"],
         "Will this model fit in my RAM? Which command tells me?"),
    _cmd("bench", "measures speed: prompt processing and generation in tokens per second.",
         "llmdesk bench MODEL", ["bench", "tokens per second"], ["measure how fast a model runs", "benchmark a model", "measure tokens per second"],
         "How do I benchmark the speed of a model?"),
    _cmd("make-model", "writes a GGUF with random weights and the exact shapes of a real model, for benchmarks without downloads.",
         "llmdesk make-model --preset llama-3.2-1b --type q4_k_m -o test.gguf", ["make-model", "random weights"],
         ["make a test model with the shape of a real one", "benchmark a model size without downloading it", "create a random-weight GGUF"],
         "How can I try the speed of a model size without downloading it?"),
    _cmd("serve", "starts an OpenAI-compatible HTTP server for your models.", "llmdesk serve -m MODEL",
         ["serve", "server"], ["start an API server", "serve a model over HTTP", "use a local model from my own scripts"], "How can my scripts call a local model over HTTP?"),
    _cmd("quantize", "makes a smaller GGUF file with fewer bits per weight.",
         "llmdesk quantize MODEL Q4_K_M", ["quantize", "smaller"], ["make a model file smaller", "quantize a model to 4 bits", "reduce the size of a GGUF"],
         "How do I shrink a GGUF model to fewer bits?"),
    _cmd("imatrix", "computes an importance matrix from sample text to improve quantization.",
         "llmdesk imatrix MODEL text.txt -o imatrix.gguf", ["imatrix", "importance"], ["compute an importance matrix", "improve the quality of a low-bit quantization", "make an imatrix file"],
         "What helps low-bit quantization keep quality, and which command makes it?"),
    _cmd("eval ppl", "measures the perplexity of a model on a text.", "llmdesk eval ppl MODEL text.txt",
         ["perplexity", "eval"], ["measure perplexity", "evaluate a model on a text file", "check the quality of a model"], "Which command computes a model's perplexity on my text?"),
    _cmd("eval kld", "measures the KL divergence between a quantized model and the original.",
         "llmdesk eval kld BASE MODEL text.txt", ["kl divergence", "quantized"],
         ["compare a quantized model with the original", "measure the KL divergence", "check how much quantization hurt a model"],
         "How can I see how much quantization changed a model's predictions?"),
    _cmd("results", "shows saved measurements and plots from bench and eval.", "llmdesk results",
         ["results", "measurements"], ["see my saved benchmark results", "look at earlier measurements", "plot my eval results"],
         "Where are my earlier benchmark and eval numbers?"),
    # -- concepts --------------------------------------------------------------------------------
    Fact(["What is quantization?", "Explain quantization.", "what is quantization of a model",
          "Why quantize a model?", "What does it mean to quantize weights?"],
         ["In simple words, what is model quantization?"],
         ["Quantization stores the weights with fewer bits, for example 4 or 8 bits instead of 16. "
          "The file gets smaller and the model runs faster, with a small loss of quality.",
          "Quantization means storing weights in fewer bits. A smaller file uses less memory and "
          "runs faster, with a little less quality."],
         ["fewer bits", "smaller"]),
    Fact(["What is GGUF?", "Explain the GGUF format.", "what is a gguf file", "What is a .gguf file?",
          "Tell me about GGUF."],
         ["What kind of file is GGUF?"],
         ["GGUF is the file format of llama.cpp. One file holds the weights, the tokenizer and the "
          "settings of a model.",
          "GGUF is llama.cpp's model file format: weights, tokenizer and metadata in a single file."],
         ["llama.cpp", "file"]),
    Fact(["What is the context length?", "Explain context length.", "What does context window mean?",
          "what is the context size of a model", "What is the context of a model?"],
         ["How many tokens can a model see at once?"],
         ["The context length is the number of tokens the model can see at once: your prompt plus "
          "its answer. Set it with --ctx.",
          "Context length is how many tokens fit in the model's view at one time, prompt and answer "
          "together. Use --ctx to set it."],
         ["tokens", "at once"]),
    Fact(["What is LoRA?", "Explain LoRA.", "what is lora fine-tuning", "What does LoRA stand for?",
          "How does LoRA work?"],
         ["What is a low-rank adapter?"],
         ["LoRA is low-rank adaptation: fine-tuning trains small adapter matrices instead of all "
          "weights, so it needs much less memory.",
          "LoRA fine-tunes a model by training small low-rank adapters on top of frozen weights; "
          "it needs far less memory."],
         ["low-rank", "adapter"]),
    Fact(["What are tokens per second?", "Explain tokens per second.", "what does tokens/s mean",
          "How is model speed measured?", "What is tokens per second?"],
         ["What does the tokens/s number tell me?"],
         ["Tokens per second is the speed of a model: how many tokens it reads or writes each "
          "second. llmdesk bench measures it.",
          "Tokens per second measures speed: the tokens generated each second. Measure it with "
          "llmdesk bench."],
         ["speed", "second"]),
    Fact(["What is the KV cache?", "Explain the KV cache.", "what is a kv cache",
          "What does the KV cache store?", "Why does the KV cache use memory?"],
         ["What is the key-value cache in a transformer?"],
         ["The KV cache keeps the keys and values of every token already seen, so the model does "
          "not compute them again. It grows with the context length.",
          "The KV cache stores keys and values for past tokens so they are not recomputed; it "
          "uses more memory as the context grows."],
         ["keys and values", "memory"]),
    Fact(["What is perplexity?", "Explain perplexity.", "what does perplexity measure",
          "Is lower perplexity better?", "What is ppl?"],
         ["How do you read a perplexity number?"],
         ["Perplexity measures how well a model predicts a text. Lower is better. llmdesk eval ppl "
          "computes it.",
          "Perplexity tells how surprised a model is by a text: lower perplexity is better. Use "
          "llmdesk eval ppl."],
         ["predicts", "lower"]),
    Fact(["What is a token?", "Explain tokens.", "what is a token in an llm", "How does a model read text?",
          "What is a tokenizer?"],
         ["What are the pieces of text a model works with?"],
         ["A token is a piece of text, often a word or part of a word. The tokenizer splits text "
          "into tokens and the model reads and writes tokens.",
          "Models work on tokens: small pieces of text like words or parts of words, made by the "
          "tokenizer."],
         ["piece of text", "word"]),
    Fact(["What is llama.cpp?", "Explain llama.cpp.", "what engine does llmdesk use",
          "What runs the models in llmdesk?", "Which inference engine is inside llmdesk?"],
         ["What library does llmdesk run models with?"],
         ["llmdesk runs models with llama.cpp, a fast C and C++ engine for GGUF models on CPU and GPU.",
          "The engine is llama.cpp: fast inference of GGUF models on your CPU or GPU."],
         ["llama.cpp", "gguf"]),
    Fact(["What is llmdesk?", "Explain llmdesk.", "what can llmdesk do", "Tell me about llmdesk.",
          "What is this tool?"],
         ["Describe llmdesk in one sentence."],
         ["llmdesk is a toolkit to run, measure and tune language models on your own machine: "
          "one CLI, one server and one Python API.",
          "llmdesk lets you run, measure and tune LLMs locally, with a CLI, a server and a Python API."],
         ["run", "machine"]),
    Fact(["Who are you?", "What are you?", "what model are you", "Which model is this?",
          "Are you a big model?"],
         ["What kind of assistant am I talking to?"],
         ["I am the llmdesk demo model, a tiny model trained with llmdesk train. I know a little "
          "about llmdesk and local LLMs.",
          "I am a tiny demo model bundled with llmdesk. I answer simple questions about llmdesk."],
         ["demo", "tiny"]),
    Fact(["What is temperature?", "Explain sampling temperature.", "what does --temperature do",
          "How do I make answers less random?", "What is greedy decoding?"],
         ["What does the temperature setting change?"],
         ["Temperature controls randomness. 0 is greedy and always picks the most likely token; "
          "higher values give more varied text.",
          "The temperature sets how random sampling is: 0 means greedy, higher means more varied."],
         ["random", "greedy"]),
    Fact(["How much memory does a model need?", "How much RAM do I need for a 7B model?",
          "what decides the memory of a model", "Why does a model need so much memory?",
          "How big is a model in memory?"],
         ["What determines how much RAM a model uses?"],
         ["Memory is about the weights (parameters times bits per weight) plus the KV cache. "
          "Quantization lowers it. llmdesk fit estimates it.",
          "A model needs memory for its weights and its KV cache; fewer bits per weight means "
          "less memory. Check with llmdesk fit."],
         ["weights", "kv cache"]),
    Fact(["What is a parameter?", "Explain model parameters.", "what does 7B mean",
          "What does the number of parameters mean?", "What are weights?"],
         ["What does the B in 7B stand for?"],
         ["Parameters are the numbers the model learned, its weights. 7B means seven billion "
          "parameters.",
          "The parameters are the learned weights; 7B is seven billion of them."],
         ["weights", "billion"]),
    Fact(["What is fine-tuning?", "Explain fine-tuning.", "what is finetuning a model",
          "How do I adapt a model to my data?", "What is the difference between training and fine-tuning?"],
         ["How is fine-tuning different from pretraining?"],
         ["Fine-tuning continues training a pretrained model on your own data, so it learns your "
          "task. Pretraining starts from scratch.",
          "Fine-tuning adapts an already trained model to your data; pretraining starts from random "
          "weights."],
         ["pretrained", "data"]),
    Fact(["What is a chat template?", "Explain chat templates.", "what is chatml",
          "How are chat messages turned into a prompt?", "Why does a model need a template?"],
         ["What formats the messages of a conversation for the model?"],
         ["A chat template turns the messages of a conversation into the exact prompt the model "
          "was trained on, for example ChatML with im_start and im_end.",
          "The chat template formats messages into the prompt text the model expects, like ChatML."],
         ["template", "prompt"]),
    Fact(["What is q4_k_m?", "Which quantization should I use?", "what is q8_0",
          "What is a good quantization type?", "Explain q4_k_m and q8_0."],
         ["Which quant type is a good default?"],
         ["q4_k_m is a good default: about 4.8 bits per weight with small quality loss. q8_0 uses "
          "8 bits and is almost lossless.",
          "Use q4_k_m for a good balance of size and quality; q8_0 is bigger and nearly lossless."],
         ["q4_k_m", "bits"]),
    Fact(["Does llmdesk need the internet?", "Can I use llmdesk offline?", "does llmdesk work without internet",
          "Do my chats leave my computer?", "Is llmdesk private?"],
         ["Will my data be sent to a server?"],
         ["No. llmdesk runs models locally on your machine, so it works offline and your data stays "
          "private. Only pull downloads from the internet.",
          "llmdesk works offline: models run on your own computer and your data stays private."],
         ["offline", "private"]),
    Fact(["Do I need a GPU?", "Can llmdesk run on a CPU?", "does llmdesk need cuda",
          "Will it work without a graphics card?", "Can I run models on a laptop?"],
         ["Is a GPU required to use llmdesk?"],
         ["No GPU is needed. llama.cpp runs models on the CPU; a GPU makes them faster.",
          "You do not need a GPU: models run on the CPU, and a GPU only speeds them up."],
         ["cpu", "gpu"]),
    Fact(["What is an OpenAI-compatible server?", "Can I use the OpenAI client with llmdesk?",
          "what api does llmdesk serve", "How do my scripts talk to llmdesk serve?",
          "Which API does the server speak?"],
         ["Can existing OpenAI scripts use my local model?"],
         ["llmdesk serve speaks the OpenAI API, so the official OpenAI client works: point its base "
          "URL at your local server.",
          "The server is OpenAI-compatible: set the OpenAI client's base URL to llmdesk serve."],
         ["openai", "base url"]),
    Fact(["What is prompt processing?", "What is prefill?", "what is time to first token",
          "Why is the first token slow?", "What does TTFT mean?"],
         ["Why does a long prompt take time before the answer starts?"],
         ["Prefill is prompt processing: the model reads the whole prompt before the first token. "
          "Time to first token grows with prompt length.",
          "Before answering, the model processes the prompt (prefill); a longer prompt means a later "
          "first token."],
         ["prompt", "first token"]),
    Fact(["What is KL divergence?", "Explain KL divergence.", "what does kld measure",
          "How do I compare two models' predictions?", "Why measure KLD after quantization?"],
         ["What number shows how far a quantized model drifts from the original?"],
         ["KL divergence measures how different two models' predictions are, for example a quantized "
          "model against the original. Lower is closer.",
          "KLD compares the token probabilities of two models; after quantization, a low KL divergence "
          "means little quality lost."],
         ["predictions", "quantized"]),
]


# generic frames around each concept's subject: more ways to ask the same thing
CONCEPT_TEMPLATES = ["Can you explain {s}?", "I don't understand {s}. Help?", "Tell me about {s}.",
                     "What should I know about {s}?", "{s}: what is it?", "Describe {s} briefly."]
CONCEPT_SUBJECTS = ["quantization", "GGUF", "context length", "LoRA", "tokens per second", "the KV cache",
                    "perplexity", "tokens", "llama.cpp", "llmdesk", "you", "temperature", "model memory",
                    "parameters", "fine-tuning", "chat templates", "q4_k_m", "offline use", "GPUs",
                    "the OpenAI-compatible server", "prefill", "KL divergence"]


def _add_concept_frames() -> None:
    concepts = [f for f in FACTS if len(f.questions) < 10]  # the command facts have more already
    assert len(concepts) == len(CONCEPT_SUBJECTS)
    for fact, subject in zip(concepts, CONCEPT_SUBJECTS):
        fact.questions += [t.format(s=subject) for t in CONCEPT_TEMPLATES]


_add_concept_frames()


def _variants(q: str, rng: random.Random) -> str:
    """A surface paraphrase of a training question: prefixes, case, punctuation."""
    pre = rng.choice(["", "", "", "Hi! ", "Quick question: ", "Please tell me: ", "I'm new here. ",
                      "Hello. ", "Hey, ", "Question: "])
    post = rng.choice(["", "", "", " Thanks!", " Please keep it short.", " Thank you."])
    body = q
    r = rng.random()
    if r < 0.15:
        body = body.lower()
    elif r < 0.25:
        body = body.rstrip("?.")
    return (pre + body + post).strip()


def conversations(seed: int = 0, per_fact: int = 72) -> list[list[dict]]:
    """Training conversations: `per_fact` paraphrased exchanges per fact, shuffled."""
    rng = random.Random(seed)
    convs: list[list[dict]] = []
    for fact in FACTS:
        for i in range(per_fact):
            q = _variants(fact.questions[i % len(fact.questions)], rng)
            a = fact.answers[rng.randrange(len(fact.answers))]
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if rng.random() < 0.3:
                msgs.insert(0, {"role": "system", "content": SYSTEM})
            convs.append(msgs)
    # some two-turn conversations, so a follow-up question after an answer works too
    for _ in range(len(FACTS) * per_fact // 6):
        f1, f2 = rng.sample(FACTS, 2)
        convs.append([{"role": "user", "content": _variants(rng.choice(f1.questions), rng)},
                      {"role": "assistant", "content": rng.choice(f1.answers)},
                      {"role": "user", "content": _variants(rng.choice(f2.questions), rng)},
                      {"role": "assistant", "content": rng.choice(f2.answers)}])
    rng.shuffle(convs)
    return convs


def heldout() -> list[tuple[str, list[str]]]:
    """(question, key terms) pairs never seen in training: the demo model's test set."""
    return [(q, f.keys) for f in FACTS for q in f.heldout]


def write_corpus(path: Path, seed: int = 0, per_fact: int = 72) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for msgs in conversations(seed, per_fact):
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path


def key_term_recall(answer: str, keys: list[str]) -> float:
    """The share of key terms present in `answer` (case-insensitive): the held-out metric."""
    a = answer.lower()
    return sum(k.lower() in a for k in keys) / len(keys)
