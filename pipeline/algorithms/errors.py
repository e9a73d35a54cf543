"""Errors the algorithms raise for bad input; all are :class:`tasks.errors.MetatrainError` (one-line messages)."""

from metatrain.tasks.errors import MetatrainError


class AlgorithmConfigError(MetatrainError):
    """An algorithm setting is unknown, out of range or inconsistent with the model; the message names the field."""


class TaskMismatchError(MetatrainError):
    """An episode does not fit the model (labels outside the head's ways, wrong label dtype)."""


class NonFiniteGradientError(MetatrainError):
    """A gradient came out NaN or Inf; the message names the algorithm, episode, step and parameter."""
