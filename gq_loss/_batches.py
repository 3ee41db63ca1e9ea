"""How a detector reads its data: a tensor, an ``(inputs, labels)`` pair, a dict batch or an
iterable of batches (a `DataLoader`, with or without a length), split into batches, under an
optional progress bar."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._runtime import check_batch


def labelled_pair(data: Any) -> bool:
    """``(inputs, labels)`` with integer labels ``(B,)``: one batch, not an iterable of two."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
        and not data[1].is_floating_point()
        and data[1].ndim == 1
    )


def length(data: Any) -> int | None:
    """``len(data)``, or None for an iterable without one (a `DataLoader` over an
    `IterableDataset` has ``__len__`` but raises `TypeError` from it)."""
    try:
        return len(data)
    except TypeError:
        return None


def batches(
    inputs: Any, name: str, batch_size: int | None, input_key: str = "pixel_values"
) -> tuple[Iterable[Any], int | None, torch.device]:
    """(batches, number of batches or None, device of the results) for a tensor, a Mapping or
    an iterable.

    A tensor (or a Mapping holding one under ``input_key``: one batch, e.g. a Hugging Face
    ``BatchFeature``) is split into ``batch_size`` chunks and its results stay on its device;
    an iterable (a `DataLoader`, a generator; no length needed) yields tensors, tuples/lists
    whose first element is the input, or Mappings whose ``input_key`` entry is (a Hugging Face
    image `DataLoader`'s ``{"pixel_values": ..., "labels": ...}``), and its results are
    concatenated on the CPU.
    """
    if labelled_pair(inputs):
        inputs = inputs[0]
    if isinstance(inputs, Mapping):
        inputs = batch_input(inputs, input_key, name)
    if isinstance(inputs, Tensor):
        check_batch(inputs, name)
        chunks = inputs.split(batch_size or max(len(inputs), 1))
        return chunks, len(chunks), inputs.device
    if isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
        items = (batch_input(b, input_key, name) for b in inputs)
        return items, length(inputs), torch.device("cpu")
    raise TypeError(
        f"`{name}` must be a tensor (B, ...) or an iterable of batches, got {type(inputs).__name__}"
    )


def batch_input(batch: Any, input_key: str, name: str) -> Any:
    """The input of one batch: the first element of a tuple/list, the ``input_key`` entry of a
    Mapping, else the batch itself (checked by `check_batch`)."""
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return batch[0]
    if isinstance(batch, Mapping):
        if input_key not in batch:
            raise ValueError(
                f"`{name}` gave a {type(batch).__name__} batch without the key "
                f"`input_key`={input_key!r}, with keys {list(batch)[:8]}; set `input_key=` to "
                "the key of the float inputs the model takes (text models: a tensor of input "
                "embeddings, with a model that takes it)"
            )
        return batch[input_key]
    return batch


def progress(items: Iterable[Any], total: int | None, enabled: bool, desc: str) -> Iterable[Any]:
    """``items`` under a tqdm bar when ``enabled``; ``total=None`` gives a bar without a total."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError as err:
        raise ImportError("`progress=True` needs tqdm: `pip install tqdm`") from err
    return tqdm(items, total=total, desc=desc, unit="batch")
