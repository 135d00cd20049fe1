"""Errors a user can cause and fix. The CLI prints them as one line and exits non-zero;
anything else that escapes is a bug and keeps its traceback."""


class LlmdeskError(Exception):
    """What went wrong, with which file or field, and what to do about it: one line."""

    exit_code = 1


class ModelNotFound(LlmdeskError):
    pass


class BadModelFile(LlmdeskError):
    """A file that is not a valid GGUF model (truncated, corrupted, hostile, another format)."""


class TemplateError(LlmdeskError):
    """A chat template that cannot be rendered, or that was refused by the sandbox."""
