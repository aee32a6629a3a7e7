"""Building blocks of the Grain pipelines: tokenizing in batches, an accounting flat-map whose
counters live in the checkpointable iterator state, first-fit packing into rows, and the
per-host sharding default.

A *prepared* element (what the map stage returns for a batch of records) is a dict::

    {"items": [element, ...],              # what flows on, possibly none
     "counts": {"documents": 3, ...},      # plain counters, summed
     "events": [[reason, location], ...]}  # one per record something happened to

The :class:`AccountedFlatMap` stage flattens ``items``, adds ``counts`` and one count per
event reason to its counters, lists the first ``MAX_LISTED`` events with their location and
logs a warning for the first ``MAX_WARNINGS``. Reasons listed in ``fatal`` raise instead,
naming the location and the fix. The counters are part of ``get_state()``, so a resumed run
reports the same numbers as an uninterrupted one; :func:`pipeline_report` reads them.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

log = logging.getLogger(__name__)

MAX_WARNINGS = 20
MAX_LISTED = 100
COUNTS_KEY = "qmath_counts"
PROBLEMS_KEY = "qmath_problems"


class TokenizerLike(Protocol):
    """What the pipelines need from a tokenizer."""

    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...


def encode_many(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, through ``encode_batch`` when the tokenizer has one.

    Accepts both this project's ``Tokenizer`` (lists of ids) and a raw HF
    ``tokenizers.Tokenizer`` (``Encoding`` objects with ``.ids``).
    """
    if not texts:
        return []
    batch_fn = getattr(tokenizer, "encode_batch", None)
    out = batch_fn(list(texts)) if batch_fn is not None else [tokenizer.encode(t) for t in texts]
    return [list(getattr(e, "ids", e)) for e in out]


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """``(shard_index, shard_count)``; defaults to ``jax.process_index() / process_count()``.

    Raises:
      ValueError: only one of the two is given, or the index is out of range.
    """
    if (shard_index is None) != (shard_count is None):
        raise ValueError("give both shard_index and shard_count, or neither (one per host)")
    if shard_index is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    return int(shard_index), int(shard_count)


def prepared(items: list[Any], counts: Mapping[str, int], events: list[list[str]]) -> dict:
    """Builds a prepared element (see the module docstring)."""
    return {"items": items, "counts": dict(counts), "events": events}


MAX_EMPTY_ELEMENTS = 1000  # consecutive prepared chunks without a record before giving up


class _AccountedIterator(grain.DatasetIterator):
    """Iterator of :class:`AccountedFlatMap`.

    The state is the parent's state *before* the prepared element being drained, the offset
    into it and the counters *including* it; restoring re-reads that element without counting
    it again, so the counters and the output match an uninterrupted run exactly.
    """

    def __init__(self, parent: grain.DatasetIterator, fatal: Mapping[str, str], quiet: set[str]):
        super().__init__(parent)
        self._fatal = fatal
        self._quiet = quiet
        self._buffer: list[Any] = []
        self._offset = 0
        self._in_element = False
        self._element_parent_state = self._parent.get_state()
        self._counts: collections.Counter = collections.Counter()
        self._problems: list[list[str]] = []
        self._warned = 0

    def _absorb(self, element: Mapping[str, Any]) -> None:
        self._counts.update(element["counts"])
        for reason, loc in element["events"]:
            if reason in self._fatal:
                raise ValueError(f"{loc}: {reason}; {self._fatal[reason]}")
            self._counts[reason] += 1
            if reason in self._quiet:
                continue
            if len(self._problems) < MAX_LISTED:
                self._problems.append([reason, loc])
            if self._warned < MAX_WARNINGS:
                self._warned += 1
                log.warning("data: %s at %s", reason, loc)

    def __next__(self) -> Any:
        empty = 0
        while self._offset >= len(self._buffer):
            self._element_parent_state = self._parent.get_state()
            element = next(self._parent)
            self._absorb(element)
            self._buffer, self._offset, self._in_element = element["items"], 0, True
            empty = 0 if self._buffer else empty + 1
            if empty >= MAX_EMPTY_ELEMENTS:
                # Everything read is being dropped: an endless (repeating) source would
                # otherwise spin here forever.
                raise ValueError(
                    f"data: the last {empty} prepared chunks yielded no usable record "
                    f"(counts so far: {dict(self._counts)}; first problems: "
                    f"{self._problems[:3]}); fix the data or the limits that drop it "
                    "(e.g. a longer train.seq_len)")
        item = self._buffer[self._offset]
        self._offset += 1
        return item

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._element_parent_state,
            "offset": self._offset,
            "in_element": self._in_element,
            COUNTS_KEY: dict(self._counts),
            PROBLEMS_KEY: [list(p) for p in self._problems],
            "warned": self._warned,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._element_parent_state = state["parent"]
        self._counts = collections.Counter(state[COUNTS_KEY])
        self._problems = [list(p) for p in state[PROBLEMS_KEY]]
        self._warned = state["warned"]
        self._buffer, self._offset, self._in_element = [], 0, False
        if state["in_element"]:
            # Re-read the element being drained; its counts are already in the state.
            self._buffer = next(self._parent)["items"]
            self._offset = state["offset"]
            self._in_element = True


