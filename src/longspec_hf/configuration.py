"""Configuration of the LongSpec draft: the target's attention geometry plus the draft's own cache settings."""

from __future__ import annotations

from transformers import PreTrainedConfig

# The target attributes a draft must agree with to be able to share its embeddings, LM head and KV cache.
BINDING_ATTRIBUTES = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
# Which committed tokens the draft's self-attention sees (see LongSpecDraftConfig). A draft must be run with the rule
# it was trained with: the attention pattern is part of what it learned.
WINDOW_RULES = ("sink_window", "official")
# A draft reads and writes its target's token ids (shared embeddings and LM head): its config carries the target's
# special tokens, which is how transformers' pipelines tell that an assistant needs no tokenizer of its own.
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


class last_layer_view:  # noqa: N801 - reads like the config it wraps
    """A target text config read as its last layer sees it: per-layer attributes (configs whose layers differ in
    shape refuse global reads of them) come from the last layer's config, every other attribute from the config."""

    def __init__(self, config):
        self._config = config
        layers = getattr(config, "per_layer_config", None) if _has_per_layer(config) else None
        self._last = layers[-1] if layers else None

    def __getattr__(self, name):
        try:
            return getattr(self._config, name)
        except Exception:  # noqa: BLE001 - a per-layer attribute refusing a global read
            if self._last is None:
                raise
            return getattr(self._last, name)


def last_of(value):
    """A per-layer list's last entry (Gemma 3n lists its MLP widths per layer), or the value itself."""
    return value[-1] if isinstance(value, list | tuple) and value else value


def _has_per_layer(config) -> bool:
    try:
        return bool(getattr(config, "per_layer_config", None))
    except Exception:  # noqa: BLE001
        return False


class LongSpecDraftConfig(PreTrainedConfig):
    r"""Configuration of a [`LongSpecDraftModel`].

    The draft is one GliDe-style decoder layer, so most fields mirror the target's config (use
    [`LongSpecDraftConfig.from_target_config`]); `sink_size`, `window_size` and `window_rule` say what the draft's
    self-attention sees, which also sizes its constant cache.

    A token's *path* is the committed tokens before it followed by its tree ancestors and itself (in training: the
    sequence up to it). Tree nodes always see their ancestors; the rules differ in how far back they look:

    * ``"sink_window"`` (this project's drafts, and what ``longspec train`` trains): a token sees the first
      `sink_size` tokens and the last `window_size` tokens of its path, itself included. A node at depth `d` of a tree
      (the root is depth 0) thus sees the sinks and the newest `window_size - 1 - d` committed tokens.
    * ``"official"`` (LongSpec's released drafts; set when an official checkpoint is converted): a token sees the
      `window_size` tokens before it on its path and itself (the official trainer's and chain decoder's
      flash-attention window `(window_size, -1)`) — this applies to the root and to every node of a chain (a tree
      whose levels all have width 1). In a wider tree, the official tree decoder windows the committed tokens per
      level instead, aligned to the level's end: row `i` (0-based) of a level of `m` nodes at depth >= 1 sees the
      newest `window_size + m - i` committed tokens plus all its ancestors. The sinks (none in official drafts) are
      seen as well. The draft's cache keeps the `max(m)` extra committed tokens this needs.

    Args:
        vocab_size, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
        hidden_act, rms_norm_eps, max_position_embeddings, rope_parameters:
            Copied from the target (the draft's queries must be rotated exactly like the target's keys).
        attention_bias (`bool`, defaults to `True`): bias on q/k/v projections, as in the official checkpoints.
        sink_size (`int`, defaults to 4): first tokens always seen (and kept in the draft's self-attention cache).
        window_size (`int`, defaults to 512): the sliding window of the draft's self-attention (see `window_rule`);
            its cache keeps the sinks and the last `window_size` committed tokens (a few more under "official" trees).
        window_rule (`str`, defaults to "sink_window"): "sink_window" or "official", as above. Training and inference
            apply the same rule; drafts saved before this setting existed were trained with "sink_window".
        target_model_type / target_name_or_path / target_revision: what the draft was built or trained for.
        bos_token_id / eos_token_id / pad_token_id: the target's special tokens (the draft has no tokenizer of its
            own); copied from the target's config by `from_target_config` and filled in when the draft is bound.
        draft_vocab_size (`int`, *optional*): the draft scores only this many tokens — the target's most frequent
            outputs, whose ids the draft saves as its `draft_vocab` buffer — instead of the whole vocabulary: the LM
            head is most of a draft step's work. Verification still runs over the whole vocabulary, so the output
            is unchanged; a token outside the subset is never drafted. `None`: the whole vocabulary.
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
    window_rule: str = "sink_window"
    target_model_type: str | None = None
    target_name_or_path: str | None = None
    target_revision: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    weights_sha256: dict | None = None
    draft_vocab_size: int | None = None

    def __post_init__(self, **kwargs):
        if self.window_rule not in WINDOW_RULES:
            rules = ", ".join(map(repr, WINDOW_RULES))
            raise ValueError(f"window_rule must be one of {rules}; got {self.window_rule!r}.")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size must be between 1 and vocab_size ({self.vocab_size}); got "
                             f"{self.draft_vocab_size} (None scores the whole vocabulary).")
        super().__post_init__(**kwargs)

    @classmethod
    def from_target_config(cls, target_config: PreTrainedConfig, **kwargs) -> LongSpecDraftConfig:
        """Derive a draft config from any decoder-only target config (GQA, RoPE and rope scaling inherited). Where
        layers differ in shape (per-layer configs, e.g. Gemma 4), the last layer's, whose KV the draft reads."""
        text = last_layer_view(target_config.get_text_config(decoder=True))
        num_heads = text.num_attention_heads
        values = dict(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=last_of(getattr(text, "intermediate_size", None)) or 4 * text.hidden_size,
            num_attention_heads=num_heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // num_heads,
            hidden_act=getattr(text, "hidden_act", None) or getattr(text, "hidden_activation", None) or "silu",
            rms_norm_eps=getattr(text, "rms_norm_eps", None) or getattr(text, "layer_norm_eps", None) or 1e-6,
            max_position_embeddings=getattr(text, "max_position_embeddings", 4096),
            rope_parameters=dict(text.rope_parameters) if getattr(text, "rope_parameters", None) else None,
            target_model_type=text.model_type,
            target_name_or_path=getattr(target_config, "_name_or_path", None) or None,
            target_revision=getattr(target_config, "_commit_hash", None),
            **special_tokens(text),
            torch_dtype=None,
        )
        values.pop("torch_dtype")
        values.update(kwargs)
        return cls(**values)


def special_tokens(text_config: PreTrainedConfig) -> dict:
    """`{name: id}` of the special tokens a target's text config sets (the unset ones are left out)."""
    values = {name: getattr(text_config, name, None) for name in SPECIAL_TOKENS}
    return {name: value for name, value in values.items() if value is not None}
