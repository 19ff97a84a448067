"""Errors that name the problem and the fix, shown as one line rather than a stack of frames.

IPython (Jupyter, Colab, Kaggle, the kernel papermill runs) calls `_render_traceback_` when an
exception has one and prints what it returns instead of the traceback: a user who passed a wrong
path reads one sentence, not forty lines of the suite's internals. The pipeline prints the same
name and message.
"""
from __future__ import annotations


class OneLine:
    """Mixin: render as `Name: message` in IPython."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class SuiteError(OneLine, Exception):
    """Base of the suite's user-facing errors."""


class TrainingInterrupted(OneLine, KeyboardInterrupt):
    """Ctrl-C or the stop button, after the training state was saved; still a KeyboardInterrupt, so
    that nothing catching Exception swallows it."""


class MissingRunFile(SuiteError, FileNotFoundError):
    """A file a step needs that an earlier step writes (prepared data, metrics, a checkpoint)."""
