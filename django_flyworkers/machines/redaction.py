"""Removing a Fly API token, and every piece of it, from text shown to people.

The client never puts the token into an error, a log line or a repr itself, but a server or
proxy may echo it back (a 401 body quoting the ``Authorization`` header), and callers store
error text in the database and print it. Before any such text leaves the client it goes
through a :class:`Redactor`, which removes:

- the whole token, with or without its ``FlyV1``/``Bearer`` scheme;
- each comma-separated macaroon of a multi-macaroon token, with or without its
  ``fm2_``-style prefix;
- any *head* of those (8 characters or more) where the text stops or stops looking like a
  token: the remains of an echo cut at 500 or 120 characters;
- any *tail* of them (8 characters or more) where the text starts or follows a character
  that is not token-like: an echo cut at the front;
- the same forms percent-encoded, as a proxy may quote a header in a URL.

A head or tail that runs into other token-like text (``flyworkers-abc`` against the
placeholder token ``flyworkers-test-token``) is a different string, not an echo, and is kept:
that way readable names in messages survive a readable test token. Tokens shorter than 8
characters are test placeholders and are left alone, since redacting them would mangle
ordinary words.

Usage::

    redactor = Redactor(token)          # once per token
    safe = redactor(text)
    safe = redact(text, token)          # one-off
"""

from __future__ import annotations

import re
import string
from urllib.parse import quote

__all__ = ["MIN_FRAGMENT", "REPLACEMENT", "Redactor", "redact"]

MIN_FRAGMENT = 8
"""Shortest piece of a token that is removed (and shortest token redacted at all)."""
REPLACEMENT = "[redacted]"
"""What a removed piece is replaced with."""

# "FlyV1 fm2_...", "Bearer ...", and "Bearer FlyV1 ..." as some clients send it.
_SCHEME = re.compile(r"^(?:(?:FlyV1|Bearer)\s+)+", re.IGNORECASE)
# fm1r_, fm1a_, fm2_ today (fly-go's tokens.go); any later fmN*_ the same way.
_MACAROON_PREFIX = re.compile(r"^fm\d+[a-z]*_")
_TOKEN_LIKE = frozenset(string.ascii_letters + string.digits + "_-")


class Redactor:
    """Removes one token, and every piece of it, from text (see the module docstring).

    Build it once per token: it precomputes the forms to look for. Its repr never shows the
    token.
    """

    __slots__ = ("_forms", "_replacement")

    def __init__(self, token: str | None, *, replacement: str = REPLACEMENT) -> None:
        self._forms = _forms(token or "")
        self._replacement = replacement

    def __call__(self, text: str) -> str:
        """``text`` with every piece of the token replaced by ``[redacted]``."""
        if not self._forms or not text:
            return text
        spans = [span for form in self._forms for span in _find(text, form)]
        if not spans:
            return text
        parts: list[str] = []
        position = 0
        for start, end in _merge(spans):
            parts.append(text[position:start])
            parts.append(self._replacement)
            position = end
        parts.append(text[position:])
        return "".join(parts)

    def redact_bytes(self, data: bytes) -> bytes:
        """Same as calling it, for a response body (decoded as UTF-8, errors replaced)."""
        if not self._forms or not data:
            return data
        text = data.decode("utf-8", errors="replace")
        cleaned = self(text)
        return data if cleaned == text else cleaned.encode("utf-8")

    def __bool__(self) -> bool:
        """False when there is nothing to redact (no token, or a placeholder under 8 chars)."""
        return bool(self._forms)

    def __repr__(self) -> str:
        return f"Redactor(forms={len(self._forms)})"


def redact(text: str, token: str | None) -> str:
    """``text`` with every piece of ``token`` removed; see :class:`Redactor`."""
    return Redactor(token)(text)


def _forms(token: str) -> tuple[tuple[str, frozenset[str]], ...]:
    """Every spelling of the token worth looking for, longest first, with its alphabet."""
    token = token.strip()
    if len(token) < MIN_FRAGMENT:
        return ()
    body = _SCHEME.sub("", token)
    found = {token, body}
    for piece in body.split(","):
        piece = piece.strip()
        found.add(piece)
        found.add(_MACAROON_PREFIX.sub("", piece))
    found |= {quote(form, safe="") for form in found}
    kept = sorted((form for form in found if len(form) >= MIN_FRAGMENT), key=len, reverse=True)
    return tuple((form, _TOKEN_LIKE | frozenset(form)) for form in kept)


def _find(text: str, entry: tuple[str, frozenset[str]]) -> list[tuple[int, int]]:
    """Spans of ``text`` holding the form whole, or a cut-off head or tail of it."""
    form, alphabet = entry
    spans: list[tuple[int, int]] = []
    size = len(form)
    head, tail = form[:MIN_FRAGMENT], form[-MIN_FRAGMENT:]
    start = text.find(head)
    while start != -1:
        length = MIN_FRAGMENT
        while length < size and start + length < len(text):
            if text[start + length] != form[length]:
                break
            length += 1
        stop = start + length
        # A head that runs on into other token-like text is another string, not an echo.
        if length == size or stop == len(text) or text[stop] not in alphabet:
            spans.append((start, stop))
        start = text.find(head, start + 1)
    end = text.find(tail)
    while end != -1:
        stop = end + MIN_FRAGMENT
        length = MIN_FRAGMENT
        while length < size and stop - length > 0:
            if text[stop - length - 1] != form[size - length - 1]:
                break
            length += 1
        begin = stop - length
        if length == size or begin == 0 or text[begin - 1] not in alphabet:
            spans.append((begin, stop))
        end = text.find(tail, end + 1)
    return spans


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping spans covering every given one (touching spans join)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged
