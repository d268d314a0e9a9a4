"""The safetensors header of a wire blob, checked before safetensors reads the body.

A blob is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}` and the
data the offsets point into. The header is the client's to forge, and the loader does not fail
cleanly on all of it (a dtype safetensors knows but torch cannot map is a KeyError, a 500), so
`load_checked` checks every field first against an allow-list; only a header that passes reaches
safetensors, whose own errors still become a `WireError`. `opd.teacher.wire` builds the request
and response formats on top.

Test: `pytest tests/unit/test_wire.py tests/unit/test_wire_fuzz.py`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from safetensors.torch import load as safetensors_load

CONTENT_TYPE = "application/vnd.opd.safetensors"


class WireError(ValueError):
    """A request or response that does not follow the wire format; `status` is the HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


REQUEST_DTYPES = ("I32", "I64")
# BF16: hidden states a client asked in bfloat16.
SCORES_DTYPES = ("I32", "I64", "F32", "BF16")
_DTYPE_BYTES = {"I32": 4, "I64": 8, "F32": 4, "BF16": 2}
# torch's names for the safetensors dtypes torch maps, for messages; the rest are named as sent.
_TORCH_DTYPE_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}
# Our headers are a few hundred bytes (4 tensors, 3 metadata strings); the cap bounds what the
# JSON parser builds from a hostile one. Our tensors have 1 or 2 dimensions.
MAX_HEADER_BYTES = 64 * 1024
MAX_NDIM = 8
_NOT_SAFETENSORS = "the body is not a valid safetensors blob"


