"""Responses and labels as what the numba verifier reads: the UTF-8 bytes of all responses back to back
with their offsets (zero-copy from Arrow string arrays), and the labels as int64."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .rulebook import LABELS

_MAX_OFFSET32 = 2**31 - 1


def as_string_array(responses) -> pa.Array:
    """One contiguous Arrow (large_)string array from an Arrow array, chunked array or list."""
    if not isinstance(responses, (pa.Array, pa.ChunkedArray)):
        if isinstance(responses, (str, bytes)):
            raise TypeError("responses must be a sequence of strings, not a single string")
        # string (int32 offsets) like parquet columns, so both share one compiled specialisation;
        # pyarrow returns a chunked array when the text outgrows int32 offsets
        responses = pa.array(list(responses), type=pa.string())
    if isinstance(responses, pa.ChunkedArray):
        if responses.num_chunks == 1:
            responses = responses.chunk(0)
        else:
            # combine copies once; int32 offsets cannot address more than 2 GiB of text
            if pa.types.is_string(responses.type) and \
                    sum(c.buffers()[2].size if c.buffers()[2] else 0 for c in responses.chunks) > _MAX_OFFSET32:
                responses = responses.cast(pa.large_string())
            responses = responses.combine_chunks()
    if pa.types.is_string_view(responses.type):
        responses = responses.cast(pa.string())
    if not (pa.types.is_string(responses.type) or pa.types.is_large_string(responses.type)):
        raise TypeError(f"responses must be an Arrow string or large_string array, got {responses.type}")
    return responses


def arrow_string_views(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data uint8, offsets int32/int64 [n+1], valid bool [n]) of a string array; data and offsets
    are views of the Arrow buffers (no copy), already shifted by the array's own slice offset."""
    n = len(arr)
    _, offsets_buf, data_buf = arr.buffers()
    offset_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    if offsets_buf is None or n == 0:
        offsets = np.zeros(n + 1, dtype=offset_type)
    else:
        offsets = np.frombuffer(offsets_buf, dtype=offset_type)[arr.offset: arr.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    if arr.null_count:
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
    else:
        valid = np.ones(n, dtype=np.bool_)
    return data, offsets, valid


def as_label_array(labels, n: int) -> np.ndarray:
    """Labels as int64 [n]; nulls (Arrow) become -1 (unknown)."""
    if isinstance(labels, (pa.Array, pa.ChunkedArray)):
        if not pa.types.is_integer(labels.type):
            raise TypeError(f"labels must be integers, got Arrow type {labels.type}")
        # int64 first: -1 does not fit an unsigned column's fill value
        labels = labels.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if len(arr) != n:
        raise ValueError(f"got {n} responses but {len(arr)} labels; they must have the same length")
    if n and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must be integers (-1 for unknown, {LABELS[0]}..{LABELS[-1]}), got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < -1) | (arr > LABELS[-1])
    if bad.any():
        raise ValueError(f"labels must be -1 (unknown) or {LABELS[0]}..{LABELS[-1]}; "
                         f"label {arr[bad][0]} at index {int(np.flatnonzero(bad)[0])}")
    return arr
