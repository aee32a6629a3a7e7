"""The end-to-end demo on the embedded synthetic corpus (CPU, no downloads).

  python -m qmath_jax.launch --config demo --workdir runs/demo

Runs pretrain -> SFT (CoT + TIR) -> RM data + RM -> GRPO -> a synth round + SFT ->
evaluation of each stage (greedy, maj@8, RM@8; CoT and TIR) -> HF export, reloaded in
transformers with the same greedy tokens. On an idle 2-core Zen 4 CPU: 15.8 minutes
(pretrain 81 s, SFT 253, RM data 56, RM 151, GRPO 187, synth 31, RFT 45, eval 136, export 6);
on 2 Zen 5 cores 11.8 minutes (49, 155, 64, 95, 148, 38, 27, 118, 5), with the same table.
What it showed (seed 0, 48 held-out problems per row; TIR greedy / maj@8 / RM@8, %):
  2-digit sums      SFT 4 / 100 / 100   GRPO 100 / 100 / 100   synth round 100 / 100 / 100
  3-digit products  SFT 0 /  98 /  98   GRPO 100 / 100 / 100   synth round 100 / 100 / 100
CoT stays at 0-6% (a 4-layer model does not learn carries in these few steps), so TIR
beats CoT on large numbers by 98-100 points in every column but SFT greedy.
Why SFT greedy is low and maj@8 high: 30% of the TIR training solutions answer by hand,
which the model cannot reproduce, and each of the three code openings is rarer than the
by-hand one. Greedy decoding takes the by-hand path and is wrong; of 8 samples about
two thirds call Python, agree on the right answer and win the vote. The RM, trained on
the SFT model's own answers (6 per problem at T 1.0, 384 problems), ranks a correct answer
above a wrong one in 95% of the held-out pairs (90 groups), so RM@8 >= maj@8. GRPO trains
on the 250 of 256 queries with 1 to 7 of 8 answers right (most have 4 to 6) and moves the
model onto the tool: greedy 4 -> 100 and 0 -> 100. The synth round keeps every verified
path (574 of 576); its SFT round, 36% new paths (one pass over them) and 64% the original
mix, stays at 100%.
At seed 1 (--config.seed=1; 16.2 minutes) the same holds: SFT TIR 96 / 100 / 100 on sums
(there greedy opens with code) and 0 / 98 / 100 on products, then 100 / 100 / 100 in every
TIR row after GRPO and after the synth round; RM pair accuracy 99% (82 groups).
Results: runs/demo/demo_summary.json and demo_summary.png; per-stage curves in
runs/demo/<stage>/plots/.
"""

import ml_collections

from qmath_jax.run_config import base


def get_config():
    c = base("demo")
    c.model.preset = "demo"
    c.mesh.num_devices = 1
    c.tokenizer.train_vocab_size = 512
    c.data.synthetic_kinds = "add,big_mul"
    c.data.synthetic_digits = "add=2,big_mul=3"
    # 30% of the TIR solutions are written by hand, which the model cannot reproduce:
    # its sampled answers branch into a mostly wrong path and mostly right code paths
    # (see qmath_jax/data/synthetic.py). TIR gets the larger share of SFT for that.
    c.data.synthetic_tir_by_hand = 0.3
    c.data.tir_fraction = 0.65
    stage_train = {"batch_size": 16, "seq_len": 256, "warmup_steps": 20,
                   "checkpoint_every_steps": 100}
    c.demo = ml_collections.ConfigDict({
        "pretrain": {**stage_train, "steps": 200, "lr": 3e-3, "end_lr": 3e-4},
        "sft": {**stage_train, "steps": 700, "lr": 2e-3, "end_lr": 2e-4},
        "rm": {**stage_train, "steps": 150, "batch_size": 8, "seq_len": 224, "lr": 3e-4,
               "end_lr": 3e-5},
        "rft": {**stage_train, "steps": 100, "lr": 2e-4, "end_lr": 2e-5, "warmup_steps": 5},
        "grpo_train": {"steps": 30, "lr": 5e-5, "end_lr": 5e-5, "warmup_steps": 0,
                       "decay": "constant", "checkpoint_every_steps": 10},
        # queries: those of 256 training problems with 1 to 7 of 8 sampled answers right
        # (all-right or all-wrong groups have no GRPO advantage). The report keeps 2 to 5
        # (grpo_7b and grpo_72b do); a small model's accuracy moves from seed to seed
        # (most queries had 4 to 6 right at seed 0, 5 to 7 at seed 1), so the demo keeps
        # every query that carries a signal
        "grpo": {"mode": "tir", "group_size": 8, "prompts_per_step": 8, "mini_batch": 32,
                 "passes": 1, "max_prompt_len": 128, "max_new_tokens": 192, "kl_coef": 1e-3,
                 "filter_n": 8, "filter_keep": "1,7", "filter_problems": 256},
        # the RFT round keeps every verified path (the report's rejection fine-tuning)
        "synth": {"n": 6, "max_new_tokens": 192, "batch_size": 32, "temperature": 0.7,
                  "top_p": 0.8, "reference_positive": True, "keep": "all"},
        "rm_problems": 384,
        "rm_mode": "tir",  # sampling mode of the RM data
        "rm_held_out_problems": 96,  # test-split problems whose sampled groups score the RM
        "rm_temperature": 1.0,  # of the RM data: more groups with both right and wrong answers
        "synth_problems": 96,
        "synth_modes": "tir",  # the report's online rejection fine-tuning round is TIR
        "rft_new_paths_share": 0.5,  # of the RFT round's SFT mix, at most one pass over them
        "eval_problems": 96,
        "eval_k": 8,
        "eval_temperature": 0.7,
        "eval_top_p": 0.8,
        "eval_max_new_tokens": 192,
    })
    return c
