"""RM and GRPO losses against hand computations."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qmath_jax.train import rl_losses as L


def _hand_rm(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    pairs = list(itertools.product(pos, neg))
    return -sum(math.log(1 / (1 + math.exp(-(p - n)))) for p, n in pairs) / len(pairs)


@pytest.mark.parametrize("labels", [[1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 1, 0, 1, 0]])
def test_listwise_loss_equals_hand_computation(labels):
    scores = [0.3, -1.2, 2.0, 0.7, -0.1, 1.1]
    total, aux = L.listwise_rm_loss(jnp.array([scores]), jnp.array([labels]))
    assert float(aux["weight"]) == 1.0
    np.testing.assert_allclose(float(total), _hand_rm(scores, labels), rtol=1e-6)


def test_listwise_loss_skips_groups_without_pairs_and_sums_groups():
    scores = jnp.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    labels = jnp.array([[1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    total, aux = L.listwise_rm_loss(scores, labels)
    assert float(aux["weight"]) == 1.0
    np.testing.assert_allclose(float(total), _hand_rm([1.0] + [0.0] * 5, [1] + [0] * 5), rtol=1e-6)
    assert float(aux["pair_accuracy"]) == 1.0 and float(aux["top_correct"]) == 1.0


def test_listwise_gradient_pushes_positives_up_and_negatives_down():
    labels = jnp.array([[1, 0, 1, 0, 0, 0]])
    grad = jax.grad(lambda s: L.listwise_rm_loss(s, labels)[0])(jnp.zeros((1, 6)))
    assert np.all(grad[0, np.array([0, 2])] < 0) and np.all(grad[0, np.array([1, 3, 4, 5])] > 0)


def test_shaped_reward_and_group_advantages():
    r = L.shaped_reward(jnp.array([2.0, -2.0]), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(r, [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1)) - 1], rtol=1e-6)
    adv = L.group_advantages(jnp.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], rtol=1e-5)
    np.testing.assert_array_equal(adv[1], 0.0)


def _hand_grpo(logp, old, ref, adv, mask, eps, beta, est, agg):
    seq_losses, tok_sum, n_tok = [], 0.0, 0
    for b in range(len(adv)):
        terms = []
        for t in range(len(mask[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            pg = -min(ratio * adv[b], min(max(ratio, 1 - eps), 1 + eps) * adv[b])
            lr = ref[b][t] - logp[b][t]
            kl = {"k1": -lr, "k2": 0.5 * lr * lr, "k3": math.exp(lr) - lr - 1}[est]
            terms.append(pg + beta * kl)
        seq_losses.append(sum(terms) / len(terms))
        tok_sum += sum(terms)
        n_tok += len(terms)
    if agg == "seq_mean_token_mean":
        return sum(seq_losses) / len(seq_losses)
    return tok_sum / n_tok


@pytest.mark.parametrize("est", L.KL_ESTIMATORS)
@pytest.mark.parametrize("agg", L.AGGREGATIONS)
def test_grpo_loss_and_gradient_equal_a_hand_written_reference(est, agg):
    rng = np.random.default_rng(0)
    logp = rng.normal(-1.0, 0.3, (3, 5))
    old = logp + rng.normal(0, 0.3, (3, 5))
    ref = logp + rng.normal(0, 0.2, (3, 5))
    adv = np.array([1.2, -0.7, 0.3])
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])

    def ours(lp):
        total, aux = L.grpo_loss(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                                 jnp.asarray(mask), clip_eps=0.2, kl_coef=0.05,
                                 kl_estimator=est, aggregation=agg)
        return total / aux["weight"]

    def hand(lp):
        return _hand_grpo(lp, old, ref, adv, mask, 0.2, 0.05, est, agg)

    np.testing.assert_allclose(float(ours(jnp.asarray(logp))), hand(logp), rtol=1e-6)
    grad = np.asarray(jax.grad(ours)(jnp.asarray(logp)))
    h = 1e-6
    for b, t in [(0, 0), (1, 4), (2, 2), (0, 4)]:
        up, down = logp.copy(), logp.copy()
        up[b, t] += h
        down[b, t] -= h
        np.testing.assert_allclose(grad[b, t], (hand(up) - hand(down)) / (2 * h), atol=1e-5)


def test_equal_rewards_give_no_policy_gradient():
    adv = L.group_advantages(jnp.full((1, 4), 0.7))[0]
    logp = jnp.full((4, 3), -1.0)

    def loss(lp):  # reference == policy, so the KL term has zero gradient too
        return L.grpo_loss(lp, lp, lp, adv, jnp.ones((4, 3)))[0]

    np.testing.assert_array_equal(jax.grad(loss)(logp), 0.0)
