"""Fuzzing the teacher server's request decoder: hostile bytes never escape as a 500.

Properties, on hypothesis-generated bodies:
- any bytes (random, or a valid request with bytes flipped, cut or spliced): `decode_request`
  raises a `WireError` with a 4xx status and a short ASCII message, or returns a request within
  every limit;
- well-formed safetensors headers with wrong or exotic dtypes, wrong shapes and names, offsets
  that do not add up, bad metadata strings (`nan`, `1e-45`, `-0`, huge integers, text), ids out
  of the vocabulary, lengths whose sums wrap: the same;
- whatever the header checks accept, safetensors loads (its loader never fails behind them);
- every request that decodes gets finite sampled logprobs from the real tiny `LocalTeacher`, and
  top-k logprobs that are finite except the `-inf` padding past the vocabulary.

About 2,400 cases: 800 any-bytes, 1,500 hostile safetensors, 60 scored by the model (plus the
ones hypothesis discards as invalid). Derandomized: the same cases every run, so CI is
reproducible. Run:
`.venv/bin/pytest tests/unit/test_wire_fuzz.py --hypothesis-show-statistics`.
"""

from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from opd.teacher import wire, wire_header
from opd.teacher.local import LocalTeacher
from opd.teacher.wire import (
    MIN_TEMPERATURE,
    REQUEST_TENSORS,
    RequestLimits,
    ScoreRequest,
    WireError,
    decode_request,
    encode_request,
    estimated_response_bytes,
    make_request,
)

VOCAB = 49  # the tiny teacher's (tests/conftest.py)
# Small limits, so that fuzzed requests reach every one of them.
LIMITS = RequestLimits(
    vocab_size=VOCAB,
    max_top_k=8,
    max_sequence_tokens=24,
    max_sequences=5,
    max_response_bytes=wire.RESPONSE_HEADER_BYTES + 800,
)
INT64_MAX = 2**63 - 1
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

WIRE_DTYPES = ["I32", "I64"]
# Everything else safetensors knows, plus names it does not.
OTHER_DTYPES = [
    "BOOL", "U8", "I8", "I16", "U16", "U32", "U64", "F16", "BF16", "F32", "F64", "C64",
    "F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0", "i64", "", "I128",
]  # fmt: skip
# Their true sizes, so that a blob with one of them is otherwise consistent: the loader then
# meets the dtype itself (`F8_E8M0` used to be a KeyError there, a 500).
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
    "F16": 2, "BF16": 2, "U32": 4, "F32": 4, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
TOP_K_TEXTS = [
    "0", "1", "8", "9", "-1", "-0", " 3 ", "3.0", "1e3", "0x10", "1_0", "nan", "inf", "",
    "9" * 30, "9" * 5000, "two", "\ud800",
]  # fmt: skip
TEMPERATURE_TEXTS = [
    "1.0", "0.7", "0.01", "0.0099", "1e-45", "5e-324", "-0", "0", "-1", "nan", "-nan", "inf",
    "-inf", "1e308", "1e309", "1" * 400, "1_000", "", "warm", "0x1p-3",
]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The property every body must satisfy
# ------------------------------------------------------------------------------------------------


def decode_or_4xx(body: bytes, limits: RequestLimits = LIMITS) -> ScoreRequest | None:
    """The decoded request (checked against every limit), or None after a clean 4xx."""
    try:
        request = decode_request(body, limits)
    except WireError as error:
        message = str(error)
        assert 400 <= error.status < 500, message
        # The message goes back in a JSON body and the logs: encodable, and not an echo.
        assert message.isascii() and 0 < len(message) < 600, message
        event(f"{error.status}: {re.sub(r'[0-9]+', 'N', message)[:70]}")
        return None
    assert_within_limits(request, limits)
    event("decoded")
    return request


