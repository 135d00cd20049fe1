"""`llmdesk bench --plot FILE.png`: tokens/s against whatever was varied, one line per test kind."""

from __future__ import annotations

from pathlib import Path

from ..errors import LlmdeskError
from .core import BenchRun


def plot_run(run: BenchRun, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker.MaxNLocator below)

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LlmdeskError(f"--plot writes .png, .svg or .pdf files, not '{path.suffix or path.name}'")
    rows = run.rows
    varied = [k for k in ("threads", "batch") if len({getattr(r, k) for r in rows}) > 1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, kind, size_attr in ((axes[0][0], "pp", "n_prompt"), (axes[0][1], "tg", "n_gen")):
        kind_rows = [r for r in rows if r.test.startswith(kind)]
        if not kind_rows:
            ax.set_visible(False)
            continue
        sizes = sorted({getattr(r, size_attr) for r in kind_rows})
        if varied:
            x_attr = varied[0]
            group_attrs = [size_attr] + varied[1:]
        else:
            x_attr, group_attrs = size_attr, []
        groups: dict[tuple, list] = {}
        for r in kind_rows:
            groups.setdefault(tuple(getattr(r, a) for a in group_attrs), []).append(r)
        for key, rs in sorted(groups.items()):
            rs.sort(key=lambda r: getattr(r, x_attr))
            xs = [getattr(r, x_attr) for r in rs]
            label = ", ".join(f"{a.replace('n_prompt', 'pp').replace('n_gen', 'tg')}={v}" for a, v in zip(group_attrs, key)) or kind
            if len(xs) > 1:
                ax.errorbar(xs, [r.tokens_per_second for r in rs], yerr=[r.stddev for r in rs], marker="o", capsize=3, label=label)
            else:
                ax.bar([str(x) for x in xs], [r.tokens_per_second for r in rs], yerr=[r.stddev for r in rs], capsize=3, label=label)
        ax.set_xlabel({"n_prompt": "prompt tokens", "n_gen": "generated tokens"}.get(x_attr, x_attr))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel("tokens/s")
        ax.set_title("prompt processing" if kind == "pp" else "generation")
        ax.grid(True, alpha=0.3)
        if len(groups) > 1 or group_attrs:
            ax.legend(fontsize=8)
        if x_attr == size_attr and len(sizes) > 1 and max(sizes) / max(min(sizes), 1) >= 8:
            ax.set_xscale("log", base=2)
    fig.suptitle(f"{run.model} ({run.file_type or '?'}) on {run.machine.get('cpu', '?')}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
