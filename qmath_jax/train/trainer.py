"""The one generic trainer: state, optimizer, the jitted step, checkpoints and metrics.

A stage supplies a loss `loss_fn(params, batch, rng) -> (sum, aux)` (aux["weight"] the
normaliser, other aux entries sums reported per unit weight) and an iterator of numpy
batches with `get_state()` / `set_state()`. The step is a module-level pure function,
jitted once with explicit shardings and the state donated; metrics are read one step late.

Non-finite policy (`train.nonfinite`): "skip" leaves params and optimizer state unchanged
for a step whose loss or gradient is NaN/inf and counts it in `nonfinite_steps`; "halt"
stops the run at such a step, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from qmath_jax import fileio, parallel
from qmath_jax.train import checkpoint as params_ckpt
from qmath_jax.train import metrics as metrics_lib

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_steps: jax.Array


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    end_lr: float = 0.0
    warmup_steps: int = 0
    total_steps: int = 1000
    decay: str = "cosine"  # cosine | linear | constant
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0


def make_schedule(oc: OptimConfig) -> optax.Schedule:
    decay_steps = max(oc.total_steps - oc.warmup_steps, 1)
    if oc.decay == "cosine":
        decay = optax.cosine_decay_schedule(oc.lr, decay_steps, alpha=oc.end_lr / oc.lr)
    elif oc.decay == "linear":
        decay = optax.linear_schedule(oc.lr, oc.end_lr, decay_steps)
    elif oc.decay == "constant":
        decay = optax.constant_schedule(oc.lr)
    else:
        raise ValueError(f"train.decay={oc.decay!r}: use cosine, linear or constant")
    if oc.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, oc.lr, oc.warmup_steps)
    return optax.join_schedules([warmup, decay], [oc.warmup_steps])


def _decay_mask(params):
    """Weight decay on matrices (kernels, embedding, LM head); not on biases or norm scales."""

    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name.endswith("kernel") or name in ("embedding", "lm_head")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(oc: OptimConfig) -> optax.GradientTransformation:
    """AdamW behind global-norm clipping, following `make_schedule`."""
    parts = []
    if oc.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(oc.clip_norm))
    parts.append(optax.adamw(make_schedule(oc), b1=oc.b1, b2=oc.b2, eps=oc.eps,
                             weight_decay=oc.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


def _split_micro(batch: dict, grad_accum: int) -> dict:
    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into "
                             f"{grad_accum} micro-batches; make train.batch_size a multiple")
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])

    return jax.tree.map(split, batch)


def _accumulate(loss_fn: LossFn, params, batch: dict, rng, grad_accum: int):
    """Sum of loss and grads over micro-batches (a scan, so memory is one micro-batch)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        return grad_fn(params, batch, rng)
    micro = _split_micro(batch, grad_accum)
    keys = jax.random.split(rng, grad_accum)

    def body(carry, xs):
        mb, key = xs
        (total, aux), grads = grad_fn(params, mb, key)
        return jax.tree.map(jnp.add, carry, ((total, aux), grads)), None

    zero_out = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), keys[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_out)
    summed, _ = jax.lax.scan(body, zeros, (micro, keys))
    return summed


def train_step(state: TrainState, batch: dict, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               grad_accum: int = 1) -> tuple[TrainState, dict]:
    """One optimizer update on `batch` (split into `grad_accum` micro-batches)."""
    rng, step_rng = jax.random.split(state.rng)
    (total, aux), grads = _accumulate(loss_fn, state.params, batch, step_rng, grad_accum)
    weight = jnp.maximum(aux["weight"], 1e-9)
    grads = jax.tree.map(lambda g: g / weight, grads)
    loss = total / weight
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        rng=rng,
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
    )
    metrics = {f"{k}": v / weight for k, v in aux.items() if k != "weight"}
    metrics.update(loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                   weight=aux["weight"], finite=finite,
                   nonfinite_steps=new_state.nonfinite_steps)
    return new_state, metrics


