"""The end-to-end demo on the embedded synthetic corpus (CPU, no downloads).

  python -m qmath_jax.launch --config demo --workdir runs/demo

Runs pretrain -> SFT (CoT + TIR) -> RM data + RM -> GRPO -> a synth round + SFT ->
evaluation of each stage (greedy, maj@8, RM@8; CoT and TIR) -> HF export, reloaded in
transformers with the same greedy tokens. On an idle 2-core CPU: 15.2 minutes measured
(pretrain 79 s, SFT 251, RM data 59, RM 153, GRPO 167, synth 25, RFT 40, eval 130, export 6).
What it showed (one run, 48 held-out problems per row; TIR greedy / maj@8 / RM@8, %):
  2-digit sums      SFT 100 / 98 / 100   GRPO 98 / 96 / 98   synth round 100 / 100 / 100
  3-digit products  SFT  81 / 73 /  81   GRPO 92 / 92 / 92   synth round  96 /  96 /  96
CoT stays at 0-2% (a 4-layer model does not learn carries in these few steps), so TIR
beats CoT on large numbers by 96 points, and TIR accuracy on products rises stage by stage
(GRPO trains on the 158 of 256 queries with 1 to 7 of 8 answers right).
The RM, trained on the SFT model's own answers (6 per problem at T 1.0, 384 problems),
ranks a correct answer above a wrong one in 77% of the held-out pairs (54 groups) and puts
a correct answer on top in 70% of them (a random pick: 58%), so RM@8 >= maj@8 in every
TIR row. maj@8 (T 0.7) stays at or below greedy: what goes wrong here is one digit
copied where the model hesitates between two; greedy takes the likelier one, and the
samples split their votes between both.
At seed 1 (--config.seed=1; 14.9 minutes) the SFT model already answers every held-out
TIR problem (100 / 100 / 100 in every TIR row of every stage), so the rise shows at seed 0
only. Its query filter found no query with 2 to 5 of 8 answers right and 31 with 6 or 7,
which is why the demo keeps 1 to 7.
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
    c.data.tir_fraction = 0.5
    stage_train = dict(batch_size=16, seq_len=256, warmup_steps=20, checkpoint_every_steps=100)
    c.demo = ml_collections.ConfigDict({
        "pretrain": dict(stage_train, steps=200, lr=3e-3, end_lr=3e-4),
        "sft": dict(stage_train, steps=700, lr=2e-3, end_lr=2e-4),
        "rm": dict(stage_train, steps=150, batch_size=8, seq_len=224, lr=3e-4, end_lr=3e-5),
        "rft": dict(stage_train, steps=100, lr=2e-4, end_lr=2e-5, warmup_steps=5),
        "grpo_train": dict(steps=30, lr=5e-5, end_lr=5e-5, warmup_steps=0, decay="constant",
                           checkpoint_every_steps=10),
        # queries: those of 256 training problems with 1 to 7 of 8 sampled answers right
        # (all-right or all-wrong groups have no GRPO advantage). The report keeps 2 to 5
        # (grpo_7b and grpo_72b do); here the SFT model answers most queries right 6 to 8
        # times in 8, and at seed 1 not one of 256 had 2 to 5
        "grpo": dict(mode="tir", group_size=8, prompts_per_step=8, mini_batch=32, passes=1,
                     max_prompt_len=128, max_new_tokens=192, kl_coef=1e-3,
                     filter_n=8, filter_keep="1,7", filter_problems=256),
        "synth": dict(n=6, max_new_tokens=192, batch_size=32, temperature=0.7, top_p=0.8,
                      reference_positive=True),
        "rm_problems": 384,
        "rm_mode": "tir",  # sampling mode of the RM data
        "rm_held_out_problems": 96,  # test-split problems whose sampled groups score the RM
        "rm_temperature": 1.0,  # of the RM data: more groups with both right and wrong answers
        "synth_problems": 96,
        "synth_modes": "tir",  # the report's online rejection fine-tuning round is TIR
        "rft_new_paths_share": 0.25,  # of the RFT round's SFT mix
        "eval_problems": 96,
        "eval_k": 8,
        "eval_temperature": 0.7,
        "eval_top_p": 0.8,
        "eval_max_new_tokens": 192,
    })
    return c