def assert_within_limits(request: ScoreRequest, limits: RequestLimits) -> None:
    lengths = (request.context_lengths_B, request.completion_lengths_B)
    ids = (request.context_ids_N, request.completion_ids_M)
    assert all(t.dtype == torch.int64 and t.ndim == 1 for t in (*lengths, *ids))
    assert 1 <= request.num_sequences <= limits.max_sequences
    assert request.completion_lengths_B.numel() == request.num_sequences
    for lengths_B, ids_N in zip(lengths, ids, strict=True):
        assert int(lengths_B.min()) >= 1 and int(lengths_B.sum()) == ids_N.numel()
        assert int(ids_N.min()) >= 0 and int(ids_N.max()) < limits.vocab_size
    assert int((lengths[0] + lengths[1]).max()) <= limits.max_sequence_tokens
    assert 0 <= request.top_k <= limits.max_top_k
    assert MIN_TEMPERATURE <= request.temperature < math.inf
    assert estimated_response_bytes(request) <= limits.max_response_bytes


@pytest.fixture(scope="module", autouse=True)
def loader_failures():
    """Records every body the safetensors loader rejects after the header checks passed it
    (a wrapper around the real loader, not a fake): there must be none."""
    failures: list[tuple[bytes, str]] = []
    real_load = wire_header.safetensors_load

    def observed_load(body: bytes):
        try:
            return real_load(body)
        except Exception as error:
            failures.append((body[:200], repr(error)))
            raise

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wire_header, "safetensors_load", observed_load)
        yield failures
    assert not failures, f"safetensors rejected bodies the header checks accepted: {failures[:3]}"


# ------------------------------------------------------------------------------------------------
# (a) Any bytes
# ------------------------------------------------------------------------------------------------


# Strategies are built once, here: building them inside each draw cost most of the run time.
# Bulk choices (ids, lengths, positions) come from a `random.Random` seeded by one drawn integer.
SEEDS = st.integers(0, 2**32 - 1)
TEMPERATURES = st.sampled_from([MIN_TEMPERATURE, 0.05, 0.7, 1.0, 2.0, 1e4, 1e308]) | st.floats(
    MIN_TEMPERATURE, 1e6
)
MUTATIONS = st.lists(
    st.sampled_from(["flip", "set", "cut", "insert", "length"]), min_size=1, max_size=4
)
LENGTH_FIELDS = st.sampled_from([0, 1, 7, 8, 2**32, 2**63, 2**64 - 1])


@st.composite
def valid_requests(draw, max_top_k: int = 8) -> ScoreRequest:
    rng = random.Random(draw(SEEDS))
    num_sequences = rng.randint(1, 4)
    contexts, completions = (
        [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))] for _ in range(num_sequences)]
        for _ in range(2)
    )
    top_k = rng.randint(0, max_top_k)
    return make_request(contexts, completions, top_k=top_k, temperature=draw(TEMPERATURES))


@st.composite
def mutated_bodies(draw) -> bytes:
    """A valid request's bytes with a few flips, cuts, splices or a rewritten length field."""
    body = bytearray(encode_request(draw(valid_requests())))
    rng = random.Random(draw(SEEDS))
    for kind in draw(MUTATIONS):
        at = rng.randrange(len(body) + 1)
        if kind == "flip" and at < len(body):
            body[at] ^= 1 << rng.randrange(8)
        elif kind == "set" and at < len(body):
            body[at] = rng.choice(b'{}[]",:0-9 \x00\xff')
        elif kind == "cut":
            del body[at : at + rng.randint(1, 64)]
        elif kind == "insert":
            body[at:at] = rng.randbytes(rng.randint(1, 16))
        elif kind == "length":
            body[:8] = draw(LENGTH_FIELDS).to_bytes(8, "little")
    return bytes(body)


@settings(FUZZ, max_examples=800)
@given(st.binary(max_size=300) | mutated_bodies())
def test_any_bytes_give_a_4xx_or_a_valid_request(body):
    decode_or_4xx(body)


# ------------------------------------------------------------------------------------------------
# (b) Well-formed safetensors with hostile contents
# ------------------------------------------------------------------------------------------------

