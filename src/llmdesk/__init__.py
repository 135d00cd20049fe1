"""llmdesk: run, measure, tune and evaluate large language models on your own machine.

    >>> import llmdesk
    >>> model = llmdesk.load("path/to/model.gguf")      # or "openai:http://HOST:PORT/v1#MODEL"
    >>> model.generate("The capital of France is", max_tokens=8, temperature=0)
    >>> llmdesk.ask("When do backups run?", "notes", model=model).citations   # from `llmdesk docs add`
"""

from .errors import LlmdeskError

__version__ = "0.1.0"
__all__ = ["load", "ask", "Model", "RemoteModel", "ModelRef", "LlmdeskError", "__version__"]


def __getattr__(name: str):
    # llama.cpp is loaded only when a model is: `import llmdesk` stays cheap
    if name in ("load", "Model"):
        from .runtime import model

        return getattr(model, name)
    if name == "ask":
        from .rag.answer import ask

        return ask
    if name == "RemoteModel":
        from .runtime.remote import RemoteModel

        return RemoteModel
    if name == "ModelRef":
        from .store.refs import ModelRef

        return ModelRef
    raise AttributeError(name)
