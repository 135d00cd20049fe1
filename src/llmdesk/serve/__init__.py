"""`llmdesk serve`: an OpenAI- and Ollama-compatible HTTP server over the Engine, with a web chat.

    from llmdesk.serve import ServeConfig, create_app, BackgroundServer

FastAPI is imported only when this package is, not by `import llmdesk`.
"""

from .app import BackgroundServer, create_app
from .config import ServeConfig

__all__ = ["BackgroundServer", "ServeConfig", "create_app"]