JSON_JUNK = st.none() | st.booleans() | st.floats() | st.text(max_size=4) | st.lists(st.none())
BIG_INTS = st.sampled_from([0, -1, 2**31, 2**32 + 1, INT64_MAX, -(2**63), 2**64, 10**30])
BAD_IDS = st.sampled_from([-1, VOCAB, 2**31 - 1, -(2**63), INT64_MAX])
BAD_NAMES = st.sampled_from(["extra", "", "context_ids ", "\ud800", "__metadata_"])
BAD_DTYPE = st.sampled_from(OTHER_DTYPES) | JSON_JUNK
BAD_SHAPE = st.lists(st.integers(-2, 4) | BIG_INTS, max_size=3) | JSON_JUNK
OFFSET_SHIFT = st.sampled_from([-9, -8, -4, -1, 1, 4, 8, 9])
BAD_OFFSETS = st.lists(st.integers(-8, 8) | BIG_INTS, max_size=3) | JSON_JUNK
BAD_TOP_K = st.sampled_from(TOP_K_TEXTS) | st.integers(-2, 12).map(str) | st.text(max_size=6)
BAD_TEMPERATURE = (
    st.sampled_from(TEMPERATURE_TEXTS)
    | st.floats(allow_nan=True, allow_infinity=True).map(repr)
    | st.text(max_size=6)
)
BAD_METADATA = JSON_JUNK | st.dictionaries(
    st.sampled_from(["top_k", "temperature", "other"]), JSON_JUNK, min_size=1
)


def _faults(kinds: list[str]):
    """None of `kinds` (about half the draws), or one or two of them."""
    return st.just(frozenset()) | st.frozensets(st.sampled_from(kinds), min_size=1, max_size=2)


# What a body gets wrong in its structure, and in its contents.
STRUCTURE_FAULTS = _faults([
    "shape", "offsets", "shift", "entry", "dtype", "name", "missing", "length_field",
    "trailing", "metadata_type",
])  # fmt: skip
CONTENT_FAULTS = _faults([
    "big_length", "zero_length", "bad_id", "ids_vs_lengths", "count_mismatch", "top_k",
    "temperature",
])  # fmt: skip


def _tensor_bytes(values: list[int], dtype: object) -> bytes:
    """`values` as the dtype's bytes: real integers for I32/I64 (wrapping like a C cast), else
    filler of one plausible size per element."""
    wrapped = np.array([v % 2**64 for v in values], dtype=np.uint64).astype(np.int64)
    if dtype == "I64":
        return wrapped.tobytes()
    if dtype == "I32":
        return wrapped.astype(np.int32).tobytes()
    return bytes(len(values) * (DTYPE_BYTES.get(dtype, 4) if isinstance(dtype, str) else 4))


def hostile_values(draw, rng: random.Random, faults: frozenset[str]) -> dict[str, list[int]]:
    """The four request arrays, consistent, then broken by the content `faults`."""
    num_sequences = rng.randint(0 if "zero_length" in faults else 1, 4)
    values: dict[str, list[int]] = {}
    for part in ("context", "completion"):
        lengths = [rng.randint(1, 6) for _ in range(num_sequences)]
        values[f"{part}_lengths"] = lengths
        values[f"{part}_ids"] = [rng.randrange(VOCAB) for _ in range(sum(lengths))]
    part = rng.choice(["context", "completion"])
    lengths, ids = values[f"{part}_lengths"], values[f"{part}_ids"]
    if "big_length" in faults and lengths:
        lengths[rng.randrange(len(lengths))] = draw(BIG_INTS)
    if "zero_length" in faults and lengths:
        lengths[rng.randrange(len(lengths))] = 0
    if "bad_id" in faults and ids:
        ids[rng.randrange(len(ids))] = draw(BAD_IDS)
    if "ids_vs_lengths" in faults:
        values[f"{part}_ids"] = ids[: rng.randint(0, len(ids))] + [1] * rng.randint(0, 2)
    if "count_mismatch" in faults:
        values["completion_lengths"].append(1)
        values["completion_ids"].append(1)
    return values


def hostile_entries(draw, rng: random.Random, values: dict[str, list[int]], faults):
    """Header entries and data for `values`; the structural `faults` hit one tensor."""
    names = list(REQUEST_TENSORS)
    hit = rng.randrange(len(names))
    if "name" in faults:
        names[hit] = draw(BAD_NAMES)
    header, data = {}, b""
    for index, (name, key) in enumerate(zip(names, REQUEST_TENSORS, strict=True)):
        faults_here = faults if index == hit else frozenset()
        if "missing" in faults_here:
            continue
        dtype = draw(BAD_DTYPE) if "dtype" in faults_here else rng.choice(WIRE_DTYPES)
        chunk = _tensor_bytes(values[key], dtype)
        begin, end = len(data), len(data) + len(chunk)
        entry = {"dtype": dtype, "shape": [len(values[key])], "data_offsets": [begin, end]}
        if "shape" in faults_here:
            entry["shape"] = draw(BAD_SHAPE)
        if "shift" in faults_here:  # overlaps, gaps, or past the data
            shift = draw(OFFSET_SHIFT)
            entry["data_offsets"] = [begin + shift, end + shift]
        if "offsets" in faults_here:
            entry["data_offsets"] = draw(BAD_OFFSETS)
        header[name] = draw(JSON_JUNK) if "entry" in faults_here else entry
        data += chunk
    return header, data


