"""`llmdesk ask`: an answer from your documents, citing its sources."""

from __future__ import annotations
