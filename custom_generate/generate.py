"""LongSpec speculative decoding for plain transformers, without longspec-hf installed.

    out = target.generate(input_ids, custom_generate="<draft repo>", trust_remote_code=True, max_new_tokens=256)

transformers loads this file from the draft's repository together with its sibling modules (the draft's modeling and
the decode loop of longspec-hf, copied there by ``longspec push``), loads the draft stored in the same repository, and
runs ``target.generate(..., assistant_model=draft)``: greedy output is token-identical to plain ``generate()``, sampled
output has the same distribution. Pass ``assistant_model=`` to use another LongSpec draft.
"""

from .attention import register_hybrid_attention
from .draft_source import DRAFT_REPO, DRAFT_REVISION
from .hook import install_generation_hook
from .modeling import LongSpecDraftModel

_DRAFTS = {}


def load_draft(model, repo=DRAFT_REPO, revision=DRAFT_REVISION):
    """The repository's draft on `model`'s device and dtype, loaded once per process."""
    key = (repo, revision, str(model.device), model.dtype)
    if key not in _DRAFTS:
        draft = LongSpecDraftModel.from_pretrained(repo, revision=revision, dtype=model.dtype)
        _DRAFTS[key] = draft.to(model.device).eval()
    return _DRAFTS[key]


def generate(model, *args, assistant_model=None, **kwargs):
    """`model.generate(*args, **kwargs)` with this repository's LongSpec draft as the assistant."""
    register_hybrid_attention()
    install_generation_hook()
    if assistant_model is None:
        assistant_model = load_draft(model)
    return model.generate(*args, assistant_model=assistant_model, **kwargs)
