"""The C++ NAMM scorer (cpp/namm/, ggml graphs) against the PyTorch reference.

Every test builds evo-memory-format checkpoints with random parameters (pymemory.namm.testing), converts them with
the converter and drives both implementations with the same random causal attention: checkpoint -> GGUF -> C++
must give the checkpoint's reference scores and decisions. Also: quantised weights, the streaming form, long caches,
and clear errors for bad inputs and bad files. No downloads.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from helpers.measurements import record

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from pymemory import InvalidArgumentError, ModelLoadError, ModelNotFoundError  # noqa: E402
from pymemory.namm import NammModel, NammReference, load_checkpoint, write_gguf  # noqa: E402
from pymemory.namm.reference import ema_streaming_update  # noqa: E402
from pymemory.namm.testing import random_causal_attention, write_random_checkpoint  # noqa: E402

SEEDS = (1, 2, 3)
WEIGHT_TYPES = ("f32", "f16", "q8_0", "q4_0")
DELAY = 512


class Policy(NamedTuple):
    reference: NammReference  # from ckpt.pt
    models: dict[str, NammModel]  # weight type -> C++ scorer of the converted GGUF


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> dict[int, Policy]:
    out = {}
    for seed in SEEDS:
        directory = tmp_path_factory.mktemp(f"namm{seed}")
        write_random_checkpoint(directory / "ckpt.pt", seed=seed)
        vector = load_checkpoint(directory / "ckpt.pt", trust_pickle=True)
        models = {t: NammModel(write_gguf(vector, directory / f"{t}.gguf", t)["output"], n_threads=1)
                  for t in WEIGHT_TYPES}
        out[seed] = Policy(NammReference.from_checkpoint(directory / "ckpt.pt", trust_pickle=True), models)
    return out


def keep_mask(keep: np.ndarray, n_tokens: int) -> np.ndarray:
    """keep int [H, K] -> bool [H, n]."""
    mask = np.zeros((keep.shape[0], n_tokens), bool)
    np.put_along_axis(mask, keep, True, axis=1)
    return mask


def invocation_inputs(rng, n_kv_heads: int, n_old: int, invocation: int, gap: int = 0):
    """(attn float32 [H, 512, n_old + 512], new_pos int64 [512]) of invocation i; `gap` unused positions between
    invocations, as tokens removed by another policy would leave."""
    start = invocation * (DELAY + gap)
    return random_causal_attention(rng, n_kv_heads, n_old, DELAY), np.arange(start, start + DELAY)


# ---- f32: the round trip checkpoint -> GGUF -> C++ equals checkpoint -> reference ------------------------------

@pytest.mark.parametrize("seed, n_kv_heads", [(1, 2), (2, 5), (3, 8)])
def test_f32_gguf_in_cpp_equals_the_checkpoint_in_the_reference(policies, seed, n_kv_heads):
    policy = policies[seed]
    model = policy.models["f32"]
    rng = np.random.default_rng(seed)
    ref_state, cpp_state = policy.reference.new_state(n_kv_heads), model.new_state(n_kv_heads)
    evicted, sizes, worst = 0, [], 0.0
    for invocation in range(5):
        attn, new_pos = invocation_inputs(rng, n_kv_heads, ref_state.n_tokens, invocation, gap=3)
        ref_keep, ref_scores = policy.reference.step(ref_state, attn, new_pos)
        cpp_keep, cpp_scores = model.step(cpp_state, attn, new_pos)
        assert cpp_scores.dtype == np.float32 and cpp_keep.dtype == np.int64
        worst = max(worst, float(np.max(np.abs(cpp_scores - ref_scores))))
        assert worst <= 1e-4
        np.testing.assert_array_equal(cpp_keep, ref_keep)
        np.testing.assert_array_equal(cpp_state.positions, ref_state.positions)
        np.testing.assert_array_equal(cpp_state.history, ref_state.history)
        np.testing.assert_allclose(cpp_state.ema, ref_state.ema, rtol=1e-5, atol=1e-9)
        evicted += attn.shape[2] - ref_keep.shape[1]
        sizes.append(attn.shape[2])
    assert evicted > 0 and sizes[-1] > sizes[0]  # the policy evicts, and the cache grows across invocations
    print(f"f32, {n_kv_heads} heads: max |score difference| {worst:.1e} over 5 invocations, retained sets identical")
    record(f"scorer_f32_max_abs_score_diff_{n_kv_heads}_heads", worst,
           f"C++ f32 scorer vs the PyTorch reference, {n_kv_heads} KV heads, 5 invocations: max |score difference| "
           "(retained sets identical)")


def test_intermediate_hooks_match_the_reference(policies):
    policy = policies[2]
    model = policy.models["f32"]
    rng = np.random.default_rng(7)
    ref_state = policy.reference.new_state(3)
    for invocation in range(2):  # the second invocation has old tokens with EMA and history
        attn, new_pos = invocation_inputs(rng, 3, ref_state.n_tokens, invocation)
        cpp_state = model.state_from_arrays(ref_state.positions, ref_state.ema, ref_state.history)
        expected = policy.reference.features(ref_state, attn, new_pos)
        got = model.features(cpp_state, attn, new_pos)
        assert cpp_state.n_tokens == ref_state.n_tokens  # features() leaves the state alone
        np.testing.assert_array_equal(got.positions, expected.positions)
        np.testing.assert_array_equal(got.history, expected.history)
        np.testing.assert_allclose(got.ema, expected.ema, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(got.X, expected.X.numpy(), rtol=1e-5, atol=2e-5)
        ref_scores = policy.reference.scores_from_features(expected.X)
        np.testing.assert_allclose(model.scores_from_features(expected.X.numpy()), ref_scores, atol=1e-5)
        policy.reference.step(ref_state, attn, new_pos)


def test_selection_rule_and_ties_match_the_reference(policies):
    policy = policies[1]
    model = policy.models["f32"]
    # Head 1 has the fewest negative scores (2), so every head keeps K = 6 - 2 = 4 tokens. Head 0 then needs one of
    # its two tied -0.2 tokens: the newer one (index 2) wins. The newest token is kept whatever its score.
    scores = np.array([[0.5, -0.2, -0.2, 0.3, -0.9, -3.0],
                       [0.5, -0.4, -0.2, 0.3, 0.1, 0.0]], np.float32)
    np.testing.assert_array_equal(model.select(scores), [[0, 2, 3, 5], [0, 3, 4, 5]])
    np.testing.assert_array_equal(policy.reference.select(scores), [[0, 2, 3, 5], [0, 3, 4, 5]])
    random_scores = np.random.default_rng(5).normal(size=(3, 60)).astype(np.float32)
    np.testing.assert_array_equal(model.select(random_scores), policy.reference.select(random_scores))
    np.testing.assert_array_equal(model.select(np.ones((2, 9), np.float32)), np.tile(np.arange(9), (2, 1)))


# ---- quantised weights -----------------------------------------------------------------------------------------

class Trajectory(NamedTuple):
    """The reference's consecutive invocations on one seed's random attention: the state before each invocation
    (positions, ema, history) and the tokens it kept."""

    seed: int
    states: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    keeps: list[np.ndarray]


@pytest.fixture(scope="module")
def trajectories(policies) -> dict[int, Trajectory]:
    out = {}
    for seed, policy in policies.items():
        rng, state = np.random.default_rng(seed), policy.reference.new_state(4)
        states, keeps = [], []
        for invocation in range(5):
            states.append((state.positions, state.ema, state.history))
            keeps.append(policy.reference.step(state, *invocation_inputs(rng, 4, state.n_tokens, invocation))[0])
        out[seed] = Trajectory(seed, states, keeps)
    return out


def keep_agreement(trajectory: Trajectory, model: NammModel) -> float:
    """Fraction of (head, token) keep decisions equal to the reference's, each invocation run from the reference's
    state on the same attention (so one flip does not change later inputs)."""
    rng = np.random.default_rng(trajectory.seed)  # replays the attention the reference received
    same = total = 0
    for invocation, (arrays, ref_keep) in enumerate(zip(trajectory.states, trajectory.keeps)):
        state = model.state_from_arrays(*arrays)
        attn, new_pos = invocation_inputs(rng, state.n_heads, state.n_tokens, invocation)
        cpp_keep, _ = model.step(state, attn, new_pos)
        n = attn.shape[2]
        same += np.count_nonzero(keep_mask(cpp_keep, n) == keep_mask(ref_keep, n))
        total += ref_keep.shape[0] * n
    return same / total


def rounded(values: list[float]) -> list[float]:
    return [round(float(v), 5) for v in values]


# The floors docs/namm.md states for the keep decisions (measured on these seeds: f16 1.0, q8_0 >= 0.9996).
DOCUMENTED_AGREEMENT = {"f16": 1.0, "q8_0": 0.998, "q4_0": 0.991}


@pytest.mark.parametrize("weight_type", ["f16", "q8_0"])
def test_f16_and_q8_0_keep_decisions_agree_as_documented(policies, trajectories, weight_type):
    agreements = [keep_agreement(trajectories[s], policies[s].models[weight_type]) for s in SEEDS]
    print(f"{weight_type}: keep-decision agreement with the reference {rounded(agreements)}")
    record(f"scorer_{weight_type}_keep_agreement", rounded(agreements),
           f"{weight_type} GGUF: fraction of keep decisions equal to the reference's, seeds {list(SEEDS)}")
    assert min(agreements) >= DOCUMENTED_AGREEMENT[weight_type]


def test_q4_0_agreement_is_reported_and_far_above_an_unrelated_policy(policies, trajectories):
    """q4_0 keeps 4 bits per weight, so decisions near score 0 flip (measured: 99.2-99.97 %); docs/namm.md states
    >= 99.1 %. A broken q4_0 path (wrong scales or nibble order) behaves like an unrelated network: that is the
    baseline measured here with another seed's weights (36-68 %)."""
    q4 = [keep_agreement(trajectories[s], policies[s].models["q4_0"]) for s in SEEDS]
    unrelated = [keep_agreement(trajectories[s], policies[SEEDS[(i + 1) % 3]].models["f32"])
                 for i, s in enumerate(SEEDS)]
    print(f"q4_0: keep-decision agreement {rounded(q4)}; an unrelated policy: {rounded(unrelated)}")
    record("scorer_q4_0_keep_agreement", rounded(q4),
           f"q4_0 GGUF: fraction of keep decisions equal to the reference's, seeds {list(SEEDS)}")
    record("scorer_unrelated_keep_agreement", rounded(unrelated),
           "another seed's f32 weights on the same inputs (what a broken path would look like)")
    assert max(unrelated) < 0.95 and min(q4) >= DOCUMENTED_AGREEMENT["q4_0"]


