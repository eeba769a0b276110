"""`pymemory train-namm`: settings refused before any work, candidates scored in memory, a short run that learns,
resuming a killed run, Dask evaluation, and the files a run writes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pymemory.errors import InvalidArgumentError
from pymemory.namm.training import TrainConfig

pytestmark = pytest.mark.model

# A tiny run: 256-token samples through a 128-cell cache, NAMM every 32 tokens.
TINY = dict(sample_tokens=256, cache_fraction=0.5, scored_tokens=64, namm_delay=32, population=4, generations=2,
            text_samples=1, retrieval_samples=1, heldout_every=1, heldout_text=1, heldout_retrieval=1,
            calibration_samples=1, workers=0, threads=2, data=["austen", "passkey", "kv"], warm_start="none")


def tiny(tmp_path: Path, **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": os.fspath(tmp_path / "run"), **changes})


# ---- bad settings: clear errors before any work --------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(population=1), "population must be at least 2"),
    (dict(cache_fraction=1.0), "budget must be below the sample length"),
    (dict(cache_fraction=1.5), "budget must be below the sample length"),
    (dict(data=["passkey"]), "at least one text source"),
    (dict(data=["novels"]), "give one or more of"),
    (dict(data=[]), "give one or more of"),
    (dict(namm_delay=40), "multiple of 16"),
    (dict(scored_tokens=200), "scored-tokens"),
    (dict(cache_fraction=0.2), "must hold n_sink"),
    (dict(mode="vote"), "--mode"),
    (dict(dask="somewhere"), "--dask"),
    (dict(warm_start="guess"), "--warm-start"),
    (dict(warm_start="imitation", warm_start_horizon=48), "--warm-start-horizon"),
    (dict(warm_start="imitation", warm_start_horizon=224), "--warm-start-horizon"),
    (dict(warm_start="imitation", warm_start_horizon=96, warm_start_steps=0), "--warm-start-steps"),
    (dict(warm_start="imitation", warm_start_horizon=96, warm_start_target="mean"), "--warm-start-target"),
    (dict(warm_start="imitation", warm_start_horizon=96, warm_start_target="max", mode="budget"),
     "use it with --mode budget_max"),
    (dict(key_weight=-0.5), "--key-weight must be between 0 and"),
    (dict(key_weight=1000.0), "--key-weight must be between 0 and"),
    (dict(key_weight=0.5, mode="quorum"), "quorum mode ranks none"),
])
def test_bad_settings_are_refused(tmp_path, changes, message):
    with pytest.raises(InvalidArgumentError, match=message):
        tiny(tmp_path, **changes).validate()


def test_unwritable_output_directory_is_refused_before_any_work(tmp_path):
    from pymemory.namm.training.config import prepare_out_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(InvalidArgumentError, match="cannot write to the output directory"):
        prepare_out_dir(tiny(tmp_path, out_dir=os.fspath(blocker / "run")))


def test_a_run_directory_with_other_settings_is_not_resumed(tmp_path):
    from pymemory.namm.training.config import prepare_out_dir

    config = tiny(tmp_path)
    assert prepare_out_dir(config)[1] is False
    assert prepare_out_dir(replace(config, generations=9, workers=2))[1] is True  # compute settings may change
    with pytest.raises(InvalidArgumentError, match="population"):
        prepare_out_dir(replace(config, population=6))


def test_runs_saved_before_the_pooled_target_resume_as_per_head(tmp_path):
    """A run directory written before --warm-start-target existed was fitted per head: it resumes with per_head
    and refuses the new default (pooled) instead of continuing another experiment."""
    from pymemory.namm.training.config import CONFIG_FILE, prepare_out_dir

    config = tiny(tmp_path, warm_start="imitation", warm_start_horizon=96)
    assert config.warm_start_target == "pooled"
    prepare_out_dir(replace(config, warm_start_target="per_head"))
    saved_path = tmp_path / "run" / CONFIG_FILE
    saved = json.loads(saved_path.read_text())
    del saved["warm_start_target"]
    saved_path.write_text(json.dumps(saved))
    assert prepare_out_dir(replace(config, warm_start_target="per_head"))[1] is True
    with pytest.raises(InvalidArgumentError, match="warm_start_target"):
        prepare_out_dir(config)


def test_data_too_short_for_the_samples_is_refused(tmp_path, smollm2_path):
    from pymemory.namm.training.trainer import Trainer

    config = tiny(tmp_path, model=smollm2_path, sample_tokens=400_000, cache_fraction=0.25, scored_tokens=1000)
    with pytest.raises(InvalidArgumentError, match="no text of at least 400000 tokens"):
        Trainer(config, progress=False)
    assert not (tmp_path / "run" / "state.pkl").exists()


# ---- candidates in memory --------------------------------------------------------------------------------------

def _random_vector(seed: int, scale: float = 0.3):
    from pymemory.namm import NammVector

    rng = np.random.default_rng(seed)
    return NammVector(rng.normal(0, scale, 4172).astype(np.float32), rng.random(17).astype(np.float32) * 0.05,
                      rng.random(17).astype(np.float32) * 0.01 + 1e-4, f"test {seed}")


def test_parameters_set_in_memory_score_like_the_same_file(tmp_path, smollm2_model, english_text):
    """A candidate set with set_namm_parameters gives exactly what loading its GGUF gives."""
    from pymemory._loader import _core
    from pymemory.namm.convert import ggml_tensors, write_gguf

    vector = _random_vector(1)
    template = write_gguf(_random_vector(2), tmp_path / "template.gguf", delay=32)["output"]
    direct = write_gguf(vector, tmp_path / "direct.gguf", delay=32)["output"]
    tokens = smollm2_model.tokenize(english_text, True, False)[:400]
    kwargs = dict(policy="namm", n_sink=4, window=124, namm_mode="budget", namm_delay=32, n_threads=1)
    from_file = _core.Engine(smollm2_model, namm_path=direct, **kwargs)
    in_memory = _core.Engine(smollm2_model, namm_path=template, **kwargs)
    before = in_memory.score(tokens, 32)
    in_memory.reset()
    in_memory.set_namm_parameters(ggml_tensors(vector))
    after = in_memory.score(tokens, 32)
    reference = from_file.score(tokens, 32)
    np.testing.assert_array_equal(after[1:], reference[1:])
    assert not np.array_equal(before[1:], reference[1:])  # the template itself scores differently
    assert in_memory.cached_positions() == from_file.cached_positions()


def test_bad_in_memory_parameters_are_refused(tmp_path, smollm2_model):
    from pymemory._loader import _core
    from pymemory.errors import PymemoryError
    from pymemory.namm.convert import ggml_tensors, write_gguf

    vector = _random_vector(3)
    template = write_gguf(vector, tmp_path / "t.gguf", delay=32)["output"]
    engine = _core.Engine(smollm2_model, policy="namm", n_sink=4, window=124, namm_path=template, namm_delay=32)
    good = ggml_tensors(vector)
    cases = {
        "values, expected": {**good, "namm.out.weight": np.zeros(24, np.float32)},
        "NaN": {**good, "namm.attn_out.bias": np.full(50, np.nan, np.float32)},
        "missing": {k: v for k, v in good.items() if k != "namm.feat_mean"},
        "unknown NAMM tensor": {**good, "namm.extra": np.zeros(3, np.float32)},
        "not all zero": {**good, "namm.feat_var": np.zeros(17, np.float32)},
    }
    for message, tensors in cases.items():
        with pytest.raises(PymemoryError, match=message):
            engine.set_namm_parameters(tensors)
    quantised = write_gguf(vector, tmp_path / "q.gguf", "q8_0", delay=32)["output"]
    engine_q8 = _core.Engine(smollm2_model, policy="namm", n_sink=4, window=124, namm_path=quantised, namm_delay=32)
    with pytest.raises(PymemoryError, match="f32"):
        engine_q8.set_namm_parameters(good)
    sink = _core.Engine(smollm2_model, policy="sink", n_sink=4, window=124)
    with pytest.raises(PymemoryError, match="policy 'namm'"):
        sink.set_namm_parameters(good)


def test_score_chunk_sets_the_batches_sink_is_scored_in(smollm2_path, english_text):
    """Job.score_chunk decides how many target tokens each scored batch holds (at most the engine's prefill chunk,
    here 31): unset, the spec's interval. Sink evicts at least a batch's worth before each batch, so it scores
    differently in 16- and 31-token batches, while the full cache scores the same either way."""
    from pymemory._loader import _core
    from pymemory.namm.training.data import Sample
    from pymemory.namm.training.evaluator import Job, MemorySpec, _Worker

    tokens = _core.Model.load(os.fspath(smollm2_path)).tokenize(english_text, True, False)[:384]
    sample = Sample("text-0", "text", tuple(tokens[:256]), tuple(tokens[256:]))
    spec = MemorySpec(os.fspath(smollm2_path), capacity=128, sample_tokens=384, n_sink=4, namm_delay=32,
                      mode="budget", quorum=1.0, max_cells=96, feat_mean=(0.0,) * 17, feat_var=(1.0,) * 17, threads=2)
    worker = _Worker(spec)
    nll = {chunk: worker.run(Job("sink", sample, score_chunk=chunk)).nll for chunk in (None, 32, 16)}
    assert nll[None] == nll[32]
    assert abs(nll[16] - nll[32]) > 1e-3
    full = [worker.run(Job("full", sample, score_chunk=chunk)).nll for chunk in (16, 32)]
    assert abs(full[0] - full[1]) < 1e-4


def test_a_key_weight_trains_the_ranking_it_deploys(tmp_path, smollm2_path, english_text):
    """--key-weight: every candidate's engine adds the keys' distinctiveness to its ranking (the same θ keeps other
    tokens, so scores another NLL, and the all-zero NAMM keeps what the keys alone rank), and the run's ckpt.pt
    and GGUF record the weight, so what it trained is what it deploys."""
    from pymemory._loader import _core
    from pymemory.namm import load_checkpoint
    from pymemory.namm.checkpoint import gguf_settings
    from pymemory.namm.training.data import Sample
    from pymemory.namm.training.evaluator import Job, MemorySpec, _Worker, deploy_settings
    from pymemory.namm.training.outputs import write_checkpoint

    tokens = _core.Model.load(os.fspath(smollm2_path)).tokenize(english_text, True, False)[:384]
    sample = Sample("text-0", "text", tuple(tokens[:256]), tuple(tokens[256:]))
    common = dict(capacity=128, sample_tokens=384, n_sink=4, namm_delay=32, mode="budget_zmax", quorum=1.0,
                  max_cells=96, feat_mean=(0.0,) * 17, feat_var=(1.0,) * 17, threads=2)
    theta = tuple(_random_vector(4).theta.tolist())
    nll, kept = {}, {}
    for weight in (0.0, 0.5):
        worker = _Worker(MemorySpec(os.fspath(smollm2_path), **common, key_weight=weight))
        assert gguf_settings(worker.template).get("deploy_key_weight", 0.0) == weight
        nll[weight] = worker.run(Job("namm", sample, theta)).nll
        worker.run(Job("namm", sample))  # all zeros: the attention scores tie, the keys alone rank
        kept[weight] = worker.engines[next(k for k in worker.engines if k.startswith("namm:"))].cached_positions()
    assert abs(nll[0.5] - nll[0.0]) > 1e-4
    assert kept[0.5] != kept[0.0]
    spec = MemorySpec(os.fspath(smollm2_path), **common, key_weight=0.5)
    import cma

    es = cma.CMAEvolutionStrategy(np.zeros(4172), 0.03, {"CMA_diagonal": True, "verbose": -9})
    write_checkpoint(tmp_path / "ckpt.pt", es, np.zeros(17), np.ones(17), 1, 0.9, 100,
                     settings=deploy_settings(spec))
    assert load_checkpoint(tmp_path / "ckpt.pt", trust_pickle=True).settings["deploy_key_weight"] == 0.5


# ---- a short run: learns, resumes, writes its files -----------------------------------------------------------

def _log(run_dir: Path) -> dict:
    return json.loads((run_dir / "log.json").read_text())


def test_short_run_improves_on_generation_zero(tmp_path, smollm2_path):
    """On fixed samples and a fixed seed, the evolved CMA mean beats the starting all-zero NAMM."""
    from pymemory.namm.training import train_namm

    config = tiny(tmp_path, model=smollm2_path, fixed_samples=True, population=6, generations=6, heldout_every=6,
                  seed=3)
    train_namm(config, progress=False)
    records = _log(tmp_path / "run")["records"]
    start = records[0]["cma_mean_loss"]  # generation 1 scores the initial mean (all zeros) next to its members
    later = min(r["cma_mean_loss"] for r in records[1:])
    print(f"CMA mean loss: start {start:.4f}, best later {later:.4f}; per generation "
          f"{[round(r['cma_mean_loss'], 4) for r in records]}")
    assert later < start


def test_imitation_warm_start_predicts_future_attention(tmp_path, smollm2_path):
    """The warm start fits the NAMM to the attention tokens receive later: its scores rank tokens like the targets
    (on the examples it was fitted to) and beat predicting a constant; CMA-ES starts from it, and it is generation
    0 of the held-out curve, shipped until evolution beats it on held-out data."""
    from pymemory.namm import load_checkpoint
    from pymemory.namm.training import train_namm
    from pymemory.namm.training.trainer import Trainer
    from pymemory.namm.training.warm_start import capture_examples, fit_imitation

    config = tiny(tmp_path, model=smollm2_path, warm_start="imitation", warm_start_samples=2, warm_start_horizon=96,
                  warm_start_steps=60, generations=1)
    summary = train_namm(config, progress=False)
    log = _log(tmp_path / "run")
    report = log["warm_start"]
    assert report["examples"] >= 10 and len(report["samples"]) == 2  # pooled: one example per invocation
    assert report["explained"] > 0.2, report
    assert report["rank_correlation_median"] > 0.3, report
    start = log["heldout"][0]
    assert start["generation"] == 0 and start["loss"] == log["heldout_baselines"]["warm start"]["loss"]
    best = min(log["heldout"], key=lambda h: h["loss"])
    assert summary["best_generation"] == best["generation"]
    trainer = Trainer(config, progress=False)  # resumes the finished run: state as saved
    shipped = load_checkpoint(tmp_path / "run" / "ckpt.pt", trust_pickle=True)
    assert shipped.iteration == best["generation"]
    if best["generation"] == 0:
        np.testing.assert_allclose(shipped.theta, trainer.state["warm_start_theta"], rtol=1e-6)
    # The targets are hindsight: the same tokens, scored with the attention that came after them.
    examples = capture_examples(trainer.model, trainer.heldout[:1], 32, 96, 4, 1)  # per head
    assert all(e.target.shape == e.ema.shape[:2] and not e.pooled for e in examples)
    theta, _ = fit_imitation(examples, trainer.state["feat_mean"], trainer.state["feat_var"], steps=1)
    assert theta.shape == (4172,) and np.isfinite(theta).all()


RATE_SETTINGS = dict(mode="budget_zmax", ema_coefficient=0.998, ema_bias_correction=True)


def test_a_namm_file_to_continue_from_must_read_attention_as_the_run_does(tmp_path):
    with pytest.raises(InvalidArgumentError, match="--warm-start must be one of .* NAMM GGUF"):
        tiny(tmp_path, warm_start=os.fspath(tmp_path / "missing.gguf")).validate()
    with pytest.raises(InvalidArgumentError, match=r"other settings \(mode, ema_coefficient, ema_bias_correction\)"
                                                   r".*--mode budget_zmax --ema-coefficient 0.998 --ema-bias-correction"):
        tiny(tmp_path, warm_start="smollm2-rate").validate()
    tiny(tmp_path, warm_start="smollm2-rate", **RATE_SETTINGS).validate()  # its interval (32) may differ: 16 here
    tiny(tmp_path, warm_start="smollm2-rate", namm_delay=16, **RATE_SETTINGS).validate()


def test_a_run_continues_from_a_namm_file_as_it_is(tmp_path, smollm2_path):
    """--warm-start FILE: CMA-ES starts at the file's weights with its normalisation statistics (no calibration),
    and generation 0 of the held-out curve scores exactly what the engine scores running the file itself."""
    from pymemory.namm import load_gguf
    from pymemory.namm.packaged import resolve_namm
    from pymemory.namm.training import train_namm
    from pymemory.namm.training.evaluator import Job, make_executor
    from pymemory.namm.training.trainer import Trainer, _gaps

    config = tiny(tmp_path, model=smollm2_path, warm_start="smollm2-rate", generations=1, **RATE_SETTINGS)
    train_namm(config, progress=False)
    log = _log(tmp_path / "run")
    shipped, _ = load_gguf(resolve_namm("smollm2-rate"))
    assert log["warm_start"]["namm"] == resolve_namm("smollm2-rate") and log["calibration_seconds"] < 1.0
    np.testing.assert_array_equal(np.asarray(log["feature_mean"], np.float32), shipped.feat_mean)
    trainer = Trainer(config, progress=False)
    np.testing.assert_array_equal(np.asarray(trainer.state["warm_start_theta"], np.float32), shipped.theta)
    assert log["heldout"][0]["generation"] == 0
    executor = make_executor(0, "", 2)
    try:
        direct = executor.map(trainer.spec(), [Job("namm_file", smp, namm_file=resolve_namm("smollm2-rate"))
                                               for smp in trainer.heldout])
    finally:
        executor.close()
    gaps = _gaps(direct, trainer.state["heldout_refs"])
    assert gaps == pytest.approx({k: v for k, v in log["heldout_baselines"]["warm start"].items() if k != "loss"},
                                 rel=1e-6)


def test_run_outputs_convert_and_match(tmp_path, smollm2_path):
    """ckpt.pt (evo-memory format) converts with convert-namm into the GGUF the run wrote, with the settings the run
    trained under (delay, moving average, mode); log and plot exist."""
    from pymemory.cli import main as cli
    from pymemory.namm import load_checkpoint, load_gguf
    from pymemory.namm.training import train_namm

    summary = train_namm(tiny(tmp_path, model=smollm2_path, ema_coefficient=0.995, ema_bias_correction=True),
                         progress=False)
    run = tmp_path / "run"
    log = _log(run)
    assert [r["generation"] for r in log["records"]] == [1, 2]
    assert [h["generation"] for h in log["heldout"]] == [1, 2]
    assert set(log["heldout_baselines"]) == {"sink", "h2o", "random namm", "zero namm"}
    assert log["heldout_baselines"]["sink"]["loss"] == pytest.approx(1.0)
    assert summary["best_generation"] in (1, 2)
    assert (run / "curve.png").stat().st_size > 10_000
    vector = load_checkpoint(run / "ckpt.pt", trust_pickle=True)
    shipped, _ = load_gguf(run / "namm.gguf")
    np.testing.assert_array_equal(vector.theta, shipped.theta)
    np.testing.assert_allclose(vector.feat_var, log["feature_var"], rtol=1e-6)
    import torch

    state = torch.load(run / "ckpt.pt", weights_only=False)
    assert state["iter_num"] == summary["best_generation"]
    assert state["evolution_state"]["C"].shape == (4172, 4172)
    assert float(state["best_val_loss"]) == pytest.approx(summary["best_heldout_loss"])
    # The GGUF, written by the run or converted from its ckpt.pt, says how it was trained, and the engine takes
    # that by default.
    converted = tmp_path / "converted.gguf"
    assert cli(["convert-namm", os.fspath(run / "ckpt.pt"), "-o", os.fspath(converted), "--trust-pickle"]) == 0
    recorded = _settings(run / "namm.gguf")
    assert recorded == {"namm.delay": 32, "namm.ema_coefficient": pytest.approx(0.995),
                        "namm.ema_bias_correction": True, "namm.deploy.mode": "budget", "namm.deploy.quorum": 1.0}
    assert _settings(converted) == recorded
    from pymemory._loader import _core

    model = _core.Model.load(smollm2_path)
    engine = _core.Engine(model, policy="namm", n_sink=4, window=124, namm_path=os.fspath(converted))
    engine.feed(model.tokenize("word " * 300, True, False))
    full = [r for r in engine.policy_stats()["invocations"] if r["cells_before"] == 128]
    assert full and all(r["cells_after"] == 128 - 32 for r in full)  # budget mode, delay 32, from the file


def _settings(path) -> dict:
    """The run settings a NAMM GGUF records."""
    import gguf

    reader = gguf.GGUFReader(os.fspath(path))
    out = {}
    for key in ("namm.delay", "namm.ema_coefficient", "namm.ema_bias_correction", "namm.deploy.mode",
                "namm.deploy.quorum"):
        field = reader.get_field(key)
        out[key] = field.contents() if field is not None else None
    return out


def test_killed_run_resumes_where_it_stopped(tmp_path, smollm2_path):
    from pymemory.namm.training import train_namm

    run = tmp_path / "run"
    args = [sys.executable, "-m", "pymemory", "train-namm", "--model", smollm2_path, "--out", os.fspath(run),
            "--quiet"]
    for key, value in TINY.items():
        if key == "data":
            value = ",".join(value)
        args += [f"--{key.replace('_', '-')}", str(value)]
    args[args.index("--generations") + 1] = "50"
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and child.poll() is None:
            if (run / "log.json").exists() and _log(run)["generation"] >= 1:
                break
            time.sleep(0.5)
        assert child.poll() is None, child.stderr.read().decode()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    saved = _log(run)["generation"]
    assert 1 <= saved < 50
    train_namm(tiny(tmp_path, model=smollm2_path, generations=saved + 1), progress=False)
    log = _log(run)
    assert [r["generation"] for r in log["records"]] == list(range(1, saved + 2))
    assert log["heldout_baselines"]["sink"]["loss"] == pytest.approx(1.0)


def test_one_generation_on_a_local_dask_cluster(tmp_path, smollm2_path):
    pytest.importorskip("dask.distributed")
    from pymemory.namm.training import train_namm

    summary = train_namm(tiny(tmp_path, model=smollm2_path, generations=1, dask="local:2", threads=1),
                         progress=False)
    log = _log(tmp_path / "run")
    assert log["records"][0]["generation"] == 1
    assert np.isfinite(log["records"][0]["best_loss"])
    assert summary["generation"] == 1


# ---- the shipped NAMM ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, model_fixture, model_asset", [
    ("smollm2", "smollm2_path", "smollm2-135m-instruct"),
    ("smollm2-evolved", "smollm2_path", "smollm2-135m-instruct"),
    ("smollm2-rate", "smollm2_path", "smollm2-135m-instruct"),
    ("smollm2-keys", "smollm2_path", "smollm2-135m-instruct"),
    ("smollm2-merged", "smollm2_path", "smollm2-135m-instruct"),
    ("qwen2.5", "qwen_path", "qwen2.5-coder-0.5b-instruct"),
    ("qwen2.5-per-head", "qwen_path", "qwen2.5-coder-0.5b-instruct"),
    ("qwen2.5-rate", "qwen_path", "qwen2.5-coder-0.5b-instruct"),
    ("qwen2.5-keys", "qwen_path", "qwen2.5-coder-0.5b-instruct"),
])
def test_shipped_namm_loads_by_name_with_its_trained_settings(request, name, model_fixture, model_asset):
    from pymemory import StreamingLLM
    from pymemory.namm import load_gguf
    from pymemory.namm.checkpoint import run_settings
    from pymemory.namm.packaged import packaged_namms

    shipped = packaged_namms()
    assert name in shipped
    record = json.loads(shipped[name].with_suffix(".json").read_text())
    assert record["config"]["model"] == model_asset and "command" in record and record["name"] == name
    vector, hparams = load_gguf(shipped[name])
    assert np.abs(vector.theta).max() > 0  # trained, not the all-zero start
    # The file reads its spectrum as the run trained it (moving average, bias correction).
    assert hparams.ema_coefficient == pytest.approx(record["config"].get("ema_coefficient", 0.99))
    assert hparams.ema_bias_correction is record["config"].get("ema_bias_correction", False)
    settings = run_settings(shipped[name])  # what the engine and `bench` run it with by default
    # The interval it runs at: the one chosen by measurement after training, where its JSON records one.
    delay = record.get("deploy", {}).get("namm_delay", record["config"]["namm_delay"])
    assert settings == {"namm_delay": delay, "trained_delay": record["config"]["namm_delay"],
                        "ema_coefficient": hparams.ema_coefficient,
                        "ema_bias_correction": hparams.ema_bias_correction, "mode": record["config"]["mode"],
                        "neighbours": record.get("deploy", {}).get("neighbours", 0),
                        "key_weight": record.get("deploy", {}).get("key_weight", 0.0),
                        "merge_threshold": record.get("deploy", {}).get("merge_threshold")}
    model_path = request.getfixturevalue(model_fixture)
    with StreamingLLM(model_path, policy="namm", namm_path=name, n_sink=4, window=124, n_threads=1) as llm:
        text = "".join(llm.generate("Once upon a time", max_tokens=200, ignore_eos=True, temperature=0.0))
        assert text
        invocations = llm.policy_stats["invocations"]
        full = [r for r in invocations if r["cells_before"] == 128]
        assert full and all(r["cells_after"] == 128 - delay for r in full)  # budget mode from the file


def test_unknown_namm_name_says_what_is_shipped(smollm2_path):
    from pymemory import StreamingLLM
    from pymemory.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="no-such-namm.*shipped NAMM"):
        StreamingLLM(smollm2_path, policy="namm", namm_path="no-such-namm", window=1020)


def test_killed_run_leaves_no_worker_processes(tmp_path):
    """A training run killed with SIGKILL cannot shut its worker pool down; the workers notice and exit."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys, time\n"
        "from pymemory.namm.training.evaluator import ProcessPool\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPool(2)\n"
        "    pids = {pool.pool.submit(os.getpid).result() for _ in range(8)}\n"
        "    print(' '.join(map(str, pids)), flush=True)\n"
        "    time.sleep(600)\n")
    run = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in run.stdout.readline().split()]
        assert pids and all(p != run.pid for p in pids)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)

        def alive(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for init to reap it counts as gone
                return f.read().split(")")[-1].split()[0] != "Z"

        deadline = time.monotonic() + 20
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in pids), "worker processes outlived their killed run"
    finally:
        if run.poll() is None:
            run.kill()


