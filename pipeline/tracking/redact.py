"""Secrets out of everything tracking writes or says: URIs, params, tags, messages."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from typing import Any

# MLflow's limits (mlflow.utils.validation): longer values are refused by the store, not truncated.
MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH, MAX_KEY_LENGTH = 6000, 8000, 250


def warn(message: str) -> None:
    print(f"metatrain: warning: {redact_uri(message)}", file=sys.stderr, flush=True)


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return redact_uri(text if len(text) <= limit else text[: limit - 3] + "...")


# scheme://user:password@ -- greedy to the last '@' before a '/', so a badly escaped password is masked whole.
_USERINFO_RE = re.compile(r"(?P<pre>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^\s/]*)@")
_QUERY_RE = re.compile(r"(?P<pre>[?&;](?P<name>[^=&#\s?]*)=)(?P<val>[^&#\s]*)")
_SECRET_QUERY = ("token", "password", "passwd", "pwd", "secret", "key", "auth", "signature", "credential")


def redact_uri(uri: str) -> str:
    """``uri`` (or any text holding URIs) with passwords and secret query values (token=, key=, ...) as ``***``."""
    if not isinstance(uri, str) or ("://" not in uri and "=" not in uri):
        return uri
    text = _USERINFO_RE.sub(lambda m: m.group("pre") + "***@", uri)

    def query(m: re.Match) -> str:
        name = m.group("name").lower()
        secret = (any(w in name for w in _SECRET_QUERY) or name == "sig") and m.group("val")
        return m.group("pre") + ("***" if secret else m.group("val"))

    return _QUERY_RE.sub(query, text) if "?" in text else text


_SECRET_WORDS = {"password", "passwd", "pwd", "passphrase", "token", "secret", "apikey", "credential", "credentials"}
_SECRET_PARTS = ("api_key", "apikey", "access_key", "accesskey", "secret_key", "private_key", "privatekey")


def _is_secret_key(key: str) -> bool:
    """``db.password``, ``hf_token``, ``apiKey``: whole words only, so ``tokenizer`` or ``max_tokens`` are not."""
    last = str(key).rsplit(".", 1)[-1].lower()
    return bool(set(re.split(r"[^a-z0-9]+", last)) & _SECRET_WORDS) or any(p in last for p in _SECRET_PARTS)


def _scrub(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: "***" if _is_secret_key(str(k)) and v not in (None, "") else _scrub(v) for k, v in value.items()}
    return [_scrub(v) for v in value] if isinstance(value, (list, tuple)) else value


def _truncate(text: str, limit: int) -> str:
    suffix = f"...[truncated from {len(text)} chars]"
    return text if len(text) <= limit else text[: limit - len(suffix)] + suffix


def clean_key(key: str) -> str:  # MLflow keys: alphanumerics and "_-. :/", up to 250 characters
    return re.sub(r"[^\w.\- :/]", "_", str(key))[:MAX_KEY_LENGTH]


def param_value(key: str, value: Any, limit: int = MAX_PARAM_VALUE_LENGTH) -> str:
    if _is_secret_key(key) and value not in (None, ""):
        return "***"
    # JSON for non-strings (true, null, [64, 64]): the way the value reads in a config file, on every machine.
    text = value if isinstance(value, str) else json.dumps(_scrub(value), default=str)
    return _truncate(redact_uri(text), limit)


def flatten_config(d: Mapping, prefix: str = "") -> dict[str, str]:
    """``{"train": {"steps": 1000}}`` -> ``{"train.steps": "1000"}``, secrets masked, MLflow's length limit kept."""
    out: dict[str, str] = {}
    base = f"{prefix}." if prefix and not prefix.endswith(".") else prefix
    for k, v in d.items():
        out.update(flatten_config(v, f"{base}{k}") if isinstance(v, Mapping) and v else
                   {f"{base}{k}": param_value(f"{base}{k}", v)})
    return out