# ---- the streaming form ----------------------------------------------------------------------------------------

def test_streaming_fold_frame_equals_the_window_form(policies):
    model = policies[3].models["f32"]
    rng = np.random.default_rng(11)
    heads = 4
    window_state, stream_state = model.new_state(heads), model.new_state(heads)
    for invocation in range(4):
        attn, new_pos = invocation_inputs(rng, heads, window_state.n_tokens, invocation)
        window_keep, window_scores = model.step(window_state, attn, new_pos)
        # The engine's order: append the new tokens, fold each 16-query frame as it completes, score, select.
        stream_state.append(new_pos)
        for frame in range(DELAY // 16):
            model.fold_frame(stream_state, np.ascontiguousarray(attn[:, 16 * frame:16 * (frame + 1)]))
        stream_scores = model.scores(stream_state)
        stream_keep = model.select(stream_scores)
        stream_state.gather(stream_keep)
        np.testing.assert_allclose(stream_scores, window_scores, atol=1e-5)
        np.testing.assert_array_equal(stream_keep, window_keep)
        np.testing.assert_allclose(stream_state.ema, window_state.ema, rtol=1e-5, atol=1e-9)
        np.testing.assert_array_equal(stream_state.history, window_state.history)
        np.testing.assert_array_equal(stream_state.positions, window_state.positions)


def test_one_fold_frame_is_the_reference_streaming_update(policies):
    model = policies[1].models["f32"]
    rng = np.random.default_rng(12)
    ema = rng.uniform(0, 0.05, (2, 40, 17)).astype(np.float32)
    history = rng.uniform(0, 0.02, (2, 40, 16)).astype(np.float32)
    rows16 = rng.uniform(0, 0.02, (2, 16, 40)).astype(np.float32)  # [H, 16 queries, tokens]
    state = model.state_from_arrays(np.tile(np.arange(40), (2, 1)), ema, history)
    model.fold_frame(state, rows16)
    expected_ema, expected_history = ema_streaming_update(ema.astype(np.float64), history.astype(np.float64),
                                                          rows16.transpose(0, 2, 1).astype(np.float64))
    np.testing.assert_allclose(state.ema, expected_ema, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(state.history, expected_history.astype(np.float32))


# ---- long caches: BAM in query blocks --------------------------------------------------------------------------

def test_bam_in_several_query_blocks_matches_the_reference(policies):
    """2 heads x 6144 tokens split BAM's queries into blocks (24 for flash attention, 3 for the matmul form)."""
    policy = policies[2]
    rng = np.random.default_rng(13)
    X = rng.normal(0, 1, (2, 6144, 25)).astype(np.float32)
    np.testing.assert_allclose(policy.models["f32"].scores_from_features(X),
                               policy.reference.scores_from_features(X), atol=2e-5)


@pytest.mark.parametrize("n_heads, n_tokens", [(1, 1), (5, 700), (2, 1100), (90, 300)])
def test_bam_flash_attention_equals_the_matmul_form(policies, n_heads, n_tokens):
    """The CPU computes BAM's attention with ggml's flash attention (fused, masked tiles skipped); it must give the
    scores of the matmul + softmax form and of the reference, for one token, several query blocks and many heads."""
    policy = policies[3]
    model = policy.models["f32"]
    X = np.random.default_rng(n_tokens).normal(0, 1, (n_heads, n_tokens, 25)).astype(np.float32)
    assert model.bam_attention == "flash"  # what the CPU backend chooses by itself
    try:
        fused = model.scores_from_features(X)
        model.bam_attention = "matmul"
        assert model.bam_attention == "matmul"
        matmul = model.scores_from_features(X)
    finally:
        model.bam_attention = "automatic"
    np.testing.assert_allclose(fused, matmul, atol=2e-6, rtol=1e-6)
    np.testing.assert_allclose(fused, policy.reference.scores_from_features(X), atol=2e-5)
    with pytest.raises(InvalidArgumentError, match="automatic"):
        model.bam_attention = "fast"


def test_32k_cached_tokens_are_scored(policies):
    model = policies[1].models["q8_0"]
    n = 32768
    rng = np.random.default_rng(14)
    state = model.state_from_arrays(np.arange(n)[None], rng.uniform(0, 0.03, (1, n, 17)).astype(np.float32),
                                    np.zeros((1, n, 16), np.float32))
    model.fold_frame(state, rng.uniform(0, 1 / n, (1, 16, n)).astype(np.float32))
    scores, timings = model.scores(state, return_timings=True)
    assert scores.shape == (1, n) and np.isfinite(scores).all() and timings["bam_ms"] > 0
    keep = model.select(scores)
    assert keep[0, -1] == n - 1 and np.all(np.diff(keep[0]) > 0)


# ---- bad inputs ------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors_and_change_nothing(policies):
    model = policies[1].models["f32"]
    state = model.new_state(2)
    model.step(state, *invocation_inputs(np.random.default_rng(15), 2, 0, 0))
    before = (state.positions, state.ema, state.history)
    n = state.n_tokens + DELAY
    good_attn, good_pos = invocation_inputs(np.random.default_rng(16), 2, state.n_tokens, 1)
    nan_attn = good_attn.copy()
    nan_attn[1, 7, 3] = np.nan
    bad_calls = [
        (InvalidArgumentError, "columns", np.zeros((2, DELAY, n - 1), np.float32), good_pos),
        (InvalidArgumentError, "n_kv_heads=2", np.zeros((3, DELAY, n), np.float32), good_pos),
        (InvalidArgumentError, "rows", np.zeros((2, 256, n - 256), np.float32), good_pos),
        (InvalidArgumentError, "NaN", nan_attn, good_pos),
        (InvalidArgumentError, "negative", -good_attn, good_pos),
        (InvalidArgumentError, "not causal", np.full((2, DELAY, n), 1 / n, np.float32), good_pos),
        (InvalidArgumentError, "increase strictly", good_attn, np.arange(DELAY)),  # overlaps retained positions
        (InvalidArgumentError, "increase strictly", good_attn, good_pos[::-1].copy()),
        (InvalidArgumentError, "new_pos must hold", good_attn, good_pos[:-1]),
        (TypeError, "float32", good_attn.astype(np.float64), good_pos),
        (TypeError, "integer", good_attn, good_pos.astype(np.float64)),
    ]
    for error, match, attn, new_pos in bad_calls:
        with pytest.raises(error, match=match):
            model.step(state, attn, new_pos)
        for got, expected in zip((state.positions, state.ema, state.history), before):
            np.testing.assert_array_equal(got, expected)  # a rejected call changes nothing
    with pytest.raises(InvalidArgumentError, match="rows16 must be"):
        model.fold_frame(state, np.zeros((2, 15, state.n_tokens), np.float32))
    with pytest.raises(InvalidArgumentError, match="increase strictly"):
        state.gather(np.array([[1, 0], [0, 1]]))
    with pytest.raises(InvalidArgumentError, match=r"X must be \[H, n, 25\]"):
        model.scores_from_features(np.zeros((2, 10, 24), np.float32))
    with pytest.raises(ValueError, match="n_kv_heads"):
        model.new_state(0)
    with pytest.raises(InvalidArgumentError, match="increase strictly within each head"):
        model.state_from_arrays(np.array([[3, 2]]), np.zeros((1, 2, 17), np.float32), np.zeros((1, 2, 16), np.float32))


# ---- bad files -------------------------------------------------------------------------------------------------

def rewrite(source: Path, target: Path, *, arch: str = "namm", keys: dict | None = None,
            tensors: dict | None = None) -> Path:
    """Copies an f32 NAMM GGUF with changes: keys {name: None (drop) or (GGUFValueType, value)}, tensors
    {name: None (drop) or float32 array}; names not in the source are added."""
    keys, tensors = keys or {}, tensors or {}
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), arch)
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture" and name not in keys:
            writer.add_key_value(name, field.contents(), field.types[0])
    for name, change in keys.items():
        if change is not None:
            writer.add_key_value(name, change[1], change[0])
    for tensor in reader.tensors:
        if tensor.name not in tensors:
            writer.add_tensor(tensor.name, np.array(tensor.data, np.float32))
    for name, array in tensors.items():
        if array is not None:
            writer.add_tensor(name, np.asarray(array, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


U32, F32, STR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING
padded_qkv = np.zeros((96, 32), np.float32)
padded_qkv[5, 30] = 0.5
nan_bias = np.zeros(50, np.float32)
nan_bias[3] = np.nan
BAD_FILES = {
    "architecture": (dict(arch="llama"), "general.architecture is 'llama', expected 'namm'"),
    "version": (dict(keys={"namm.format_version": (U32, 2)}), "format version 2 is not supported"),
    "missing key": (dict(keys={"namm.delay": None}), "missing key 'namm.delay'"),
    "key type": (dict(keys={"namm.delay": (F32, 512.0)}), "key 'namm.delay' has type"),
    "other network": (dict(keys={"namm.hidden_dim": (U32, 16)}), "namm.hidden_dim is 16"),
    "delay": (dict(keys={"namm.delay": (U32, 100)}), "namm.delay must be a positive multiple of 16"),
    "deploy delay": (dict(keys={"namm.deploy.delay": (U32, 24)}), "namm.deploy.delay must be a positive multiple of 16"),
    "zero deploy delay": (dict(keys={"namm.deploy.delay": (U32, 0)}), "namm.deploy.delay must be a positive multiple"),
    "weight type": (dict(keys={"namm.weight_type": (STR, "q8_0")}), "has type f32, expected q8_0"),
    "missing tensor": (dict(tensors={"namm.out.weight": None}), "missing tensor 'namm.out.weight'"),
    "shape": (dict(tensors={"namm.attn_out.bias": np.zeros(49)}), "'namm.attn_out.bias' has shape"),
    "extra tensor": (dict(tensors={"namm.extra": np.zeros(4)}), "unexpected tensor 'namm.extra'"),
    "padding": (dict(tensors={"namm.attn_qkv.weight": padded_qkv}), "non-zero padding"),
    "nan": (dict(tensors={"namm.attn_out.bias": nan_bias}), "'namm.attn_out.bias' contains NaN"),
    "variance": (dict(tensors={"namm.feat_var": -np.ones(17)}), "namm.feat_var must be >= 0"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_gguf_files_are_refused_with_the_reason(policies, tmp_path, case):
    changes, message = BAD_FILES[case]
    path = rewrite(Path(policies[1].models["f32"].path), tmp_path / "bad.gguf", **changes)
    with pytest.raises(ModelLoadError, match=message):
        NammModel(path)


def test_missing_unreadable_and_truncated_files(policies, tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        NammModel(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        NammModel(tmp_path)
    text = tmp_path / "text.gguf"
    text.write_text("hello, not a model")
    with pytest.raises(ModelLoadError, match="no GGUF magic"):
        NammModel(text)
    good = Path(policies[1].models["f32"].path).read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupted"):
        NammModel(truncated)
    # The last tensor's shape damaged to 2^40 values (gguf checks offsets against the earlier tensors' sizes, so
    # only the last one can grow unnoticed): refused from the header, before anything is allocated for it (loading
    # it used to abort the process in ggml's allocator; found by the fuzz test).
    name = b"namm.feat_var"
    at = good.rindex(name) + len(name) + 4  # after the name: n_dims (u32), then ne0 (u64)
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(good[:at] + (1 << 40).to_bytes(8, "little") + good[at + 8:])
    with pytest.raises(ModelLoadError, match="claim more data than the file holds"):
        NammModel(huge)
    unchanged = rewrite(Path(policies[1].models["f32"].path), tmp_path / "copy.gguf")
    assert NammModel(unchanged).hparams["weight_type"] == "f32"  # the rewriting itself keeps files valid
