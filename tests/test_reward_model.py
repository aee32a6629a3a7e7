"""The RM stage end to end on small synthetic groups, and trunk transfer from an LM."""

import json

import jax
import numpy as np
import pytest

from qmath_jax.data.synthetic import SyntheticMath
from qmath_jax.model import Transformer, get_preset, init_params
from qmath_jax.run_config import base
from qmath_jax.stages import reward_model


def _groups(path, n, split, seed=0):
    corpus = SyntheticMath(seed=seed, split=split, kinds=["add", "sub"])
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            p = corpus[i]
            labels = rng.permutation([1, 1, 0, 0, 0, 0]).tolist()
            wrong = p["cot"].replace(f"\\boxed{{{p['answer']}}}", "\\boxed{wrong}")
            responses = [p["cot"] if y else wrong for y in labels]
            f.write(json.dumps({"question": p["question"], "responses": responses,
                                "labels": labels}) + "\n")


def test_rm_stage_learns_to_rank_and_reports_held_out_metrics(tmp_path):
    train, held = tmp_path / "rm_train.jsonl", tmp_path / "rm_test.jsonl"
    _groups(train, 64, "train")
    _groups(held, 18, "test")  # not a multiple of the batch: the last 2 count too
    cfg = base("rm")
    cfg.data.sources = str(train)
    cfg.mesh.num_devices = 1  # one of the 8 simulated devices: no split for a tiny model
    cfg.rm.eval_source = str(held)
    cfg.train.update(steps=30, batch_size=4, seq_len=384, lr=2e-3, warmup_steps=3,
                     checkpoint_every_steps=0)
    reward_model.run(cfg, str(tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "rm_eval.json").read_text())
    assert report["groups"] == 18
    assert report["pair_accuracy"] > 0.9, report
    assert report["top_correct_chance"] == 2 / 6  # every group: 2 correct of 6


def test_rm_params_take_the_lm_trunk_and_a_new_head():
    lm_cfg = get_preset("tiny")
    lm = init_params(lm_cfg, jax.random.key(1))
    rm = reward_model.rm_params_from_lm(lm, lm_cfg.replace(head="rm"))
    assert set(rm) == {"embedding", "layers", "final_norm", "score"}
    np.testing.assert_array_equal(rm["embedding"], lm["embedding"])


def test_held_out_report_with_no_mixed_group_says_so():
    # All six answers right in every group: no pair to rank, so no figure (not 0.0).
    cfg = get_preset("tiny", head="rm")
    t = 8
    batch = {"tokens": np.ones((2, 6, t), np.int32), "segment_ids": np.ones((2, 6, t), np.int32),
             "positions": np.broadcast_to(np.arange(t), (2, 6, t)).astype(np.int32),
             "last_index": np.full((2, 6), t - 1, np.int32), "labels": np.ones((2, 6), np.int32)}
    report = reward_model.evaluate(Transformer(cfg), init_params(cfg, jax.random.key(0)),
                                   [batch])
    assert report == {"pair_accuracy": None, "top_correct": None, "loss": None,
                      "top_correct_chance": None, "groups": 0}


def test_rm_from_an_lm_of_another_size_names_the_mismatch(tmp_path):
    from qmath_jax.train import checkpoint

    train = tmp_path / "rm_train.jsonl"
    _groups(train, 8, "train")
    lm_cfg = get_preset("tiny", vocab_size=640)  # the tokenizer below has 512 ids
    checkpoint.save_params(str(tmp_path / "lm"), lm_cfg, init_params(lm_cfg, jax.random.key(0)))
    cfg = base("rm")
    cfg.data.sources = str(train)
    cfg.mesh.num_devices = 1
    cfg.init.checkpoint = str(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"'vocab_size': \(640, 512\)"):
        reward_model.run(cfg, str(tmp_path / "run"))