def _question_invocations(H: int, delay: int, total: int, question_start: int, needle: int,
                          question_looks_at: int) -> list[dict]:
    """One layer's captured invocations of a retrieval sample: the haystack spreads its attention evenly, the
    question's queries put 0.9 on token `question_looks_at` and 0.1 on the first token."""
    invocations = []
    for end in range(delay, total + 1, delay):
        positions = np.arange(end)
        attention = np.zeros((H, delay, end), np.float32)  # [H, R, n]
        for r, query in enumerate(range(end - delay, end)):
            if query >= question_start:
                attention[:, r, question_looks_at] = 0.9
                attention[:, r, 0] += 0.1
            else:
                attention[:, r, :query + 1] = 1.0 / (query + 1)
        invocations.append({"positions": positions, "attention": attention,
                            "ema": np.full((H, end, 17), float(needle), np.float32)})
    return invocations


def test_retrieval_hindsight_is_the_attention_of_the_question():
    """A retrieval sample's fitness scores only its answer: its warm-start target is the attention each token gets
    from the question's queries, not from the haystack read in between, and it has no example once the question
    has begun."""
    from pymemory.namm.training.data import Sample
    from pymemory.namm.training.warm_start import examples_from

    H, delay, total, question_start, needle = 2, 4, 16, 12, 6
    sample = Sample("r", "passkey", tuple(range(total)), (1,), total - question_start)
    invocations = [[_question_invocations(H, delay, total, question_start, needle, needle)]]  # [sample][layer][k]
    examples = examples_from([sample], invocations, delay, delay, n_sink=1)
    assert [e.positions[-1] for e in examples] == [7, 11]  # after the needle exists, before the question
    for e in examples:
        assert e.target.shape == (H, e.positions.size) and e.first == 1 and not e.pooled
        assert (e.target.argmax(axis=1) == needle).all()
        others = np.delete(e.target[:, 1:], needle - 1, axis=1)
        assert np.allclose(others, np.log(0.01))  # haystack tokens no question looked at sit at the floor


