"""Training data written by the target itself (self-distillation): long prompts cut from a text source, continued by
the frozen target, so the draft learns the text it will have to predict at inference — the target's own output.

A data source ``generated:<source>`` (any other source: ``python-stdlib:train``, a folder, a datasets id) with
options after ``?``, ``&``-separated::

    generated:python-stdlib:train                                  greedy continuations, defaults below
    generated:python-stdlib:train?temperature=0,0.7&count=256      each prompt continued greedily and at T=0.7
    generated:gen.jsonl                                            a file written by `generate_data` (used as is)

Options: ``temperature`` (comma-separated; 0 = greedy, else pure temperature sampling: no top-k/top-p), ``count``
(prompts, default 64), ``new_tokens`` (128), ``prompt_len`` (default: the training ``seq_len`` minus
``new_tokens``, so prompt + continuation is one training sequence), ``batch_size`` (4), ``seed`` (0), ``cache`` (the
file; default ``<cache dir>/generated/<source>-<key>.jsonl`` where the cache dir is ``$LONGSPEC_HF_CACHE``, else
``$XDG_CACHE_HOME/longspec_hf``, else ``~/.cache/longspec_hf``) and ``loss`` (``continuation``, the default: the
prompt is context and only the continuation is scored; ``all``: every token is).

The file is a `datasets`-readable JSON-lines (or Parquet, by suffix) table, one row per prompt and temperature:
``prompt_ids``, ``continuation_ids`` (stopped after EOS, if the target emits one), ``continuation`` (text),
``temperature``, ``source``, ``prompt_index`` and ``key`` — a digest of the target's weights and every setting, so
a file made for another target or other settings is refused instead of silently reused. Generation appends each
finished batch to ``<file>.partial.jsonl`` first, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..compat import cache_kwarg
from ..cost_model import cache_folder
from .data import DATA_VERSION, GENERATED_PREFIX, load_texts, pack

GENERATED_COLUMNS = ("prompt_ids", "continuation_ids")
LOSS_SCOPES = ("continuation", "all")


@dataclass(frozen=True)
class GeneratedSpec:
    """A parsed ``generated:<source>?options`` data source."""

    source: str
    temperature: tuple[float, ...] = (0.0,)
    count: int = 64
    new_tokens: int = 128
    prompt_len: int | None = None
    batch_size: int = 4
    seed: int = 0
    cache: str | None = None
    loss: str = "continuation"


def parse_generated_spec(spec: str) -> GeneratedSpec:
    """``generated:<source>?key=value&...`` -> `GeneratedSpec`; unknown keys and bad values are refused by name."""
    body = spec.removeprefix(GENERATED_PREFIX)
    source, _, query = body.partition("?")
    if not source:
        raise ValueError(f"{spec!r} names no source; write generated:<source>, e.g. generated:python-stdlib:train.")
    known = {f.name for f in fields(GeneratedSpec)} - {"source"}
    values: dict = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        key = {"temperatures": "temperature"}.get(key, key)
        if key not in known:
            raise ValueError(f"Unknown option {key!r} in {spec!r}; known: {', '.join(sorted(known))}.")
        try:
            values[key] = parse_option(key, value)
        except ValueError:
            raise ValueError(f"Bad value {value!r} for {key} in {spec!r}; e.g. temperature=0,0.7 count=64 "
                             f"new_tokens=128 loss={'|'.join(LOSS_SCOPES)}.") from None
    parsed = GeneratedSpec(source=source, **values)
    if parsed.loss not in LOSS_SCOPES or min(parsed.temperature) < 0 or min(parsed.count, parsed.new_tokens,
                                                                              parsed.batch_size) < 1:
        raise ValueError(f"Out-of-range option in {spec!r}: temperatures >= 0, count/new_tokens/batch_size >= 1, "
                         f"loss one of {', '.join(LOSS_SCOPES)}.")
    return parsed


def parse_option(key: str, value: str):
    if key == "temperature":
        return tuple(float(t) for t in value.split(","))
    if key in ("cache", "loss"):
        if not value:
            raise ValueError(value)
        return value
    return int(value)


def default_cache_dir() -> Path:
    """Where generated files go unless ``cache=`` names one: a per-user cache folder, never the output folder (which
    --overwrite deletes)."""
    return cache_folder() / "generated"


def weights_fingerprint(model) -> str:
    """A digest of a few values of every parameter: tells targets apart (another checkpoint, dtype or GGUF file
    under the same folder name) without hashing gigabytes."""
    digest = hashlib.sha1()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(str(param.dtype).encode())
        digest.update(param.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def generation_key(target, tokenizer, source: str, prompt_len: int, new_tokens: int, count: int,
                   temperatures: tuple[float, ...], seed: int, text_column: str) -> str:
    """The identity of a generated file: the target (weights, not just its name), the tokenizer and every setting."""
    settings = dict(target=getattr(target.config, "_name_or_path", ""), weights=weights_fingerprint(target),
                    tokenizer=[getattr(tokenizer, "name_or_path", ""), len(tokenizer)], source=source,
                    prompt_len=prompt_len, new_tokens=new_tokens, count=count, temperatures=list(temperatures),
                    seed=seed, text_column=text_column, eos=eos_ids(target), format=1,
                    data_version=DATA_VERSION)
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def eos_ids(target) -> list[int]:
    eos = target.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def source_prompts(tokenizer, source: str, prompt_len: int, count: int, seed: int,
                   text_column: str = "text") -> torch.LongTensor:
    """`[count, prompt_len]` prompts: the source's documents in a seeded order, joined with EOS as for training, cut
    into consecutive windows; only the documents needed are tokenized."""
    texts = load_texts([source], text_column)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)  # prompts from all over the source, not just its first files
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for i in order:
        stream.extend(tokenizer(texts[i], add_special_tokens=False).input_ids + separator)
        if len(stream) >= prompt_len * count:
            break
    if len(stream) < prompt_len * count:
        raise ValueError(f"{source} has {len(stream)} tokens, fewer than {count} prompts of {prompt_len}; lower "
                         "count or prompt_len, or add text.")
    return torch.tensor(stream[: prompt_len * count]).view(count, prompt_len)


@torch.no_grad()
def continue_prompts(target, prompts: torch.LongTensor, new_tokens: int, temperatures: tuple[float, ...],
                     seed: int) -> list[torch.LongTensor]:
    """One continuation `[B, <= new_tokens]` of the prompts `[B, P]` per temperature, by `target.generate()`.

    With several temperatures the prompts are prefilled once and each generate() continues a copy of that cache, so
    a long prompt is read once, not once per temperature. Sampling is seeded per call (`seed`, temperature index).
    """
    device = target.device
    prompts = prompts.to(device)
    attention_mask = torch.ones_like(prompts)
    eos = eos_ids(target)
    pad = target.generation_config.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    prefill = None
    if len(temperatures) > 1:
        from transformers import DynamicCache

        prefill = DynamicCache()
        target(input_ids=prompts[:, :-1], attention_mask=attention_mask[:, :-1], **{cache_kwarg(target): prefill},
               use_cache=True, logits_to_keep=1)  # the last prompt token is left for generate() to read
    outputs = []
    for i, temperature in enumerate(temperatures):
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(
            do_sample=False)
        cache = {cache_kwarg(target): copy.deepcopy(prefill)} if prefill is not None else {}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1009 + i)
            out = target.generate(prompts, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                  pad_token_id=pad, **sampling, **cache)  # [B, P + n]
        outputs.append(out[:, prompts.shape[1]:].cpu())
    return outputs


def cut_after_eos(tokens: list[int], eos: list[int]) -> list[int]:
    """The continuation up to and including its first EOS (what follows is generate()'s padding)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def read_rows(path: Path) -> list[dict]:
    """The rows of a generated file, through `datasets` (JSON lines or Parquet by suffix)."""
    from datasets import load_dataset

    kind = "parquet" if path.suffix == ".parquet" else "json"
    return load_dataset(kind, data_files=str(path), split="train").to_list()


def write_rows(rows: list[dict], path: Path) -> None:
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = Dataset.from_list(rows)
    tmp = path.with_name(path.name + ".tmp")
    dataset.to_parquet(str(tmp)) if path.suffix == ".parquet" else dataset.to_json(str(tmp))
    tmp.replace(path)  # a complete file or none: a half-written cache would be reused as if whole


def read_partial(path: Path, key: str) -> dict[tuple[int, float], dict]:
    """`{(prompt_index, temperature): row}` an interrupted run finished with these settings (its last line may be cut
    short; a batch redone after a crash appears twice, the later row counts)."""
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row.get("key") != key:
            return {}
        rows[row["prompt_index"], row["temperature"]] = row
    return rows


def generate_data(target, tokenizer, source: str, out_path: str | Path, prompt_len: int, new_tokens: int = 128,
                  count: int = 64, temperatures: tuple[float, ...] | list[float] = (0.0,), batch_size: int = 4,
                  seed: int = 0, text_column: str = "text", progress: bool = True) -> Path:
    """Write the target's continuations of `count` prompts of `prompt_len` tokens cut from `source` to `out_path`
    (``.jsonl`` or ``.parquet``), one row per prompt and temperature; an existing file made with the same target and
    settings is kept as it is. Returns the path. Train on it with ``--data generated:<out_path>``."""
    out_path = Path(out_path)
    temperatures = tuple(float(t) for t in temperatures)
    key = generation_key(target, tokenizer, source, prompt_len, new_tokens, count, temperatures, seed, text_column)
    if out_path.exists():
        rows = read_rows(out_path)
        if rows and all(row.get("key") == key for row in rows):
            return out_path
        raise ValueError(f"{out_path} holds data generated with another target or other settings; delete it or "
                         "choose another output file.")
    prompts = source_prompts(tokenizer, source, prompt_len, count, seed, text_column)  # [count, P]
    partial = out_path.with_name(out_path.name + ".partial.jsonl")
    rows = read_partial(partial, key)
    eos = eos_ids(target)
    pending = [list(range(first, min(first + batch_size, count))) for first in range(0, count, batch_size)]
    # A batch finished before an interruption is kept; its sampling seed depends on the batch only, so none shifts.
    pending = [batch for batch in pending if not all((i, t) in rows for i in batch for t in temperatures)]
    bar = tqdm(total=count * len(temperatures), disable=not progress, desc="generate data",
               initial=count * len(temperatures) - sum(len(batch) for batch in pending) * len(temperatures))
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "a" if rows else "w", encoding="utf-8") as log:
        for indices in pending:
            continuations = continue_prompts(target, prompts[indices], new_tokens, temperatures, seed + indices[0])
            for temperature, batch in zip(temperatures, continuations, strict=True):
                for i, tokens in zip(indices, batch.tolist(), strict=True):
                    tokens = cut_after_eos(tokens, eos)
                    row = dict(prompt_index=i, temperature=temperature, source=source, key=key,
                               prompt_ids=prompts[i].tolist(), continuation_ids=tokens,
                               continuation=tokenizer.decode(tokens))
                    rows[i, temperature] = row
                    log.write(json.dumps(row) + "\n")
                bar.update(len(indices))
            log.flush()
    bar.close()
    write_rows([rows[i, t] for i in range(count) for t in temperatures], out_path)
    partial.unlink()
    return out_path