def load_checked(
    body: bytes, dtypes: tuple[str, ...], *, names: tuple[str, ...] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The blob's tensors and metadata, once its header passes every check below.

    Args:
        dtypes: the safetensors dtypes allowed (e.g. `REQUEST_DTYPES`).
        names: when given, the only tensor names allowed.
    """
    header, data_length = _read_header(body)
    metadata = _header_metadata(header.pop("__metadata__", None))
    if names is not None and set(header) - set(names):
        unknown = ", ".join(quoted(name) for name in sorted(set(header) - set(names))[:5])
        raise WireError(f"unknown tensors [{unknown}]; a request holds {list(names)}")
    spans = [
        _tensor_span(name, entry, dtypes, max_dim=data_length) for name, entry in header.items()
    ]
    _check_spans_tile(spans, data_length)
    try:
        tensors = safetensors_load(body)
    except Exception as error:  # defence in depth: the checks above should leave nothing here
        raise WireError(f"{_NOT_SAFETENSORS}: {_describe(error)}") from error
    return tensors, metadata


def _read_header(body: bytes) -> tuple[dict[str, Any], int]:
    """The header's JSON object, and how many data bytes follow it."""
    if not body:
        raise WireError(f"empty body; send a safetensors blob ({CONTENT_TYPE})")
    if len(body) < 8:
        raise WireError(
            f"{_NOT_SAFETENSORS}: it has {len(body)} byte(s), less than its 8-byte header length"
        )
    header_length = int.from_bytes(body[:8], "little")
    if header_length > len(body) - 8:
        raise WireError(
            f"{_NOT_SAFETENSORS}: its header length is {header_length} bytes but only "
            f"{len(body) - 8} bytes follow"
        )
    if header_length > MAX_HEADER_BYTES:
        raise WireError(
            f"{_NOT_SAFETENSORS}: its header is {header_length} bytes, over {MAX_HEADER_BYTES}"
        )
    header_bytes = body[8 : 8 + header_length]
    try:
        header = json.loads(
            header_bytes.decode("utf-8"),
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_reject_constant,
        )
    except WireError:
        raise
    except (ValueError, RecursionError) as error:  # RecursionError: deeply nested lists
        raise WireError(
            f"{_NOT_SAFETENSORS}: its header is not JSON ({_describe(error)})"
        ) from error
    # safetensors also insists on the '{' first: no leading whitespace.
    if not isinstance(header, dict) or not header_bytes.startswith(b"{"):
        raise WireError(f"{_NOT_SAFETENSORS}: its header is not a JSON object")
    return header, len(body) - 8 - header_length


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise WireError(f"{_NOT_SAFETENSORS}: key {quoted(key)} appears twice in its header")
        seen.add(key)
    # Python's parser takes an escaped lone surrogate ("\ud800"); safetensors' does not, and
    # such a string cannot be encoded back to UTF-8 (in a message, a log line, a response).
    for text in (*seen, *(value for _, value in pairs if isinstance(value, str))):
        if not _is_unicode(text):
            raise WireError(f"{_NOT_SAFETENSORS}: its header holds {quoted(text)}, not Unicode")
    return dict(pairs)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_constant(constant: str):
    raise WireError(f"{_NOT_SAFETENSORS}: its header holds {constant}, which JSON does not allow")


def _header_metadata(metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise WireError(f"{_NOT_SAFETENSORS}: __metadata__ must be an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise WireError(
                f"{_NOT_SAFETENSORS}: __metadata__ {quoted(key)} must be a string, "
                f"got {type(value).__name__}"
            )
    return metadata


def _tensor_span(name: str, entry: Any, dtypes: tuple[str, ...], *, max_dim: int):
    """(begin, end, name) of a tensor's data, once its dtype, shape and offsets agree.

    Args:
        max_dim: the largest size a dimension may have (the data's bytes: a bigger dimension
            only fits a zero-element tensor, which no wire tensor needs).
    """
    where = f"{_NOT_SAFETENSORS}: tensor {quoted(name)}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise WireError(f"{where} needs exactly the keys dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in dtypes:
        expected = " or ".join(_dtype_label(code) for code in dtypes)
        raise WireError(
            f"{quoted(name, quotes=False)} has dtype {_dtype_label(dtype)}, expected {expected}"
        )
    if not _is_int_list(shape, upper=max_dim) or len(shape) > MAX_NDIM:
        raise WireError(
            f"{where} has a shape that is not a list of at most {MAX_NDIM} integers "
            f"in [0, {max_dim}]"
        )
    if not _is_int_list(offsets, upper=max_dim) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise WireError(
            f"{where} needs data_offsets [begin, end] with 0 <= begin <= end <= {max_dim} "
            "(the data's bytes)"
        )
    num_bytes = math.prod(shape) * _DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != num_bytes:
        raise WireError(
            f"{where} has shape {shape} of {dtype} ({num_bytes} bytes) but its data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]} bytes"
        )
    return offsets[0], offsets[1], name


def _check_spans_tile(spans: list[tuple[int, int, str]], data_length: int) -> None:
    """The tensors' bytes must cover the data exactly once: no overlap, no gap, nothing after."""
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap"
            raise WireError(
                f"{_NOT_SAFETENSORS}: tensor {quoted(name)} starts at byte {begin} and {problem}"
            )
        position = end
    if position != data_length:
        raise WireError(
            f"{_NOT_SAFETENSORS}: its tensors cover {position} of the {data_length} data bytes"
        )


def _is_int_list(value: Any, *, upper: int) -> bool:
    # bool is an int subclass in Python, but `true` is not a JSON integer.
    return isinstance(value, list) and all(
        type(item) is int and 0 <= item <= upper for item in value
    )


def _dtype_label(dtype: Any) -> str:
    """A dtype for a message: torch's name and the wire code ("int16 (I16)"), the string sent,
    or the JSON type sent instead of a string (never its contents: they may nest deeply)."""
    if not isinstance(dtype, str):
        return f"<{type(dtype).__name__}>"
    if dtype in _TORCH_DTYPE_NAMES:
        return f"{_TORCH_DTYPE_NAMES[dtype]} ({dtype})"
    return quoted(dtype, quotes=False)


def quoted(text: str, *, quotes: bool = True, limit: int = 60) -> str:
    """Client-sent text for a message: ASCII only (a lone surrogate cannot be encoded into the
    JSON error body) and at most `limit` characters (a huge name is not echoed back)."""
    shown = ascii(text[:limit] if len(text) <= limit else text[:limit] + "...")
    return shown if quotes else shown[1:-1]


def _describe(error: BaseException) -> str:
    """A library's error message for ours, as `_quote` makes client text safe."""
    return quoted(str(error), quotes=False, limit=120)