def test_pooled_hindsight_is_the_whole_models_attention():
    """The pooled target has one row per invocation for every layer's heads together: the attention a token gets
    from all of them as a multiple of a uniform share. Here layer 0's question looks at the needle and layer 1's
    at another token, so each gets half of layer 0's share; a per-head fit would see two disagreeing layers."""
    from pymemory.namm.training.data import Sample
    from pymemory.namm.training.warm_start import examples_from, fit_imitation

    H, delay, total, question_start, needle, other = 2, 4, 16, 12, 6, 9
    sample = Sample("r", "passkey", tuple(range(total)), (1,), total - question_start)
    layers = [_question_invocations(H, delay, total, question_start, needle, needle),
              _question_invocations(H, delay, total, question_start, needle, other)]
    examples = examples_from([sample], [layers], delay, delay, n_sink=1, target="pooled")
    assert [e.positions[-1] for e in examples] == [7, 11]  # one example per invocation, not per layer
    for e in examples:
        n = e.positions.size
        assert e.pooled and e.ema.shape == (2 * H, n, 17) and e.target.shape == (1, n)
        # 0.9 of one layer's question queries out of both layers' = 0.45 of all; as a multiple of 1/total.
        assert e.target[0, needle] == pytest.approx(np.log(0.45 * total), rel=1e-5)
        if other < n:
            assert e.target[0, other] == pytest.approx(e.target[0, needle])
    with pytest.raises(ValueError, match="target"):
        examples_from([sample], [layers], delay, delay, n_sink=1, target="mean")
    theta, report = fit_imitation(examples, np.zeros(17), np.ones(17), steps=3)
    assert theta.shape == (4172,) and np.isfinite(theta).all() and report["examples"] == 2


