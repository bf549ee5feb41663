"""`TrainConfig`: the options of a training run, one field per `longspec train` flag.

This module imports only the standard library, and nothing relative: the `longspec` command line runs it from its
file to build the `train` options, so `longspec train --help` answers without importing torch (or this package).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class TrainConfig:
    """Everything a training run needs; `longspec train` maps its flags one to one onto these fields."""

    target: str
    data: list[str] = field(metadata={"help": (
        "text sources: files or folders (.txt .md .rst .py .jsonl), datasets ids (id[:config][@split]), "
        "python-stdlib:train, python-docs:train, pypi:NAME==VERSION[,...] (wheels of distributions that are not "
        "installed; pypi-prose: their READMEs and .md/.rst docs only), generated:SOURCE[?options] (the target's own "
        "continuations)")})
    output_dir: str
    gguf_file: str | None = None
    tokenizer: str | None = None
    text_column: str = "text"
    seq_len: int = 512
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Distillation gave the higher tau in the CE-vs-KL comparison on SmolLM2-135M (see the shipped draft's card).
    loss: str = "distill"
    lag_min: int = 1
    lag_max: int = 4
    sink_size: int = 4
    window_size: int = 512
    max_anchor: int = 4
    long_threshold: int = 1200
    dtype: str = "fp32"
    seed: int = 0
    save_every: int = 0
    overwrite: bool = False
    resume: bool = False
    init_draft: str | None = None
    tree_shape: list[int] = field(default_factory=lambda: [4, 16, 16, 16, 16])
    # Train from a feature store in this folder (the target's last-layer KV and top-k next-token log-probs, captured
    # from --data once, then read every epoch) instead of a target forward per step. Captured if missing.
    features: str | None = None
    extra_features: list[str] = field(default_factory=list, metadata={"help": (
        "feature stores of earlier runs (same target, top-k, capture dtype and data version; rows as long as "
        "--seq-len or shorter, right-padded) to train on alongside --features: one shuffled set of rows")})
    # At most this many sequences of plain text, a seeded sample of what --data gives (generated: rows are all kept),
    # e.g. what a feature store should hold.
    max_sequences: int | None = None
    top_k: int = 32
    capture_dtype: str = "bf16"
    # Score only the target's N most frequent next tokens (LM-head rows) in the draft; None: the whole vocabulary.
    draft_vocab_size: int | None = None
    # Weight of a generated row's prompt tokens in the loss (its continuation weighs 1).
    prompt_weight: float = 0.0

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"Unknown training options {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**values)
