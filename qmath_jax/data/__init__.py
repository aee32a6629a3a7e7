"""Data: tokenizers, chat templates, sources, Grain pipelines, the synthetic math corpus and
decontamination. Import the submodules directly (e.g. ``from qmath_jax.data.tokenizer import
Tokenizer``); this package imports nothing heavy on its own."""
