"""Draft checkpoints on disk and on the Hub: integrity checks, the official LongSpec layout, and the draft class's
checkpoint methods (:class:`DraftCheckpointMixin`: `from_pretrained`, `save_pretrained`, `push_to_hub`,
`convert_official`), kept out of the network's file.

Two layouts are read:

* this project's (``save_pretrained``): ``config.json`` with ``model_type: longspec_draft``, whose
  ``weights_sha256`` records a digest of every weights file, so a truncated or corrupted download is refused instead
  of silently giving a wrong draft; safetensors only;
* the official LongSpec checkpoints (``sail/longspec-*``): a *target-style* ``config.json`` (``model_type`` llama or
  qwen2, the target's geometry) and one weights file whose keys are the draft layer's module names
  (``self_attn.q_proj.weight``, ..., ``post_cross_attention_layernorm.weight``), possibly under a common prefix.
  ``model.safetensors`` is preferred; the official trainer's PyTorch files (``pytorch_model.bin``, ``*.pth``) are
  read with ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only and never runs code
  from the file; a pickle that needs more is refused. They convert losslessly: the tensors are the same, only the
  config is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, GenerationConfig
from transformers.utils import cached_file

from .configuration import LongSpecDraftConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_WEIGHTS_NAME = "pytorch_model.bin"
PYTORCH_SUFFIX = ".pth"
# Keys under which training scripts commonly nest a state dict inside a saved dict.
STATE_DICT_KEYS = ("state_dict", "model", "module")
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
# The official draft attends to a 512-token sliding window without sinks, under its own window rule (chain and
# training: flash-attention's window (512, -1); tree levels: a window over the committed tokens per level).
OFFICIAL_SINK_SIZE, OFFICIAL_WINDOW_SIZE, OFFICIAL_WINDOW_RULE = 0, 512, "official"


class CorruptCheckpointError(OSError):
    """A draft weights file that is truncated, malformed, or does not match its recorded digest."""


def hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}


def looks_local(source: str | os.PathLike) -> bool:
    """Whether `source` can only mean a local folder: a Hub repo id is `name` or `org/name`, so a path object, a
    leading `.`, `/` or `~`, a second `/`, or a first part that is an existing folder (`drafts/typo` next to
    `drafts/`) say "path". Without this a mistyped path goes to the Hub and fails there after its retries."""
    if isinstance(source, os.PathLike):
        return True
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        or ("/" in source and Path(source.split("/", 1)[0]).is_dir())
    )


def check_source(source: str | os.PathLike, local_files_only: bool = False, cache_dir=None, revision=None,
                 **_) -> None:
    """Fail at once, in one line, where asking the Hub cannot help: a local-looking folder that does not exist, or
    a repo id in offline mode (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) that is not in the cache."""
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    path = Path(source).expanduser()
    if path.is_dir():
        return
    if looks_local(source):
        raise FileNotFoundError(f"No such folder: {source} (looked for {path.absolute()}); check the path, or name "
                                "a Hub repo as org/name.")
    if local_files_only or is_offline_mode():
        cached = try_to_load_from_cache(str(source), CONFIG_NAME, cache_dir=cache_dir, revision=revision)
        if not isinstance(cached, str):
            raise FileNotFoundError(
                f"{source} is neither a local folder nor in the Hugging Face cache, and offline mode is on "
                "(HF_HUB_OFFLINE=1 or local_files_only=True); give the folder's path, or download it once online."
            )


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


def fetch_again(source: str) -> str:
    """How to replace a damaged weights file: a Hub download is fetched again, a local folder has no other copy."""
    if Path(source).expanduser().is_dir():
        return ("The folder is local (nothing to download again): copy the draft again from where it came from, or "
                "re-save it with save_pretrained.")
    return "Download it again: from_pretrained(..., force_download=True)."


def check_safetensors(path: str, source: str) -> None:
    """Refuse a file whose header is malformed or whose data is cut short (e.g. an interrupted download)."""
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as err:
        raise CorruptCheckpointError(
            f"The draft weights {Path(path).name} of {source} are truncated or corrupted ({err}). {fetch_again(source)}"
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
                    f"{fetch_again(source)}"
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
        f"{source} has no {WEIGHTS_NAME}; longspec-hf reads its own drafts from safetensors only (never pickle). "
        "Re-save the draft with save_pretrained, or convert an official checkpoint with `longspec convert`."
    )


def pth_files(path_or_repo: str | os.PathLike, **hub) -> list[str]:
    """Names of the `*.pth` files at the top of a folder or Hub repo (the official trainer's own file names vary)."""
    subfolder = hub.get("subfolder") or ""
    folder = Path(path_or_repo) / subfolder
    if folder.is_dir():
        return sorted(p.name for p in folder.glob("*" + PYTORCH_SUFFIX))
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(str(path_or_repo), revision=hub.get("revision"), token=hub.get("token"))
    except Exception:  # offline, or not a repo: only the fixed file names can be tried
        return []
    prefix = subfolder.strip("/") + "/" if subfolder else ""
    return sorted(f[len(prefix):] for f in files
                  if f.startswith(prefix) and "/" not in f[len(prefix):] and f.endswith(PYTORCH_SUFFIX))


def official_weights_file(path_or_repo: str | os.PathLike, **hub) -> str | None:
    """Local path of an official checkpoint's weights: safetensors first, then `pytorch_model.bin`, then one `*.pth`."""
    for name in (WEIGHTS_NAME, PYTORCH_WEIGHTS_NAME):
        path = resolve(path_or_repo, name, required=False, **hub)
        if path is not None:
            return path
    names = pth_files(path_or_repo, **hub)
    if len(names) > 1:
        raise OSError(
            f"{path_or_repo} holds several PyTorch weights files ({', '.join(names)}) and no {WEIGHTS_NAME}; keep "
            f"only the draft's own file (or name it {PYTORCH_WEIGHTS_NAME})."
        )
    return resolve(path_or_repo, names[0], **hub) if names else None


def refused_pickle_reason(err: Exception) -> str:
    """The first object torch's safe unpickler refused (its message spans many lines; ours is one)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    return f"it references {found.group(1)}" if found else "it holds objects other than tensors"


def first_sentence(err: Exception) -> str:
    return str(err).splitlines()[0].split(". ")[0] if str(err) else type(err).__name__


def as_state_dict(loaded, name: str, source: str) -> dict[str, torch.Tensor]:
    """A flat `{key: tensor}`, also when the trainer nested it (`{"state_dict": {...}, "step": ...}`)."""
    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return loaded
    if isinstance(loaded, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(loaded.get(key), dict):
                return as_state_dict(loaded[key], name, source)
    raise ValueError(
        f"{name} of {source} is not a state dict (a dict of tensors); official LongSpec checkpoints hold the draft "
        "layer's tensors."
    )


def load_pytorch_weights(path: str, source: str) -> dict[str, torch.Tensor]:
    """A pickled PyTorch state dict, unpickled with tensors and plain containers only: nothing in it can run code."""
    name = Path(path).name
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"Refused to load {name} of {source}: {refused_pickle_reason(err)}, so unpickling it could run code "
            "(only tensors and plain containers are read from pickles). If you trust the file, save its tensors as "
            "model.safetensors next to config.json (safetensors.torch.save_file) and run `longspec convert` on "
            "that folder."
        ) from None
    except (RuntimeError, EOFError) as err:
        raise CorruptCheckpointError(
            f"The draft weights {name} of {source} are truncated or corrupted ({first_sentence(err)}). "
            f"{fetch_again(source)}"
        ) from err
    return as_state_dict(loaded, name, source)


def load_official_weights(path: str, source: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        check_safetensors(path, source)
        return load_file(path)
    return load_pytorch_weights(path, source)


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


class DraftCheckpointMixin:
    """Checkpoint I/O of a LongSpec draft class, kept apart from the network (`modeling.py`): `from_pretrained` with
    official checkpoints converted on the fly and weights verified, `save_pretrained` with digests and a card,
    `push_to_hub` with a `custom_generate/` folder, `convert_official`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> DraftCheckpointMixin:
        """As `PreTrainedModel.from_pretrained` (``revision=``, ``dtype=``, ``device_map=``, offline cache, ...), plus:

        * the draft's tree settings (`generation_config.json`);
        * official LongSpec checkpoints (target-style `config.json`, e.g. ``sail/longspec-Llama-3-8B-Instruct-262k``),
          converted on the fly (see :mod:`longspec_hf.checkpoints`; ``longspec convert`` writes the result to disk);
        * weights verified against the digests in `config.json` before use, read from safetensors only.
        """
        source = pretrained_model_name_or_path
        hub = hub_kwargs(kwargs)
        check_source(source, **hub)
        config_path = None if "config" in kwargs else resolve(source, CONFIG_NAME, required=False, **hub)
        if config_path is not None:
            config = read_json(config_path)
            if is_official_config(config):
                rest = {k: v for k, v in kwargs.items() if k not in hub}
                with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as converted:
                    cls.convert_official(source, converted, **hub)
                    draft = cls.from_pretrained(converted, *args, **rest)
                draft.config._name_or_path = draft.name_or_path = str(source)
                return draft
            verify_weights(source, config, **hub)
        kwargs["use_safetensors"] = True
        draft = super().from_pretrained(source, *args, **kwargs)  # PreTrainedModel's, next in the draft's MRO
        try:
            draft.generation_config = GenerationConfig.from_pretrained(source, **hub)
        except OSError:
            pass  # no generation_config.json: keep the default tree
        return draft

    def save_pretrained(self, save_directory, *args, model_card=None, push_to_hub: bool = False, **kwargs):
        """As `PreTrainedModel.save_pretrained` (weights only, safetensors), plus the tree settings, a digest of each
        weights file in `config.json`, and a model card (`model_card`, else the one already in the folder, else one
        rendered from ``hub_cards/``). ``push_to_hub=True`` then uploads the draft like :meth:`push_to_hub`."""
        from .cards import draft_card

        push_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "token", "create_pr")
                       if k in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        self.generation_config.save_pretrained(save_directory)
        self.config.weights_sha256 = weights_digests(save_directory)
        self.config.save_pretrained(save_directory)
        readme = os.path.join(save_directory, "README.md")
        if model_card is not None:
            model_card.save(readme)
        elif not os.path.isfile(readme):
            draft_card(self).save(readme)
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
            self.push_to_hub(repo_id, model_card=model_card, **push_kwargs)

    def push_to_hub(self, repo_id: str, *, model_card=None, custom_generate: bool = True, **kwargs):
        """Upload the draft to `repo_id` in one commit: weights, config, tree settings, model card (`model_card`, else
        rendered from ``hub_cards/``) and, unless ``custom_generate=False``, a `custom_generate/` folder so that plain
        transformers can use it (`target.generate(ids, custom_generate=repo_id, trust_remote_code=True)`).
        Other arguments as `PreTrainedModel.push_to_hub` (`private`, `token`, `revision`, `create_pr`, `tags`, ...)."""
        from .hub import push_draft

        return push_draft(self, repo_id, model_card=model_card, custom_generate=custom_generate, **kwargs)

    @classmethod
    def convert_official(cls, path_or_repo: str | os.PathLike, save_directory: str | os.PathLike, **hub) -> Path:
        """Write an official LongSpec checkpoint (target-style config) in this project's `save_pretrained` layout.

        Returns `save_directory`. The weights are copied unchanged, so the converted draft computes exactly the same
        function; the config is rebuilt from the target-style config (geometry, RoPE) with the official 512-token window
        and window rule, so the draft sees at inference what it was trained on.
        """
        source = str(path_or_repo)
        check_source(path_or_repo, **hub)
        config = read_json(resolve(path_or_repo, CONFIG_NAME, **hub))
        if not is_official_config(config):
            raise ValueError(
                f"{source} is already in longspec-hf's layout; load it with LongSpecDraftModel.from_pretrained."
            )
        weights_path = official_weights_file(path_or_repo, **hub)
        if weights_path is None:
            raise OSError(
                f"{source} has no draft weights: an official LongSpec checkpoint holds {WEIGHTS_NAME} (or the "
                f"trainer's {PYTORCH_WEIGHTS_NAME} / *{PYTORCH_SUFFIX}) next to its config.json."
            )
        weights = load_official_weights(weights_path, source)
        target_config = AutoConfig.from_pretrained(str(path_or_repo), **hub)
        name = source.rstrip("/").split("/")[-1]
        draft_config = LongSpecDraftConfig.from_target_config(
            target_config,
            sink_size=OFFICIAL_SINK_SIZE,
            window_size=OFFICIAL_WINDOW_SIZE,
            window_rule=OFFICIAL_WINDOW_RULE,
            attention_bias=True,
            target_name_or_path=OFFICIAL_TARGETS.get(name),
            target_revision=None,
        )
        with torch.device("meta"):
            draft = cls(draft_config)
        weights = official_state_dict(weights, set(draft.state_dict()), source)
        draft.load_state_dict(weights, strict=True, assign=True)
        dtype = next(iter(weights.values())).dtype
        draft.config.dtype = dtype
        draft.save_pretrained(save_directory)
        return Path(save_directory)
