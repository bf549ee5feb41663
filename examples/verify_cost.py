"""How much does verifying a tree cost on this device? (pick tree shapes by measuring, not by guessing)

For a context length and several tree sizes, times one target forward over the tree with the hybrid tree attention
(each available backend) and with dense SDPA over the same 4D mask, relative to one plain decode step measured in the
same run. Uses the offline SmolLM2-135M-Instruct GGUF model by default, or any local/Hub model with --model.

    python examples/verify_cost.py --context 2048 --tree-sizes 4,16,69
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from longspec_hf.attention import HYBRID_ATTENTION_NAME, available_backends
from longspec_hf.tree import DraftTree
from longspec_hf.verify import attention_implementation, verification_mask


def load_target(model: str | None):
    if model:
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    from demo import GGUF_FILE, smollm2_dir

    return AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE, dtype=torch.float32).eval()


def chain_like_tree(size: int) -> DraftTree:
    """A tree of `size` nodes, four levels deep like the beam tree's depth profile (shape only matters for the mask)."""
    parents = [-1] + [max(0, (i - 1) // 4) for i in range(1, size)]
    depths = [0] * size
    ancestors = torch.eye(size, dtype=torch.bool)
    for i in range(1, size):
        depths[i] = depths[parents[i]] + 1
        ancestors[i] |= ancestors[parents[i]]
    return DraftTree(torch.randint(100, 1000, (size,)), parents, torch.tensor(depths), ancestors)


@torch.no_grad()
def time_forward(target, cache, ids, position_ids, mask, repeats, **kwargs) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        target(input_ids=ids, position_ids=position_ids, attention_mask=mask, past_key_values=cache,
               use_cache=True, logits_to_keep=0, **kwargs)
        times.append(time.perf_counter() - start)
        cache.crop(-ids.shape[1])
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model id or folder (default: offline SmolLM2-135M GGUF)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--tree-sizes", default="4,16,69")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    target = load_target(args.model)
    cache = DynamicCache()
    with torch.no_grad():
        target(torch.randint(100, 1000, (1, args.context)), past_key_values=cache, use_cache=True, logits_to_keep=1)
    step_ids = torch.randint(100, 1000, (1, 1))
    step_pos = torch.tensor([[args.context]])
    time_forward(target, cache, step_ids, step_pos, None, 2)  # warm-up
    decode = time_forward(target, cache, step_ids, step_pos, None, args.repeats)
    print(f"context {args.context}: one plain decode step = {decode * 1000:.1f} ms")
    print(f"{'tree':>5} {'method':>18} {'ms':>8} {'x decode step':>14}")
    for size in (int(s) for s in args.tree_sizes.split(",")):
        tree = chain_like_tree(size)
        ids, pos = tree.tokens[None], (args.context + tree.depths)[None]
        mask = verification_mask(tree, args.context, target.dtype, None)
        rows = [("dense sdpa", {}, "sdpa")]
        rows += [(f"hybrid {b}", {"tree_prefix_len": args.context, "tree_attn_backend": b}, HYBRID_ATTENTION_NAME)
                 for b in available_backends(target.device.type)]
        for label, kwargs, impl in rows:
            with attention_implementation(target, impl):
                time_forward(target, cache, ids, pos, mask, 1, **kwargs)
                t = time_forward(target, cache, ids, pos, mask, args.repeats, **kwargs)
            print(f"{size:>5} {label:>18} {t * 1000:>8.1f} {t / decode:>14.2f}")


if __name__ == "__main__":
    main()
