"""The JSON parser of every API view: refuses, with a 400 ``parse_error``, what json.loads would let through.

DRF's JSONParser hands anything ``json.loads`` accepts to the view: a 100k-deep ``[[[...]]]`` raises RecursionError
(a 500), lone surrogates (``"\\ud800"``) reach PostgreSQL (which raises), ``NaN`` and ``1e999`` become floats no
column stores. This parser checks the size, then the nesting depth with a scan that never recurses, then parses with
NaN/Infinity and out-of-range numbers refused, then checks that every string (keys too) is valid UTF-8.
"""

from __future__ import annotations

import json
import math
import re

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

MAX_DEPTH = 32  # arrays + objects; the deepest real body (an announcement's interventions) is 3
MAX_NUMBER_CHARS = 40  # an int64 has 19 digits, a float repr at most 24 characters

# A JSON string token, or one bracket. Possessive quantifiers: linear time, no backtracking on long strings.
_STRUCTURE = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]', re.DOTALL)


class StrictJSONParser(JSONParser):
    """``application/json`` bodies of at most ``max_bytes`` (default ``SOP_MAX_REQUEST_BYTES``), nested at most
    ``max_depth`` deep, finite numbers only, strings that are valid UTF-8."""

    max_bytes: int | None = None  # None: settings.SOP_MAX_REQUEST_BYTES, read per request
    max_depth = MAX_DEPTH

    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        limit = self.max_bytes if self.max_bytes is not None else settings.SOP_MAX_REQUEST_BYTES
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise ParseError(f"JSON body over {limit} bytes")
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            raise ParseError(f"JSON body is not valid {encoding}") from None
        depth = _max_depth(text)
        if depth > self.max_depth:
            raise ParseError(f"JSON nested deeper than {self.max_depth} levels")
        try:
            data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
        except ParseError:
            raise
        except (ValueError, RecursionError, OverflowError, MemoryError) as exc:
            raise ParseError(f"JSON parse error - {_short(exc)}") from None
        _check_strings(data)
        return data


def _max_depth(text: str) -> int:
    """How deep arrays and objects nest, ignoring brackets inside strings. Never recurses."""
    depth = deepest = 0
    for match in _STRUCTURE.finditer(text):
        token = match.group()
        if token == "[" or token == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif token == "]" or token == "}":
            depth -= 1
    return deepest


def _refuse_constant(name: str):
    raise ParseError(f"JSON constant {name} is not allowed (numbers must be finite)")


def _finite_float(raw: str) -> float:
    if len(raw) > MAX_NUMBER_CHARS:
        raise ParseError(f"JSON number of {len(raw)} characters")
    value = float(raw)
    if not math.isfinite(value):
        raise ParseError(f"JSON number {raw[:40]} is out of range")
    return value


def _bounded_int(raw: str) -> int:
    if len(raw) > MAX_NUMBER_CHARS:
        raise ParseError(f"JSON number of {len(raw)} digits")
    return int(raw)


def _check_strings(data) -> None:
    """Every string, key or value, must encode as UTF-8: a lone surrogate from a ``\\ud800`` escape does not."""
    pending = [data]  # bounded by MAX_DEPTH levels, but iterative all the same
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            _utf8(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                _utf8(key)
                pending.append(value)
        elif isinstance(item, list):
            pending.extend(item)


def _utf8(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ParseError("JSON string is not valid UTF-8 (a lone surrogate escape)") from None


def _short(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deep"
    return str(exc)[:200]
