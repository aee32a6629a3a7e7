"""The reward model's listwise loss and the GRPO objective, as pure functions.

Legend: B batch (groups or sequences), G responses per group, T length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean")


def listwise_rm_loss(scores_BG: jax.Array, labels_BG: jax.Array):
    """Qwen2.5-Math RM loss, summed over groups.

    Per group with k correct of G: -1/(k(G-k)) * sum over (pos, neg) pairs of
    log sigmoid(r_pos - r_neg). Groups with no pair (all correct or all wrong) add nothing.

    Returns:
      (sum over groups, aux) with aux["weight"] = number of groups with pairs,
      aux["pair_accuracy"] (sum of per-group fraction of pairs ranked right) and
      aux["top_correct"] (sum of 1 when the top-scored answer is correct).
    """
    scores = scores_BG.astype(jnp.float32)
    pos_BG = labels_BG.astype(bool)
    pairs_BGG = pos_BG[:, :, None] & ~pos_BG[:, None, :]
    diff_BGG = scores[:, :, None] - scores[:, None, :]
    n_pairs_B = jnp.sum(pairs_BGG, axis=(1, 2)).astype(jnp.float32)
    valid_B = n_pairs_B > 0
    denom_B = jnp.maximum(n_pairs_B, 1.0)
    logsig = jnp.where(pairs_BGG, jax.nn.log_sigmoid(diff_BGG), 0.0)
    loss_B = -jnp.sum(logsig, axis=(1, 2)) / denom_B
    right_B = jnp.sum(pairs_BGG & (diff_BGG > 0), axis=(1, 2)) / denom_B
    top_B = jnp.take_along_axis(pos_BG, jnp.argmax(scores, axis=1)[:, None], 1)[:, 0]
    valid = valid_B.astype(jnp.float32)
    return jnp.sum(loss_B * valid), {
        "weight": jnp.sum(valid),
        "pair_accuracy": jnp.sum(right_B * valid),
        "top_correct": jnp.sum(top_B.astype(jnp.float32) * valid),
    }


def shaped_reward(rm_score, verifier):
    """The report's reward: sigmoid(0.5 * r_m) + (r_v - 1), r_v in {0, 1}."""
    return jax.nn.sigmoid(0.5 * rm_score) + (verifier - 1.0)


def group_advantages(rewards_BG: jax.Array, eps: float = 1e-6) -> jax.Array:
    """(r - mean) / std within each group; a group whose rewards are all equal gets 0."""
    mean = jnp.mean(rewards_BG, axis=1, keepdims=True)
    std = jnp.std(rewards_BG, axis=1, keepdims=True)
    return jnp.where(std > eps, (rewards_BG - mean) / jnp.maximum(std, eps), 0.0)


def kl_penalty(logp, ref_logp, estimator: str = "k3"):
    """Per-token estimate of KL(policy || reference) from samples of the policy."""
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return jnp.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"kl estimator {estimator!r}: choose one of {KL_ESTIMATORS}")


def aggregate(x_BT, mask_BT, aggregation: str):
    """Sums x over masked tokens by the aggregation rule; returns (sum, weight).

    "seq_mean_token_mean": each sequence's token mean, summed over sequences, weight =
    sequences with tokens; "token_mean": the token sum, weight = token count.
    """
    mask = mask_BT.astype(jnp.float32)
    tokens_B = jnp.sum(mask, axis=1)
    if aggregation == "seq_mean_token_mean":
        total = jnp.sum(jnp.sum(x_BT * mask, axis=1) / jnp.maximum(tokens_B, 1.0))
        return total, jnp.sum((tokens_B > 0).astype(jnp.float32))
    if aggregation == "token_mean":
        return jnp.sum(x_BT * mask), jnp.sum(mask)
    raise ValueError(f"aggregation {aggregation!r}: choose one of {AGGREGATIONS}")


def grpo_loss(logp_BT, old_logp_BT, ref_logp_BT, advantages_B, mask_BT, *, clip_eps=0.2,
              kl_coef=1e-3, kl_estimator="k3", aggregation="seq_mean_token_mean"):
    """Clipped-ratio policy loss plus a KL penalty to the reference, summed.

    aggregation "seq_mean_token_mean" (the report's GRPO): the mean over each sequence's
    tokens, summed over sequences, weight = number of sequences; "token_mean" (DAPO): the
    sum over all tokens, weight = number of tokens.

    Returns:
      (sum, aux) with aux sums of kl, clip fraction and the ratio, and aux["weight"].
    """
    ratio = jnp.exp(logp_BT - old_logp_BT)
    adv = advantages_B[:, None]
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_BT = -jnp.minimum(ratio * adv, clipped * adv)
    kl_BT = kl_penalty(logp_BT, ref_logp_BT, kl_estimator)
    per_token = pg_BT + kl_coef * kl_BT
    was_clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)

    def agg(x):
        return aggregate(x, mask_BT, aggregation)[0]

    weight = aggregate(per_token, mask_BT, aggregation)[1]
    return agg(per_token), {"weight": weight, "kl": agg(kl_BT), "clip_fraction": agg(was_clipped),
                            "policy_loss": agg(pg_BT), "ratio": agg(ratio)}