def test_max_hindsight_is_the_highest_pairs_attention():
    """The `max` target (budget_max's ranking) is, per token, the highest of the pairs' own log shares: layer 0's
    question puts 0.9 of its attention on the needle, so the needle's target is that share (log 0.9 x total), twice
    its pooled share, and the token that one head of layer 1 reads gets the same (a mean over that layer's heads
    would halve it); the fit runs on it."""
    from pymemory.namm.training.data import Sample
    from pymemory.namm.training.warm_start import _predicted, examples_from, fit_imitation

    torch = pytest.importorskip("torch")
    H, delay, total, question_start, needle, other = 2, 4, 16, 12, 6, 9
    sample = Sample("r", "passkey", tuple(range(total)), (1,), total - question_start)
    layers = [_question_invocations(H, delay, total, question_start, needle, needle),
              _question_invocations(H, delay, total, question_start, needle, other)]
    for mine, needle_reader in zip(layers[1], layers[0]):  # layer 1's head 0 reads the needle, its head 1 `other`
        mine["attention"][0] = needle_reader["attention"][0]
    examples = examples_from([sample], [layers], delay, delay, n_sink=1, target="max")
    assert [e.positions[-1] for e in examples] == [7, 11]
    for e in examples:
        n = e.positions.size
        assert e.pooled and e.aggregate == "max" and e.ema.shape == (2 * H, n, 17) and e.target.shape == (1, n)
        assert e.target[0, needle] == pytest.approx(np.log(0.9 * total), rel=1e-5)
        if other < n:
            assert e.target[0, other] == pytest.approx(e.target[0, needle])
        assert np.allclose(np.delete(e.target[0, 1:], [i - 1 for i in (needle, other) if i < n]), np.log(0.01))
    # What the fit compares with the target: a smooth maximum over the pairs, within T log P of the maximum.
    scores = torch.tensor([[0.0, 2.0, -1.0], [1.0, -3.0, 0.5], [0.2, 0.1, 0.0]])
    smooth = _predicted(scores, "max")[0]
    assert torch.all(smooth >= scores.max(dim=0).values) and torch.all(smooth <= scores.max(dim=0).values + 0.25 * np.log(3))
    assert torch.equal(_predicted(scores, "mean"), scores.mean(dim=0, keepdim=True))
    theta, report = fit_imitation(examples, np.zeros(17), np.ones(17), steps=3)
    assert theta.shape == (4172,) and np.isfinite(theta).all() and report["examples"] == 2


