"""The generic trainer: accumulation, non-finite policy, SFT masking, loss decrease."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from qmath_jax.model import Transformer, get_preset, init_params
from qmath_jax.stages import common
from qmath_jax.train import trainer as T
from qmath_jax.train.losses import masked_cross_entropy, token_logprobs


def _state(params, optimizer):
    return T.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=optimizer.init(params),
                        rng=jax.random.key_data(jax.random.key(0)),
                        nonfinite_steps=jnp.zeros((), jnp.int32))


def _batch(rng, b=8, t=32, vocab=512):
    tokens = rng.integers(1, vocab, (b, t)).astype(np.int32)
    mask = (rng.random((b, t)) > 0.3).astype(np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": mask,
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t), (b, t)).astype(np.int32)}


def test_token_logprobs_equal_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 3
    targets = jnp.array([[0, 3, 10, 2, 2], [1, 1, 5, 9, 0]])
    ref = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logprobs(logits, targets), ref, atol=1e-6)


def test_masked_cross_entropy_and_accuracy_by_hand():
    logits = np.array([[[2.0, 1.0, 0.0], [0.0, 3.0, 3.0], [1.0, 1.0, 5.0]],
                       [[0.5, 0.2, 0.1], [4.0, 0.0, 1.0], [0.0, 0.0, 0.0]]], np.float32)
    targets = np.array([[0, 2, 1], [1, 0, 2]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    nll = np.log(np.exp(logits).sum(-1)) - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    # Right where the target's logit is the row's largest; [0, 1] ties for it (counts).
    right = np.array([[1, 1, 0], [0, 1, 1]])
    total, aux = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(total, (nll * mask).sum(), rtol=1e-6)
    assert float(aux["weight"]) == 5.0
    assert float(aux["accuracy"]) == (right * mask).sum() == 3


def test_grad_accumulation_equals_one_big_batch():
    cfg = get_preset("tiny")
    model = Transformer(cfg)
    loss = common.lm_loss(model)
    params = init_params(cfg, jax.random.key(0))
    opt = T.OptimConfig(lr=1e-3, total_steps=10)
    optimizer, schedule = T.make_optimizer(opt), T.make_schedule(opt)
    batch = _batch(np.random.default_rng(0))
    outs = []
    for accum in (1, 4):
        step = jax.jit(lambda s, b, a=accum: T.train_step(s, b, loss_fn=loss, optimizer=optimizer,
                                                          schedule=schedule, grad_accum=a))
        outs.append(step(_state(params, optimizer), batch))
    (s1, m1), (s4, m4) = outs
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), s1.params, s4.params)


def test_nonfinite_step_is_skipped_and_counted():
    params = {"w": jnp.ones((3, 3))}

    def loss(p, batch, rng):
        total = jnp.sum(p["w"]) * batch["scale"][0]
        return total, {"weight": jnp.float32(1.0)}

    opt = T.OptimConfig(lr=0.1, total_steps=10)
    optimizer, schedule = T.make_optimizer(opt), T.make_schedule(opt)
    step = jax.jit(lambda s, b: T.train_step(s, b, loss_fn=loss, optimizer=optimizer,
                                             schedule=schedule))
    state = _state(params, optimizer)
    state, m = step(state, {"scale": jnp.array([jnp.nan])})
    assert not bool(m["finite"]) and int(state.nonfinite_steps) == 1
    np.testing.assert_array_equal(state.params["w"], params["w"])
    state, m = step(state, {"scale": jnp.array([1.0])})
    assert bool(m["finite"]) and int(state.nonfinite_steps) == 1
    assert not np.array_equal(state.params["w"], params["w"])


def test_sft_prompt_tokens_get_exactly_zero_gradient(tmp_path):
    from qmath_jax.run_config import base
    from qmath_jax.stages import sft

    cfg = base("sft")
    cfg.train.batch_size, cfg.train.seq_len = 2, 256
    tok = common.tokenizer(cfg, str(tmp_path))
    batch = next(iter(sft.dataset(cfg, tok)))
    assert 0 < batch["loss_mask"].sum() < (batch["segment_ids"] > 0).sum()
    model_cfg = common.model_config(cfg, vocab_size=tok.vocab_size)
    params = init_params(model_cfg, jax.random.key(0))
    logits = Transformer(model_cfg).apply({"params": params}, batch["tokens"],
                                          batch["positions"], batch["segment_ids"])
    grad = jax.grad(lambda lg: masked_cross_entropy(lg, batch["targets"],
                                                    batch["loss_mask"])[0])(logits)
    per_position = np.abs(np.asarray(grad)).sum(-1)
    assert np.all(per_position[batch["loss_mask"] == 0] == 0.0)
    assert np.all(per_position[batch["loss_mask"] == 1] > 0.0)


def test_loss_falls_on_the_synthetic_corpus(tmp_path):
    from qmath_jax.run_config import base
    from qmath_jax.stages import pretrain

    cfg = base("pretrain")
    cfg.train.update(steps=40, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=5,
                     checkpoint_every_steps=0)
    pretrain.run(cfg, str(tmp_path))
    rows = T_metrics(tmp_path)
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 1.5, (first, last)
    assert (tmp_path / "plots" / "pretrain.png").exists()


def T_metrics(workdir):
    from qmath_jax.train.metrics import read_metrics

    return read_metrics(str(workdir / "metrics.jsonl"))


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="nonfinite"):
        T.Trainer("/tmp/unused", None, dict, None, T.OptimConfig(), nonfinite="ignore")
    with pytest.raises(ValueError, match="decay"):
        T.make_schedule(T.OptimConfig(decay="step"))
    assert isinstance(ml_collections.ConfigDict(), ml_collections.ConfigDict)


def test_params_checkpoint_restores_into_shardings(tmp_path):
    from qmath_jax import parallel
    from qmath_jax.model import param_axes
    from qmath_jax.train import checkpoint

    cfg = get_preset("tiny")
    params = init_params(cfg, jax.random.key(3))
    checkpoint.save_params(str(tmp_path / "p"), cfg, params)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = parallel.logical_to_sharding(param_axes(cfg), mesh)
    cfg2, restored = checkpoint.load_params(str(tmp_path / "p"), shardings)
    assert cfg2 == cfg
    emb = restored["embedding"]
    assert emb.sharding == shardings["embedding"]
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(params["embedding"]))
