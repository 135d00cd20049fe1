"""The demo model bundled with llmdesk: `run`, `chat` and `serve` use it when no model is named.

It is built by `make demo-model` (python -m llmdesk.demo.build) with llmdesk's own train +
convert + quantize, from a corpus this package writes itself (llmdesk.demo.corpus). See
MODEL_CARD.md beside the file.
"""

from __future__ import annotations

from pathlib import Path

DEMO_FILE = "llmdesk-demo.gguf"


def default_model_path() -> Path | None:
    """The bundled demo GGUF, or None when this install does not include it."""
    p = Path(__file__).with_name(DEMO_FILE)
    return p if p.is_file() else None
