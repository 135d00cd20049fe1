"""`llmdesk tune`: fine-tune a model on your own data (LoRA, QLoRA, full)."""

from __future__ import annotations

from .app import app  # noqa: F401 (the command registers on the app)
