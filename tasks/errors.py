"""The one error type users see.

Every bad input that metatrain can name (a missing archive, a corrupt store, an impossible episode shape, an
unknown config key) raises :class:`MetatrainError` with a one-line message that names the field or file. The CLI
turns it into ``metatrain: error: <message>`` and exit code 2; anything else is a bug and keeps its traceback.
"""


class MetatrainError(Exception):
    """A user-facing error: bad input, bad data or bad configuration, with a one-line message."""


class DataError(MetatrainError):
    """A source archive, image file or prepared store is missing, unreadable or inconsistent."""


class EpisodeError(MetatrainError):
    """An episode cannot be drawn as asked (ways, shots, queries or split do not fit the data)."""


def did_you_mean(value: object, known, *, cutoff: float = 0.6) -> str:
    """``" (did you mean 'x'?)"`` for the name in ``known`` closest to ``value``, or ``""`` when none is close."""
    import difflib

    close = difflib.get_close_matches(str(value), list(known), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""
