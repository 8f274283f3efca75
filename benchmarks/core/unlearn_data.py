"""Turning forget and retain texts into the micro-batches defenses train on.

* Each text is tokenised as MUSE does (``add_special_tokens=True``, so a BOS-prepending
  tokenizer starts it with BOS). A text longer than ``max_length`` tokens is split into
  consecutive windows of at most ``max_length`` tokens, each starting with BOS again when the
  tokenizer uses one; every window is one example. Texts with fewer than two tokens (nothing
  to predict) are dropped. A caller may add further *views* (other encodings of the same
  text, e.g. the embedded world's second training view); each view's windows are examples
  too, after those of the running text.
* Forget example ``i`` carries ``index = i``: the key of its cached reference
  log-likelihood (:mod:`benchmarks.core.reference`).
* Forget example ``i`` is paired with retain example ``order[i mod N_retain]``, where
  ``order`` is a seeded permutation of the retain examples — MUSE pairs forget chunk ``i``
  with retain chunk ``i mod N_retain``; the permutation only avoids always using the first
  ``N_forget`` retain texts when the retain set is larger. One epoch is one pass over the
  forget examples in a seeded shuffled order.
* Batches are right-padded; ``attention_mask`` marks real tokens, so padding never enters a
  loss (:func:`benchmarks.core.logprobs.target_mask`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.core.batching import pad_batch, pad_id_of
from benchmarks.core.errors import DataError


View = Callable[[str], Sequence[int]]


def running_text(tokenizer) -> View:
    """MUSE's encoding: the whole text, ``add_special_tokens=True``."""
    return lambda text: tokenizer(text, add_special_tokens=True)["input_ids"]


def tokenize_texts(
    tokenizer, texts: Sequence[str], max_length: int, extra_views: Sequence[View] = ()
) -> list[list[int]]:
    """Token ids of each text (split into windows of at most ``max_length``), in order; then
    the same for every extra view."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    bos = tokenizer.bos_token_id
    examples: list[list[int]] = []
    for view in (running_text(tokenizer), *extra_views):
        for text in texts:
            ids = list(view(text))
            starts_with_bos = bos is not None and bool(ids) and ids[0] == bos
            body = ids[1:] if starts_with_bos else ids
            width = max_length - 1 if starts_with_bos else max_length
            for start in range(0, max(len(body), 1), width):
                window = ([bos] if starts_with_bos else []) + body[start : start + width]
                if len(window) >= 2:
                    examples.append(window)
    return examples


class ForgetRetainDataset(Dataset):
    """Forget examples (with their index), each paired with a retain example when
    ``retain`` is given.

    The pairing moves on every epoch (:meth:`set_epoch`, called by the training loop): epoch
    ``e`` pairs forget example ``i`` with the retain example at position ``i + e * len(forget)``
    of one seeded permutation, so over the epochs the retain term sees the whole retain set,
    not the same ``len(forget)`` examples again and again. (With the pairing fixed, a retain set
    larger than the forget set is mostly never trained on.)
    """

    def __init__(self, forget: list[list[int]], retain: list[list[int]] | None = None, seed: int = 0) -> None:
        if not forget:
            raise DataError("the forget set yields no training examples; check the split and --max-length")
        if retain is not None and not retain:
            raise DataError("the retain set yields no training examples; check the split or use --retain-loss none")
        self.forget = forget
        self.retain = retain
        self.epoch = 0
        if retain is not None:
            generator = torch.Generator().manual_seed(seed)
            self.retain_order = torch.randperm(len(retain), generator=generator).tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def retain_index(self, i: int) -> int:
        """Which retain example forget example ``i`` is paired with in the current epoch."""
        return self.retain_order[(i + self.epoch * len(self.forget)) % len(self.retain)]

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"forget": (i, self.forget[i])}
        if self.retain is not None:
            item["retain"] = self.retain[self.retain_index(i)]
        return item


class Collate:
    """Collates dataset items into ``{"forget": {..., "index"}, "retain": {...}}``."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        forget = pad_batch([ids for _, ids in (item["forget"] for item in items)], self.pad_id)
        forget["index"] = torch.tensor([i for i, _ in (item["forget"] for item in items)], dtype=torch.long)
        batch: dict[str, Any] = {"forget": forget}
        if "retain" in items[0]:
            batch["retain"] = pad_batch([item["retain"] for item in items], self.pad_id)
        return batch


_pad_id = pad_id_of


def training_loader(dataset: ForgetRetainDataset, tokenizer, batch_size: int, seed: int) -> DataLoader:
    """Shuffled (seeded) micro-batches of ``batch_size`` forget examples and their retain pairs."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=Collate(_pad_id(tokenizer))
    )


class _ForgetOnly(Dataset):
    def __init__(self, forget: list[list[int]]) -> None:
        self.forget = forget

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"forget": (i, self.forget[i])}


class _ForgetPart:
    def __init__(self, pad_id: int) -> None:
        self.collate = Collate(pad_id)

    def __call__(self, items):
        return self.collate(items)["forget"]


def reference_loader(forget: list[list[int]], tokenizer, batch_size: int) -> DataLoader:
    """Forget examples in order, with ``index``, for caching reference log-likelihoods."""
    return DataLoader(_ForgetOnly(forget), batch_size=batch_size, shuffle=False, collate_fn=_ForgetPart(_pad_id(tokenizer)))
