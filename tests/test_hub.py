"""Drafts on the Hub, offline: save/load, integrity, official checkpoints, push (API boundary), custom_generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import random_prompt, tiny_target
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from safetensors.torch import save_file
from transformers import AutoModel

from longspec_hf import LongSpecDraftModel
from longspec_hf.checkpoints import CorruptCheckpointError
from longspec_hf.cli import main as cli

CORE_MODULES = {"acceptance", "attention", "auto_tree", "cache", "cards", "checkpoints", "compat", "compiled",
                "configuration", "cost_model", "drafting", "generation", "hook", "hub", "lookup", "modeling", "probe",
                "rounds", "specpv", "support", "timing", "tree", "verify", "vocabulary"}


def trained_like_draft(family: str, seed: int = 1, **kwargs) -> LongSpecDraftModel:
    """A draft with non-trivial weights (biases and norms too), so a wrong conversion cannot go unnoticed."""
    target = tiny_target(family)
    draft = LongSpecDraftModel.from_target(target, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return draft


def draft_logits(draft: LongSpecDraftModel, n: int = 12) -> torch.Tensor:
    ids, pos = random_prompt(n), torch.arange(n)[None]
    kv = torch.randn(1, 2, n, 16, generator=torch.Generator().manual_seed(0))
    return draft(ids, pos, kv, kv.flip(-1))


# ---------------------------------------------------------------------------------------------------------------------
# save / load


def test_save_writes_digest_card_and_round_trips(tmp_path):
    draft = trained_like_draft("llama", window_size=16)
    draft.generation_config.tree_shape = [2, 2]
    draft.save_pretrained(tmp_path)
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= {
        p.name for p in tmp_path.iterdir()}
    assert not list(tmp_path.glob("*.bin"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["weights_sha256"]) == {"model.safetensors"}
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "longspec-hf" and "speculative-decoding" in card.data.tags

    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, LongSpecDraftModel)
    assert loaded.generation_config.tree_shape == [2, 2] and loaded.config.window_size == 16
    loaded.bind(tiny_target("llama"))
    torch.testing.assert_close(draft_logits(draft), draft_logits(loaded), rtol=0, atol=0)


def test_from_pretrained_accepts_dtype_device_map_and_revision(tmp_path):
    draft = trained_like_draft("qwen3")
    draft.save_pretrained(tmp_path)
    loaded = LongSpecDraftModel.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu", revision="main")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}


def test_save_keeps_an_existing_card_unless_given_one(tmp_path):
    draft = trained_like_draft("llama")
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# my notes\n")
    draft.save_pretrained(tmp_path)
    assert "# my notes" in (tmp_path / "README.md").read_text()
    draft.save_pretrained(tmp_path, model_card=ModelCard("---\nlicense: mit\n---\n# replaced\n"))
    assert "# replaced" in (tmp_path / "README.md").read_text()


def test_offline_load_from_a_populated_hub_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with the files in the Hugging Face cache: loads by repo id without any request."""
    import huggingface_hub.constants

    draft = trained_like_draft("mistral")
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--org--tiny-draft"
    draft.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = LongSpecDraftModel.from_pretrained("org/tiny-draft", cache_dir=tmp_path / "hub")
    loaded.bind(tiny_target("mistral"))
    torch.testing.assert_close(draft_logits(draft), draft_logits(loaded), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# integrity: never a silently wrong draft


def test_truncated_weights_are_refused(tmp_path):
    trained_like_draft("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CorruptCheckpointError, match="re-save it with save_pretrained") as err:
        LongSpecDraftModel.from_pretrained(tmp_path)
    assert "force_download" not in str(err.value)  # a local folder has nothing to download again


def test_a_corrupted_hub_download_names_force_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--org--tiny-draft"
    trained_like_draft("llama").save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    weights = repo / "snapshots" / commit / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CorruptCheckpointError, match="force_download=True"):
        LongSpecDraftModel.from_pretrained("org/tiny-draft", cache_dir=tmp_path / "hub")


def test_flipped_bytes_are_refused_by_the_recorded_digest(tmp_path):
    trained_like_draft("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # inside a tensor: the file still parses, the numbers are wrong
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="digest"):
        LongSpecDraftModel.from_pretrained(tmp_path)


def test_truncated_weights_without_a_digest_are_refused(tmp_path):
    trained_like_draft("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["weights_sha256"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupted"):
        LongSpecDraftModel.from_pretrained(tmp_path)


def test_pickle_checkpoints_are_never_read(tmp_path):
    draft = trained_like_draft("llama")
    draft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["weights_sha256"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    torch.save(draft.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors only"):
        LongSpecDraftModel.from_pretrained(tmp_path)


def test_binding_to_a_target_with_other_rope_settings_is_refused():
    draft = trained_like_draft("llama")
    draft.config.rope_parameters = {**draft.config.rope_parameters, "rope_theta": 123.0}
    with pytest.raises(ValueError, match="rope_theta.*different target|different target.*rope_theta"):
        draft.bind(tiny_target("qwen2"))


# ---------------------------------------------------------------------------------------------------------------------
# official LongSpec checkpoints (target-style config, bare module names)


def write_official_checkpoint(folder: Path, draft: LongSpecDraftModel, family: str, prefix: str = "",
                              v4_rope: bool = False, weights_file: str = "model.safetensors") -> None:
    """The official layout: the target's own config.json and one weights file of the draft layer's tensors
    (model.safetensors, or the official trainer's pickled `pytorch_model.bin` / `*.pth`)."""
    target = tiny_target(family)
    target.config.save_pretrained(folder)
    if v4_rope:  # configs written by transformers 4.x carry rope_theta at the top level
        config = json.loads((folder / "config.json").read_text())
        config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
        (folder / "config.json").write_text(json.dumps(config))
    weights = {prefix + k: v.contiguous() for k, v in draft.state_dict().items()}
    if weights_file.endswith(".safetensors"):
        save_file(weights, str(folder / weights_file))
    else:
        torch.save(weights, folder / weights_file)


class RunsCode:
    """Unpickling this object calls `open(marker, "w")`: a stand-in for a pickle that runs arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("family,prefix,v4_rope", [("llama", "", True), ("qwen2", "glide.", False)])
def test_official_checkpoint_loads_with_identical_outputs(tmp_path, family, prefix, v4_rope):
    draft = trained_like_draft(family)
    write_official_checkpoint(tmp_path / "official", draft, family, prefix, v4_rope)
    loaded = LongSpecDraftModel.from_pretrained(tmp_path / "official")
    assert loaded.config.target_model_type == family
    assert (loaded.config.sink_size, loaded.config.window_size) == (0, 512)
    assert loaded.config.rope_parameters["rope_theta"] == draft.config.rope_parameters["rope_theta"]
    target = tiny_target(family)
    loaded.bind(target)
    torch.testing.assert_close(draft_logits(draft), draft_logits(loaded), rtol=0, atol=0)

    # and the converted draft decodes losslessly like any other
    loaded.generation_config.tree_shape = [2, 2, 2]
    ids = random_prompt(40)
    plain = target.generate(ids, do_sample=False, max_new_tokens=16)
    spec = target.generate(ids, assistant_model=loaded, do_sample=False, max_new_tokens=16)
    assert spec.tolist() == plain.tolist()


@pytest.mark.parametrize("weights_file,nested", [("pytorch_model.bin", False), ("draft.pth", False),
                                                 ("draft.pth", True)])
def test_official_pytorch_checkpoint_loads_like_its_safetensors_twin(tmp_path, weights_file, nested):
    """The official trainer's pickled weights load, tensors only, to exactly the draft the safetensors twin gives."""
    draft = trained_like_draft("llama")
    write_official_checkpoint(tmp_path / "safetensors", draft, "llama")
    write_official_checkpoint(tmp_path / "pytorch", draft, "llama", weights_file=weights_file)
    if nested:  # training scripts often save {"state_dict": ..., "step": ...}
        weights = torch.load(tmp_path / "pytorch" / weights_file, weights_only=True)
        torch.save({"state_dict": weights, "step": 1000}, tmp_path / "pytorch" / weights_file)
    twin = LongSpecDraftModel.from_pretrained(tmp_path / "safetensors")
    loaded = LongSpecDraftModel.from_pretrained(tmp_path / "pytorch")
    assert loaded.config.to_dict() | {"_name_or_path": None} == twin.config.to_dict() | {"_name_or_path": None}
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in loaded.state_dict().items())
    loaded.bind(tiny_target("llama"))
    torch.testing.assert_close(draft_logits(draft), draft_logits(loaded), rtol=0, atol=0)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    draft = trained_like_draft("llama")
    write_official_checkpoint(tmp_path / "official", draft, "llama", weights_file="pytorch_model.bin")
    weights = {k: v.contiguous() for k, v in draft.state_dict().items()}
    torch.save({**weights, "extra": RunsCode(marker)}, tmp_path / "official" / "pytorch_model.bin")
    convert = LongSpecDraftModel.convert_official
    for load in (LongSpecDraftModel.from_pretrained, lambda path: convert(path, tmp_path / "out")):
        with pytest.raises(ValueError) as err:
            load(tmp_path / "official")
        message = str(err.value)
        assert "\n" not in message and "could run code" in message and "`longspec convert`" in message
        assert not marker.exists()
    torch.load(tmp_path / "official" / "pytorch_model.bin", weights_only=False)  # the payload is live: it runs
    assert marker.exists()


def test_safetensors_is_preferred_and_the_pickle_beside_it_is_never_opened(tmp_path):
    marker = tmp_path / "code-ran"
    draft = trained_like_draft("llama")
    write_official_checkpoint(tmp_path, draft, "llama")
    torch.save({"payload": RunsCode(marker)}, tmp_path / "pytorch_model.bin")
    torch.save({"payload": RunsCode(marker)}, tmp_path / "draft.pth")
    loaded = LongSpecDraftModel.from_pretrained(tmp_path)
    loaded.bind(tiny_target("llama"))
    torch.testing.assert_close(draft_logits(draft), draft_logits(loaded), rtol=0, atol=0)
    assert not marker.exists()


def test_a_truncated_pytorch_checkpoint_is_refused(tmp_path):
    write_official_checkpoint(tmp_path, trained_like_draft("llama"), "llama", weights_file="pytorch_model.bin")
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CorruptCheckpointError, match="truncated or corrupted"):
        LongSpecDraftModel.from_pretrained(tmp_path)


def test_longspec_convert_writes_this_layout(tmp_path, capsys):
    draft = trained_like_draft("llama")
    write_official_checkpoint(tmp_path / "official", draft, "llama")
    cli(["convert", str(tmp_path / "official"), str(tmp_path / "converted")])
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["model_type"] == "longspec_draft" and "weights_sha256" in config
    converted = AutoModel.from_pretrained(tmp_path / "converted")
    converted.bind(tiny_target("llama"))
    torch.testing.assert_close(draft_logits(draft), draft_logits(converted), rtol=0, atol=0)
    with pytest.raises(SystemExit, match="--overwrite"):
        cli(["convert", str(tmp_path / "official"), str(tmp_path / "converted")])


def test_official_checkpoint_with_foreign_tensors_is_refused(tmp_path):
    draft = trained_like_draft("llama")
    write_official_checkpoint(tmp_path, draft, "llama")
    weights = {k: v.contiguous() for k, v in draft.state_dict().items() if not k.startswith("mlp.")}
    weights["lm_head.weight"] = torch.zeros(4, 4)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*mlp.*unexpected.*lm_head"):
        LongSpecDraftModel.convert_official(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------------
# push (the network calls replaced at the huggingface_hub API boundary)


@pytest.fixture
def fake_hub(monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls["create_commit"] = {"repo_id": repo_id, **kwargs}
        calls["files"] = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/1", commit_message="",
                          commit_description="", oid="1", pr_url=None)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def card_metadata(readme: bytes) -> dict:
    return yaml.safe_load(readme.decode().split("---")[1])


def test_push_to_hub_uploads_the_expected_files_and_card(fake_hub):
    draft = trained_like_draft("llama")
    draft.config.target_name_or_path = "org/tiny-llama"
    draft.push_to_hub("org/tiny-llama-longspec", private=True, tags=["extra-tag"])
    assert fake_hub["create_repo"]["repo_id"] == "org/tiny-llama-longspec" and fake_hub["create_repo"]["private"]
    files = fake_hub["files"]
    assert set(files) == {"README.md", "config.json", "generation_config.json", "model.safetensors",
                          "custom_generate/generate.py", "custom_generate/requirements.txt",
                          "custom_generate/draft_source.py"} | {f"custom_generate/{m}.py" for m in CORE_MODULES}
    meta = card_metadata(files["README.md"])
    assert meta["library_name"] == "longspec-hf" and meta["base_model"] == "org/tiny-llama"
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] == "apache-2.0"
    assert {"longspec", "speculative-decoding", "extra-tag"} <= set(meta["tags"])
    readme = files["README.md"].decode()
    assert 'LongSpecDraftModel.from_pretrained("org/tiny-llama-longspec")' in readme
    assert 'custom_generate="org/tiny-llama-longspec"' in readme
    assert b"DRAFT_REPO = 'org/tiny-llama-longspec'" in files["custom_generate/draft_source.py"]


def test_longspec_push_uses_the_folder_card(tmp_path, fake_hub):
    draft = trained_like_draft("llama")
    draft.save_pretrained(tmp_path)  # card rendered without a repo id yet
    assert "<this repo>" in (tmp_path / "README.md").read_text()
    cli(["push", str(tmp_path), "org/pushed", "--no-custom-generate", "--commit-message", "first"])
    assert fake_hub["create_commit"]["commit_message"] == "first"
    assert set(fake_hub["files"]) == {"README.md", "config.json", "generation_config.json", "model.safetensors"}
    readme = fake_hub["files"]["README.md"].decode()
    assert "<this repo>" not in readme and 'from_pretrained("org/pushed")' in readme


# ---------------------------------------------------------------------------------------------------------------------
# plain transformers: custom_generate/ without longspec-hf


@pytest.mark.parametrize("tree_shape", [[2, 2, 2], "auto"])
def test_custom_generate_folder_matches_assistant_model_without_the_package(tmp_path, tree_shape):
    """A fresh interpreter that never imports longspec_hf runs target.generate(custom_generate=<folder>) and gets the
    same tokens as generate(assistant_model=draft), through the speculative loop (the draft's stats prove it ran)."""
    from longspec_hf.hub import write_custom_generate

    target = tiny_target("qwen2")
    draft = trained_like_draft("qwen2", window_size=16)
    draft.generation_config.tree_shape = tree_shape
    target.save_pretrained(tmp_path / "target")
    draft.save_pretrained(tmp_path / "draft")
    write_custom_generate(tmp_path / "draft" / "custom_generate", str(tmp_path / "draft"))
    ids = random_prompt(30)
    expected = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=20)
    assert expected.tolist() == target.generate(ids, do_sample=False, max_new_tokens=20).tolist()

    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        target = AutoModelForCausalLM.from_pretrained({str(tmp_path / "target")!r})
        ids = torch.tensor({ids.tolist()})
        out = target.generate(ids, custom_generate={str(tmp_path / "draft")!r}, trust_remote_code=True,
                              do_sample=False, max_new_tokens=20)
        entry = next(m for name, m in sys.modules.items() if name.endswith("custom_generate.generate"))
        (draft,) = entry._DRAFTS.values()
        print(json.dumps({{"tokens": out.tolist(), "package_imported": "longspec_hf" in sys.modules,
                          "rounds": draft.stats.rounds}}))
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tokens"] == expected.tolist()
    assert not result["package_imported"] and 0 < result["rounds"] < 20


def test_the_shipped_smollm2_draft_loads_verified_with_its_card():
    folder = Path(__file__).resolve().parents[1] / "drafts" / "smollm2-135m-instruct"
    draft = LongSpecDraftModel.from_pretrained(folder)  # digest checked against config.json
    config = draft.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (576, 9, 3)
    assert config.target_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct" and config.weights_sha256
    assert draft.generation_config.tree_shape == "auto"
    meta = ModelCard.load(folder / "README.md").data
    assert meta.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta.library_name == "longspec-hf"
