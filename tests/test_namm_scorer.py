"""The C++ NAMM scorer (ggml graph) against the PyTorch reference, per weight type."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from pymemory import InvalidArgumentError, ModelLoadError, ModelNotFoundError  # noqa: E402
from pymemory._loader import _core  # noqa: E402
from pymemory.namm import NammModel, NammReference, load_checkpoint  # noqa: E402
from pymemory.namm.convert import write_gguf  # noqa: E402
from pymemory.namm.testing import random_causal_attention, write_random_checkpoint  # noqa: E402

SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{seed: (reference from ckpt.pt, {type: C++ model})} for random evo-memory checkpoints."""
    out = {}
    for seed in SEEDS:
        d = tmp_path_factory.mktemp(f"namm{seed}")
        write_random_checkpoint(d / "ckpt.pt", seed=seed)
        params = load_checkpoint(d / "ckpt.pt", trust_pickle=True)
        models = {t: NammModel(write_gguf(params, d / f"{t}.gguf", t)["output"]) for t in ("f32", "f16", "q8_0", "q4_0")}
        out[seed] = (NammReference.from_checkpoint(d / "ckpt.pt", trust_pickle=True), models)
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_f32_scorer_equals_reference_over_consecutive_invocations(converted, seed):
    reference, models = converted[seed]
    heads = 2 + seed  # 3..5 KV heads
    rng = np.random.default_rng(seed)
    ref_state, cpp_state = reference.new_state(heads), models["f32"].new_state(heads)
    evicted = 0
    for invocation in range(5):
        attn = random_causal_attention(rng, heads, ref_state.n_tokens)
        new_pos = np.arange(invocation * 512, (invocation + 1) * 512) + 3 * invocation  # gaps are allowed
        ref_keep, ref_scores = reference.step(ref_state, attn, new_pos)
        cpp_keep, cpp_scores = models["f32"].step(cpp_state, attn, new_pos)
        assert np.max(np.abs(ref_scores - cpp_scores)) <= 1e-4
        np.testing.assert_array_equal(ref_keep, cpp_keep)
        np.testing.assert_array_equal(cpp_state.positions, ref_state.positions)
        np.testing.assert_allclose(cpp_state.ema, ref_state.ema, rtol=1e-4, atol=1e-8)
        evicted += attn.shape[2] - ref_keep.shape[1]
    assert evicted > 0  # the random policy really evicts (and keeps) tokens


def keep_agreement(reference, model, rng, heads=4, invocations=5):
    """Fraction of (head, token) keep decisions equal to the reference's, on the reference's own inputs."""
    state = reference.new_state(heads)
    same = total = 0
    for invocation in range(invocations):
        attn = random_causal_attention(rng, heads, state.n_tokens)
        new_pos = np.arange(invocation * 512, (invocation + 1) * 512)
        X, ema, _, positions = reference.features(state, attn, new_pos)
        ref_mask = np.zeros(positions.shape, bool)
        np.put_along_axis(ref_mask, reference.select(reference.scores_from_features(X)), True, 1)
        _, cpp_mask, _, _ = model.score(positions, ema)
        same += np.count_nonzero(cpp_mask.astype(bool) == ref_mask)
        total += ref_mask.size
        reference.step(state, attn, new_pos)
    return same / total


@pytest.mark.parametrize("weight_type, floor", [("f16", 0.99), ("q8_0", 0.99), ("q4_0", 0.95)])
def test_quantised_scorers_agree_with_the_reference(converted, weight_type, floor):
    agreements = [keep_agreement(converted[s][0], converted[s][1][weight_type], np.random.default_rng(s)) for s in SEEDS]
    print(f"{weight_type}: keep-decision agreement {[round(a, 4) for a in agreements]}")
    # q4_0 keeps 4 bits per weight; its floor only guards against a broken dequantisation (measured >= 0.991).
    assert min(agreements) >= floor


def test_features_match_the_reference(converted):
    reference, models = converted[1]
    rng = np.random.default_rng(4)
    state = reference.new_state(2)
    X, ema, _, positions = reference.features(state, random_causal_attention(rng, 2, 0), np.arange(512))
    np.testing.assert_allclose(models["f32"].features(positions, ema), X.numpy(), rtol=1e-5, atol=1e-5)