def is_generated_file(source: str) -> bool:
    """Whether `source` is a file `generate_data` wrote (rather than text to cut prompts from)."""
    path = Path(source).expanduser()
    if path.suffix not in (".jsonl", ".json", ".parquet") or not path.is_file():
        return False  # the suffix first: a long `pypi:` list is no file name the OS would even look up
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
    else:
        with open(path, encoding="utf-8") as f:
            names = list(json.loads(f.readline() or "{}"))
    return all(column in names for column in GENERATED_COLUMNS)


def cache_path(spec: GeneratedSpec, key: str) -> Path:
    if spec.cache:
        return Path(spec.cache).expanduser()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.source).strip("_")[:60]
    return default_cache_dir() / f"{slug}-{key}.jsonl"


def training_rows(rows: list[dict], seq_len: int, pad_id: int, loss: str) -> tuple[torch.LongTensor, torch.Tensor]:
    """`(ids [N, seq_len], loss_mask [N, seq_len])` from generated rows: prompt + continuation, the last `seq_len`
    tokens when longer (the continuation is what must stay), padded on the right when shorter (a continuation that
    stopped at EOS). `loss_mask[n, i]` says whether predicting token i counts: continuation tokens only for
    ``loss="continuation"``, every real token for ``"all"``, never padding."""
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    for n, row in enumerate(rows):
        prompt, continuation = row["prompt_ids"], row["continuation_ids"]
        if len(continuation) >= seq_len:
            raise ValueError(f"Generated continuations of {len(continuation)} tokens do not fit --seq-len {seq_len} "
                             "with any context; generate fewer new_tokens or train longer sequences.")
        sequence = (prompt + continuation)[-seq_len:]
        ids[n, : len(sequence)] = torch.tensor(sequence)
        scored_from = 0 if loss == "all" else len(sequence) - len(continuation)
        mask[n, scored_from : len(sequence)] = True
    return ids, mask


def generated_sequences(source: str, target, tokenizer, seq_len: int, text_column: str = "text",
                        progress: bool = True) -> tuple[torch.LongTensor, torch.Tensor]:
    """`(ids, loss_mask)` `[N, seq_len]` of one ``generated:`` source: its file is read when it exists (a
    `generate_data` file named directly, or the cache of these settings), generated with the target otherwise."""
    spec = parse_generated_spec(source)
    if is_generated_file(spec.source):
        path = Path(spec.source).expanduser()
    else:
        prompt_len = spec.prompt_len or seq_len - spec.new_tokens
        if prompt_len < 1:
            raise ValueError(f"{source}: new_tokens={spec.new_tokens} leaves no prompt in --seq-len {seq_len}; "
                             "lower new_tokens or raise --seq-len.")
        key = generation_key(target, tokenizer, spec.source, prompt_len, spec.new_tokens, spec.count,
                             spec.temperature, spec.seed, text_column)
        path = generate_data(target, tokenizer, spec.source, cache_path(spec, key), prompt_len, spec.new_tokens,
                             spec.count, spec.temperature, spec.batch_size, spec.seed, text_column, progress)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return training_rows(read_rows(path), seq_len, pad, spec.loss)


def training_sequences(sources: list[str], target, tokenizer, seq_len: int, text_column: str = "text",
                       progress: bool = True, max_plain: int | None = None,
                       seed: int = 0) -> tuple[torch.LongTensor, torch.Tensor | None]:
    """All training sequences `[N, seq_len]` of a run and their loss mask: text sources packed as ever (every token
    scored; at most `max_plain` of them, a sample seeded by `seed`), ``generated:`` sources from the target's
    continuations. The mask is None when nothing is masked, so plain-text runs train exactly as before."""
    plain = [s for s in sources if not s.startswith(GENERATED_PREFIX)]
    parts = [(sample_rows(pack(load_texts(plain, text_column), tokenizer, seq_len), max_plain, seed), None)] if plain \
        else []
    parts += [generated_sequences(s, target, tokenizer, seq_len, text_column, progress)
              for s in sources if s.startswith(GENERATED_PREFIX)]
    ids = torch.cat([p[0] for p in parts])
    if all(p[1] is None for p in parts):
        return ids, None
    return ids, torch.cat([torch.ones_like(p[0], dtype=torch.bool) if p[1] is None else p[1] for p in parts])


def sample_rows(rows: torch.Tensor, count: int | None, seed: int) -> torch.Tensor:
    """At most `count` of `rows`, a seeded sample kept in order (all of them when `count` is None)."""
    if count is None or count >= len(rows):
        return rows
    keep = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:count]
    return rows[keep.sort().values]


def generate_data_cli(args) -> None:
    """`longspec generate-data`: load the target, write the file once (see :func:`generate_data`)."""
    from ..loading import load_causal_lm, resolve_device

    device = resolve_device(args.device, "generate-data")
    target, tokenizer = load_causal_lm(args.target, args.gguf_file, args.dtype, str(device))
    path = generate_data(target, tokenizer, args.source, args.output, args.prompt_len, args.new_tokens, args.count,
                         args.temperatures, args.batch_size, args.seed, args.text_column)
    print(f"wrote {path}; train on it with --data {GENERATED_PREFIX}{path}")


__all__ = ["GeneratedSpec", "generate_data", "generated_sequences", "parse_generated_spec", "training_sequences"]