def boxed_state(params_fn, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh TrainState around `params_fn()`; params keep their logical-axis boxes."""
    params = params_fn()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)),
                      nonfinite_steps=jnp.zeros((), jnp.int32))


def state_shardings(mesh, init_params_fn, optimizer: optax.GradientTransformation,
                    seed: int = 0):
    """The NamedSharding pytree of the TrainState on `mesh` (shapes only, nothing built)."""
    abstract = jax.eval_shape(lambda: boxed_state(init_params_fn, optimizer, seed))
    return parallel.logical_to_sharding(nn.get_partition_spec(abstract), mesh)


def abstract_state(init_params_fn, optimizer: optax.GradientTransformation, seed: int,
                   shardings) -> TrainState:
    """ShapeDtypeStructs of the TrainState carrying `shardings` (restore and AOT targets)."""
    abstract = nn.meta.unbox(jax.eval_shape(lambda: boxed_state(init_params_fn, optimizer,
                                                                seed)))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


@dataclasses.dataclass(frozen=True)
class BuiltStep:
    """The jitted step of one run on one mesh and the state layout it runs on.

    Attributes:
      step: jitted `(state, batch) -> (state, metrics)`, state donated; call (or
        `.lower`) it under `with jax.set_mesh(mesh), parallel.axis_rules()`.
      state_shardings: NamedSharding pytree of the TrainState.
      abstract_state: ShapeDtypeStructs of the TrainState with those shardings.
      optimizer: the optax transformation the step applies.
      schedule: its learning-rate schedule.
    """

    step: Callable
    state_shardings: Any
    abstract_state: Any
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule


def build_step(mesh, init_params_fn, loss_fn: LossFn, optim: OptimConfig, *, seed: int = 0,
               grad_accum: int = 1) -> BuiltStep:
    """The train step jitted for `mesh`, touching no device, file or checkpoint.

    `Trainer` runs what this returns; `qmath_jax.compile_only` lowers it for a TPU
    topology. The batch keeps the sharding it arrives with (`parallel.shard_batch`).
    """
    optimizer, schedule = make_optimizer(optim), make_schedule(optim)
    shardings = state_shardings(mesh, init_params_fn, optimizer, seed)
    step = functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer,
                             schedule=schedule, grad_accum=grad_accum)
    jitted = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None),
                     donate_argnums=0)
    return BuiltStep(step=jitted, state_shardings=shardings,
                     abstract_state=abstract_state(init_params_fn, optimizer, seed, shardings),
                     optimizer=optimizer, schedule=schedule)


class Preempted(Exception):
    """Raised after the checkpoint of a SIGTERM'd (preempted) run is written."""


class NonFiniteHalt(RuntimeError):
    """Raised under the "halt" policy when a step's loss or gradient is not finite."""


class Trainer:
    """Builds the state on a mesh, runs steps, logs, checkpoints and resumes.

    Args:
      workdir: where checkpoints/, metrics.jsonl, TensorBoard events and plots go.
      mesh: the device mesh (`parallel.make_mesh`).
      init_params_fn: () -> params (may hold logical-axis boxes); called under jit.
      loss_fn: see the module docstring.
      optim: OptimConfig.
      seed: the RNG seed of the state.
      grad_accum: micro-batches per step.
      checkpoint_every_steps / checkpoint_every_minutes / keep_checkpoints: Orbax policy.
      nonfinite: "skip" or "halt".
      run_config: a JSON-able dict saved with every checkpoint.
      model_config: saved as model_config.json so `hf export` can read the workdir.
    """

    def __init__(self, workdir: str, mesh, init_params_fn, loss_fn: LossFn, optim: OptimConfig,
                 *, seed: int = 0, grad_accum: int = 1, checkpoint_every_steps: int = 0,
                 checkpoint_every_minutes: float = 0.0, keep_checkpoints: int = 3,
                 nonfinite: str = "skip", run_config: dict | None = None, model_config=None,
                 flops_per_token: float = 0.0, peak_flops: float = 0.0, stage: str = "train"):
        if nonfinite not in ("skip", "halt"):
            raise ValueError(f"train.nonfinite={nonfinite!r}: use 'skip' or 'halt'")
        self.workdir = fileio.abspath(workdir)  # local, or a bucket every host reaches
        fileio.makedirs(self.workdir)
        self.mesh, self.nonfinite, self.stage = mesh, nonfinite, stage
        self.seed, self.run_config = seed, run_config or {}
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._init_params_fn = init_params_fn
        built = build_step(mesh, init_params_fn, loss_fn, optim, seed=seed,
                           grad_accum=grad_accum)
        self.optimizer, self.schedule = built.optimizer, built.schedule
        self.state_shardings, self._step = built.state_shardings, built.step
        if model_config is not None and jax.process_index() == 0:  # one shared copy
            params_ckpt.write_model_config(self.workdir, model_config)
        self.manager = ocp.CheckpointManager(
            os.path.join(self.workdir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_checkpoints,
                save_interval_steps=checkpoint_every_steps or 1,
                enable_async_checkpointing=True,
            ),
        )
        self.checkpoint_every_steps = checkpoint_every_steps
        self.checkpoint_every_s = checkpoint_every_minutes * 60
        self._last_save_time = time.time()
        self._last_saved_step = None
        self._sigterm = False
        self.logger = metrics_lib.MetricsLogger(self.workdir, stage)

    # -- state -------------------------------------------------------------------------

    def _boxed_state(self, params_fn):
        return boxed_state(params_fn, self.optimizer, self.seed)

    def init_state(self, params=None) -> TrainState:
        """A fresh state; `params` (already loaded, e.g. from HF) replaces the random init."""
        if params is None:
            state, _ = parallel.sharded_init(lambda: self._boxed_state(self._init_params_fn),
                                             self.mesh)
            return state
        params = jax.device_put(params, self.state_shardings.params)
        init_rest = jax.jit(lambda p: nn.meta.unbox(self._boxed_state(lambda: p)),
                            out_shardings=self.state_shardings)
        with jax.set_mesh(self.mesh):
            return init_rest(params)

    def abstract_state(self):
        return abstract_state(self._init_params_fn, self.optimizer, self.seed,
                              self.state_shardings)

    # -- checkpoints -------------------------------------------------------------------

    def restore_latest(self):
        """(state, data_state) of the newest checkpoint, or (None, None)."""
        step = self.manager.latest_step()
        if step is None:
            return None, None
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(self.abstract_state()),
            data=ocp.args.JsonRestore(),
        ))
        return restored.state, restored.data

    def save(self, state: TrainState, data_state, force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        if step in (self._last_saved_step, self.manager.latest_step()):
            return False  # already written (a periodic save of this very step)
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(self.run_config),
        ), force=force)
        if saved:
            self._last_save_time, self._last_saved_step = time.time(), step
            self.logger.flush()  # a bucket workdir gets its held-back metrics rows too
        return saved

    def _due(self, step: int) -> bool:
        by_steps = self.checkpoint_every_steps and step % self.checkpoint_every_steps == 0
        by_time = self.checkpoint_every_s and time.time() - self._last_save_time >= \
            self.checkpoint_every_s
        return bool(by_steps or by_time)

    # -- the loop ----------------------------------------------------------------------

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One jitted update; `batch` holds this host's rows (numpy)."""
        with jax.set_mesh(self.mesh), parallel.axis_rules():
            return self._step(state, parallel.shard_batch(batch, self.mesh))

    def fit(self, state: TrainState, batches, num_steps: int, tokens_key: str = "loss_mask"):
        """Runs until `state.step == num_steps`, checkpointing and logging as configured.

        Returns the final state. Raises Preempted after saving on SIGTERM.
        """
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._fit(state, batches, num_steps, tokens_key)
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.manager.wait_until_finished()
            self.logger.flush()

    def _on_sigterm(self, signum, frame):
        self._sigterm = True

    def _fit(self, state, batches, num_steps, tokens_key):
        start = int(jax.device_get(state.step))
        pending = None
        progress = metrics_lib.progress(start, num_steps, self.stage)
        for step in range(start, num_steps):
            t0 = time.perf_counter()
            batch = next(batches)
            state, metrics = self.step(state, batch)
            if pending is not None:  # the previous step's metrics: the device is busy now
                self._report(*pending, progress)
            tokens = float(np.sum(np.asarray(batch[tokens_key]))) if tokens_key in batch else 0
            pending = (step + 1, metrics, tokens, t0)
            if self._due(step + 1):
                self.save(state, batches.get_state())
            if self._sigterm or self.manager.reached_preemption(step + 1):
                self._report(*pending, progress)
                self.save(state, batches.get_state(), force=True)
                self.manager.wait_until_finished()
                raise Preempted(f"preempted at step {step + 1}; checkpoint saved")
        if pending is not None:
            self._report(*pending, progress)
        self.save(state, batches.get_state(), force=True)
        progress.close()
        self.logger.plot()
        return state

    def _report(self, step, metrics, tokens, t0, progress):
        metrics = jax.device_get(metrics)
        if not bool(metrics.pop("finite")) and self.nonfinite == "halt":
            raise NonFiniteHalt(f"step {step}: loss {metrics['loss']} / grad norm "
                                f"{metrics['grad_norm']} not finite; the last good checkpoint "
                                f"is in {self.manager.directory} (policy train.nonfinite=halt)")
        seconds = time.perf_counter() - t0
        record = {k: float(v) for k, v in metrics.items()}
        record["step_s"] = seconds
        if tokens:
            record["tokens_per_s"] = tokens / seconds
            if self.flops_per_token and self.peak_flops:
                record["mfu"] = self.flops_per_token * tokens / seconds / self.peak_flops
        self.logger.write(step, record)
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}")


def restore_params(workdir: str, model_cfg, shardings=None):
    """The params of the newest train state in a run's workdir (see
    `checkpoint.restore_subtree`: any writer topology; the optimizer state is not read)."""
    from qmath_jax.train.checkpoint import restore_subtree

    directory = os.path.join(fileio.abspath(workdir), "checkpoints")
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory} holds no checkpoint")
    return restore_subtree(os.path.join(directory, str(step), "state"), "params", shardings)
