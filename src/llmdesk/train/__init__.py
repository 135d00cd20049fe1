"""Pretraining small Llama-architecture models from scratch (torch lives only here and in the converter).

Nothing here imports torch at import time: `llmdesk.train.config` is plain data, and the training
loop (`llmdesk.train.loop`) imports torch when it is called.
"""

from llmdesk.train.config import PRESETS, TrainConfig

__all__ = ["PRESETS", "TrainConfig", "train"]


def train(*args, **kwargs):
    """See llmdesk.train.loop.train."""
    from llmdesk.train.loop import train as _train

    return _train(*args, **kwargs)