def test_selection_rule_is_shared(converted):
    reference, _ = converted[1]
    scores = np.random.default_rng(5).normal(size=(3, 50)).astype(np.float32)
    scores[:, 10] = scores[:, 11]  # a tie
    mask, k = _core.namm_select(scores, 0.0)
    expected = np.zeros(scores.shape, bool)
    np.put_along_axis(expected, reference.select(scores), True, 1)
    np.testing.assert_array_equal(mask.astype(bool), expected)
    assert k == expected.sum(1)[0]


def test_large_cache_runs_in_blocks(converted):
    """32K tokens per head must fit (queries are processed in blocks; memory O(n·block))."""
    _, models = converted[2]
    n = 32768
    rng = np.random.default_rng(6)
    positions = np.arange(n, dtype=np.int32)[None]
    ema = rng.uniform(0.0, 0.03, (1, n, 17)).astype(np.float32)
    scores, mask, k, timings = models["q8_0"].score(positions, ema)
    assert scores.shape == (1, n) and np.isfinite(scores).all() and mask[0, -1] == 1 and 1 <= k <= n


def test_bad_inputs_and_files(converted, tmp_path):
    _, models = converted[1]
    model = models["f32"]
    state = model.new_state(2)
    with pytest.raises(InvalidArgumentError, match="columns"):
        model.step(state, np.zeros((2, 512, 500), np.float32), np.arange(512))
    with pytest.raises(InvalidArgumentError, match="n_kv_heads=2"):
        model.step(state, np.zeros((3, 512, 512), np.float32), np.arange(512))
    with pytest.raises(InvalidArgumentError, match="NaN"):
        model.step(state, np.full((2, 512, 512), np.nan, np.float32), np.arange(512))
    with pytest.raises(InvalidArgumentError, match="increase"):
        model.step(state, np.zeros((2, 512, 512), np.float32), np.zeros(512, int))
    with pytest.raises(TypeError, match="float32"):
        model.step(state, np.zeros((2, 512, 512)), np.arange(512))
    assert state.n_tokens == 0  # rejected calls change nothing

    with pytest.raises(ModelNotFoundError):
        NammModel(tmp_path / "missing.gguf")
    text = tmp_path / "x.gguf"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="no GGUF magic"):
        NammModel(text)
    import gguf

    def write(name, arch="namm", drop=None, reshape=None):
        path = tmp_path / name
        w = gguf.GGUFWriter(str(path), arch)
        w.add_uint32("namm.format_version", 1)
        w.add_tensor("namm.attn_qkv.bias", np.zeros(96 if reshape is None else reshape, np.float32))
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        return path

    with pytest.raises(ModelLoadError, match="general.architecture is 'llama'"):
        NammModel(write("llama.gguf", arch="llama"))
    with pytest.raises(ModelLoadError, match="missing key 'namm.delay'"):
        NammModel(write("nokeys.gguf"))


def test_missing_or_misshaped_tensors_are_refused(converted, tmp_path):
    import gguf

    source = converted[1][1]["f32"].path

    def copy(name, *, drop=None, replace=None):
        reader = gguf.GGUFReader(source)
        path = tmp_path / name
        writer = gguf.GGUFWriter(str(path), "namm")
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            kind = field.types[0]
            if kind == gguf.GGUFValueType.STRING:
                writer.add_string(key, str(bytes(field.parts[-1]), "utf-8"))
            else:
                writer.add_key_value(key, field.parts[-1].tolist()[0], kind)
        for tensor in reader.tensors:
            if tensor.name == drop:
                continue
            data = replace if tensor.name == (replace is not None and "namm.attn_out.bias") else tensor.data
            writer.add_tensor(tensor.name, np.array(data, np.float32))
        writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
        return path

    with pytest.raises(ModelLoadError, match="missing tensor 'namm.out.weight'"):
        NammModel(copy("drop.gguf", drop="namm.out.weight"))
    with pytest.raises(ModelLoadError, match="'namm.attn_out.bias' has shape"):
        NammModel(copy("shape.gguf", replace=np.zeros(49, np.float32)))