def test_past_rate_target_is_each_pairs_attention_per_query_since_arrival():
    """The `past_rate` target is causal: per (layer, KV head), the attention a token has received from that pair's
    queries so far divided by the queries since it arrived, as a multiple of a uniform share. In the haystack of
    _question_invocations every query spreads 1/(q + 1) over the tokens 0..q, so token t's rate after query Q is
    (H(Q + 1) - H(t)) / (Q + 1 - t) (H the harmonic numbers); the question's queries then put 0.9 on the needle."""
    from pymemory.namm.training.data import Sample
    from pymemory.namm.training.warm_start import examples_from, fit_imitation

    H, delay, total, question_start, needle = 2, 4, 16, 12, 6
    sample = Sample("r", "passkey", tuple(range(total)), (1,), total - question_start)
    layer = _question_invocations(H, delay, total, question_start, needle, needle)
    layer[0]["attention"][1] *= 0.5  # head 1's first window gives half as much: the heads' targets differ
    examples = examples_from([sample], [[layer, layer]], delay, delay, n_sink=1, target="past_rate")
    assert len(examples) == 2 * total // delay  # every invocation of every layer, the question's included
    first = examples[0]  # layer 0, positions 0..3: token t got sum_{q=t..3} 1/(q+1) from 4 - t queries
    harmonic = np.cumsum([0.0] + [1.0 / (q + 1) for q in range(total)])
    expected = np.log([(harmonic[4] - harmonic[t]) / (4 - t) * 4 for t in range(4)])
    np.testing.assert_allclose(first.target[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first.target[1], np.log(np.exp(expected) * 0.5), rtol=1e-5, atol=1e-6)
    assert first.first == 1 and not first.pooled and first.ema.shape == (H, 4, 17)
    last = examples[total // delay - 1]  # after the question: the needle stands out in both heads
    assert last.positions[-1] == total - 1 and (last.target[:, 1:].argmax(axis=1) + 1 == needle).all()
    theta, report = fit_imitation(examples, np.zeros(17), np.ones(17), steps=3)
    assert theta.shape == (4172,) and np.isfinite(theta).all() and report["examples"] == len(examples)
