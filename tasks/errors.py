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


def did_you_mean(value: object, known, *, cutoff: float = 0.6, ignore_case: bool = False, prefix: str = "",
                 form: str = " (did you mean {!r}?)") -> str:
    """``" (did you mean 'x'?)"`` for the name in ``known`` closest to ``value``, or ``""`` when none is close.

    ``cutoff``: the least similarity (0-1) to suggest a name; ``ignore_case``: compare lower-cased, suggest the name
    as spelt in ``known``; ``prefix``: prepended to the suggestion (a dotted key's section, ``"train."``);
    ``form``: the text around the suggestion, ``{!r}`` where it goes.
    """
    import difflib

    fold = (lambda v: str(v).lower()) if ignore_case else str
    options = {fold(k): k for k in known}
    close = difflib.get_close_matches(fold(value), list(options), n=1, cutoff=cutoff)
    if not close:
        return ""
    match = options[close[0]]
    return form.format(f"{prefix}{match}" if prefix else match)
