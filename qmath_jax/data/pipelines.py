"""Grain pipelines, one per training stage: pretraining, SFT, reward model (RM) and RL.

Every pipeline is a ``grain.IterDataset`` built the same way::

    source(s) -> attach location -> shard (host) -> shuffle(seed) -> repeat(num_epochs)
      -> mix(weights) -> batch of records -> prepare (tokenize, mask, split, mark drops)
      -> to_iter_dataset (threads) -> AccountedFlatMap (counts) -> [pack rows] -> batch

* Deterministic: the order depends only on the seed, the sources and the shard.
* Sharded per host: ``shard_index / shard_count`` (default ``jax.process_index() /
  process_count()``) split every source into disjoint strided shards before shuffling.
* Checkpointable: ``it = iter(ds); state = it.get_state()`` is a dict of ints, strings and
  lists (``json.dumps`` works, so it can go inside an Orbax checkpoint as JSON);
  ``it.set_state(state)`` on a fresh iterator of the same pipeline continues with exactly
  the elements an uninterrupted run would read, and with the same counters.
* Nothing is dropped silently: every record that is skipped, split or truncated is counted
  (``pipeline_report(it)``), the first ones are logged with their ``file:line``, and
  ``too_long="error"`` raises at the first one instead.

Batches are dicts of numpy arrays. Packed stages (pretraining, SFT) give ``[B, T]`` int32
``tokens``, ``targets``, ``segment_ids`` (1..n per row, 0 = padding), ``positions``
(restarting at 0 per segment) and ``loss_mask`` (1 where the loss is taken). Targets are
shifted within each document before packing, so no target crosses a document boundary and
padding carries no loss.

SFT loss: on the response (target) tokens only, never on the prompt. In TIR responses the
interpreter's output blocks carry no loss: for each block `````output`` … ````` `` the model
itself writes the opening fence ``"```output"`` (the TIR loop stops generation there), so its
tokens are trained, while everything after it up to and including the closing fence
``"```"`` is written by the interpreter and masked. The response is tokenized piecewise at
those boundaries, so each token lies wholly inside or outside a masked span (see
:func:`tir_output_spans`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from qmath_jax.data.packing import (
    AccountedFlatMap,
    encode_many,
    pack_rows,
    pipeline_report,
    prepared,
    resolve_shard,
    shift_pairs,
)

__all__ = [
    "TOO_LONG_POLICIES",
    "pipeline_report",
    "pretrain_dataset",
    "rl_dataset",
    "rm_dataset",
    "sft_dataset",
    "tir_output_spans",
    "with_fields",
]

TOO_LONG_POLICIES = ("split", "truncate", "drop", "error")
_TOO_LONG_FIX = (
    "fix: raise seq_len, shorten the record, or pass too_long='truncate'/'drop' "
    "(or 'split' for pretraining) to count and handle such records"
)

SourceLike = Any  # grain.MapDataset, a random-access source (len + getitem), or a list of dicts


# ---------------------------------------------------------------------------------------------
# Records: sources -> sharded, shuffled, repeated, mixed MapDataset


class _AttachLoc:
    """Adds ``_loc`` (``name[index]``) to records that do not say where they came from."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(record)
        out.setdefault("_loc", f"{self.name}[{index}]")
        return out


def _named_sources(
    sources: SourceLike | Mapping[str, SourceLike] | Sequence[SourceLike],
    weights: Sequence[float] | Mapping[str, float] | None,
) -> tuple[list[str], list[SourceLike], list[float] | None]:
    if isinstance(sources, Mapping):
        names, srcs = list(sources), list(sources.values())
    elif isinstance(sources, (list, tuple)) and sources and not isinstance(sources[0], Mapping):
        names, srcs = [f"source{i}" for i in range(len(sources))], list(sources)
    else:
        names, srcs = ["source0"], [sources]
    if weights is None:
        return names, srcs, None
    if isinstance(weights, Mapping):
        missing = set(names) - set(weights)
        if missing or set(weights) - set(names):
            raise ValueError(f"weights keys {sorted(weights)} must match source names {names}")
        weights = [weights[n] for n in names]
    if len(weights) != len(srcs) or any(w <= 0 for w in weights):
        raise ValueError(f"need one positive weight per source ({len(srcs)}), got {weights}")
    return names, srcs, [float(w) for w in weights]


