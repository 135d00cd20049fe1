"""llmdesk bench: rows like llama-bench's, stored and compared, every output format, bench serve."""

from __future__ import annotations

import csv
import io
import json
import sys
import types

import pytest

from llmdesk.bench.core import parse_list, run_bench, store_run
from llmdesk.cli.main import main
from llmdesk.errors import LlmdeskError


@pytest.fixture(autouse=True)
def fixed_machine(monkeypatch):
    from llmdesk.fit import hardware

    monkeypatch.setattr(hardware, "measure_bandwidth", lambda *a, **k: 20.0)
    monkeypatch.setattr(hardware, "cpu_peak_gflops", lambda *a, **k: 200.0)


def test_parse_list():
    assert parse_list("128,512", "-p", [1]) == [128, 512]
    assert parse_list(["1-3", "8"], "-t", [1]) == [1, 2, 3, 8]
    assert parse_list(None, "-p", [512]) == [512]
    with pytest.raises(LlmdeskError, match="numbers separated by commas"):
        parse_list("12x", "-p", [512])
    with pytest.raises(LlmdeskError, match="at least 1"):
        parse_list("0", "-t", [1], minimum=1)


def test_every_combination_is_a_row(tiny_gguf):
    run = run_bench(str(tiny_gguf), prompts=[16, 32], gens=[8], threads=[1, 2], batches=[16], reps=2)
    assert [(r.test, r.threads) for r in run.rows] == [
        ("pp16", 1), ("pp32", 1), ("tg8", 1), ("pp16", 2), ("pp32", 2), ("tg8", 2)]
    for r in run.rows:
        assert r.tokens_per_second > 0 and r.stddev >= 0 and len(r.samples) == 2
    tg = run.rows[2]
    assert tg.n_gen == 8 and tg.n_prompt == 0 and tg.ttft_ms is None
    # achieved bandwidth is bytes read per token x tokens/s, against the (fixed) 20 GB/s machine
    assert tg.achieved_gbs == pytest.approx(tg.bytes_per_token * tg.tokens_per_second / 1e9)
    assert tg.roofline_fraction == pytest.approx(tg.achieved_gbs / 20.0)
    assert run.rows[0].ttft_ms > 0 and run.rows[0].n_prompt == 16
    assert len(run.sha256) == 64


def test_prompt_rows_are_not_shortened_by_the_prefix_cache(tiny_gguf):
    """Each repetition uses a new random prompt: prefill always processes all N tokens."""
    from llmdesk.bench.core import EngineBench
    from llmdesk.runtime.llama import LlamaModel

    llama = LlamaModel(tiny_gguf)
    eb = EngineBench(llama, n_ctx=256, threads=1, batch=64)
    try:
        r1 = eb._run(eb.tokens(40), 1)
        r2 = eb._run(eb.tokens(40), 1)
        assert r1.n_cached == 0 and r2.n_cached == 0
    finally:
        eb.close()
        llama.close()


def test_cli_json_rows_stored_and_compared(tiny_gguf, capsys):
    args = ["bench", str(tiny_gguf), "-p", "16", "-n", "8", "-r", "2", "-b", "16", "-t", "1"]
    assert main(args + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["test"] for r in rows] == ["pp16", "tg8"]
    for r in rows:
        for k in ("test", "n_prompt", "n_gen", "threads", "tokens_per_second", "stddev"):
            assert k in r
    from llmdesk.store.results import query

    stored = query("bench")
    assert {s["settings"]["test"] for s in stored} == {"pp16", "tg8"} and stored[0]["model_sha256"]
    assert main(args + ["--compare"]) == 0
    o = capsys.readouterr().out
    assert "earlier runs of this model" in o and o.count("pp16") >= 2


def test_cli_csv_md_and_plot(tiny_gguf, tmp_path, capsys):
    base = ["bench", str(tiny_gguf), "-p", "8,16", "-n", "4", "-r", "1", "-t", "1", "--no-save"]
    assert main(base + ["--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["test"] for r in rows] == ["pp8", "pp16", "tg4"]
    assert main(base + ["--md"]) == 0
    assert "| pp16 | 1 |" in capsys.readouterr().out
    png = tmp_path / "speed.png"
    assert main(base + ["--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["-p", "abc"], "-p takes numbers"),
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["-r", "0"], "at least 1"),
    (["--plot", "x.jpg"], "--plot writes .png"),
    (["--bogus"], "unexpected argument"),
])
def test_cli_bad_input_is_one_line(tiny_gguf, capsys, args, message):
    rc = main(["bench", str(tiny_gguf), "--no-save"] + args)
    assert rc in (1, 2)
    e = capsys.readouterr().err
    assert message in e and e.count("\n") == 1


def test_cli_missing_or_non_model_file(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope.gguf")]) == 1
    assert "no such file" in capsys.readouterr().err
    f = tmp_path / "x.gguf"
    f.write_bytes(b"PK\x03\x04 zip")
    assert main(["bench", str(f)]) == 1
    assert "not a GGUF file" in capsys.readouterr().err


def test_bench_serve_dispatches_to_the_load_generator(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("llmdesk.bench.load")
    fake.main = lambda **kw: calls.append(kw) or 0
    monkeypatch.setitem(sys.modules, "llmdesk.bench.load", fake)
    import llmdesk.bench

    monkeypatch.setattr(llmdesk.bench, "load", fake, raising=False)
    assert main(["bench", "serve", "http://127.0.0.1:9", "--concurrency", "1,4", "--requests", "10",
                 "--prompt-tokens", "64", "--max-tokens", "32", "--json"]) == 0
    assert calls == [{"url": "http://127.0.0.1:9", "concurrency": [1, 4], "requests": 10, "prompt_tokens": 64,
                      "max_tokens": 32, "json_out": True}]
    assert main(["bench", "serve", "http://x", "-c", "2", "--api-key", "k", "--model", "m"]) == 0
    assert calls[-1]["api_key"] == "k" and calls[-1]["model"] == "m" and calls[-1]["concurrency"] == [2]
    fake.main = lambda **kw: 1  # no request succeeded: a non-zero exit
    assert main(["bench", "serve", "http://x"]) == 1
    assert main(["bench", "serve"]) == 1
    assert "needs the server's URL" in capsys.readouterr().err


def test_store_run_one_row_per_test(tiny_gguf):
    run = run_bench(str(tiny_gguf), prompts=[8], gens=[4], threads=[1], reps=1)
    assert len(store_run(run)) == 2


def test_gpu_layers_without_a_gpu_backend_is_a_cpu_run(tiny_gguf):
    """-ngl reaches llama.cpp; on a build with no GPU backend (this one) every layer stays on the
    CPU, so the run is a CPU run, with its roofline shares."""
    from llmdesk.runtime.llama import gpu_offload

    assert not gpu_offload()
    run = run_bench(str(tiny_gguf), prompts=[8], gens=[4], threads=[1], reps=1, gpu_layers=999)
    assert run.machine["gpu_layers"] == 0
    assert [(r.test, len(r.samples)) for r in run.rows] == [("pp8", 1), ("tg4", 1)]
    assert [r.roofline_fraction is not None for r in run.rows if r.test.startswith("tg")] == [True]
