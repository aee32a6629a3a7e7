"""Chat format: exact Qwen2.5-Math prompt strings and parity with HF apply_chat_template."""

import pytest

from qmath_jax.data import chat
from qmath_jax.data.tokenizer import train_bpe_tokenizer

Q = "Find the value of $x$ that satisfies the equation $4x+5 = 6x+7$."


def test_system_prompts_are_the_qwen25_math_ones():
    # Written out by hand from the Qwen2.5-Math model card / evaluation code.
    assert chat.COT_SYSTEM == (
        "Please reason step by step, and put your final answer within " + "\\" + "boxed{}."
    )
    assert chat.TIR_SYSTEM == (
        "Please integrate natural language reasoning with programs to solve the problem "
        "above, and put your final answer within " + "\\" + "boxed{}."
    )


def test_cot_prompt_equals_qwen25_math_cot_template():
    # The evaluation's `qwen25-math-cot` input template, with {input} = Q.
    expected = (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>user\n" + Q + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.format_prompt(Q, "cot") == expected
    assert chat.format_prompt(Q) == expected


def test_tir_and_none_prompts():
    assert chat.format_prompt(Q, "tir") == (
        "<|im_start|>system\nPlease integrate natural language reasoning with programs to "
        "solve the problem above, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\n" + Q + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.format_prompt(Q, "none") == (
        "<|im_start|>user\n" + Q + "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_format_sft_concatenates_to_full_conversation():
    response = "We get $x = -1$. The answer is $\\boxed{-1}$."
    prompt, target = chat.format_sft(Q, response, "tir")
    full = chat.format_chat(
        chat.prompt_messages(Q, "tir") + [{"role": "assistant", "content": response}],
        add_generation_prompt=False,
    )
    assert prompt + target == full
    assert target == response + "<|im_end|>\n"


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tok = train_bpe_tokenizer(["hello world 123", "a b c"] * 20, vocab_size=300)
    out = tok.save(tmp_path_factory.mktemp("chat_tok"))
    return transformers.AutoTokenizer.from_pretrained(str(out))


CONVERSATIONS = [
    chat.prompt_messages(Q, "cot"),
    chat.prompt_messages(Q, "none"),
    [
        {"role": "system", "content": chat.TIR_SYSTEM},
        {"role": "user", "content": "Compute $2^{10}$. 数学 ∑ {{ not jinja }} {% raw %}"},
        {"role": "assistant", "content": "```python\nprint(2**10)\n```\n```output\n1024\n```"},
        {"role": "user", "content": "And $2^{11}$?"},
    ],
    [{"role": "user", "content": ""}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_jinja_template_matches_format_chat(hf_tokenizer, messages, add_generation_prompt):
    ours = chat.format_chat(messages, add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert theirs == ours


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": 3}], "must be a str"),
    ],
)
def test_bad_messages_are_refused(messages, match):
    with pytest.raises((ValueError, TypeError), match=match):
        chat.format_chat(messages, True)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="unknown prompt mode 'pal'"):
        chat.format_prompt(Q, "pal")
