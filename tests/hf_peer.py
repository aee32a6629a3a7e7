"""Builds tiny random HF transformers Qwen2 models: the independent peer of our tests."""

from __future__ import annotations

import torch
import transformers


def tiny_qwen2(tmp_dir: str, *, tied: bool = False, num_heads: int = 4, num_kv_heads: int = 2,
               vocab: int = 256, hidden: int = 64, layers: int = 2, mlp: int = 96,
               seed: int = 0, head_dim: int | None = None):
    """Saves a random Qwen2ForCausalLM to `tmp_dir` and returns the torch model (eval, f32)."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, attn_implementation="eager",
        **({"head_dim": head_dim} if head_dim else {}),
    )
    model = transformers.Qwen2ForCausalLM(config).eval().float()
    with torch.no_grad():  # HF inits biases to zero; random ones test the bias path
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
            layer.input_layernorm.weight.normal_(1.0, 0.2)
    model.save_pretrained(tmp_dir, safe_serialization=True)
    return model


def torch_logits(model, tokens, attention_mask=None):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=None if attention_mask is None
                    else torch.tensor(attention_mask))
    return out.logits.float().numpy()