def hostile_metadata(draw, rng: random.Random, faults: frozenset[str]) -> dict[str, str]:
    metadata = {}
    if "top_k" in faults:
        metadata["top_k"] = draw(BAD_TOP_K)
    elif rng.random() < 0.5:
        metadata["top_k"] = str(rng.randint(0, 8))
    if "temperature" in faults:
        metadata["temperature"] = draw(BAD_TEMPERATURE)
    elif rng.random() < 0.5:
        metadata["temperature"] = repr(rng.choice([MIN_TEMPERATURE, rng.uniform(0.01, 100)]))
    return metadata


@st.composite
def hostile_bodies(draw) -> bytes:
    structure_faults, content_faults = draw(STRUCTURE_FAULTS), draw(CONTENT_FAULTS)
    rng = random.Random(draw(SEEDS))
    values = hostile_values(draw, rng, content_faults)
    header, data = hostile_entries(draw, rng, values, structure_faults)
    if "metadata_type" in structure_faults:
        header["__metadata__"] = draw(BAD_METADATA)
    elif metadata := hostile_metadata(draw, rng, content_faults):
        header["__metadata__"] = metadata
    text = json.dumps(header, allow_nan=True).encode()  # allow_nan: `NaN` must be refused too
    text += b" " * rng.randint(0, 3)
    length = len(text)
    if "length_field" in structure_faults:
        length = max(0, length + rng.choice([-1, 1, -8, 8, 2**40]))
    if "trailing" in structure_faults:
        data += rng.randbytes(rng.randint(1, 8))
    return length.to_bytes(8, "little") + text + data


@settings(FUZZ, max_examples=1500)
@given(hostile_bodies())
def test_hostile_safetensors_give_a_4xx_or_a_valid_request(body):
    decode_or_4xx(body)


# ------------------------------------------------------------------------------------------------
# (c) What decodes scores finite
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_local_teacher(tiny_teacher):
    """The tiny teacher, run on one torch thread: its forwards are overhead-bound, and on a busy
    2-core machine two OpenMP threads spin against each other (this test took 20 s at load 7
    with two threads, 0.7 s with one)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    teacher = LocalTeacher(model, batch_size=3)
    assert teacher.vocab_size == VOCAB
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield teacher
    torch.set_num_threads(threads)


# top_k up to 64 > VOCAB: the teacher pads the top-k past its vocabulary with -inf.
SCORING_LIMITS = RequestLimits(vocab_size=VOCAB, max_top_k=64, max_sequence_tokens=24)


@settings(FUZZ, max_examples=60)
@given(valid_requests(max_top_k=64).map(encode_request) | hostile_bodies())
def test_decoded_requests_get_finite_scores(tiny_local_teacher, body):
    request = decode_or_4xx(body, SCORING_LIMITS)
    if request is None:
        return
    scores = tiny_local_teacher.score_sequences(request)
    sampled_M = scores.sampled_logprobs_M
    assert sampled_M.shape == (request.completion_ids_M.numel(),)
    assert torch.isfinite(sampled_M).all() and (sampled_M <= 0).all(), request
    if not request.top_k:
        assert scores.topk_logprobs_MK is None
        return
    topk_MK = scores.topk_logprobs_MK
    real = min(request.top_k, VOCAB)
    assert topk_MK.shape == (sampled_M.numel(), request.top_k)
    assert torch.isfinite(topk_MK[:, :real]).all() and (topk_MK[:, :real] <= 0).all()
    assert torch.isneginf(topk_MK[:, real:]).all()  # padding only past the vocabulary
    assert (topk_MK[:, :-1] >= topk_MK[:, 1:]).all()  # descending
