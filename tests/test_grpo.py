"""The GRPO stage: packing of rollouts, and checkpoint/resume that repeats the same run."""

import json

import jax
import numpy as np
import pytest

from qmath_jax.model import get_preset, init_params
from qmath_jax.run_config import base
from qmath_jax.stages import common, grpo
from qmath_jax.train import checkpoint


def test_pack_sequences_masks_prompt_padding_and_executor_tokens():
    out = grpo.pack_sequences([[5, 6, 7]], [[8, 9, 10, 11]], [[1, 0, 0, 1]], seq_len=10,
                              pad_id=0)
    np.testing.assert_array_equal(out["tokens"][0], [5, 6, 7, 8, 9, 10, 11, 0, 0, 0])
    # position t predicts token t+1: the loss sits where 8 and 11 (model tokens) are targets
    np.testing.assert_array_equal(out["loss_mask"][0], [0, 0, 1, 0, 0, 1, 0, 0, 0, 0])
    assert out["targets"][0][2] == 8 and out["targets"][0][5] == 11
    np.testing.assert_array_equal(out["segment_ids"][0], [1] * 7 + [0] * 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    cfg = base("grpo")
    tok = common.tokenizer(cfg, str(root / "tok"))
    rm_cfg = get_preset("tiny", head="rm", vocab_size=tok.vocab_size)
    checkpoint.save_params(str(root / "rm"), rm_cfg, init_params(rm_cfg, jax.random.key(7)))
    return root, str(root / "tok" / "tokenizer.json"), str(root / "rm")


def _cfg(tok_path, rm_dir, steps):
    cfg = base("grpo")
    cfg.tokenizer.path = tok_path
    cfg.mesh.num_devices = 1
    cfg.grpo.rm_checkpoint = rm_dir  # a random RM: rewards differ, so updates happen
    cfg.grpo.update(group_size=4, prompts_per_step=2, mini_batch=4, max_new_tokens=16)
    cfg.train.update(steps=steps, lr=1e-3, decay="constant", warmup_steps=0,
                     checkpoint_every_steps=1)
    return cfg


def _rows(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "rollout_s" in r}


def test_resume_mid_grpo_repeats_the_same_rollouts_and_updates(setup):
    root, tok_path, rm_dir = setup
    straight, resumed = root / "straight", root / "resumed"
    grpo.run(_cfg(tok_path, rm_dir, 3), str(straight))
    grpo.run(_cfg(tok_path, rm_dir, 2), str(resumed))
    grpo.run(_cfg(tok_path, rm_dir, 3), str(resumed))  # picks up at iteration 2
    a, b = _rows(straight), _rows(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for it in (1, 2, 3):
        for key in ("reward", "rm_score", "response_length", "loss", "kl"):
            np.testing.assert_allclose(b[it][key], a[it][key], rtol=1e-5, atol=1e-6)
    assert a[3]["grad_norm"] > 0
    _, pa = checkpoint.load_params(str(straight))
    _, pb = checkpoint.load_params(str(resumed))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), pa, pb)


def test_query_filter_keeps_the_queries_in_range_and_a_restart_reuses_them(setup):
    root, tok_path, rm_dir = setup
    cfg = _cfg(tok_path, rm_dir, 1)
    # A random policy answers no synthetic problem right: every query has 0 of 4 correct.
    cfg.grpo.update(filter_n=4, filter_keep="0,0", filter_problems=6)
    workdir = root / "filtered"
    grpo.run(cfg, str(workdir))
    report = json.loads((workdir / grpo.FILTER_REPORT).read_text())
    assert report["screened"] == 6 and report["kept"] == 6
    assert report["correct_histogram"] == {"0": 6, "1": 0, "2": 0, "3": 0, "4": 0}
    kept = [json.loads(x) for x in (workdir / grpo.QUERIES_FILE).read_text().splitlines()]
    corpus = common.synthetic_corpus(cfg, "train")
    assert [q["question"] for q in kept] == [corpus[i]["question"] for i in range(6)]
    assert sorted(_rows(workdir)) == [1]
    # A restart reads the kept queries back instead of screening again.
    (workdir / grpo.QUERIES_FILE).write_text("".join(json.dumps(q) + "\n" for q in kept[:2]))
    cfg.train.steps = 2
    grpo.run(cfg, str(workdir))
    assert json.loads((workdir / grpo.FILTER_REPORT).read_text())["kept"] == 6
    assert sorted(_rows(workdir)) == [1, 2]


def test_query_filter_that_keeps_nothing_says_how_to_fix_it(setup, tmp_path):
    _, tok_path, rm_dir = setup
    cfg = _cfg(tok_path, rm_dir, 1)
    cfg.grpo.update(filter_n=4, filter_keep="2,4", filter_problems=3)
    with pytest.raises(ValueError, match=r"kept none of 3 queries.*filter_keep"):
        grpo.run(cfg, str(tmp_path / "none"))
    cfg.grpo.filter_keep = "5"
    with pytest.raises(ValueError, match="LOW,HIGH"):
        grpo.run(cfg, str(tmp_path / "bad"))
