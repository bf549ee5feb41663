"""Model cards for drafts, rendered from the templates in ``hub_cards/`` with `huggingface_hub.ModelCard`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .tree import tree_setting_text

DRAFT_TEMPLATE = "longspec_draft.md"
# What the usage snippet names when the repository is not known yet; `longspec push` replaces it.
REPO_PLACEHOLDER = "<this repo>"


def template_path(name: str = DRAFT_TEMPLATE) -> Path:
    """The card template, from the installed package or, in a source checkout, from the repository's hub_cards/."""
    packaged = resources.files("longspec_hf").joinpath("hub_cards", name)
    if packaged.is_file():
        return Path(str(packaged))
    source = Path(__file__).resolve().parents[2] / "hub_cards" / name
    if source.is_file():
        return source
    raise FileNotFoundError(f"Card template {name} not found; reinstall longspec-hf.")


def draft_card(
    draft,
    base_model: str | None = None,
    repo_id: str | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    training_recipe: str | None = None,
    results_table: str | None = None,
) -> ModelCard:
    """A model card for `draft` (metadata for the Hub plus usage, settings, recipe and results)."""
    config = draft.config
    base_model = base_model or config.target_name_or_path
    data = ModelCardData(
        library_name="longspec-hf",
        base_model=base_model,
        license=license,
        datasets=datasets,
        pipeline_tag="text-generation",
        tags=["longspec", "speculative-decoding", "draft-model", "long-context"],
    )
    return ModelCard.from_template(
        data,
        template_path=str(template_path()),
        model_name=f"LongSpec draft for {base_model}" if base_model else "LongSpec draft",
        base_model=base_model,
        repo_id=repo_id or REPO_PLACEHOLDER,
        sink_size=config.sink_size,
        window_size=config.window_size,
        tree_shape=tree_setting_text(getattr(draft.generation_config, "tree_shape", None)),
        prompt_lookup=getattr(draft.generation_config, "prompt_lookup_num_tokens", None) or "none",
        draft_vocab=(f"{config.draft_vocab_size:,} most frequent of {config.vocab_size:,}"
                     if getattr(config, "draft_vocab_size", None) else f"all {config.vocab_size:,}"),
        training_recipe=training_recipe,
        results_table=results_table,
    )
