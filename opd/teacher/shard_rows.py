"""Shard rows <-> the stage types: arrow tables of ragged lists to `RolloutBatch` /
`TeacherScores` (right-padded `[B, T]`) and back.

The column layout is described in `opd/shards.py`. Conversions go through numpy on the
flat arrow buffers, never through Python lists of floats, so a shard of long completions with
top-k scores converts in milliseconds. Hidden states are stored in their own dtype: float32
values, or bfloat16 as its raw bits in uint16 (arrow has no bfloat16), so nothing is rounded.

Test: `pytest tests/unit/test_shards.py tests/integration/test_offline_hidden.py`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from opd.teacher.wire import HIDDEN_DTYPES, SequenceScores
from opd.types import RolloutBatch, TeacherScores

HIDDEN_COLUMN = "teacher_hidden_states"
# Sets of a teacher of another tokenizer: True at the first student token of each span.
SPAN_START_COLUMN = "teacher_span_start"
# Hidden-state dtype -> the arrow value type holding it (bfloat16: its bits, as uint16).
HIDDEN_STORAGE = {"float32": pa.float32(), "bfloat16": pa.uint16()}
STORED_HIDDEN_DTYPES = {value_type: name for name, value_type in HIDDEN_STORAGE.items()}


def _as_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def list_lengths(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """int64 [B] length of each list (0 for a null list)."""
    lengths = _as_array(column).value_lengths().fill_null(0)
    return np.asarray(lengths.to_numpy(zero_copy_only=False), dtype=np.int64)


def _flat_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return _as_array(column).flatten().to_numpy(zero_copy_only=False)


def _padded(values: np.ndarray, lengths_B: np.ndarray, fill, dtype) -> torch.Tensor:
    """Ragged values (concatenated rows) to a right-padded `[B, T, ...]` tensor."""
    width = int(lengths_B.max()) if len(lengths_B) else 0
    inner_shape = values.shape[1:]
    out = np.full((len(lengths_B), width, *inner_shape), fill, dtype=dtype)
    # A boolean mask in row-major order visits positions in the order the values are concatenated.
    out[np.arange(width)[None, :] < lengths_B[:, None]] = values
    return torch.from_numpy(out)


def ragged_ids(column: pa.ChunkedArray | pa.Array) -> list[list[int]]:
    return column.to_pylist()


def rollout_batch_from_table(table: pa.Table) -> RolloutBatch:
    """The rows of a rollout (or teacher-score) table as a right-padded `RolloutBatch`.

    Every stored completion token is unmasked. `sampler_logprobs_BT` is None when a row has no
    sampler logprobs (rollouts made outside `opd rollout`); `teacher_prompt_ids` is None when it
    equals `prompt_ids` on every row.
    """
    lengths_B = list_lengths(table["completion_ids"])
    completion_ids_BT = _padded(_flat_values(table["completion_ids"]), lengths_B, 0, np.int64)
    width = completion_ids_BT.shape[1]
    mask_BT = torch.from_numpy(np.arange(width)[None, :] < lengths_B[:, None]).long()
    sampler = table["sampler_logprobs"]
    has_sampler = sampler.null_count == 0 and np.array_equal(list_lengths(sampler), lengths_B)
    prompt_ids = ragged_ids(table["prompt_ids"])
    teacher_prompt_ids = ragged_ids(table["teacher_prompt_ids"])
    return RolloutBatch(
        prompt_ids=prompt_ids,
        completion_ids_BT=completion_ids_BT,
        completion_mask_BT=mask_BT,
        sampler_logprobs_BT=(
            _padded(_flat_values(sampler), lengths_B, 0.0, np.float32) if has_sampler else None
        ),
        stop_reason_B=table["stop_reason"].to_pylist(),
        teacher_prompt_ids=None if teacher_prompt_ids == prompt_ids else teacher_prompt_ids,
    )


def sequence_scores_from_table(
    table: pa.Table, *, top_k: int, hidden_dtype: str = ""
) -> SequenceScores:
    """The stored teacher scores of a teacher-score table, flat (one entry per token).

    `top_k` may be smaller than the stored K: the stored lists are sorted descending, so their
    first `top_k` entries are the top `top_k`. `hidden_dtype` ("float32"/"bfloat16"): also the
    stored hidden states, in that dtype (the table must hold them).
    """
    lengths_B = list_lengths(table["completion_ids"])
    num_tokens = int(lengths_B.sum())
    optional = {}
    if top_k:
        for name, key, dtype in (
            ("teacher_topk_ids", "topk_ids_MK", np.int64),
            ("teacher_topk_logprobs", "topk_logprobs_MK", np.float32),
        ):
            per_token = _flat_values(table[name].combine_chunks().flatten())
            stored_k = len(per_token) // num_tokens if num_tokens else top_k
            values_MK = per_token.reshape(num_tokens, stored_k)[:, :top_k].astype(dtype)
            optional[key] = torch.from_numpy(np.ascontiguousarray(values_MK))
    if hidden_dtype:
        optional["hidden_MH"] = hidden_states_from_table(table).to(HIDDEN_DTYPES[hidden_dtype])
    sampled_M = _flat_values(table["teacher_logprobs"]).astype(np.float32)
    return SequenceScores(
        completion_lengths_B=torch.from_numpy(lengths_B),
        sampled_logprobs_M=torch.from_numpy(sampled_M),
        **optional,
    )


def hidden_states_from_table(table: pa.Table, *, padded: bool = False) -> torch.Tensor:
    """The stored hidden states in their stored dtype: flat `[M, H]`, or with `padded`
    right-padded `[B, T, H]` (0 past a row's end, T its longest completion)."""
    tokens = _as_array(table[HIDDEN_COLUMN]).flatten()  # fixed_size_list<H>, one per token
    dtype = STORED_HIDDEN_DTYPES[tokens.type.value_type]
    values = tokens.flatten().to_numpy(zero_copy_only=False)
    # numpy has no bfloat16: its bits go to torch as int16 (0 bits are 0.0 in both dtypes)
    values_MH = values.view(np.int16 if dtype == "bfloat16" else np.float32).reshape(
        len(tokens), tokens.type.list_size
    )
    if padded:
        hidden = _padded(values_MH, list_lengths(table["completion_ids"]), 0, values_MH.dtype)
    else:
        hidden = torch.from_numpy(values_MH.copy())  # arrow buffers are read-only
    return hidden.view(HIDDEN_DTYPES[dtype])


def teacher_scores_from_table(
    table: pa.Table, *, top_k: int, teacher_id: str, temperature: float
) -> TeacherScores:
    """The stored teacher scores of a teacher-score table, `[B, T]` like its `RolloutBatch`."""
    flat = sequence_scores_from_table(table, top_k=top_k)
    lengths_B = flat.completion_lengths_B.numpy()
    sampled_BT = _padded(flat.sampled_logprobs_M.numpy(), lengths_B, 0.0, np.float32)
    mask_BT = torch.arange(sampled_BT.shape[1])[None, :] < flat.completion_lengths_B[:, None]
    topk = {}
    if top_k:
        topk["topk_ids_BTK"] = _padded(flat.topk_ids_MK.numpy(), lengths_B, 0, np.int64)
        topk["topk_logprobs_BTK"] = _padded(
            flat.topk_logprobs_MK.numpy(), lengths_B, -np.inf, np.float32
        )
    span_start_BT = None  # a set of a teacher of another tokenizer (cross_tokenizer.py)
    if SPAN_START_COLUMN in table.column_names:
        starts_M = _flat_values(table[SPAN_START_COLUMN]).astype(bool)
        span_start_BT = _padded(starts_M, lengths_B, False, np.bool_)
    return TeacherScores(
        sampled_logprobs_BT=sampled_BT,
        completion_mask_BT=mask_BT.long(),
        teacher_id=teacher_id,
        temperature=temperature,
        span_start_BT=span_start_BT,
        **topk,
    )


def _list_array(values: np.ndarray, lengths_B: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths_B)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def teacher_columns(
    scores: TeacherScores, lengths_B: np.ndarray, top_k: int
) -> dict[str, pa.Array]:
    """The teacher-score columns for rows whose completions have `lengths_B` tokens.

    Takes the first `lengths_B[b]` positions of each row (the whole stored completion).
    """
    width = scores.sampled_logprobs_BT.shape[1]
    keep_BT = torch.from_numpy(np.arange(width)[None, :] < lengths_B[:, None])
    sampled_M = scores.sampled_logprobs_BT.cpu()[keep_BT].numpy().astype(np.float32)
    columns = {"teacher_logprobs": _list_array(sampled_M, lengths_B, pa.float32())}
    if scores.span_start_BT is not None:
        starts_M = scores.span_start_BT.cpu()[keep_BT].numpy()
        columns[SPAN_START_COLUMN] = _list_array(starts_M, lengths_B, pa.bool_())
    if top_k:
        num_tokens = int(lengths_B.sum())
        per_token = np.full(num_tokens, top_k, dtype=np.int64)
        assert scores.topk_ids_BTK is not None and scores.topk_logprobs_BTK is not None
        for name, tensor, value_type in (
            ("teacher_topk_ids", scores.topk_ids_BTK, pa.int32()),
            ("teacher_topk_logprobs", scores.topk_logprobs_BTK, pa.float32()),
        ):
            flat = tensor.cpu()[keep_BT][:, :top_k].reshape(-1).numpy()
            inner = _list_array(flat, per_token, value_type)
            offsets = np.concatenate([[0], np.cumsum(lengths_B)]).astype(np.int32)
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets), inner)
    return columns


def hidden_column(hidden_BTH: torch.Tensor, lengths_B: np.ndarray) -> pa.Array:
    """The `teacher_hidden_states` column: the first `lengths_B[b]` positions of each row's
    `[T, H]` hidden states (float32 or bfloat16, stored as they are), one fixed-size list of H
    values per token."""
    dtype = str(hidden_BTH.dtype).removeprefix("torch.")
    width, hidden_size = hidden_BTH.shape[1], hidden_BTH.shape[2]
    keep_BT = torch.from_numpy(np.arange(width)[None, :] < lengths_B[:, None])
    hidden_MH = hidden_BTH.cpu()[keep_BT].contiguous()
    if dtype == "bfloat16":
        values_M = hidden_MH.view(torch.int16).numpy().view(np.uint16).reshape(-1)
    else:
        values_M = hidden_MH.numpy().reshape(-1)
    values = pa.array(values_M, type=HIDDEN_STORAGE[dtype])
    tokens = pa.FixedSizeListArray.from_arrays(values, hidden_size)
    offsets = np.concatenate([[0], np.cumsum(lengths_B)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), tokens)
