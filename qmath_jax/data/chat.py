"""Qwen chat format (ChatML) and the Qwen2.5-Math CoT / TIR system prompts.

A conversation renders as::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n

Both prompts go in the system message, as the Qwen2.5-Math model card shows and as the
Qwen2.5-Math evaluation's `qwen25-math-cot` prompt type writes it (`qwen25-math-cot` is
exactly ``COT_SYSTEM`` as the system turn, the question as the user turn).

`CHAT_TEMPLATE` is the Jinja form of `format_chat`, saved into `tokenizer_config.json`, so HF
`tokenizer.apply_chat_template` gives the same string. Unlike the Qwen2.5-Math-Instruct
template it renders exactly the messages given: it does not insert ``COT_SYSTEM`` when the
first message is not a system message (so mode ``"none"`` is expressible), and it has no
tool-call branches (TIR here runs code inside the assistant turn, as Qwen2.5-Math does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
TIR_SYSTEM = (
    "Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}."
)
SYSTEM_PROMPTS: dict[str, str | None] = {"cot": COT_SYSTEM, "tir": TIR_SYSTEM, "none": None}

ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def _check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; use one of {ROLES}")
        if not isinstance(m["content"], str):
            raise TypeError(f"message {i} content must be a str, got {type(m['content']).__name__}")


def format_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    """Renders messages in the Qwen chat format (same string as `CHAT_TEMPLATE`).

    Args:
        messages: dicts with `role` in ("system", "user", "assistant") and `content`.
        add_generation_prompt: append `<|im_start|>assistant\\n` so the model answers next.

    Returns:
        The rendered conversation.

    Raises:
        ValueError: a message lacks a field or has an unknown role.
        TypeError: a message's content is not a string.
    """
    _check_messages(messages)
    out = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def prompt_messages(question: str, mode: str = "cot") -> list[dict[str, str]]:
    """The messages of a math prompt: the mode's system prompt (if any) and the question.

    Args:
        question: problem text.
        mode: "cot", "tir" or "none" (no system message).

    Returns:
        The message list.
    """
    if mode not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown prompt mode {mode!r}; use one of {tuple(SYSTEM_PROMPTS)}")
    system = SYSTEM_PROMPTS[mode]
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": question})
    return messages


def format_prompt(question: str, mode: str = "cot") -> str:
    """The full generation prompt for one question, ending in `<|im_start|>assistant\\n`.

    Args:
        question: problem text.
        mode: "cot" (COT_SYSTEM), "tir" (TIR_SYSTEM) or "none" (no system message).

    Returns:
        The prompt string.
    """
    return format_chat(prompt_messages(question, mode), add_generation_prompt=True)


def format_sft(question: str, response: str, mode: str = "cot") -> tuple[str, str]:
    """Splits one SFT example into the prompt and the target the loss is taken on.

    `prompt + target` equals `format_chat` of the whole conversation; the target ends with
    `<|im_end|>\\n`, so the model learns to stop with `<|im_end|>`.

    Args:
        question: problem text.
        response: the assistant's solution.
        mode: as in `format_prompt`.

    Returns:
        (prompt, target).
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    return format_prompt(question, mode), f"{response}{IM_END}\n"