def _records(
    sources: Any,
    weights: Any,
    *,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    shard_index: int | None,
    shard_count: int | None,
) -> grain.MapDataset:
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    names, srcs, weights = _named_sources(sources, weights)
    parts = []
    for i, (name, src) in enumerate(zip(names, srcs)):
        ds = src if isinstance(src, grain.MapDataset) else grain.MapDataset.source(src)
        ds = ds.map_with_index(_AttachLoc(name))
        # Strided shards before shuffling: disjoint, covering, balanced to within one record.
        ds = ds[shard_index::shard_count]
        if len(ds) == 0:
            raise ValueError(
                f"source {name!r} has no records for shard {shard_index} of {shard_count}; "
                "give it more records or use fewer shards"
            )
        if shuffle:
            ds = ds.shuffle(seed + 7919 * i)  # one stream per source; reshuffled every epoch
        parts.append(ds.repeat(num_epochs))
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)


def _prepared_stream(
    records: grain.MapDataset, prepare: Callable, *, records_per_call: int, num_threads: int
) -> grain.IterDataset:
    batched = records.batch(records_per_call, batch_fn=list).map(prepare)
    # Threads overlap tokenization (HF tokenizers release the GIL); order is preserved.
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, num_threads))
    return batched.to_iter_dataset(options)


def _check_policy(too_long: str, allowed: Sequence[str]) -> None:
    if too_long not in allowed:
        raise ValueError(f"too_long={too_long!r}; choose one of {tuple(allowed)}")


def _fatal(too_long: str) -> dict[str, str]:
    return {"too_long": _TOO_LONG_FIX} if too_long == "error" else {}


def with_fields(source: SourceLike, **fields: str | Callable[[Mapping[str, Any]], Any]):
    """A MapDataset whose records are ``{new_name: record[old_name] or fn(record)}`` plus
    ``_loc``. Use it to adapt a source to a stage, e.g. CoT and TIR views of one corpus::

        cot = with_fields(synth, question="question", response="cot", mode=lambda r: "cot")
    """
    ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
    return ds.map(_FieldMap(fields))


class _FieldMap:
    def __init__(self, fields: Mapping[str, Any]):
        self.fields = dict(fields)

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: (record[v] if isinstance(v, str) else v(record)) for k, v in self.fields.items()}
        if "_loc" in record:
            out["_loc"] = record["_loc"]
        return out


def _loc(record: Mapping[str, Any]) -> str:
    return str(record.get("_loc", "?"))


# ---------------------------------------------------------------------------------------------
# Pretraining


def _text_field(record: Mapping[str, Any]) -> str:
    return record["text"]


class _PretrainPrepare:
    """Tokenizes a batch of documents and cuts them into (inputs, targets) pieces."""

    def __init__(self, tokenizer, text_fn, seq_len: int, too_long: str, add_eos: bool):
        self.tokenizer, self.text_fn = tokenizer, text_fn
        self.seq_len, self.too_long, self.add_eos = seq_len, too_long, add_eos

    def __call__(self, records: list[Mapping[str, Any]]) -> dict:
        counts = {"documents": 0, "chunks": 0, "tokens": 0, "truncated_tokens": 0}
        events, texts, kept = [], [], []
        for r in records:
            try:
                text = self.text_fn(r)
            except (KeyError, TypeError, IndexError):
                events.append(["missing_text", _loc(r)])
                continue
            if not isinstance(text, str) or not text.strip():
                events.append(["empty_text", _loc(r)])
                continue
            texts.append(text)
            kept.append(r)
        items = []
        for r, ids in zip(kept, encode_many(self.tokenizer, texts)):
            counts["documents"] += 1
            if self.add_eos:
                ids = ids + [self.tokenizer.eos_id]
            items.extend(self._pieces(ids, _loc(r), counts, events))
        return prepared(items, counts, events)

    def _pieces(self, ids: list[int], loc: str, counts: dict, events: list) -> list[dict]:
        inputs, targets = shift_pairs(ids)
        n, t = len(inputs), self.seq_len
        if n == 0:
            events.append(["too_short", loc])
            return []
        if n > t:
            if self.too_long == "error":
                events.append(["too_long", loc])
            elif self.too_long == "drop":
                events.append(["too_long_dropped", loc])
                return []
            elif self.too_long == "truncate":
                events.append(["too_long_truncated", loc])
                counts["truncated_tokens"] += n - t
                inputs, targets, n = inputs[:t], targets[:t], t
            else:
                events.append(["too_long_split", loc])
        # "split": consecutive chunks of <= seq_len (input, target) pairs; each target is
        # predicted exactly once and each chunk is its own segment (positions restart at 0).
        pieces = [
            {"inputs": inputs[s : s + t], "targets": targets[s : s + t]} for s in range(0, n, t)
        ]
        counts["chunks"] += len(pieces)
        counts["tokens"] += n
        return pieces


