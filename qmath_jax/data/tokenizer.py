"""Tokenizers: a Qwen-style HF `tokenizer.json` (byte-level BPE) or a sentencepiece model.

One `Tokenizer` class hides which backend is used. Special tokens written in the text
(`<|im_start|>`, `<|endoftext|>`, ...) always become single ids, as in HF `transformers`
with `add_special_tokens=False`; no BOS/EOS is added implicitly.

`train_bpe_tokenizer` trains a small byte-level BPE with Qwen's pre-tokenizer (digits are
split one at a time) and Qwen's special tokens appended after the learned vocabulary, for
the small models of the tests and the demo.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from qmath_jax.data.chat import CHAT_TEMPLATE

# Qwen2 / Qwen2.5 pre-tokenizer regex (from the released tokenizer.json). `\p{N}` alone,
# not `\p{N}+`, makes every digit its own pre-token, so numbers are tokenized digit by digit.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Qwen2.5's added tokens, in its id order: special ones, then the non-special ones.
QWEN_SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_NONSPECIAL_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

_CONFIG_NAME = "tokenizer_config.json"
# What `Tokenizer.from_file` reads from a directory: copying a remote run or HF directory
# (qmath_jax.fileio.fetch) takes these alone, not the weights beside them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", _CONFIG_NAME, "chat_template.jinja")


class Tokenizer:
    """A text <-> ids codec over HF `tokenizers` or sentencepiece.

    Build it with `Tokenizer.from_file` or `train_bpe_tokenizer`.

    Attributes:
        eos_id: id that ends a document / a generation (`<|endoftext|>` for Qwen base).
        pad_id: id used for padding (the config's pad token, else `eos_id`).
        chat_template: Jinja chat template saved into `tokenizer_config.json`.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer | spm.SentencePieceProcessor,
        *,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        source: str = "<memory>",
    ) -> None:
        """Wraps a backend; prefer `from_file` or `train_bpe_tokenizer`.

        Args:
            backend: a `tokenizers.Tokenizer` or a loaded `SentencePieceProcessor`.
            eos_token: EOS token string; default `<|endoftext|>` if present, else the
                sentencepiece EOS piece.
            pad_token: padding token string; default the EOS token.
            chat_template: Jinja chat template; default `chat.CHAT_TEMPLATE`.
            source: where it was loaded from, for error messages.
        """
        self._hf = backend if isinstance(backend, tokenizers.Tokenizer) else None
        self._sp = backend if isinstance(backend, spm.SentencePieceProcessor) else None
        if self._hf is None and self._sp is None:
            raise TypeError(
                f"backend must be tokenizers.Tokenizer or SentencePieceProcessor, "
                f"got {type(backend).__name__}"
            )
        self.source = source
        self.chat_template = CHAT_TEMPLATE if chat_template is None else chat_template
        self._special_ids: frozenset[int] = frozenset()
        self._sp_split_re: re.Pattern[str] | None = None
        if self._sp is not None:
            self._init_sentencepiece_specials()
        else:
            self._special_ids = frozenset(
                i for i, t in self._hf.get_added_tokens_decoder().items() if t.special
            )
        self.eos_id = self._resolve_eos(eos_token)
        self.pad_id = self._resolve_id(pad_token, "pad_token") if pad_token else self.eos_id

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Loads `tokenizer.json`, a sentencepiece `*.model`, or an HF checkpoint directory.

        A directory must hold `tokenizer.json` (or `tokenizer.model`); its
        `tokenizer_config.json`, if present, gives the EOS/pad tokens and chat template
        (`chat_template.jinja`, as transformers 5 writes it, takes precedence).

        Args:
            path: file or directory.

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: nothing loadable at `path`.
            ValueError: the file is not a valid tokenizer.
        """
        path = Path(path)
        config: dict[str, Any] = {}
        chat_template = None
        if path.is_dir():
            config_path = path / _CONFIG_NAME
            if config_path.is_file():
                config = _read_config(config_path)
                chat_template = _config_chat_template(config.get("chat_template"))
            jinja_path = path / "chat_template.jinja"  # where transformers 5 writes it
            if jinja_path.is_file():
                chat_template = jinja_path.read_text(encoding="utf-8")
            candidates = [path / "tokenizer.json", path / "tokenizer.model"]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    f"{path} holds neither tokenizer.json nor tokenizer.model; pass an HF "
                    f"checkpoint directory, a tokenizer.json or a sentencepiece .model file"
                )
            path = found
        elif not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        if path.suffix == ".json":
            try:
                backend = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # the Rust error says what is wrong inside the file
                raise ValueError(f"{path} is not a valid HF tokenizer.json: {e}") from e
        else:
            backend = spm.SentencePieceProcessor()
            try:
                backend.Load(str(path))
            except Exception as e:
                raise ValueError(f"{path} is not a valid sentencepiece model: {e}") from e
        return cls(
            backend,
            eos_token=_token_str(config.get("eos_token")),
            pad_token=_token_str(config.get("pad_token")),
            chat_template=chat_template,
            source=str(path),
        )

    def _init_sentencepiece_specials(self) -> None:
        sp = self._sp
        control, user = [], []
        for i in range(sp.get_piece_size()):
            if sp.is_control(i):
                control.append(i)
            elif sp.is_unknown(i):
                continue
            elif sp.IdToPiece(i) in QWEN_SPECIAL_TOKENS or _is_user_defined(sp, i):
                user.append(i)
        self._special_ids = frozenset(control + user)
        # sentencepiece never matches control symbols (<s>, </s>, ...) in text, and puts its
        # dummy-prefix piece before a user-defined symbol at the start of a text; so special
        # pieces are split out here and encoded as one id each, the text between them by sp.
        pieces = sorted((sp.IdToPiece(i) for i in self._special_ids if sp.IdToPiece(i)), key=len)
        if pieces:
            alternation = "|".join(re.escape(p) for p in reversed(pieces))
            self._sp_split_re = re.compile(f"({alternation})")

    def _resolve_eos(self, eos_token: str | None) -> int:
        if eos_token:
            return self._resolve_id(eos_token, "eos_token")
        eid = self.token_to_id(ENDOFTEXT)
        if eid is not None:
            return eid
        if self._sp is not None and self._sp.eos_id() >= 0:
            return self._sp.eos_id()
        raise ValueError(
            f"{self.source}: no EOS token: the vocabulary has no {ENDOFTEXT} and no "
            f"sentencepiece EOS; set eos_token in tokenizer_config.json"
        )

    def _resolve_id(self, token: str, what: str) -> int:
        tid = self.token_to_id(token)
        if tid is None:
            raise ValueError(
                f"{self.source}: {what} {token!r} is not in the vocabulary; fix "
                f"tokenizer_config.json or add the token"
            )
        return tid

    # ----------------------------------------------------------------- properties

    @property
    def backend_name(self) -> str:
        """`"hf"` for a tokenizer.json, `"sentencepiece"` for a .model file."""
        return "hf" if self._hf is not None else "sentencepiece"

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding needs at least this many)."""
        if self._hf is not None:
            return self._hf.get_vocab_size(with_added_tokens=True)
        return self._sp.get_piece_size()

    @property
    def im_start_id(self) -> int | None:
        """Id of `<|im_start|>`, or None when the vocabulary lacks it."""
        return self.token_to_id(IM_START)

    @property
    def im_end_id(self) -> int | None:
        """Id of `<|im_end|>`, or None when the vocabulary lacks it."""
        return self.token_to_id(IM_END)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special_tokens=True)` drops."""
        return self._special_ids

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string, or None if it is not a single token of the vocabulary."""
        if self._hf is not None:
            return self._hf.token_to_id(token)
        tid = self._sp.PieceToId(token)
        # sentencepiece maps unknown pieces to unk; only a real unk piece maps back.
        if tid == self._sp.unk_id() and self._sp.IdToPiece(tid) != token:
            return None
        return tid

    def id_to_token(self, tid: int) -> str | None:
        """Token string of one id, or None when out of range."""
        if not 0 <= tid < self.vocab_size:
            return None
        if self._hf is not None:
            return self._hf.id_to_token(tid)
        return self._sp.IdToPiece(tid)

    # ----------------------------------------------------------------- encode / decode

    def encode(self, text: str) -> list[int]:
        """Encodes text; special tokens written in it become single ids; no BOS/EOS added.

        Args:
            text: the string.

        Returns:
            Token ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp_encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts at once (Rust / C++ threads); same ids as `encode` on each."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: item {i} is {type(t).__name__}, expected str")
        if self._hf is not None:
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        if self._sp_split_re is None:
            return self._sp.Encode(texts, out_type=int)
        return [self._sp_encode(t) for t in texts]

    def _sp_encode(self, text: str) -> list[int]:
        if self._sp_split_re is None:
            return self._sp.Encode(text, out_type=int)
        ids: list[int] = []
        for k, chunk in enumerate(self._sp_split_re.split(text)):
            if k % 2:  # odd chunks are the captured control pieces
                ids.append(self._sp.PieceToId(chunk))
            elif chunk:
                ids.extend(self._sp.Encode(chunk, out_type=int))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Decodes ids to text.

        Args:
            ids: token ids (a list, or a 1-D integer array).
            skip_special_tokens: drop special tokens (`<|im_end|>`, `<|endoftext|>`, ...).

        Returns:
            The text.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"decode: ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}) of "
                f"{self.source}; the ids come from another tokenizer or an oversized vocab"
            )
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._sp_decode(ids, skip_special_tokens)

    def _sp_decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # sentencepiece's own decode renders control ids as "", so runs of ordinary ids are
        # decoded together and special ids are written out (or dropped) in between.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_ids:
                if run:
                    parts.append(self._sp.Decode(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self._sp.IdToPiece(i))
            else:
                run.append(i)
        if run:
            parts.append(self._sp.Decode(run))
        return "".join(parts)

    # ----------------------------------------------------------------- saving

    def save(self, directory: str | Path) -> Path:
        """Writes the tokenizer so `from_file(directory)` and HF `AutoTokenizer` load it.

        For the HF backend: `tokenizer.json` and `tokenizer_config.json` (EOS/pad tokens,
        the chat template). For sentencepiece: `tokenizer.model` and the same config, which
        `from_file` reads back (HF loading of raw sentencepiece models is not covered).

        Args:
            directory: output directory, created if missing.

        Returns:
            The directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        eos = self.id_to_token(self.eos_id)
        pad = self.id_to_token(self.pad_id)
        config: dict[str, Any] = {
            "eos_token": eos,
            "pad_token": pad,
            "bos_token": None,
            "unk_token": None,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 131072,
            "split_special_tokens": False,
        }
        if self._hf is not None:
            self._hf.save(str(directory / "tokenizer.json"))
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            config["errors"] = "replace"
        else:
            (directory / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
        (directory / _CONFIG_NAME).write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return directory

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.backend_name}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, source={self.source!r})"
        )


def _is_user_defined(sp: spm.SentencePieceProcessor, i: int) -> bool:
    # `is_user_defined` exists in recent sentencepiece builds only.
    fn = getattr(sp, "IsUserDefined", None) or getattr(sp, "is_user_defined", None)
    return bool(fn(i)) if fn is not None else False


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from e
    if not isinstance(config, dict):
        # A file whose content is wrong is a value error, whatever Python type it parsed to.
        found = type(config).__name__
        raise ValueError(f"{path} must hold a JSON object, found {found}")  # noqa: TRY004
    return config


def _config_chat_template(value: Any) -> str | None:
    # tokenizer_config.json holds the template as a string, or as a list of named
    # templates ([{"name": "default", "template": ...}, ...]) in some checkpoints.
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json writes tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _qwen_added_tokens() -> list[tokenizers.AddedToken]:
    special = [
        tokenizers.AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS
    ]
    plain = [
        tokenizers.AddedToken(t, special=False, normalized=False)
        for t in QWEN_NONSPECIAL_ADDED_TOKENS
    ]
    return special + plain


def qwen_style_tokenizer(model: models.Model) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` with Qwen2's NFC normalizer, pre-tokenizer and decoder.

    Args:
        model: the BPE model (trained or loaded).

    Returns:
        The configured HF tokenizer (no added tokens yet).
    """
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                tokenizers.Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Trains a small Qwen-style byte-level BPE tokenizer.

    The 256 byte symbols are always in the vocabulary, so any text encodes. Qwen's 22 added
    tokens (14 special ones first, `<|endoftext|>` among them) come after the learned vocab,
    as in Qwen2.5.

    Args:
        texts: training corpus.
        vocab_size: total number of ids, added tokens included; at least 256 + 22.
        min_frequency: minimum pair count for a merge.
        show_progress: show the Rust trainer's progress bar.

    Returns:
        The trained tokenizer, EOS = pad = `<|endoftext|>`.

    Raises:
        ValueError: `vocab_size` too small.
    """
    added = _qwen_added_tokens()
    base = 256
    if vocab_size < base + len(added):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must hold the {base} byte symbols "
            f"and the {len(added)} Qwen added tokens (>= {base + len(added)})"
        )
    tok = qwen_style_tokenizer(models.BPE(byte_fallback=False))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),
        min_frequency=min_frequency,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])
    return Tokenizer(tok, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT)
