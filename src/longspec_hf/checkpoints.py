"""Draft checkpoints on disk: integrity checks, and the official LongSpec layout.

Two layouts are read, both safetensors only:

* this project's (``save_pretrained``): ``config.json`` with ``model_type: longspec_draft``, whose
  ``weights_sha256`` records a digest of every weights file, so a truncated or corrupted download is refused instead
  of silently giving a wrong draft;
* the official LongSpec checkpoints (``sail/longspec-*``): a *target-style* ``config.json`` (``model_type`` llama or
  qwen2, the target's geometry) and one ``model.safetensors`` whose keys are the draft layer's module names
  (``self_attn.q_proj.weight``, ..., ``post_cross_attention_layernorm.weight``), possibly under a common prefix.
  They convert losslessly: the tensors are the same, only the config is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoConfig
from transformers.utils import cached_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DRAFT_MODEL_TYPE = "longspec_draft"
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder", "force_download", "proxies")

# Targets of the official checkpoints, as named in the LongSpec paper (recorded in the converted config and card).
OFFICIAL_TARGETS = {
    "longspec-vicuna-7b-v1.5-16k": "lmsys/vicuna-7b-v1.5-16k",
    "longspec-vicuna-13b-v1.5-16k": "lmsys/vicuna-13b-v1.5-16k",
    "longspec-longchat-7b-v1.5-32k": "lmsys/longchat-7b-v1.5-32k",
    "longspec-longchat-13b-16k": "lmsys/longchat-13b-16k",
    "longspec-Llama-3-8B-Instruct-262k": "gradientai/Llama-3-8B-Instruct-262k",
    "longspec-QwQ-32B-Preview": "Qwen/QwQ-32B-Preview",
}
# The official draft attends to a 512-token sliding window without sinks.
OFFICIAL_SINK_SIZE, OFFICIAL_WINDOW_SIZE = 0, 512


class CorruptCheckpointError(OSError):
    """A draft weights file that is truncated, malformed, or does not match its recorded digest."""


def hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}


def resolve(path_or_repo: str | os.PathLike, filename: str, required: bool = True, **hub) -> str | None:
    """Local path of `filename` in a folder or Hub repo (downloaded or from the cache, offline mode honoured)."""
    return cached_file(
        str(path_or_repo), filename, _raise_exceptions_for_missing_entries=required,
        _raise_exceptions_for_connection_errors=required, **hub,
    )


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digests(folder: str | os.PathLike) -> dict[str, str]:
    """`{file name: sha256}` of every safetensors file in `folder` (written into the config by save_pretrained)."""
    return {p.name: file_sha256(p) for p in sorted(Path(folder).glob("*.safetensors"))}


def check_safetensors(path: str, source: str) -> None:
    """Refuse a file whose header is malformed or whose data is cut short (e.g. an interrupted download)."""
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise CorruptCheckpointError(
            f"The draft weights {Path(path).name} of {source} are truncated or corrupted ({err}). Delete the file "
            "(or the Hugging Face cache entry) and download it again, e.g. from_pretrained(..., force_download=True)."
        ) from err


def verify_weights(path_or_repo, config: dict, **hub) -> None:
    """Check every weights file of a draft in this project's layout before transformers loads it."""
    source = str(path_or_repo)
    digests = config.get("weights_sha256") or {}
    if digests:
        for name, expected in digests.items():
            path = resolve(path_or_repo, name, **hub)
            actual = file_sha256(path)
            if actual != expected:
                raise CorruptCheckpointError(
                    f"The draft weights {name} of {source} do not match the digest recorded in its config.json "
                    f"(sha256 {actual[:12]}... instead of {expected[:12]}...): the file is corrupted or was replaced. "
                    "Download it again, e.g. from_pretrained(..., force_download=True), or re-save the draft."
                )
        return
    # Older saves carry no digest: at least refuse malformed or truncated files.
    single = resolve(path_or_repo, WEIGHTS_NAME, required=False, **hub)
    if single is not None:
        check_safetensors(single, source)
        return
    index = resolve(path_or_repo, WEIGHTS_INDEX_NAME, required=False, **hub)
    if index is not None:
        for name in sorted(set(read_json(index)["weight_map"].values())):
            check_safetensors(resolve(path_or_repo, name, **hub), source)
        return
    raise OSError(
        f"{source} has no {WEIGHTS_NAME}; longspec-hf reads drafts from safetensors only (never pickle). Re-save the "
        "draft with save_pretrained, or convert an official checkpoint with `longspec convert`."
    )


def is_official_config(config: dict) -> bool:
    return config.get("model_type") != DRAFT_MODEL_TYPE


def official_state_dict(weights: dict[str, torch.Tensor], expected: set[str], source: str) -> dict[str, torch.Tensor]:
    """Rename official keys to this project's (drop a common prefix) and check nothing is missing or extra."""
    anchor = next((k for k in weights if k.endswith("self_attn.q_proj.weight")), None)
    prefix = anchor[: -len("self_attn.q_proj.weight")] if anchor is not None else ""
    renamed = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    extra = sorted([k for k in weights if not k.startswith(prefix)] + [k for k in renamed if k not in expected])
    missing = sorted(expected - set(renamed))
    if missing or extra:
        raise ValueError(
            f"{source} is not a LongSpec draft checkpoint: missing {missing[:6]}, unexpected {extra[:6]}. Official "
            "checkpoints hold exactly one draft layer (self_attn, cross_attn, mlp and three norms)."
        )
    return renamed


def convert_official_checkpoint(path_or_repo: str | os.PathLike, save_directory: str | os.PathLike, **hub) -> Path:
    """Write an official LongSpec checkpoint (target-style config) in this project's `save_pretrained` layout.

    Returns `save_directory`. The weights are copied unchanged, so the converted draft computes exactly the same
    function; the config is rebuilt from the target-style config (geometry, RoPE) with the official 512-token window.
    """
    from .configuration import LongSpecDraftConfig
    from .modeling import LongSpecDraftModel

    source = str(path_or_repo)
    config = read_json(resolve(path_or_repo, CONFIG_NAME, **hub))
    if not is_official_config(config):
        raise ValueError(
            f"{source} is already in longspec-hf's layout; load it with LongSpecDraftModel.from_pretrained."
        )
    weights_path = resolve(path_or_repo, WEIGHTS_NAME, required=False, **hub)
    if weights_path is None:
        raise OSError(
            f"{source} has no {WEIGHTS_NAME}; official LongSpec checkpoints are read from safetensors only (never "
            "pickle)."
        )
    check_safetensors(weights_path, source)
    target_config = AutoConfig.from_pretrained(str(path_or_repo), **hub)
    name = source.rstrip("/").split("/")[-1]
    draft_config = LongSpecDraftConfig.from_target_config(
        target_config,
        sink_size=OFFICIAL_SINK_SIZE,
        window_size=OFFICIAL_WINDOW_SIZE,
        attention_bias=True,
        target_name_or_path=OFFICIAL_TARGETS.get(name),
        target_revision=None,
    )
    with torch.device("meta"):
        draft = LongSpecDraftModel(draft_config)
    weights = official_state_dict(load_file(weights_path), set(draft.state_dict()), source)
    draft.load_state_dict(weights, strict=True, assign=True)
    dtype = next(iter(weights.values())).dtype
    draft.config.dtype = dtype
    draft.save_pretrained(save_directory)
    return Path(save_directory)
