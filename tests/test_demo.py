"""A shortened demo, end to end: every stage runs, the table and the HF check come out."""

import json
import os
import subprocess
import sys

SHORT = [
    "--config.model.preset=tiny", "--config.data.synthetic_kinds=add",
    "--config.data.synthetic_digits=add=2",
    "--config.demo.pretrain.steps=2", "--config.demo.sft.steps=2", "--config.demo.rm.steps=2",
    "--config.demo.rft.steps=2", "--config.demo.grpo_train.steps=1",
    "--config.demo.grpo_train.checkpoint_every_steps=1", "--config.demo.rm_problems=4",
    "--config.demo.rm_held_out_problems=4", "--config.demo.synth_problems=4", "--config.demo.eval_problems=2", "--config.demo.eval_k=2",
    "--config.demo.eval_max_new_tokens=24", "--config.demo.synth.max_new_tokens=24",
    "--config.demo.grpo.max_new_tokens=24", "--config.demo.grpo.prompts_per_step=2",
    "--config.demo.grpo.group_size=4", "--config.demo.grpo.filter_n=4",
    "--config.demo.grpo.filter_keep=0,4", "--config.demo.grpo.filter_problems=4", "--config.demo.grpo.mini_batch=8",
    "--config.demo.pretrain.seq_len=192", "--config.demo.sft.seq_len=192",
    "--config.demo.rft.seq_len=192", "--config.demo.pretrain.batch_size=4",
    "--config.demo.sft.batch_size=4", "--config.demo.rft.batch_size=4",
    "--config.demo.rm.batch_size=2",
]


def test_short_demo_runs_every_stage_and_its_hf_export_matches(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "qmath_jax.launch", "--config", "demo", "--workdir",
           str(workdir), *SHORT]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((workdir / "demo_summary.json").read_text())
    assert set(summary["table"]) == {"sft", "grpo", "rft"}
    for stage in summary["table"].values():
        assert set(stage["add"]) == {"cot", "tir"}
        assert {"greedy", "maj@2", "rm@2"} <= set(stage["add"]["cot"])
    assert summary["export_check"]["same_greedy_tokens"] is True
    assert isinstance(summary["rm_held_out"], dict)  # empty when no held-out group is mixed
    assert (workdir / "demo_summary.png").exists()
    for stage in ("pretrain", "sft", "rm", "grpo", "rft"):
        assert (workdir / stage / "DONE").exists(), stage
    assert "== rft" in done.stdout
    # The HF export loads in transformers (checked inside the run) and ships the tokenizer.
    assert (workdir / "export" / "tokenizer.json").exists()
