"""What a benchmark run measures besides tokens: wall time, target forwards, peak memory, KV-cache bytes."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall time covers the work (CUDA launches are asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device):
    """`with timed(dev) as t: ...` then `t["seconds"]`, synchronised on both ends."""
    result = {}
    synchronize(device)
    start = time.perf_counter()
    try:
        yield result
    finally:
        synchronize(device)
        result["seconds"] = time.perf_counter() - start


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The target's stack of decoder layers (`model.model.layers` in every transformers decoder-only LM)."""
    base = getattr(model, model.base_model_prefix, model)
    base = getattr(base, "language_model", base)  # multimodal wrappers keep the text stack one level down
    layers = getattr(base, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


@contextmanager
def count_target_forwards(model):
    """Counts full target forwards: calls of its *last* decoder layer, which early-exit drafting never reaches."""
    counter = {"forwards": 0}
    layers = decoder_layers(model)
    module = layers[-1] if layers is not None else model

    def hook(*_):
        counter["forwards"] += 1

    handle = module.register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def current_rss() -> int | None:
    """Resident set size of this process in bytes (Linux /proc; psutil elsewhere if installed)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


@contextmanager
def peak_memory(device: torch.device, interval: float = 0.005):
    """Peak memory while the block runs: CUDA max allocated on GPU, sampled process RSS on CPU (bytes or None)."""
    result = {"peak_bytes": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield result
        finally:
            result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        return
    start = current_rss()
    if start is None:
        yield result
        return
    peak, stop = [start], threading.Event()

    def sample():
        while not stop.wait(interval):
            peak[0] = max(peak[0], current_rss() or 0)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_bytes"] = max(peak[0], current_rss() or 0)
