"""json.loads / json.dumps for the exec'd plugins, without importing the `json` package.

`import json` pulls in `re` and `enum` (~10 ms of CPU per plugin exec); the C accelerator
`_json` that json itself uses is enough for well-formed input. Anything the fast path does
not handle (bad JSON, BOMs, UTF-16, trailing data, unserialisable objects) falls back to the
real `json`, so results and error messages are exactly json's.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

_WHITESPACE = " \t\n\r"

try:
    import _json

    class _Context:
        # The attributes _json.make_scanner reads (those of json.JSONDecoder's defaults).
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"),
                          "NaN": float("nan")}.__getitem__  # fmt: skip

    _scan: Callable[[str, int], tuple[object, int]] | None = _json.make_scanner(_Context())  # type: ignore[arg-type]
    _encode_str = _json.encode_basestring_ascii
    _make_encoder = _json.make_encoder
except (ImportError, AttributeError, TypeError):  # another Python: always use json
    _scan = None


def loads(data: bytes | str) -> object:
    if _scan is not None:
        try:
            text = data.decode() if isinstance(data, bytes) else data
            start = len(text) - len(text.lstrip(_WHITESPACE))
            if not text.startswith("\ufeff"):
                obj, end = _scan(text, start)
                if not text[end:].strip(_WHITESPACE):
                    return obj
        except Exception:
            pass  # json below raises the canonical error
    import json

    return json.loads(data)


def _unserialisable(obj: object) -> object:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def dumps(obj: object, compact: bool = False) -> str:
    """json.dumps(obj) (compact: separators=(",", ":"))."""
    if _scan is not None:
        try:
            item_sep, key_sep = (",", ":") if compact else (", ", ": ")
            encode = _make_encoder(
                {}, _unserialisable, _encode_str, None, key_sep, item_sep, False, False, True
            )
            return "".join(encode(obj, 0))
        except Exception:
            pass
    import json

    return json.dumps(obj, separators=(",", ":") if compact else None)
