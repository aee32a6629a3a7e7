"""Tokenizer: special tokens, round trips, HF transformers parity, sentencepiece backend."""

import json
import unicodedata

import pytest

from qmath_jax.data import chat
from qmath_jax.data.synthetic import SyntheticMath
from qmath_jax.data.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN_NONSPECIAL_ADDED_TOKENS,
    QWEN_SPECIAL_TOKENS,
    Tokenizer,
    train_bpe_tokenizer,
)

ROUND_TRIP_TEXTS = [
    "What is $12345 \\times 6789$? The answer is $\\boxed{83810205}$.",
    "Soit $f(x) = \\frac{1}{2}x^2$ ; calculez $f'(3)$. Éléments, naïve façon.",
    "∫₀¹ x² dx = ⅓, ∑_{k=1}^{n} k = n(n+1)/2, √2 ≈ 1.41421356, α β γ ∞ ≠ ≤ ≥",
    "数学很有趣。求 $x$ 使得 $3x + 5 = 11$。答案是 6。",
    "emoji 🙂🚀 and zero-width\u200bjoiner, tabs\tand\n\nnewlines  \n   trailing  ",
    "```python\nprint(2 ** 100)\n```\n```output\n1267650600228229401496703205376\n```",
    "",
]


def _corpus() -> list[str]:
    ds = SyntheticMath(seed=0)
    return [ds[i]["cot"] for i in range(300)] + ROUND_TRIP_TEXTS * 3


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe_tokenizer(_corpus(), vocab_size=600)


def test_special_tokens_are_single_ids(bpe):
    added = QWEN_SPECIAL_TOKENS + QWEN_NONSPECIAL_ADDED_TOKENS
    ids = [bpe.token_to_id(t) for t in added]
    # Appended after the learned vocabulary, in Qwen's order, as in Qwen2.5.
    assert ids == list(range(bpe.vocab_size - len(added), bpe.vocab_size))
    for tok, tid in zip(added, ids):
        assert bpe.encode(tok) == [tid]
        assert bpe.encode(f"x{tok}y").count(tid) == 1
    assert bpe.eos_id == bpe.pad_id == bpe.token_to_id(ENDOFTEXT)
    assert bpe.im_start_id == bpe.token_to_id(IM_START)
    assert bpe.im_end_id == bpe.token_to_id(IM_END)
    prompt_ids = bpe.encode(chat.format_prompt("What is 1+1?"))
    assert prompt_ids.count(bpe.im_start_id) == 3 and prompt_ids.count(bpe.im_end_id) == 2


def test_digits_are_split_one_at_a_time(bpe):
    ids = bpe.encode("x = 1234567890 and 4096")
    pieces = [bpe.decode([i]) for i in ids]
    assert "".join(pieces) == "x = 1234567890 and 4096"
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digit_pieces == list("1234567890") + list("4096")
    # No learned token holds two digits: Qwen's \p{N} pre-tokenizer rule forbids it.
    for i in range(bpe.vocab_size):
        assert sum(c.isdigit() for c in bpe.decode([i])) <= 1


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(bpe, text):
    ids = bpe.encode(text)
    # The Qwen normalizer is NFC, so a round trip returns the NFC form (these texts are NFC).
    assert text == unicodedata.normalize("NFC", text)
    assert bpe.decode(ids) == text


def test_decode_skips_special_tokens(bpe):
    text = chat.format_prompt("Hi") + "Hello" + IM_END + ENDOFTEXT
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.decode(ids, skip_special_tokens=True) == (
        f"system\n{chat.COT_SYSTEM}\nuser\nHi\nassistant\nHello"
    )


def test_encode_batch_matches_encode(bpe):
    texts = ROUND_TRIP_TEXTS + [chat.format_prompt(t) for t in ROUND_TRIP_TEXTS]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_saved_tokenizer_loads_in_transformers_with_same_ids(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat.CHAT_TEMPLATE
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = ROUND_TRIP_TEXTS + [chat.format_prompt(t, "tir") for t in ROUND_TRIP_TEXTS]
    for text in texts:
        ids = bpe.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == bpe.decode(ids)
        assert hf.decode(ids, skip_special_tokens=True) == bpe.decode(ids, True)
    assert hf.eos_token_id == bpe.eos_id and hf.pad_token_id == bpe.pad_id
    assert len(hf) == bpe.vocab_size
    # And back: what transformers writes, we load with the same ids and template.
    hf.chat_template = "{{ messages[0]['content'] }}"
    hf_dir = tmp_path / "hf_saved"
    hf.save_pretrained(str(hf_dir))
    again = Tokenizer.from_file(hf_dir)
    assert [again.encode(t) for t in texts] == [bpe.encode(t) for t in texts]
    assert again.eos_id == bpe.eos_id and again.chat_template == hf.chat_template


def test_from_file_forms(bpe, tmp_path):
    bpe.save(tmp_path)
    text = chat.format_prompt("1/2 + 1/3 = ?")
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        assert Tokenizer.from_file(path).encode(text) == bpe.encode(text)
    # Some checkpoints store named templates as a list; the "default" one is used.
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": "D"},
    ]
    cfg_path.write_text(json.dumps(cfg))
    assert Tokenizer.from_file(tmp_path).chat_template == "D"


def test_bad_inputs_have_clear_errors(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
        Tokenizer.from_file(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([bpe.vocab_size + 5])
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_bpe_tokenizer(["abc"], vocab_size=100)
    bpe.save(tmp_path / "cfg")
    cfg = tmp_path / "cfg" / "tokenizer_config.json"
    cfg.write_text(json.dumps({"eos_token": "<|missing|>"}))
    with pytest.raises(ValueError, match="eos_token '<\\|missing\\|>' is not in the vocabulary"):
        Tokenizer.from_file(tmp_path / "cfg")


# ----------------------------------------------------------------------------- sentencepiece


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(d / "tiny"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,  # any character round-trips through byte pieces
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        user_defined_symbols=[ENDOFTEXT, IM_START, IM_END],
        character_coverage=1.0,
        minloglevel=2,
    )
    return d / "tiny.model"


def test_sentencepiece_through_the_same_api(sp_model, tmp_path):
    tok = Tokenizer.from_file(sp_model)
    assert tok.backend_name == "sentencepiece"
    assert tok.eos_id == tok.token_to_id(ENDOFTEXT) == tok.pad_id
    for special in (ENDOFTEXT, IM_START, IM_END, "</s>", "<s>"):
        tid = tok.token_to_id(special)
        assert tid is not None and tok.encode(special) == [tid]
    assert tok.token_to_id("<|not-a-token|>") is None
    text = chat.format_prompt("What is $3 + 4$?") + "It is 7." + IM_END + "</s>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert "<|im_start|>" not in tok.decode(ids, skip_special_tokens=True)
    for t in ROUND_TRIP_TEXTS[:4]:
        assert tok.decode(tok.encode(t)) == t
    assert tok.encode_batch(ROUND_TRIP_TEXTS) == [tok.encode(t) for t in ROUND_TRIP_TEXTS]
    tok.save(tmp_path)
    again = Tokenizer.from_file(tmp_path)
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size == 400
