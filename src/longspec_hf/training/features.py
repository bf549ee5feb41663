"""A feature store: what a draft learns from, captured from the frozen target once per training token.

A training step of a LongSpec draft needs, per sequence, the target's last-layer keys and values (the draft
cross-attends to them) and the target's next-token distribution (the distillation target). Both come from one target
forward — for SmolLM2-135M thirty layers against the draft's one, the bulk of a step. Captured once to disk, they
serve every epoch and every later run on the same data (another learning rate, another draft vocabulary) for the
cost of reading them.

A store is a folder::

    manifest.json              what was captured (target fingerprint, data, sequence length, top-k) and the row count
    shard-00000.safetensors    rows [0, S): input_ids, position_ids [S, L] int32, loss_mask [S, L] uint8,
                               key, value [S, Hkv, L, D] and top_logprobs [S, L, k] in fp16 (half the bytes of
                               fp32, more mantissa than bf16; read back as fp32), top_ids [S, L, k] int32 — the
                               target's k most likely next tokens and their log-probs

Shards are written whole (to a temporary name, then renamed), so an interrupted capture resumes at the first
missing shard; a manifest made for another target or other settings is refused rather than mixed in.

A run can also read stores captured by earlier runs (:class:`StoreUnion`, ``--extra-features``): a later run on new
text then rehearses the earlier runs' text for the cost of reading it, instead of forgetting it or capturing it again.
An earlier store of shorter rows rehearses in a run of longer ones, its rows right-padded (:func:`pad_rows`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import DATA_VERSION
from .objective import target_pass

MANIFEST = "manifest.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@torch.no_grad()
def capture_rows(target, input_ids: torch.LongTensor, position_ids: torch.LongTensor, top_k: int,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One target forward over `input_ids [b, L]`: `{key, value [b, Hkv, L, D], top_ids, top_logprobs [b, L, k]}`."""
    key, value, logits = target_pass(target, input_ids.to(target.device), position_ids.to(target.device), True)
    top = torch.log_softmax(logits.float(), dim=-1).topk(top_k, dim=-1)  # [b, L, k]
    return {"key": key.to(dtype).cpu(), "value": value.to(dtype).cpu(),
            "top_ids": top.indices.int().cpu(), "top_logprobs": top.values.to(dtype).cpu()}


def store_key(fingerprint: str, settings: dict) -> str:
    """The identity of a capture: the target's weights fingerprint and the capture's settings (JSON)."""
    return hashlib.sha256(json.dumps([fingerprint, settings], sort_keys=True).encode()).hexdigest()[:16]


def check_manifest(folder: Path, manifest: dict) -> None:
    path = folder / MANIFEST
    if path.exists():
        found = json.loads(path.read_text())
        if found.get("key") != manifest["key"]:
            raise ValueError(f"The feature store {folder} was captured with other settings or another target "
                             f"({found.get('settings')}); use another --features folder or delete this one.")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2))


def capture_features(target, input_ids: torch.LongTensor, position_ids: torch.LongTensor,
                     loss_mask: torch.Tensor | None, folder: str | Path, settings: dict, key: str, top_k: int = 32,
                     dtype: str = "fp16", rows_per_shard: int = 16, batch_size: int = 1,
                     progress: bool = True) -> FeatureStore:
    """Capture the features of the sequences `input_ids [N, L]` at `position_ids [N, L]` into `folder`, skipping
    shards already there; `settings` (JSON) and `key` (their digest with the target's) identify the capture."""
    folder = Path(folder)
    manifest = {"key": key, "settings": settings, "rows": len(input_ids), "seq_len": input_ids.shape[1],
                "top_k": top_k, "dtype": dtype, "rows_per_shard": rows_per_shard}
    check_manifest(folder, manifest)
    mask = torch.ones_like(input_ids, dtype=torch.bool) if loss_mask is None else loss_mask
    shards = range(0, len(input_ids), rows_per_shard)
    bar = tqdm(total=len(input_ids), disable=not progress, desc="capture target features", unit="seq")
    for index, start in enumerate(shards):
        stop = min(start + rows_per_shard, len(input_ids))
        path = folder / shard_name(index)
        if not path.exists():
            parts = [capture_rows(target, input_ids[i:min(i + batch_size, stop)],
                                  position_ids[i:min(i + batch_size, stop)], top_k, DTYPES[dtype])
                     for i in range(start, stop, batch_size)]
            tensors = {name: torch.cat([p[name] for p in parts]).contiguous() for name in parts[0]}
            tensors |= {"input_ids": input_ids[start:stop].int().contiguous(),
                        "position_ids": position_ids[start:stop].int().contiguous(),
                        "loss_mask": mask[start:stop].to(torch.uint8).contiguous()}
            partial = path.with_suffix(".partial")
            save_file(tensors, str(partial))
            partial.rename(path)
        bar.update(stop - start)
    bar.close()
    return FeatureStore(folder)


class FeatureStore:
    """Read side of a captured store: rows by index, in any order (each read touches only those rows)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"No feature store in {self.folder} (no {MANIFEST}); capture one with "
                                    "`longspec train --features <folder> ...`.")
        self.manifest = json.loads(path.read_text())
        self.rows_per_shard = self.manifest["rows_per_shard"]
        count = -(-self.manifest["rows"] // self.rows_per_shard)
        missing = [shard_name(i) for i in range(count) if not (self.folder / shard_name(i)).exists()]
        if missing:
            raise ValueError(f"The feature store {self.folder} is incomplete ({len(missing)} of {count} shards "
                             f"missing, e.g. {missing[0]}): run the same capture again to finish it.")
        self._open = [safe_open(str(self.folder / shard_name(i)), framework="pt") for i in range(count)]

    def __len__(self) -> int:
        return self.manifest["rows"]

    def rows(self, indices) -> dict[str, torch.Tensor]:
        """The rows `indices` stacked: the tensors of the module docstring with a leading `[len(indices)]`."""
        picked = []
        for index in map(int, indices):
            shard, offset = divmod(index, self.rows_per_shard)
            handle = self._open[shard]
            picked.append({name: handle.get_slice(name)[offset:offset + 1] for name in handle.keys()})
        return {name: torch.cat([p[name] for p in picked]) for name in picked[0]}

    def row_lengths(self) -> torch.LongTensor:
        """`[N]` tokens of each row (a store's rows are all as long)."""
        return torch.full((len(self),), self.manifest["seq_len"], dtype=torch.long)

    def top1_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each token is the target's most likely next token over the scored tokens of the store: the
        ranking of a draft vocabulary (:func:`~longspec_hf.vocabulary.ranked_vocabulary`)."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for handle in self._open:
            top1 = handle.get_tensor("top_ids")[..., 0].long()
            scored = handle.get_tensor("loss_mask").bool()
            counts += torch.bincount(top1[scored], minlength=vocab_size)
        return counts


def pad_rows(rows: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Rows `[b, l, ...]` right-padded to `[b, length, ...]` along the sequence (dim 2 of `key`/`value`, dim 1 of the
    rest). Exact for the real tokens: both draft masks are causal, so none of them sees a pad, and a pad's
    `loss_mask` 0 after the row's last scored token gives it weight 0 (:func:`~.objective.token_weights`). A pad
    repeats the row's last position, so no pad reaches past the positions the row was captured at."""
    short = rows["input_ids"].shape[1]
    if short == length:
        return rows
    padded = {}
    for name, tensor in rows.items():
        dim = 2 if name in ("key", "value") else 1
        if name == "position_ids":
            fill = tensor[:, -1:].expand(-1, length - short)
        else:
            shape = list(tensor.shape)
            shape[dim] = length - short
            fill = tensor.new_zeros(shape)
        padded[name] = torch.cat([tensor, fill], dim=dim)
    return padded


class StoreUnion:
    """Several stores read as one: the rows of the first, then those of the second, and so on. The stores hold rows
    of one top-k and target (:func:`check_compatible`); rows shorter than the longest are right-padded to it
    (:func:`pad_rows`), so a batch mixes them."""

    def __init__(self, stores: list[FeatureStore]):
        self.stores = stores
        self.seq_len = max(store.manifest["seq_len"] for store in stores)
        self.starts = [0]
        for store in stores:
            self.starts.append(self.starts[-1] + len(store))

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """`(store, row)` of the union's row `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"Row {index} of a union of {len(self)} rows.")
        store = bisect.bisect_right(self.starts, index) - 1
        return store, index - self.starts[store]

    def rows(self, indices) -> dict[str, torch.Tensor]:
        picked = [pad_rows(self.stores[s].rows([row]), self.seq_len) for s, row in map(self.locate, map(int, indices))]
        return {name: torch.cat([p[name] for p in picked]) for name in picked[0]}

    def row_lengths(self) -> torch.LongTensor:
        """`[N]` tokens of each row before padding: what a step on it trains."""
        return torch.cat([store.row_lengths() for store in self.stores])

    def top1_counts(self, vocab_size: int) -> torch.Tensor:
        return sum(store.top1_counts(vocab_size) for store in self.stores)


def check_compatible(store: FeatureStore, seq_len: int, top_k: int, capture_dtype: str, fingerprint: str) -> None:
    """Refuse an earlier store that cannot train alongside this run's: longer rows (shorter ones are padded), another
    top-k, another capture precision, or another target (`fingerprint`:
    :func:`~longspec_hf.training.generated.weights_fingerprint` of the target loaded in `capture_dtype`, which together
    with the store's settings must give the store's key)."""
    found = store.manifest
    settings = found.get("settings", {})
    mismatched = {"top_k": (found.get("top_k"), top_k)} if found.get("top_k") != top_k else {}
    if found.get("seq_len", seq_len + 1) > seq_len:
        mismatched["seq_len"] = (found.get("seq_len"), f"{seq_len}; an earlier store's rows may be shorter, not "
                                 "longer")
    if settings.get("capture_dtype") != capture_dtype:
        mismatched["capture_dtype"] = (settings.get("capture_dtype"), capture_dtype)
    if mismatched:
        fixes = ", ".join(f"--{k.replace('_', '-')} {v[0]} (this run: {v[1]})" for k, v in mismatched.items())
        raise ValueError(f"The feature store {store.folder} was captured with other settings; train alongside it with "
                         f"{fixes}, or leave it out of --extra-features.")
    version = settings.get("data_version", 1)
    if version != DATA_VERSION:
        raise ValueError(f"The feature store {store.folder} holds text cut by an older rule of the data sources (data "
                         f"version {version}, now {DATA_VERSION}: see longspec_hf.training.data); capture it again "
                         "with this version, or leave it out of --extra-features.")
    if store_key(fingerprint, settings) != found.get("key"):
        raise ValueError(f"The feature store {store.folder} was captured from another target (or other weights of "
                         "it); leave it out of --extra-features.")
