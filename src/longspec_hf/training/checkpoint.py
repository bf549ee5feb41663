"""Resumable training state in safetensors + JSON (no pickle): optimizer, scheduler, RNG, step."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{index}.{name}"] = tensor.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def optimizer_from_files(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def save_training_state(folder: Path, optimizer, scheduler, step: int, extra: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors, groups = optimizer_to_files(optimizer)
    save_file(tensors, folder / OPTIMIZER_FILE)
    save_file({"torch": torch.get_rng_state()}, folder / RNG_FILE)
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    payload = {"step": step, "optimizer_param_groups": groups, "scheduler": scheduler_state, **extra}
    (folder / STATE_FILE).write_text(json.dumps(payload, indent=2))


def load_training_state(folder: Path, optimizer, scheduler) -> dict:
    for name in (OPTIMIZER_FILE, RNG_FILE, STATE_FILE):
        if not (folder / name).exists():
            raise ValueError(f"Checkpoint {folder} is incomplete ({name} missing); delete it to resume from an "
                             "earlier one.")
    payload = json.loads((folder / STATE_FILE).read_text())
    tensors = load_file(folder / OPTIMIZER_FILE)
    optimizer.load_state_dict(optimizer_from_files(tensors, payload["optimizer_param_groups"]))
    scheduler.load_state_dict({**payload["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(load_file(folder / RNG_FILE)["torch"])
    return payload


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]), default=None)
