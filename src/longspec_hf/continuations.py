"""The target's plain greedy continuation of a prompt, kept on disk: the reference every teacher-forced chain tau is
scored on (`longspec promote`, `longspec eval --teacher-forced`).

At 8k tokens on a small CPU one continuation costs minutes (a long prefill, then ~100 plain steps over a growing
`DynamicCache`), while scoring a draft on it costs seconds; a schedule of training runs measures the same held-out
prompts at every promotion, so the continuations are generated once and read back after that. A file is keyed by
everything that decides the tokens: the target (name and a weights fingerprint), its dtype, device and generation
config, the prompt's tokens, the number of new tokens and the torch / transformers versions; it is checked against
the prompt when read, and an unreadable file is generated again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .cost_model import cache_folder

FORMAT = 1


def continuation_key(target, input_ids: torch.LongTensor, max_new_tokens: int) -> str:
    """The identity of `input_ids [1, T]`'s greedy continuation by `target`."""
    from .training.generated import weights_fingerprint

    settings = dict(target=getattr(target.config, "_name_or_path", ""), weights=weights_fingerprint(target),
                    dtype=str(target.dtype), device=target.device.type,
                    generation=target.generation_config.to_json_string(use_diff=True, ignore_metadata=True),
                    prompt=hashlib.sha1(input_ids.cpu().numpy().tobytes()).hexdigest(), length=input_ids.shape[1],
                    new_tokens=max_new_tokens, torch=torch.__version__, transformers=transformers.__version__,
                    format=FORMAT)
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def continuation_path(key: str) -> Path:
    return cache_folder() / "continuations" / f"{key}.safetensors"


def read_continuation(path: Path, input_ids: torch.LongTensor) -> torch.LongTensor | None:
    """The stored sequence `[1, T + n]`, or None where there is none or it is unreadable or of another prompt."""
    try:
        sequence = load_file(str(path))["sequence"]
    except (OSError, SafetensorError, KeyError):  # absent, cut or foreign: generate again
        return None
    prompt = input_ids.cpu()
    if sequence.dim() != 2 or sequence.shape[1] < prompt.shape[1] or not torch.equal(
            sequence[:, : prompt.shape[1]], prompt):
        return None
    return sequence.to(input_ids.device)


@torch.no_grad()
def greedy_continuation(target, input_ids: torch.LongTensor, max_new_tokens: int) -> torch.LongTensor:
    """`[1, T + n]`: `input_ids [1, T]` and the target's plain greedy continuation of it (what any lossless greedy
    decode returns), read from the cache folder when generated before with the same settings."""
    path = continuation_path(continuation_key(target, input_ids, max_new_tokens))
    sequence = read_continuation(path, input_ids)
    if sequence is not None:
        return sequence
    sequence = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                               max_new_tokens=max_new_tokens)  # [1, T + n]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"sequence": sequence.cpu().contiguous()}, str(tmp))
    tmp.replace(path)  # whole or absent: a cut file must not pass for a continuation
    return sequence
