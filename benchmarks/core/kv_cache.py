"""A key/value cache for greedy decoding that is allocated once instead of grown every step.

``transformers``' ``DynamicCache`` appends each new token's keys and values with
``torch.cat``, which copies the whole cache of every layer at every step: the copying grows with
the square of the generated length, and VerbMem generates 128 tokens per prompt. :func:`decoding_cache` returns a ``DynamicCache`` whose
full-attention layers write into buffers sized for the prompt plus the new tokens and hand
attention views of the filled part. Attention sees the same keys and values in the same order,
so the generated tokens are the same as with the default cache (tested).

Layers of other kinds (sliding windows, shared or compressed caches) keep the class
``transformers`` chose for them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` that stores up to ``capacity`` positions in buffers allocated on the
    first update; ``keys``/``values`` are views of the filled positions.

    Anything that replaces the views with tensors of their own (``batch_select_indices``,
    ``reorder_cache``) or an update past ``capacity`` falls back to the parent's concatenation,
    so the layer is never wrong, only sometimes no faster.
    """

    def __init__(self, capacity: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if capacity < 1:
            raise ValueError(f"a cache needs room for at least one position, got capacity {capacity}")
        self.capacity = capacity
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, key_dim = key_states.shape
        self.key_buffer = key_states.new_empty((batch, heads, self.capacity, key_dim))
        self.value_buffer = value_states.new_empty((batch, heads, self.capacity, value_states.shape[-1]))
        self.keys = self.key_buffer[..., :0, :]
        self.values = self.value_buffer[..., :0, :]

    def _views_buffer(self) -> bool:
        # A view of the buffer from position 0 shares its storage at offset 0 (``data_ptr`` alone
        # would not do: an empty view's is 0).
        keys = self.keys
        return (keys.untyped_storage().data_ptr() == self.key_buffer.untyped_storage().data_ptr()
                and keys.storage_offset() == 0 and keys.shape[0] == self.key_buffer.shape[0])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.capacity or not self._views_buffer():
            return super().update(key_states, value_states, *args, **kwargs)
        self.key_buffer[..., start:end, :].copy_(key_states)
        self.value_buffer[..., start:end, :].copy_(value_states)
        self.keys = self.key_buffer[..., :end, :]
        self.values = self.value_buffer[..., :end, :]
        return self.keys, self.values


def decoding_cache(model, capacity: int) -> DynamicCache:
    """A cache for one ``generate`` call of ``model`` that holds ``capacity`` positions (prompt
    width plus new tokens) in preallocated buffers, layer by layer where the layer is plain
    full attention."""
    cache = DynamicCache(config=model.config)
    cache.layers = [
        PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache
