"""Tool-integrated reasoning (TIR) rollouts: generate, run the model's Python, continue.

The loop follows the Qwen2.5-Math evaluation: the model writes a ```python block and opens
```output; generation stops on the stop string "```output"; the last python block runs in the
sandbox (earlier successful cells of the same solution replayed first); the executor appends
"\\n<output>\\n```\\n", where <output> is the cell's stdout or, on failure, the error's last
line ("Done" when a successful cell printed nothing, "Timeout Error" on a timeout), cut to 400
characters as head...tail; and generation continues. After `max_tool_calls` executions the
line "Reach max function call limit." follows the last output, and a further ```output ends
the trajectory unexecuted (stop_reason "tool_limit").

The loop is independent of the sampler. It needs
  generate_fn(prompts: list[list[int]], max_new_tokens: int, stop: list[str]) -> list[Completion]
where a Completion has `.tokens`, `.logprobs` (one per token) and `.stop_reason` in
{"stop_string", "eos", "length"} (tokens include the stop string's tokens), and a tokenizer
with `encode(text) -> list[int]` and `decode(ids) -> str`.

`max_new_tokens` bounds the whole response, executor tokens included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

from qmath_jax.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, SandboxPool, SandboxResult
from qmath_jax.sandbox import default_pool as _default_pool

STOP = "```output"
MAX_CALLS_MESSAGE = "\nReach max function call limit."
NO_BLOCK_ERROR = "SyntaxError: no complete ```python block before ```output"
STOP_REASONS = ("stop_string", "eos", "length")


class Completion(Protocol):
    """One continuation produced by the sampler."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str


class Tokenizer(Protocol):
    """The two tokenizer methods the loop needs."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


GenerateFn = Callable[[list[list[int]], int, list[str]], Sequence[Completion]]


@dataclasses.dataclass
class Trajectory:
    """One TIR response (the prompt excluded).

    Attributes:
      tokens: Response tokens: the model's and the executor's, interleaved.
      loss_mask: 1 for a model-written token, 0 for an executor-written one.
      logprobs: The sampler's log-probability per model token; 0.0 for executor tokens.
      num_tool_calls: Code executions performed.
      stop_reason: "eos", "length" (the token budget ran out) or "tool_limit" (the model
        asked for another execution after `max_tool_calls`).
      text: `tokenizer.decode(tokens)`.
      tool_outputs: The text placed in each ```output block, in order.
    """

    tokens: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    num_tool_calls: int
    stop_reason: str
    text: str
    tool_outputs: list[str]


def extract_last_python_block(text: str) -> str | None:
    """Returns the code of the last complete ```python block in `text`, or None.

    Lines are read as the Qwen2.5-Math parser does: a line starting (or ending) with
    "```python" opens a block, the next line starting with "```" closes it. If the last
    opened block is never closed, there is no complete last block and None is returned.
    """
    code: list[str] | None = None
    current: list[str] | None = None
    for line in text.split("\n"):
        stripped = line.rstrip()
        if stripped.startswith("```python") or stripped.endswith("```python"):
            current = []
        elif line.startswith("```"):
            if current is not None:
                code, current = current, None
        elif current is not None:
            current.append(line)
    if current is not None or code is None:
        return None
    return "".join(line + "\n" for line in code)


def format_tool_output(result: SandboxResult, max_chars: int = 400) -> str:
    """The text of a ```output block, as the Qwen2.5-Math executor writes it.

    Args:
      result: The sandbox's result.
      max_chars: Longer texts keep their first and last max_chars // 2 characters around "...".
    """
    if result.timed_out:
        text = "Timeout Error"
    elif result.error:
        text = result.error.strip()
    else:
        text = result.stdout.strip() or "Done"
    if len(text) > max_chars:
        half = max_chars // 2
        text = text[:half] + "..." + text[-half:]
    return text


@dataclasses.dataclass
class _State:
    prompt: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    loss_mask: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    cells: list[str] = dataclasses.field(default_factory=list)
    outputs: list[str] = dataclasses.field(default_factory=list)
    stop_reason: str = ""

    def append(self, tokens: Sequence[int], logprobs: Sequence[float], mask: int) -> None:
        self.tokens.extend(tokens)
        self.logprobs.extend(logprobs)
        self.loss_mask.extend([mask] * len(tokens))


def run_tir(
    generate_fn: GenerateFn,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    max_tool_calls: int = 4,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    pool: SandboxPool | None = None,
    max_output_chars: int = 400,
) -> list[Trajectory]:
    """Rolls out TIR responses for a batch of prompts.

    Every round generates for all unfinished trajectories in one `generate_fn` call, then
    runs all requested cells in parallel through the sandbox pool.

    Args:
      generate_fn: The sampler (see the module docstring for the protocol).
      tokenizer: Encodes executor text and decodes model text.
      prompts: Token ids of each prompt.
      max_new_tokens: Response budget per trajectory, executor tokens included.
      max_tool_calls: Most code executions per trajectory.
      timeout_s: Wall-clock limit per execution.
      memory_mb: Memory budget per execution.
      pool: Sandbox pool; the process-wide default pool when None.
      max_output_chars: Cap on the text of one ```output block.

    Returns:
      One Trajectory per prompt, in order.
    """
    _validate(prompts, max_new_tokens, max_tool_calls)
    pool = pool or _default_pool()
    states = [_State([int(t) for t in p]) for p in prompts]
    active = list(range(len(states)))
    while active:
        budgets = [max_new_tokens - len(states[i].tokens) for i in active]
        batch = [states[i].prompt + states[i].tokens for i in active]
        completions = list(generate_fn(batch, max(budgets), [STOP]))
        if len(completions) != len(active):
            raise ValueError(
                f"generate_fn returned {len(completions)} completions for {len(active)} "
                "prompts; it must return exactly one per prompt, in order"
            )
        calls = []
        for i, comp, budget in zip(active, completions, budgets):
            code = _absorb(states[i], comp, budget, max_tool_calls, tokenizer)
            if code is not _NO_CALL:
                calls.append((i, code))
        _execute(calls, states, pool, tokenizer, max_new_tokens, max_tool_calls, timeout_s,
                 memory_mb, max_output_chars)  # fmt: skip
        active = [i for i in active if not states[i].stop_reason]
    return [
        Trajectory(
            tokens=s.tokens,
            loss_mask=s.loss_mask,
            logprobs=s.logprobs,
            num_tool_calls=len(s.outputs),
            stop_reason=s.stop_reason,
            text=tokenizer.decode(s.tokens),
            tool_outputs=s.outputs,
        )
        for s in states
    ]


_NO_CALL = object()


def _absorb(st: _State, comp: Completion, budget: int, max_calls: int, tok: Tokenizer):
    """Appends a completion; returns the code to run (None: no block), or _NO_CALL."""
    tokens, logprobs = list(comp.tokens), list(comp.logprobs)
    if len(tokens) != len(logprobs):
        raise ValueError(
            f"generate_fn returned {len(tokens)} tokens but {len(logprobs)} logprobs; "
            "a Completion needs one logprob per token"
        )
    if comp.stop_reason not in STOP_REASONS:
        raise ValueError(
            f"unknown Completion.stop_reason {comp.stop_reason!r}; expected one of {STOP_REASONS}"
        )
    if len(tokens) > budget:  # a batch-wide max_new_tokens may exceed this trajectory's budget
        st.append(tokens[:budget], logprobs[:budget], 1)
        st.stop_reason = "length"
        return _NO_CALL
    st.append(tokens, logprobs, 1)
    if comp.stop_reason != "stop_string":
        st.stop_reason = comp.stop_reason
        return _NO_CALL
    if STOP not in tok.decode(tokens):
        raise ValueError(
            f"generate_fn reported stop_reason='stop_string' but the completion does not "
            f"contain {STOP!r}; the completion's tokens must include the stop string"
        )
    if len(st.outputs) >= max_calls:
        st.stop_reason = "tool_limit"
        return _NO_CALL
    return extract_last_python_block(tok.decode(st.tokens).rsplit(STOP, 1)[0])


def _execute(calls, states, pool, tok, max_new_tokens, max_calls, timeout_s, memory_mb, cap):
    """Runs the requested cells in parallel and appends their output blocks."""
    runnable = [(i, code) for i, code in calls if code is not None]
    results = pool.map(
        [code for _, code in runnable],
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        previous_cells=[list(states[i].cells) for i, _ in runnable],
    )
    by_index = {i: r for (i, _), r in zip(runnable, results)}
    for i, code in calls:
        st = states[i]
        result = by_index.get(i)
        text = NO_BLOCK_ERROR if result is None else format_tool_output(result, cap)
        if result is not None and result.ok and not result.timed_out:
            st.cells.append(code)
        st.outputs.append(text)
        tail = tok.decode(st.tokens).rsplit(STOP, 1)[1]
        lead = "" if tail and not tail.strip() and "\n" in tail else "\n"
        block = f"{lead}{text}\n```\n" + (MAX_CALLS_MESSAGE if len(st.outputs) == max_calls else "")
        ids = tok.encode(block)
        room = max_new_tokens - len(st.tokens)
        st.append(ids[:room], [0.0] * min(room, len(ids)), 0)
        if len(ids) >= room:
            st.stop_reason = "length"


def _validate(prompts, max_new_tokens: int, max_tool_calls: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(max_tool_calls, int) or max_tool_calls < 0:
        raise ValueError(f"max_tool_calls must be an int >= 0, got {max_tool_calls!r}")
    for k, p in enumerate(prompts):
        try:
            ok = len(p) > 0 and all(int(t) == t for t in p)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"prompts[{k}] must be a non-empty list of int token ids")