class AccountedFlatMap(grain.IterDataset):
    """Flattens prepared elements and keeps their counters in the iterator state.

    Args:
      parent: Dataset of prepared elements.
      fatal: Event reasons that raise, each mapped to the fix to put in the message.
      quiet: Event reasons that are only counted (expected, not problems: e.g. RM groups
        whose responses are all correct), never listed or warned about.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        fatal: Mapping[str, str] | None = None,
        quiet: Iterable[str] = (),
    ):
        super().__init__(parent)
        self._fatal = dict(fatal or {})
        self._quiet = set(quiet)

    def __iter__(self) -> grain.DatasetIterator:
        return _AccountedIterator(self._parent.__iter__(), self._fatal, self._quiet)


def pipeline_report(state_or_iterator: Any) -> dict[str, Any]:
    """Counters and listed problems of a pipeline, from its live iterator or a saved state.

    From a live iterator the counters cover every record read so far (including those
    waiting in a packing buffer); from a state they cover what that state will replay from.

    Returns:
      ``{"counts": {reason: n}, "problems": [[reason, location], ...]}``, summed over every
      accounting stage found (there is one per stage pipeline).
    """
    live = _live_accounting(state_or_iterator)
    if live:
        counts: collections.Counter = collections.Counter()
        problems: list[list[str]] = []
        for it in live:
            counts.update(it._counts)
            problems.extend(list(p) for p in it._problems)
        return {"counts": dict(counts), "problems": problems}
    state = state_or_iterator
    if hasattr(state_or_iterator, "get_state"):
        state = state_or_iterator.get_state()
    return _report_from_state(state)


def _live_accounting(node: Any) -> list[_AccountedIterator]:
    found, stack, seen = [], [node], set()
    while stack:
        it = stack.pop()
        if id(it) in seen or not isinstance(it, grain.DatasetIterator):
            continue
        seen.add(id(it))
        if isinstance(it, _AccountedIterator):
            found.append(it)
        stack.extend(getattr(it, "_parents", ()))
    return found


def _report_from_state(state: Any) -> dict[str, Any]:
    counts: collections.Counter = collections.Counter()
    problems: list[list[str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            if COUNTS_KEY in node:
                counts.update(node[COUNTS_KEY])
                problems.extend(node.get(PROBLEMS_KEY, []))
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(state)
    return {"counts": dict(counts), "problems": problems}


def pack_rows(
    ds: grain.IterDataset,
    *,
    seq_len: int,
    features: Mapping[str, int],
    num_bins: int,
    seed: int,
) -> grain.IterDataset:
    """Packs variable-length elements into rows of ``seq_len`` with first-fit.

    Every element is a dict of equally long 1-D int arrays named in ``features`` (name ->
    padding value). First-fit (``grain.experimental.FirstFitPackIterDataset``) fills
    ``num_bins`` open rows and emits them all when an element fits none; more bins means less
    padding. Rows come out in bin order (no shuffling), so the stream depends only on the input.

    Returns:
      Rows with ``tokens`` (the ``inputs`` feature), ``segment_ids`` (1..n per row, 0 for
      padding), ``positions`` (restarting at 0 per segment) and the other features.
    """
    packed = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={k: seq_len for k in features},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=False,
        padding_struct=dict(features),
    )
    return packed.map(_rename_packed(tuple(features)))


def _rename_packed(names: tuple[str, ...]) -> Callable[[dict], dict]:
    def rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"tokens": row["inputs"].astype(np.int32)}
        out["segment_ids"] = row["inputs_segment_ids"].astype(np.int32)
        out["positions"] = row["inputs_positions"].astype(np.int32)
        for name in names:
            if name != "inputs":
                out[name] = row[name].astype(np.int32)
        if "loss_mask" not in out:
            out["loss_mask"] = (out["segment_ids"] > 0).astype(np.int32)
        return out

    return rename


def shift_pairs(ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one token sequence: targets are inputs shifted left by one.

    Shifting before packing keeps every target inside its own document, so no loss ever
    crosses a document boundary.
    """
    arr = np.asarray(ids, dtype=np.int32)
    return arr[:-1], arr[1:]
