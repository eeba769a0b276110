"""Checkpoint -> NAMM GGUF: layout, metadata, round trip, and clear errors for bad checkpoints."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from pymemory.cli import main as cli  # noqa: E402
from pymemory.namm import NammCheckpointError, NammReference, load_checkpoint, load_vectors  # noqa: E402
from pymemory.namm import gguf_format as fmt  # noqa: E402
from pymemory.namm.convert import write_gguf  # noqa: E402
from pymemory.namm.testing import random_causal_attention, write_random_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    arrays = write_random_checkpoint(path, seed=11, orig_mod_prefix=True)
    return path, arrays


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: f for name, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def field_value(field):
    value = field.parts[field.data[0]]
    return str(bytes(value), "utf-8") if field.types[0] == gguf.GGUFValueType.STRING else value[0]


@pytest.mark.parametrize("weight_type", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_layout_and_metadata(tmp_path, checkpoint, weight_type):
    path, arrays = checkpoint
    out = tmp_path / f"namm-{weight_type}.gguf"
    summary = write_gguf(load_checkpoint(path, trust_pickle=True), out, weight_type)
    fields, tensors = read(out)
    assert field_value(fields["general.architecture"]) == "namm"
    assert field_value(fields["namm.format_version"]) == fmt.FORMAT_VERSION
    for key, value in fmt.HPARAMS.items():
        got = field_value(fields[key])
        assert (got == value) if isinstance(value, (str, bool, int)) else abs(got - value) < 1e-6 * max(1, value)
    assert set(tensors) == set(fmt.TENSORS)
    assert {t["name"]: t["type"] for t in summary["tensors"]}["namm.attn_qkv.weight"] == weight_type
    if weight_type == "f32":
        theta = arrays["theta"]
        qkv = np.asarray(tensors["namm.attn_qkv.weight"].data).reshape(96, 32)
        np.testing.assert_array_equal(qkv[:, :25], theta[:2400].reshape(25, 96).T)  # the CMA-ES mean ...
        assert not np.allclose(qkv[:, :25], arrays["best_member"][:2400].reshape(25, 96).T)  # ... not best_member
        np.testing.assert_array_equal(qkv[:, 25:], 0)  # padding
        np.testing.assert_array_equal(np.asarray(tensors["namm.attn_out.weight"].data).reshape(50, 32),
                                      theta[2496:4096].reshape(32, 50).T)
        np.testing.assert_array_equal(np.asarray(tensors["namm.out.bias"].data), theta[4171:])
        np.testing.assert_array_equal(np.asarray(tensors["namm.feat_var"].data), arrays["var"])
    else:
        assert summary["tensors"][0]["max_abs_error"] > 0


def test_round_trip_checkpoint_and_gguf_give_the_same_scores(tmp_path, checkpoint):
    path, _ = checkpoint
    out = tmp_path / "namm.gguf"
    write_gguf(load_checkpoint(path, trust_pickle=True), out, "f32")
    a = NammReference.from_checkpoint(path, trust_pickle=True)
    b = NammReference.from_gguf(out)
    rng = np.random.default_rng(0)
    sa, sb = a.new_state(2), b.new_state(2)
    for invocation in range(3):
        attn = random_causal_attention(rng, 2, sa.n_tokens)
        new_pos = np.arange(invocation * 512, (invocation + 1) * 512)
        ka, scores_a = a.step(sa, attn, new_pos)
        kb, scores_b = b.step(sb, attn, new_pos)
        np.testing.assert_array_equal(scores_a, scores_b)
        np.testing.assert_array_equal(ka, kb)


def test_plain_vectors_are_accepted(tmp_path, checkpoint):
    _, arrays = checkpoint
    np.save(tmp_path / "theta.npy", arrays["theta"])
    np.savetxt(tmp_path / "mean.txt", arrays["mean"])
    torch.save(torch.from_numpy(arrays["var"]), tmp_path / "var.pt")
    params = load_vectors(tmp_path / "theta.npy", tmp_path / "mean.txt", tmp_path / "var.pt")
    np.testing.assert_array_equal(params.theta, arrays["theta"])
    np.testing.assert_allclose(params.feat_mean, arrays["mean"], rtol=1e-6)


def expect_error(path, message, trust=True):
    with pytest.raises((NammCheckpointError, FileNotFoundError), match=message):
        load_checkpoint(path, trust_pickle=trust)


def test_bad_checkpoints(tmp_path, checkpoint):
    path, arrays = checkpoint
    expect_error(tmp_path / "missing.pt", "not found")
    expect_error(path, "pickle.*trust_pickle=True", trust=False)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:2000])
    expect_error(truncated, "cannot be read as a torch.save checkpoint")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint at all")
    expect_error(text, "cannot be read as a torch.save checkpoint")
    random_bytes = tmp_path / "noise.pt"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(5000))
    expect_error(random_bytes, "cannot be read")
    other = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), other)
    expect_error(other, "no 'evolution_state'")

    short = tmp_path / "short.pt"
    write_random_checkpoint(short, seed=1, hidden=16, bias=False)
    expect_error(short, r"2026 values, expected 4172.*hidden=16, bias=False")

    nan = tmp_path / "nan.pt"
    write_random_checkpoint(nan, seed=1)
    ck = torch.load(nan, weights_only=False)
    ck["evolution_state"]["mean"][7] = float("nan")
    torch.save(ck, nan)
    expect_error(nan, "NaN")

    no_var = tmp_path / "novar.pt"
    del ck["evolution_state"]["stored_buffers_to_save.token_embedding_0_output_var"]
    torch.save(ck, no_var)
    expect_error(no_var, "lacks.*output_var")

    zero_var = tmp_path / "zerovar.pt"
    write_random_checkpoint(zero_var, seed=1, var=np.zeros(17))
    expect_error(zero_var, "variances are zero")


def test_cli_converts_and_fails_cleanly(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    out = tmp_path / "cli.gguf"
    assert cli(["convert-namm", str(path), "-o", str(out), "--type", "q8_0", "--trust-pickle"]) == 0
    printed = capsys.readouterr().out
    assert "namm.attn_qkv.weight" in printed and "q8_0" in printed and out.exists()
    bad = tmp_path / "bad.pt"
    bad.write_text("garbage")
    assert cli(["convert-namm", str(bad), "-o", str(tmp_path / "x.gguf"), "--trust-pickle"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pymemory: error:") and err.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.partial").exists()
