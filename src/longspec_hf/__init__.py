"""longspec-hf: lossless speculative decoding for long contexts (LongSpec) as a transformers extension.

    from longspec_hf import LongSpecDraftModel
    draft = LongSpecDraftModel.from_target(target)
    out = target.generate(input_ids, assistant_model=draft, max_new_tokens=256)
    print(draft.stats.tau)
"""

from transformers import AutoConfig, AutoModel

from .attention import HYBRID_ATTENTION_NAME, hybrid_tree_attention, register_hybrid_attention
from .cache import SinkWindowCache, SinkWindowLayer
from .configuration import LongSpecDraftConfig
from .drafting import Drafter, DraftState
from .generation import SpeculativeStats, speculative_generate
from .hook import install_generation_hook
from .modeling import LongSpecDraftModel
from .self_draft import SelfDraft
from .tree import DEFAULT_TREE_SHAPE, DraftTree, build_beam_tree

__version__ = "0.1.0"

register_hybrid_attention()
install_generation_hook()
AutoConfig.register(LongSpecDraftConfig.model_type, LongSpecDraftConfig, exist_ok=True)
AutoModel.register(LongSpecDraftConfig, LongSpecDraftModel, exist_ok=True)

__all__ = [
    "DEFAULT_TREE_SHAPE",
    "HYBRID_ATTENTION_NAME",
    "Drafter",
    "DraftState",
    "DraftTree",
    "LongSpecDraftConfig",
    "LongSpecDraftModel",
    "SelfDraft",
    "SinkWindowCache",
    "SinkWindowLayer",
    "SpeculativeStats",
    "build_beam_tree",
    "hybrid_tree_attention",
    "register_hybrid_attention",
    "speculative_generate",
]
