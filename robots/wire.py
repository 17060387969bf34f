"""Typed JSON messages with limits: the one validation layer of both sockets, and the JSON Schema of both.

robots/protocol.py (robot <-> server, /ws/robots/) and robots/console_protocol.py (browser <-> server, /ws/console/)
define their messages with this module; docs/schema/*.schema.json are generated from them (``json_schema``).

A message is a frozen dataclass with a ``TYPE``; each field's type hint says which JSON value it takes (str, int,
float, bool, ``Optional[...]``, ``list[...]``, or a ``Struct``: a nested object) and ``spec(...)`` in the field's
metadata says its limits. Every frame is held to:
- size in BYTES as it travels (UTF-8), before parsing and again when a message is encoded, so that a frame relayed
  from one socket to another can never exceed what the receiving peer accepts;
- nesting depth (a deeply nested document would otherwise exhaust the parser's recursion);
- per field: type, string length in characters, valid Unicode (JSON escapes can smuggle lone surrogates, which no
  database or UTF-8 peer accepts), ASCII-only where the peer needs it (SDP), ``re.fullmatch`` patterns (``$`` would
  accept a trailing newline), allowed values, numeric ranges, list lengths.
Unknown extra fields are ignored, so a newer peer can add optional fields; anything that changes meaning bumps the
protocol's version. Pure: stdlib only (the robot agent imports it without Django).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import types
import typing
from typing import Any, ClassVar, Iterable, Optional

MAX_STRING = 2000  # characters of a string field unless its spec says otherwise
MAX_DEPTH = 8  # nesting of objects and arrays, the top-level object counting as 1
MAX_INT = 2**53  # |int| without a spec: what a JavaScript peer can represent exactly
MAX_FLOAT = 1e18  # |float| without a spec (unix milliseconds fit)


class ProtocolError(ValueError):
    """A message that cannot be accepted. ``code`` is stable and machine-readable."""

    def __init__(self, code: str, message: str, ref_type: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref_type = ref_type


class WireError(str, enum.Enum):
    """The codes this layer raises; each protocol maps them onto its own error codes."""

    MALFORMED = "malformed"  # not JSON, not an object, nested too deeply
    TOO_LARGE = "too_large"
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    INVALID = "invalid"  # a field is missing or has the wrong type / value


@dataclasses.dataclass(frozen=True)
class Spec:
    """Limits of one field (all optional)."""

    max_len: int = MAX_STRING  # str: characters
    ascii: bool = False  # str: printable ASCII, tab, CR and LF only
    pattern: Optional[str] = None  # str: must match entirely
    choices: Optional[tuple] = None  # allowed values
    min: Optional[float] = None  # numbers
    max: Optional[float] = None
    min_items: int = 0  # lists
    max_items: int = 100
    description: str = ""


def spec(**limits) -> dict:
    """``dataclasses.field(metadata=spec(max_len=500))``."""
    return {"spec": Spec(**limits)}


def values(enum_cls) -> tuple:
    return tuple(m.value for m in enum_cls)


def invalid(message: str) -> ProtocolError:
    return ProtocolError(WireError.INVALID.value, message)


UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
NAME_PATTERN = r"[a-z0-9][a-z0-9_.:-]{0,99}"  # robot and task names (robots/models.py validate_name is stricter)
SHA256_PATTERN = r"[0-9a-f]{64}"
_ASCII_TEXT = re.compile(r"[\t\n\r\x20-\x7e]*")
_PATTERNS: dict[str, re.Pattern] = {}


@dataclasses.dataclass(frozen=True)
class Struct:
    """A nested JSON object of a message (e.g. an RTCIceServer). Validated field by field like a message; the value
    a message holds stays the plain dict it was given (``check_struct``)."""

    DESCRIPTION: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True)
class Message:
    """Base of every message. Subclasses set ``TYPE`` (an enum member or string) and may override ``validate``."""

    TYPE: ClassVar[Any]
    MAX_BYTES: ClassVar[Optional[int]] = None  # overrides the protocol's frame limit for this message type
    DIRECTION: ClassVar[str] = ""  # e.g. "robot -> server", for the schema

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name), hints[f.name], f.metadata.get("spec"), 2)
        self.validate()

    def validate(self) -> None:
        """Value checks across fields; raise ``invalid(...)``."""

    @classmethod
    def type_name(cls) -> str:
        return cls.TYPE.value if isinstance(cls.TYPE, enum.Enum) else str(cls.TYPE)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type_name()}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            body[f.name] = value.value if isinstance(value, enum.Enum) else value
        return body


class Protocol:
    """A set of message types sharing one frame format: ``{"type": <name>, ...fields}``, plus ``"v": version`` when
    the protocol has a version."""

    def __init__(self, name: str, *, version: Optional[int], max_bytes: int, title: str, description: str = ""):
        self.name = name
        self.version = version
        self.max_bytes = max_bytes
        self.title = title
        self.description = description
        self.registry: dict[str, type[Message]] = {}

    def register(self, cls: type[Message]) -> type[Message]:
        self.registry[cls.type_name()] = cls
        return cls

    def limit(self, cls: Optional[type[Message]]) -> int:
        return (cls.MAX_BYTES if cls is not None and cls.MAX_BYTES else None) or self.max_bytes

    # ------------------------------------------------------------ decode / encode

    def decode(self, raw: str | bytes, accept: Optional[Iterable[type[Message]]] = None) -> Message:
        """Parse and validate one frame; never returns a half-valid message. ``accept`` (optional) limits which types
        may arrive (others are ``unknown_type``), e.g. what a browser may send. The byte limit applied before parsing
        is the largest of the acceptable types'."""
        allowed = list(accept) if accept is not None else list(self.registry.values())
        limit = max([self.limit(c) for c in allowed] or [self.max_bytes])
        # A str counts its UTF-8 bytes; its character count is a cheap lower bound to refuse huge frames early.
        if len(raw) > limit or (isinstance(raw, str) and len(raw.encode("utf-8", "surrogatepass")) > limit):
            raise ProtocolError(WireError.TOO_LARGE.value, f"frame of more than {limit} bytes")
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except RecursionError:
            raise ProtocolError(WireError.MALFORMED.value, "JSON nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(WireError.MALFORMED.value, f"not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ProtocolError(WireError.MALFORMED.value, "a message must be a JSON object")
        if depth(body) > MAX_DEPTH:
            raise ProtocolError(WireError.MALFORMED.value, f"JSON nested deeper than {MAX_DEPTH} levels")
        kind = body.get("type")
        ref = kind[:50] if isinstance(kind, str) and valid_text(kind) else None
        if self.version is not None and body.get("v") != self.version:
            raise ProtocolError(WireError.BAD_VERSION.value,
                                f"protocol version {body.get('v')!r} not supported (want {self.version})", ref)
        cls = self.registry.get(kind) if isinstance(kind, str) else None
        if cls is None or (accept is not None and cls not in allowed):
            raise ProtocolError(WireError.UNKNOWN_TYPE.value, f"unknown message type {ref!r}", ref)
        raw_len = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
        if raw_len > self.limit(cls):
            raise ProtocolError(WireError.TOO_LARGE.value, f"{ref} frame of {raw_len} bytes exceeds {self.limit(cls)}",
                                ref)
        return self.from_dict(body)

    def from_dict(self, body: dict[str, Any]) -> Message:
        """A message from an already parsed JSON object (e.g. a channel-layer event), validated like a frame."""
        kind = body.get("type")
        cls = self.registry.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise ProtocolError(WireError.UNKNOWN_TYPE.value, f"unknown message type {kind!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in body.items() if k in names})
        except ProtocolError as exc:
            exc.ref_type = cls.type_name()
            raise
        except TypeError as exc:  # a required field is missing
            raise ProtocolError(WireError.INVALID.value, str(exc).replace(cls.__name__ + ".__init__() ", ""),
                                cls.type_name()) from None

    def encode(self, message: Message) -> str:
        """The frame of ``message``, refused (``too_large``) if its UTF-8 bytes exceed the limit of its type."""
        body = message.to_dict()
        if self.version is not None:
            body = {"v": self.version, **body}
        text = json.dumps(body, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
        size = len(text.encode("utf-8"))
        if size > self.limit(type(message)):
            raise ProtocolError(WireError.TOO_LARGE.value,
                                f"{message.type_name()} message of {size} bytes exceeds {self.limit(type(message))}",
                                message.type_name())
        return text

    # ------------------------------------------------------------ JSON Schema

    def json_schema(self) -> dict[str, Any]:
        """A JSON Schema (draft 2020-12) of every message of this protocol, for peers not written in Python."""
        defs: dict[str, Any] = {}
        refs = []
        for name, cls in sorted(self.registry.items()):
            key = name.replace(".", "_")
            defs[key] = _message_schema(cls, self, defs)
            refs.append({"$ref": f"#/$defs/{key}"})
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://sop.invalid/schema/{self.name}.schema.json",
            "title": self.title,
            "description": (self.description + f" Every frame is one JSON object of at most {self.max_bytes} bytes "
                            f"(UTF-8) unless its type says otherwise (x-max-bytes), nested at most {MAX_DEPTH} levels; "
                            "unknown extra fields are ignored.").strip(),
            "x-max-bytes": self.max_bytes,
            "x-max-depth": MAX_DEPTH,
            "oneOf": refs,
            "$defs": defs,
        }


# ---------------------------------------------------------------- field checks


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``{}`` is 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item)
    return deepest


def valid_text(value: str) -> bool:
    """Encodable as UTF-8: no lone surrogates (which JSON's ``\\ud800`` escapes produce)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_value(name: str, value: Any, annotation: Any, limits: Optional[Spec] = None, level: int = 1) -> None:
    """Raise ``invalid`` unless ``value`` is a JSON value of ``annotation`` within ``limits``."""
    limits = limits or Spec()
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return
        errors = []
        for option in options:
            try:
                return check_value(name, value, option, limits, level)
            except ProtocolError as exc:
                errors.append(exc.message)
        raise invalid(" or ".join(errors) if len(errors) > 1 else errors[0])
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list) or not limits.min_items <= len(value) <= limits.max_items:
            raise invalid(f"{name} must be a list of {limits.min_items} to {limits.max_items} items")
        item_limits = dataclasses.replace(limits, choices=limits.choices, min_items=0, max_items=100)
        for i, v in enumerate(value):
            check_value(f"{name}[{i}]", v, item, item_limits, level + 1)
        return
    if isinstance(annotation, type) and issubclass(annotation, Struct):
        return check_struct(name, value, annotation, level)
    if annotation is str:
        if not isinstance(value, str):
            raise invalid(f"{name} must be a string, got {_json_type(value)}")
        if len(value) > limits.max_len:
            raise invalid(f"{name} must be at most {limits.max_len} characters")
        if not valid_text(value):
            raise invalid(f"{name} must be valid Unicode (no lone surrogates)")
        if limits.ascii and not _ASCII_TEXT.fullmatch(value):
            raise invalid(f"{name} must be printable ASCII")
        if limits.pattern is not None and not _pattern(limits.pattern).fullmatch(value):
            raise invalid(f"{name} must match {limits.pattern}")
    elif annotation is bool:
        if not isinstance(value, bool):
            raise invalid(f"{name} must be true or false, got {_json_type(value)}")
    elif annotation is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise invalid(f"{name} must be an integer, got {_json_type(value)}")
        _check_range(name, value, limits, -MAX_INT, MAX_INT)
    elif annotation is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise invalid(f"{name} must be a finite number, got {_json_type(value)}")
        _check_range(name, value, limits, -MAX_FLOAT, MAX_FLOAT)
    elif annotation is dict:
        if not isinstance(value, dict):
            raise invalid(f"{name} must be an object, got {_json_type(value)}")
        _check_free_json(name, value, level)
    else:  # pragma: no cover - a message declared a type this layer does not know
        raise TypeError(f"unsupported field type {annotation!r} for {name}")
    if limits.choices is not None and value not in limits.choices:
        raise invalid(f"{name} must be one of {list(limits.choices)}")


def check_struct(name: str, value: Any, struct: type[Struct], level: int) -> None:
    if not isinstance(value, dict):
        raise invalid(f"{name} must be an object, got {_json_type(value)}")
    hints = _hints(struct)
    for f in dataclasses.fields(struct):
        if f.name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise invalid(f"{name}.{f.name} is required")
            continue
        check_value(f"{name}.{f.name}", value[f.name], hints[f.name], f.metadata.get("spec"), level + 1)


def _check_range(name, value, limits: Spec, lo, hi) -> None:
    lo = limits.min if limits.min is not None else lo
    hi = limits.max if limits.max is not None else hi
    if not lo <= value <= hi:
        raise invalid(f"{name} must be between {lo:g} and {hi:g}")


def _check_free_json(name: str, value: Any, level: int) -> None:
    """An untyped object field: strings valid Unicode and bounded, numbers finite, and a bounded size."""
    if level + depth(value) - 1 > MAX_DEPTH:
        raise invalid(f"{name} is nested too deeply")
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and (len(item) > MAX_STRING or not valid_text(item)):
            raise invalid(f"{name} holds a string that is too long or not valid Unicode")
        elif isinstance(item, float) and not math.isfinite(item):
            raise invalid(f"{name} holds a number that is not finite")
    if len(json.dumps(value, ensure_ascii=False)) > MAX_STRING:
        raise invalid(f"{name} must be at most {MAX_STRING} characters as JSON")


def _pattern(pattern: str) -> re.Pattern:
    compiled = _PATTERNS.get(pattern)
    if compiled is None:
        compiled = _PATTERNS[pattern] = re.compile(pattern)
    return compiled


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


# ---------------------------------------------------------------- JSON Schema of one type


def _message_schema(cls: type[Message], protocol: Protocol, defs: dict) -> dict[str, Any]:
    properties: dict[str, Any] = {"type": {"const": cls.type_name()}}
    required = ["type"]
    if protocol.version is not None:
        properties = {"v": {"const": protocol.version}, **properties}
        required.insert(0, "v")
    fields_schema, fields_required = _fields_schema(cls, defs)
    properties.update(fields_schema)
    doc = " ".join((cls.__doc__ or "").split())
    schema = {
        "title": cls.type_name(),
        "description": (f"{cls.DIRECTION}. " if cls.DIRECTION else "") + doc,
        "type": "object",
        "properties": properties,
        "required": required + fields_required,
    }
    if cls.MAX_BYTES:
        schema["x-max-bytes"] = cls.MAX_BYTES
    return schema


def _fields_schema(cls, defs: dict) -> tuple[dict[str, Any], list[str]]:
    hints = _hints(cls)
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        properties[f.name] = _type_schema(hints[f.name], f.metadata.get("spec") or Spec(), defs)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default.value if isinstance(f.default, enum.Enum) else f.default
            properties[f.name]["default"] = default
    return properties, required


def _type_schema(annotation: Any, limits: Spec, defs: dict) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        options = [_type_schema(a, limits, defs) for a in args if a is not type(None)]
        if type(None) in args:
            options.append({"type": "null"})
        return options[0] if len(options) == 1 else {"anyOf": options}
    schema: dict[str, Any]
    if origin is list:
        (item,) = typing.get_args(annotation)
        item_limits = dataclasses.replace(limits, min_items=0, max_items=100, description="")
        schema = {"type": "array", "items": _type_schema(item, item_limits, defs), "maxItems": limits.max_items}
        if limits.min_items:
            schema["minItems"] = limits.min_items
        return _described(schema, limits)
    if isinstance(annotation, type) and issubclass(annotation, Struct):
        key = annotation.__name__
        if key not in defs:
            defs[key] = {}  # placeholder against recursion
            properties, required = _fields_schema(annotation, defs)
            defs[key] = {"title": key, "description": " ".join((annotation.__doc__ or "").split()), "type": "object",
                         "properties": properties, "required": required}
        return _described({"$ref": f"#/$defs/{key}"}, limits)
    if annotation is str:
        schema = {"type": "string", "maxLength": limits.max_len}
        if limits.pattern:
            schema["pattern"] = f"^(?:{limits.pattern})$"
        if limits.ascii:
            schema["x-ascii"] = True
    elif annotation is bool:
        schema = {"type": "boolean"}
    elif annotation is int:
        schema = {"type": "integer", "minimum": limits.min if limits.min is not None else -MAX_INT,
                  "maximum": limits.max if limits.max is not None else MAX_INT}
    elif annotation is float:
        schema = {"type": "number", "minimum": limits.min if limits.min is not None else -MAX_FLOAT,
                  "maximum": limits.max if limits.max is not None else MAX_FLOAT}
    elif annotation is dict:
        schema = {"type": "object", "x-max-json-characters": MAX_STRING}
    else:  # pragma: no cover
        raise TypeError(annotation)
    if limits.choices is not None:
        schema["enum"] = list(limits.choices)
    return _described(schema, limits)


def _described(schema: dict, limits: Spec) -> dict:
    if limits.description:
        schema["description"] = limits.description
    return schema
