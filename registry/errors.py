"""Errors of the registry jobs that are the user's to fix (exit code 2, `error: ...`)."""

from __future__ import annotations


class PromoteError(ValueError):
    """The k-fold run, its folds or the selection metric cannot be promoted; says why."""


class PredictError(ValueError):
    """The model or the input data of a predict job cannot be used; names which."""


class ExplainError(ValueError):
    """The model or the images of an explain job cannot be used; names which."""
