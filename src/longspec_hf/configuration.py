"""Configuration of the LongSpec draft: the target's attention geometry plus the draft's own cache settings."""

from __future__ import annotations

from transformers import PreTrainedConfig

# The target attributes a draft must agree with to be able to share its embeddings, LM head and KV cache.
BINDING_ATTRIBUTES = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")


class LongSpecDraftConfig(PreTrainedConfig):
    r"""Configuration of a [`LongSpecDraftModel`].

    The draft is one GliDe-style decoder layer, so most fields mirror the target's config (use
    [`LongSpecDraftConfig.from_target_config`]); `sink_size` and `window_size` size the draft's own constant cache.

    Args:
        vocab_size, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
        hidden_act, rms_norm_eps, max_position_embeddings, rope_parameters:
            Copied from the target (the draft's queries must be rotated exactly like the target's keys).
        attention_bias (`bool`, defaults to `True`): bias on q/k/v projections, as in the official checkpoints.
        sink_size (`int`, defaults to 4): first tokens always kept in the draft's self-attention cache.
        window_size (`int`, defaults to 512): most recent tokens kept in the draft's self-attention cache.
        target_model_type / target_name_or_path / target_revision: what the draft was built or trained for.
        weights_sha256 (`dict`, *optional*): sha256 of each weights file, written by `save_pretrained` and checked by
            `from_pretrained`, so a corrupted or truncated download is refused instead of giving a wrong draft.
    """

    model_type = "longspec_draft"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_parameters: dict | None = None
    attention_bias: bool = True
    mlp_bias: bool = False
    initializer_range: float = 0.02
    sink_size: int = 4
    window_size: int = 512
    target_model_type: str | None = None
    target_name_or_path: str | None = None
    target_revision: str | None = None
    weights_sha256: dict | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    @classmethod
    def from_target_config(cls, target_config: PreTrainedConfig, **kwargs) -> LongSpecDraftConfig:
        """Derive a draft config from any decoder-only target config (GQA, RoPE and rope scaling inherited)."""
        text = target_config.get_text_config(decoder=True)
        num_heads = text.num_attention_heads
        values = dict(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
            num_attention_heads=num_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // num_heads,
            hidden_act=getattr(text, "hidden_act", None) or getattr(text, "hidden_activation", None) or "silu",
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            max_position_embeddings=getattr(text, "max_position_embeddings", 4096),
            rope_parameters=dict(text.rope_parameters) if getattr(text, "rope_parameters", None) else None,
            target_model_type=text.model_type,
            target_name_or_path=getattr(target_config, "_name_or_path", None) or None,
            target_revision=getattr(target_config, "_commit_hash", None),
            torch_dtype=None,
        )
        values.pop("torch_dtype")
        values.update(kwargs)
        return cls(**values)
