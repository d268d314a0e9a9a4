"""Sealed parquet files: the footer carries settings (string key-values) and a seal, the sha256
of the file's row groups and of those settings, so a file verifies itself without a manifest.
(`opd.shards.verified_shards` rebuilds a shard set's list of finished shards from them: `--repair`).

The row groups of a parquet file come before its footer and do not depend on the key-value
metadata the footer holds, so the seal is computed on a first encoding and stored in a second
one whose row groups are the same bytes (asserted). A sealed file stays a plain parquet file:
`datasets`, pandas and pyarrow read it as any other. `opd/shards.py` seals every shard
with the set's plan, which lets `--repair` rebuild a lost manifest.

Test: `pytest tests/unit/test_shards.py`.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SEAL_KEY = "opd.seal"


def _parquet_bytes(table: pa.Table, metadata: dict[str, str]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(metadata).combine_chunks(), sink)
    return sink.getvalue().to_pybytes()


def _row_groups(data: bytes) -> bytes:
    """A parquet file's bytes before its footer (the footer holds schema and key-value metadata,
    so the row groups' bytes do not depend on the metadata)."""
    footer_length = int.from_bytes(data[-8:-4], "little")
    return data[: len(data) - 8 - footer_length]


def _seal(row_groups: bytes, settings: dict[str, str]) -> str:
    digest = hashlib.sha256(row_groups)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def sealed_parquet(table: pa.Table, settings: dict[str, str]) -> bytes:
    """Parquet bytes of `table` whose footer carries `settings` and their seal: the sha256 of
    the row groups and the settings, so the file verifies itself without a manifest."""
    unsealed = _parquet_bytes(table, settings)
    sealed = _parquet_bytes(table, {**settings, SEAL_KEY: _seal(_row_groups(unsealed), settings)})
    assert _row_groups(sealed) == _row_groups(unsealed), "parquet row groups depend on metadata"
    return sealed


def read_sealed_parquet(
    path: str | Path, keys: tuple[str, ...]
) -> tuple[dict[str, str] | None, int, str | None]:
    """`(settings, num_rows, None)` of a file whose seal verifies and whose settings hold
    exactly `keys`, else `(None, 0, problem)`."""
    data = Path(path).read_bytes()
    if len(data) < 12 or data[:4] != b"PAR1" or data[-4:] != b"PAR1":
        return None, 0, "is not a parquet file"
    try:
        metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    except (pa.ArrowException, OSError) as error:
        return None, 0, f"has an unreadable footer ({' '.join(str(error).split())})"
    stored = {
        key.decode(errors="replace"): value.decode(errors="replace")
        for key, value in (metadata.metadata or {}).items()
    }
    settings = {key: value for key, value in stored.items() if key in keys}
    if SEAL_KEY not in stored or len(settings) != len(keys):
        return None, 0, "carries no settings or seal (written by an older opd)"
    if _seal(_row_groups(data), settings) != stored[SEAL_KEY]:
        return None, 0, "is corrupt: its rows or settings do not match its seal"
    return settings, metadata.num_rows, None