def pretrain_dataset(
    sources: SourceLike | Mapping[str, SourceLike] | Sequence[SourceLike],
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    weights: Sequence[float] | Mapping[str, float] | None = None,
    text_fn: Callable[[Mapping[str, Any]], str] = _text_field,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    too_long: str = "split",
    add_eos: bool = True,
    num_bins: int | None = None,
    tokenize_batch: int = 64,
    num_threads: int = 2,
) -> grain.IterDataset:
    """Packed pretraining batches from weighted text sources.

    Each document is tokenized, gets ``eos_id`` appended (``add_eos``), becomes
    ``(inputs, targets) = (ids[:-1], ids[1:])`` and is first-fit packed into rows of
    ``seq_len``. A document with more than ``seq_len`` pairs is handled by ``too_long``:
    ``"split"`` (default) into consecutive chunks, ``"truncate"`` to its first ``seq_len``
    pairs (dropped tokens counted), ``"drop"``, or ``"error"`` (raise with file:line).

    Args:
      sources: One source, a list, or ``{name: source}``; records give text via ``text_fn``.
      tokenizer: Anything with ``encode`` (``encode_batch`` used when present) and ``eos_id``.
      seq_len: Row length T.
      batch_size: Rows per batch B (last partial batch dropped).
      weights: Mixing weights per source (default equal); mixing is a deterministic
        interleave in these proportions (``grain.MapDataset.mix``).
      text_fn: Record -> document text (default ``record["text"]``).
      seed: Shuffle seed.
      shuffle: Shuffle records (per source, reshuffled each epoch).
      num_epochs: Passes over each source; None repeats forever. A mixture ends when its
        first source runs out.
      shard_index: This host's shard (default ``jax.process_index()``).
      shard_count: Number of shards (default ``jax.process_count()``).
      too_long: ``"split" | "truncate" | "drop" | "error"``.
      add_eos: Append ``tokenizer.eos_id`` to every document.
      num_bins: Rows packed at once (default ``max(4 * batch_size, 16)``); more = less padding.
      tokenize_batch: Documents per tokenizer call.
      num_threads: Reader threads (0 = tokenize in the consuming thread).

    Returns:
      An IterDataset of ``{"tokens", "targets", "segment_ids", "positions", "loss_mask"}``,
      each int32 ``[batch_size, seq_len]``.
    """
    _check_policy(too_long, TOO_LONG_POLICIES)
    records = _records(
        sources,
        weights,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    prep = _PretrainPrepare(tokenizer, text_fn, seq_len, too_long, add_eos)
    stream = _prepared_stream(
        records, prep, records_per_call=tokenize_batch, num_threads=num_threads
    )
    stream = AccountedFlatMap(stream, fatal=_fatal(too_long))
    pad = int(getattr(tokenizer, "pad_id", 0))
    rows = pack_rows(
        stream,
        seq_len=seq_len,
        features={"inputs": pad, "targets": pad},
        num_bins=num_bins or max(4 * batch_size, 16),
        seed=seed,
    )
    return rows.batch(batch_size, drop_remainder=True)


# ---------------------------------------------------------------------------------------------
# SFT

_OUTPUT_FENCE = "```output"
_OUTPUT_BLOCK = re.compile(r"```output(.*?)(```\n?|\Z)", re.DOTALL)


def tir_output_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` that the interpreter wrote, i.e. carry no SFT loss.

    For each block ``"```output" + content + "```\\n"`` the span runs from just after the
    opening fence ``"```output"`` through the closing fence and its newline: exactly the text
    the TIR loop appends, so SFT tokenizes it as the loop does (a token boundary that differs
    between training and sampling throws a small model off). An unclosed block runs to the end.
    """
    return [(m.start(1), m.end(2)) for m in _OUTPUT_BLOCK.finditer(text)]


def _default_sft_format(record: Mapping[str, Any]) -> tuple[str, str]:
    from qmath_jax.data import chat

    return chat.format_sft(record["question"], record["response"], record.get("mode", "cot"))


def _pieces_with_loss(target: str) -> list[tuple[str, int]]:
    pieces, pos = [], 0
    for start, end in tir_output_spans(target):
        pieces += [(target[pos:start], 1), (target[start:end], 0)]
        pos = end
    pieces.append((target[pos:], 1))
    return [(t, w) for t, w in pieces if t]


class _SftPrepare:
    def __init__(self, tokenizer, format_fn, seq_len: int, too_long: str, add_eos: bool):
        self.tokenizer, self.format_fn = tokenizer, format_fn
        self.seq_len, self.too_long, self.add_eos = seq_len, too_long, add_eos

    def __call__(self, records: list[Mapping[str, Any]]) -> dict:
        counts = {"examples": 0, "tokens": 0, "loss_tokens": 0}
        events, layouts, texts = [], [], []
        for r in records:
            try:
                prompt, target = self.format_fn(r)
            except (KeyError, TypeError, ValueError):
                events.append(["missing_field", _loc(r)])
                continue
            if not str(prompt).strip() or not str(target).strip():
                events.append(["empty_text", _loc(r)])
                continue
            pieces = [(prompt, 0)] + _pieces_with_loss(target)
            layouts.append((r, [w for _, w in pieces]))
            texts.extend(t for t, _ in pieces)
        ids_all = encode_many(self.tokenizer, texts)
        items, k = [], 0
        for r, weights in layouts:
            ids, mask = [], []
            for w in weights:
                ids += ids_all[k]
                mask += [w] * len(ids_all[k])
                k += 1
            if self.add_eos:
                ids.append(self.tokenizer.eos_id)
                mask.append(1)
            item = self._item(ids, mask, _loc(r), events)
            if item is not None:
                counts["examples"] += 1
                counts["tokens"] += len(item["inputs"])
                counts["loss_tokens"] += int(item["loss_mask"].sum())
                items.append(item)
        return prepared(items, counts, events)

    def _item(self, ids: list[int], mask: list[int], loc: str, events: list) -> dict | None:
        inputs, targets = shift_pairs(ids)
        # The loss at position i is on predicting token i + 1.
        loss_mask = np.asarray(mask[1:], dtype=np.int32)
        if len(inputs) > self.seq_len:
            if self.too_long in ("drop", "split"):
                events.append(["too_long_dropped", loc])
                return None
            if self.too_long == "error":
                events.append(["too_long", loc])
            else:
                events.append(["too_long_truncated", loc])
            t = self.seq_len
            inputs, targets, loss_mask = inputs[:t], targets[:t], loss_mask[:t]
        if not loss_mask.any():
            events.append(["no_loss_tokens", loc])
            return None
        return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


def sft_dataset(
    sources: SourceLike | Mapping[str, SourceLike] | Sequence[SourceLike],
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    weights: Sequence[float] | Mapping[str, float] | None = None,
    format_fn: Callable[[Mapping[str, Any]], tuple[str, str]] | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    too_long: str = "drop",
    add_eos: bool = False,
    num_bins: int | None = None,
    tokenize_batch: int = 64,
    num_threads: int = 2,
) -> grain.IterDataset:
    """Packed SFT batches: loss on the response only, TIR output blocks masked.

    Records are ``{"question", "response", "mode"}`` by default (adapt others with
    :func:`with_fields`); mix CoT and TIR by passing them as two weighted sources.

    Args:
      sources: One source, a list, or ``{name: source}``.
      tokenizer: Anything with ``encode`` (``encode_batch`` used when present) and ``eos_id``.
      seq_len: Row length T.
      batch_size: Rows per batch B.
      weights: Mixing weights per source (default equal).
      format_fn: Record -> ``(prompt, target)``; default ``chat.format_sft(question,
        response, mode)``, whose target ends with ``<|im_end|>\\n`` (the stop the model learns).
      seed, shuffle, num_epochs, shard_index, shard_count: As in :func:`pretrain_dataset`.
      too_long: ``"drop"`` (default), ``"truncate"`` (keep the first ``seq_len`` pairs) or
        ``"error"``; examples never split, since a response cut from its prompt is useless.
      add_eos: Append ``eos_id`` (trained) after the target.
      num_bins, tokenize_batch, num_threads: As in :func:`pretrain_dataset`.

    Returns:
      An IterDataset of ``{"tokens", "targets", "segment_ids", "positions", "loss_mask"}``,
      each int32 ``[batch_size, seq_len]``.
    """
    _check_policy(too_long, ("drop", "truncate", "error"))
    records = _records(
        sources,
        weights,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    prep = _SftPrepare(tokenizer, format_fn or _default_sft_format, seq_len, too_long, add_eos)
    stream = _prepared_stream(
        records, prep, records_per_call=tokenize_batch, num_threads=num_threads
    )
    stream = AccountedFlatMap(stream, fatal=_fatal(too_long))
    pad = int(getattr(tokenizer, "pad_id", 0))
    rows = pack_rows(
        stream,
        seq_len=seq_len,
        features={"inputs": pad, "targets": pad, "loss_mask": 0},
        num_bins=num_bins or max(4 * batch_size, 16),
        seed=seed,
    )
    return rows.batch(batch_size, drop_remainder=True)


# ---------------------------------------------------------------------------------------------
# Reward model


class _RmPrepare:
    def __init__(self, tokenizer, format_fn, seq_len, group_size, too_long, fields):
        self.tokenizer, self.format_fn = tokenizer, format_fn
        self.seq_len, self.group_size, self.too_long = seq_len, group_size, too_long
        self.responses_field, self.labels_field = fields

    def __call__(self, records: list[Mapping[str, Any]]) -> dict:
        counts = {"groups": 0}
        events, layouts, texts = [], [], []
        for r in records:
            group = self._group(r, events)
            if group is None:
                continue
            prompt_target = [self.format_fn({**r, "response": resp}) for resp in group[0]]
            layouts.append((r, group[1]))
            texts.append(prompt_target[0][0])
            texts.extend(t for _, t in prompt_target)
        ids_all = encode_many(self.tokenizer, texts)
        items, k, g = [], 0, self.group_size
        for r, labels in layouts:
            prompt_ids, resp_ids = ids_all[k], ids_all[k + 1 : k + 1 + g]
            k += 1 + g
            item = self._item(prompt_ids, resp_ids, labels, _loc(r), events)
            if item is not None:
                counts["groups"] += 1
                items.append(item)
        return prepared(items, counts, events)

    def _group(self, r: Mapping[str, Any], events: list) -> tuple[list[str], list[int]] | None:
        try:
            responses, labels = list(r[self.responses_field]), list(r[self.labels_field])
        except (KeyError, TypeError):
            events.append(["missing_field", _loc(r)])
            return None
        if len(responses) != len(labels) or len(responses) < self.group_size:
            events.append(["wrong_group_size", _loc(r)])
            return None
        # Records with more responses than a group give their first group_size.
        responses, labels = responses[: self.group_size], [int(bool(x)) for x in labels]
        labels = labels[: self.group_size]
        if all(labels) or not any(labels):
            # A group without both kinds teaches a listwise/pairwise loss nothing.
            events.append(["all_correct" if all(labels) else "all_wrong", _loc(r)])
            return None
        return responses, labels

    def _item(self, prompt_ids, resp_ids, labels, loc: str, events: list) -> dict | None:
        g, t = self.group_size, self.seq_len
        rows = [list(prompt_ids) + list(ids) for ids in resp_ids]
        if max(len(x) for x in rows) > t:
            if self.too_long == "drop":
                events.append(["too_long_dropped", loc])
                return None
            events.append(["too_long" if self.too_long == "error" else "too_long_truncated", loc])
            rows = [x[:t] for x in rows]
        pad = int(getattr(self.tokenizer, "pad_id", 0))
        tokens = np.full((g, t), pad, np.int32)
        segment_ids = np.zeros((g, t), np.int32)
        positions = np.zeros((g, t), np.int32)
        last_index = np.zeros((g,), np.int32)
        for i, row in enumerate(rows):
            n = len(row)
            tokens[i, :n], segment_ids[i, :n], positions[i, :n] = row, 1, np.arange(n)
            last_index[i] = n - 1
        return {
            "tokens": tokens,
            "segment_ids": segment_ids,
            "positions": positions,
            "last_index": last_index,
            "labels": np.asarray(labels, np.int32),
        }


def rm_dataset(
    source: SourceLike,
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    group_size: int = 6,
    format_fn: Callable[[Mapping[str, Any]], tuple[str, str]] | None = None,
    responses_field: str = "responses",
    labels_field: str = "labels",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    too_long: str = "drop",
    drop_remainder: bool = True,
    tokenize_batch: int = 16,
    num_threads: int = 2,
) -> grain.IterDataset:
    """Reward-model batches: one question, ``group_size`` responses and their labels.

    Each response is rendered with ``format_fn({**record, "response": r})`` (default
    ``chat.format_sft``) as ``prompt + target`` in its own row (no packing), right-padded.
    Groups whose labels are all correct or all wrong are dropped and counted
    (``all_correct`` / ``all_wrong``), as are groups with fewer than ``group_size`` responses
    (``wrong_group_size``; longer lists give their first ``group_size``).

    Args:
      source: Records with ``question``, ``responses_field`` (list of str) and
        ``labels_field`` (list of bool / 0-1), e.g. ``with_fields(...)`` of sampled solutions.
      tokenizer: Anything with ``encode`` and ``pad_id``.
      seq_len: Row length T.
      batch_size: Groups per batch B.
      group_size: Responses per group G.
      format_fn: Record -> ``(prompt, target)``.
      responses_field, labels_field: Field names in the records.
      seed, shuffle, num_epochs, shard_index, shard_count: As in :func:`pretrain_dataset`.
      too_long: A response row longer than T: ``"drop"`` the group (default), ``"truncate"``
        it to T (``last_index`` then marks the last kept token) or ``"error"``.
      drop_remainder: Drop a last batch of fewer than B groups (training); keep it
        (evaluation) and it comes out as ``[b < B, ...]``.
      tokenize_batch, num_threads: As in :func:`pretrain_dataset`.

    Returns:
      An IterDataset of ``{"tokens", "segment_ids", "positions"}`` int32 ``[B, G, T]``
      (segment 1 = real token, 0 = padding), ``"last_index"`` int32 ``[B, G]`` (each
      response's last token) and ``"labels"`` int32 ``[B, G]`` (1 = correct).
    """
    _check_policy(too_long, ("drop", "truncate", "error"))
    records = _records(
        source,
        None,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    prep = _RmPrepare(
        tokenizer,
        format_fn or _default_sft_format,
        seq_len,
        group_size,
        too_long,
        (responses_field, labels_field),
    )
    stream = _prepared_stream(
        records, prep, records_per_call=tokenize_batch, num_threads=num_threads
    )
    stream = AccountedFlatMap(stream, fatal=_fatal(too_long), quiet=("all_correct", "all_wrong"))
    return stream.batch(batch_size, drop_remainder=drop_remainder)


# ---------------------------------------------------------------------------------------------
# RL


def _default_rl_prompt(record: Mapping[str, Any]) -> str:
    from qmath_jax.data import chat

    return chat.format_prompt(record["question"], record.get("mode", "cot"))


class _RlPrepare:
    def __init__(self, tokenizer, prompt_fn, max_prompt_len, answer_field, id_field):
        self.tokenizer, self.prompt_fn, self.max_prompt_len = tokenizer, prompt_fn, max_prompt_len
        self.answer_field, self.id_field = answer_field, id_field

    def __call__(self, records: list[Mapping[str, Any]]) -> dict:
        events, kept, texts = [], [], []
        for r in records:
            try:
                prompt, answer = self.prompt_fn(r), r[self.answer_field]
            except (KeyError, TypeError, ValueError):
                events.append(["missing_field", _loc(r)])
                continue
            if answer is None or not str(answer).strip() or not str(prompt).strip():
                events.append(["empty_text", _loc(r)])
                continue
            kept.append((r, str(answer)))
            texts.append(prompt)
        items = []
        for (r, answer), ids in zip(kept, encode_many(self.tokenizer, texts)):
            if len(ids) > self.max_prompt_len:
                events.append(["too_long_dropped", _loc(r)])
                continue
            rid = r.get(self.id_field, _loc(r)) if self.id_field else _loc(r)
            items.append({"prompt_ids": np.asarray(ids, np.int32), "answer": answer, "id": rid})
        return prepared(items, {"prompts": len(items)}, events)


class _RlBatch:
    def __init__(self, max_prompt_len: int, pad_id: int, samples_per_prompt: int):
        self.max_prompt_len, self.pad_id, self.n = max_prompt_len, pad_id, samples_per_prompt

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        b, p = len(items), self.max_prompt_len
        tokens = np.full((b, p), self.pad_id, np.int32)
        lengths = np.zeros((b,), np.int32)
        for i, item in enumerate(items):
            ids = item["prompt_ids"]
            tokens[i, p - len(ids) :] = ids  # left-padded: generation continues at column p
            lengths[i] = len(ids)
        rep = self.n
        return {
            "prompt_tokens": np.repeat(tokens, rep, axis=0),
            "prompt_lengths": np.repeat(lengths, rep, axis=0),
            "prompt_ids": [list(map(int, it["prompt_ids"])) for it in items for _ in range(rep)],
            "answers": [it["answer"] for it in items for _ in range(rep)],
            "ids": [it["id"] for it in items for _ in range(rep)],
        }


def rl_dataset(
    source: SourceLike | Mapping[str, SourceLike] | Sequence[SourceLike],
    tokenizer: Any,
    *,
    batch_size: int,
    max_prompt_len: int,
    samples_per_prompt: int = 1,
    weights: Sequence[float] | Mapping[str, float] | None = None,
    prompt_fn: Callable[[Mapping[str, Any]], str] | None = None,
    answer_field: str = "answer",
    id_field: str | None = "idx",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    tokenize_batch: int = 64,
    num_threads: int = 2,
) -> grain.IterDataset:
    """RL prompt batches with gold answers, grouped for sampling.

    Prompts longer than ``max_prompt_len`` tokens are dropped and counted.

    Args:
      source: Records with ``question`` (or whatever ``prompt_fn`` reads) and the answer.
      tokenizer: Anything with ``encode`` and ``pad_id``.
      batch_size: Distinct prompts per batch.
      max_prompt_len: Width P of the left-padded prompt array.
      samples_per_prompt: Each prompt is repeated this many times, consecutively (a GRPO
        group), so a batch has ``batch_size * samples_per_prompt`` rows.
      weights: Mixing weights when ``source`` is several sources.
      prompt_fn: Record -> prompt text (default ``chat.format_prompt(question, mode)``).
      answer_field: Gold answer field.
      id_field: Field used as the prompt id (falls back to the record's location).
      seed, shuffle, num_epochs, shard_index, shard_count: As in :func:`pretrain_dataset`.
      tokenize_batch, num_threads: As in :func:`pretrain_dataset`.

    Returns:
      An IterDataset of ``{"prompt_tokens": int32 [N, P] (left-padded with pad_id),
      "prompt_lengths": int32 [N], "prompt_ids": list of N id lists, "answers": N str,
      "ids": N ids}`` with ``N = batch_size * samples_per_prompt``.
    """
    records = _records(
        source,
        weights,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    prep = _RlPrepare(
        tokenizer, prompt_fn or _default_rl_prompt, max_prompt_len, answer_field, id_field
    )
    stream = _prepared_stream(
        records, prep, records_per_call=tokenize_batch, num_threads=num_threads
    )
    stream = AccountedFlatMap(stream)
    pad = int(getattr(tokenizer, "pad_id", 0))
    return stream.batch(
        batch_size,
        drop_remainder=True,
        batch_fn=_RlBatch(max_prompt_len, pad, samples_per_prompt),
    )
