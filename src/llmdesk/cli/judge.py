"""`llmdesk eval judge`: a model grades answers (MT-Bench style) or compares two models' answers."""

from __future__ import annotations

from .evaluate import eval_app  # noqa: F401 (the command registers on the eval group)
