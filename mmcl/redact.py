"""Credentials out of everything mmcl writes or prints.

Shard strings may carry secrets: `https://user:token@host/d/{00000..00127}.tar`, a `?token=` or
signed-URL query, `pipe:curl -H "Authorization: Bearer ..." ...`, or a `$VAR` whose value is a
token. `redact(text)` keeps what a reader needs (scheme, host, path shape, option and header
names) and replaces the secret parts with `***`:

    https://user:tok@host/d/00001.tar?sig=abc&exp=9  ->  https://***@host/d/00001.tar?sig=***&exp=***
    pipe:curl -s -H "Authorization: Bearer abc" URL  ->  pipe:curl -s -H "Authorization: ***" URL
    pipe:curl -u me:pw URL, --token abc, AWS_SECRET_ACCESS_KEY=abc cmd  ->  -u ***, --token ***, AWS_SECRET_ACCESS_KEY=*** cmd

A value that came from an environment variable goes back to its name: every value mmcl
expanded itself (`expand_env`) and every variable whose name says it is a secret (`HF_TOKEN`,
`*_KEY`, `*PASSWORD*`...), 8 characters or longer, becomes `$NAME`. `$NAME` references written
as such are kept: they reveal nothing.

`redact_tree` does the same to every string in a nested dict/list (configs). This module
imports only the standard library.
"""
from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["MASK", "redact", "redact_tree", "expand_env"]

MASK = "***"
MIN_ENV_VALUE = 8  # shorter environment values are not looked for in text (too many false hits)
_SECRET_WORDS = r"TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|APIKEY|API_KEY|ACCESS_KEY|PRIVATE_KEY|AUTH|SIGNATURE|_KEY$|^KEY_|_KEY_"
_SECRET_NAME = re.compile(_SECRET_WORDS, re.IGNORECASE)
_REFERENCE = re.compile(r"(?:(?:Bearer|Basic|Token|Digest)\s+)?(?:\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|[:\s])*")  # names only

_expanded: dict[str, str] = {}  # value -> name of every variable mmcl expanded in this process

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_END = r"\s'\"`<>|;()"  # what ends a URL inside a command line, Markdown or a message
_USERINFO = re.compile(rf"(?P<head>{_SCHEME})(?P<secret>[^/?#@{_END}]+)@")
_QUERY = re.compile(rf"(?P<head>{_SCHEME}[^?#{_END}]*)\?(?P<query>[^#{_END}]*)")
_QUOTED_HEADER = re.compile(r"(?P<head>(?<![\w-])(?:-H|--header)(?:\s*=\s*|\s*)(?P<q>['\"])\s*[\w-]+\s*:\s*)(?P<secret>.*?)(?=(?P=q))")
_BARE_HEADER = re.compile(r"(?P<head>(?<![\w-])(?:-H|--header)(?:\s*=\s*|\s+)[\w-]+:)(?P<secret>[^\s'\"`]+)")
_QUOTED = r"(?:'[^']*'|\"[^\"]*\"|[^\s'\"]+)"
_USER_OPTION = re.compile(rf"(?P<head>(?<![\w-])(?:--user|--proxy-user)(?:\s*=\s*|\s+)|(?<![\w-])-u\s*(?=['\"]?[^\s'\"]*:))"
                          rf"(?P<secret>{_QUOTED})")  # curl's user:password (`-u` only with a `:`, not `python -u`)
_SECRET_OPTION = re.compile(
    rf"(?P<head>(?<![\w-])--?[\w-]*(?:token|secret|password|passwd|apikey|api-key|access-key|private-key|credential|bearer|auth|signature)[\w-]*(?:\s*=\s*|\s+))"
    rf"(?P<secret>{_QUOTED})", re.IGNORECASE)
_ASSIGNMENT = re.compile(rf"(?P<head>(?<![\w$-])(?P<name>[A-Z_][A-Z0-9_]*)=)(?P<secret>{_QUOTED})")
_BEARER = re.compile(r"(?P<head>\bBearer\s+)(?P<secret>[A-Za-z0-9._~+/=\-]+)")


def expand_env(text: str) -> str:
    """`os.path.expandvars(text)`, remembering each value it put in, so `redact` turns it back into `$NAME`."""
    for match in re.finditer(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))", text):
        name = match["braced"] or match["plain"]
        value = os.environ.get(name)
        if value and len(value) >= MIN_ENV_VALUE:
            _expanded.setdefault(value, name)
    return os.path.expandvars(text)


def _env_values() -> list[tuple[str, str]]:
    """(value, name) to look for, longest value first: mmcl's expansions and secret-named variables."""
    found = {value: name for value, name in _expanded.items() if os.environ.get(name) == value}  # not stale
    for name, value in os.environ.items():
        if len(value) >= MIN_ENV_VALUE and _SECRET_NAME.search(name):
            found.setdefault(value, name)
    return sorted(found.items(), key=lambda item: -len(item[0]))


def _masked(value: str) -> str:
    """MASK, unless `value` is only `$NAME` references (what the user wrote; the shell fills it in)."""
    stripped = value.strip("'\"")
    return value if stripped and _REFERENCE.fullmatch(stripped) else MASK


def _keep_quotes(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        inner = _masked(value[1:-1])
        return value[0] + inner + value[0]
    return _masked(value)


def _query(match: re.Match) -> str:
    parts = []
    for item in match["query"].split("&"):
        key, equals, value = item.partition("=")
        if not item:
            parts.append(item)
        elif equals:
            parts.append(f"{key}={_masked(value) if value else value}")
        else:  # a bare token (`?abcdef`)
            parts.append(_masked(item))
    return f"{match['head']}?{'&'.join(parts)}"


def _assignment(match: re.Match) -> str:
    if not _SECRET_NAME.search(match["name"]):
        return match[0]
    return match["head"] + _keep_quotes(match["secret"])


def redact(text: str) -> str:
    """`text` with credentials replaced by `***` and environment values by `$NAME` (see the module docstring)."""
    if not isinstance(text, str) or not text:
        return text
    for value, name in _env_values():
        if value in text:
            text = text.replace(value, f"${name}")
    text = _USERINFO.sub(lambda m: m["head"] + _masked(m["secret"]) + "@", text)
    text = _QUERY.sub(_query, text)
    text = _QUOTED_HEADER.sub(lambda m: m["head"] + _masked(m["secret"]), text)
    text = _BARE_HEADER.sub(lambda m: m["head"] + _masked(m["secret"]), text)
    text = _USER_OPTION.sub(lambda m: m["head"] + _keep_quotes(m["secret"]), text)
    text = _SECRET_OPTION.sub(lambda m: m["head"] + _keep_quotes(m["secret"]), text)
    text = _ASSIGNMENT.sub(_assignment, text)
    text = _BEARER.sub(lambda m: m["head"] + _masked(m["secret"]), text)
    return text


def redact_tree(value: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every string (keys too) passed through `redact`."""
    if isinstance(value, dict):
        return {redact_tree(key): redact_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(item) for item in value)
    return redact(value) if isinstance(value, str) else value
