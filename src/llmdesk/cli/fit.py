"""`llmdesk fit`: see its issue; registers its commands on `app`."""

from .app import app  # noqa: F401
