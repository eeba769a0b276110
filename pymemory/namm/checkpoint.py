"""Reading and validating NAMM parameters: the evo-memory trainer's `ckpt.pt`, plain vectors from other trainers,
and our own NAMM GGUF.

The trainer saves `torch.save({'evolution_state': CMA_ES.state_dict(), 'iter_num': int, 'best_val_loss':
numpy.float64})` (namm-spec.md §5). Evaluation uses the CMA-ES **mean** (not `best_member`) and the normalisation
buffers `stored_buffers_to_save.token_embedding_0_output_{mean,var}`. Everything is checked before anything is
used, and every error names the file, what is wrong and what to do. Needs torch only for `.pt` files and gguf only
for `.gguf` files.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import PymemoryError
from . import gguf_format as fmt

STATS_PREFIX = "stored_buffers_to_save.token_embedding_0_"
MEAN_KEY = STATS_PREFIX + "output_mean"
VAR_KEY = STATS_PREFIX + "output_var"
COMPILED_PREFIX = "_orig_mod."  # added by torch.compile; the trainer strips it too (memory_trainer.py:1097)
# pymemory's trainer also records how its NAMM is to run (the original keeps that in its Hydra config, not the
# checkpoint): {"namm_delay": int, "ema_coefficient": float, "mode": str, "quorum": float}.
SETTINGS_KEY = "pymemory_settings"


class NammCheckpointError(PymemoryError, ValueError):
    """A NAMM checkpoint, parameter file or NAMM GGUF is unusable; the message says why and what to do."""


@dataclass
class NammVector:
    """The learned state of a NAMM as the trainer stores it: the flat vector θ and the 17 feature statistics."""

    theta: np.ndarray  # float32 [4172]
    feat_mean: np.ndarray  # float32 [17]  μ
    feat_var: np.ndarray  # float32 [17]  σ², population variances
    source: str = ""  # provenance: file and vector
    iteration: int | None = None  # trainer iteration, when the checkpoint records it
    settings: dict | None = None  # SETTINGS_KEY of a pymemory run's ckpt.pt: the GGUF's delay, EMA, deploy mode

    def tensors(self) -> dict[str, np.ndarray]:
        """θ sliced into the network's float32 tensors in the trainer's x @ W layout (spec §5.4):
        W_qkv [25, 96], b_qkv [96], W_o [32, 50], b_o [50], w_out [25], b_out []."""
        return {name: self.theta[start:end].reshape(shape).astype(np.float32)
                for name, (start, end, shape) in fmt.PARAM_LAYOUT.items()}


def _require_torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError('reading a PyTorch file needs torch: pip install "pymemory[namm]"') from exc
    return torch


def _require_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ImportError('reading or writing a NAMM GGUF needs the gguf package: pip install "pymemory[namm]"') \
            from exc
    return gguf


def _implied_architecture(n: int) -> str:
    """Which hidden size / bias the length n would imply (n = 25·3H + 3H·b + 50H + 50b + 26), if any."""
    fits = [f"hidden={hidden}, bias={bool(b)}" for b in (0, 1)
            for hidden, rest in [divmod(n - 26 - 50 * b, 125 + 3 * b)] if rest == 0 and hidden > 0]
    if not fits:
        return "; that length fits no hidden size of the BAM network, so this is not a NAMM BAM parameter vector"
    return (f"; that length fits {' or '.join(fits)}, which the scorers do not support: only hidden=32 with "
            "attention bias and 1 head (the released configuration) can be converted")


def validate_vector(theta, feat_mean, feat_var, source: str, iteration: int | None = None) -> NammVector:
    """Checks the vector length, finiteness and the statistics; returns float32 NammVector or raises
    NammCheckpointError."""
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)  # [4172]
    if theta.size != fmt.PARAM_COUNT:
        raise NammCheckpointError(
            f"{source}: the parameter vector has {theta.size} values, expected {fmt.PARAM_COUNT} "
            f"(25·3H + 3H·b + H·50 + 50·b + 26 with hidden H=32, bias b=1){_implied_architecture(theta.size)}")
    if not np.all(np.isfinite(theta)):
        bad = np.flatnonzero(~np.isfinite(theta))
        raise NammCheckpointError(
            f"{source}: the parameter vector has {bad.size} NaN or infinite values (first at index {bad[0]}); the "
            "training run diverged or the file is corrupted: use an earlier checkpoint")
    stats = {}
    for name, values in (("mean", feat_mean), ("variance", feat_var)):
        values = np.asarray(values, dtype=np.float64).reshape(-1)  # [17]
        if values.size != fmt.N_BINS:
            raise NammCheckpointError(
                f"{source}: the feature {name} has {values.size} values, expected {fmt.N_BINS} (one per spectrum "
                "bin, stored as [1, 1, 1, 17])")
        if not np.all(np.isfinite(values)):
            raise NammCheckpointError(f"{source}: the feature {name} contains NaN or infinite values")
        stats[name] = values
    if np.any(stats["variance"] < 0):
        raise NammCheckpointError(
            f"{source}: the feature variances must be >= 0 (found {stats['variance'].min():.3g}); the statistics "
            "are corrupted")
    if np.all(stats["variance"] == 0):
        raise NammCheckpointError(
            f"{source}: all feature variances are zero, so the normalisation statistics were never estimated (the "
            "original would silently skip normalisation); use a checkpoint saved after the first evaluation")
    return NammVector(theta.astype(np.float32), stats["mean"].astype(np.float32),
                      stats["variance"].astype(np.float32), source, iteration)


# ---- the trainer's ckpt.pt ----------------------------------------------------------------------------------------

def _check_torch_save_container(path: Path) -> None:
    """Recognises a torch.save file without unpickling it: a zip with a data.pkl member, or a legacy raw pickle."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise NammCheckpointError(f"{path} is empty; expected the trainer's ckpt.pt")
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise NammCheckpointError(
                f"{path} is a truncated or corrupted zip archive ({exc}); copy the ckpt.pt again") from exc
        if not any(name.endswith("data.pkl") for name in names):
            raise NammCheckpointError(f"{path} is a zip archive but not a torch.save checkpoint (no data.pkl)")
        return
    if head[0] == 0x80:  # pickle protocol opcode: a torch.save file written with the legacy format
        return
    try:
        head.decode("utf-8")
        kind = "a text file"
    except UnicodeDecodeError:
        kind = "neither a zip archive nor a pickle"
    raise NammCheckpointError(
        f"{path} is {kind} (starts with {head[:8]!r}), not a torch.save checkpoint; pass the trainer's ckpt.pt, "
        "or a parameter vector with --params/--mean/--var")


def _as_array(value, key: str, path: Path) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().double().numpy()
    if isinstance(value, (np.ndarray, np.generic, float, int)):
        return np.asarray(value, dtype=np.float64)
    raise NammCheckpointError(f"{path}: evolution_state[{key!r}] is a {type(value).__name__}, expected a tensor")


def load_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> NammVector:
    """Reads θ = ``evolution_state['mean']`` and the feature statistics from the trainer's ``ckpt.pt``.

    A ckpt.pt is a Python pickle (it holds a numpy scalar, so ``weights_only=True`` cannot read it), and
    unpickling can run arbitrary code, so it is loaded only with ``trust_pickle=True`` (CLI ``--trust-pickle``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    if not path.is_file():
        raise NammCheckpointError(f"{path} is not a file; pass the trainer's ckpt.pt inside that run directory")
    _check_torch_save_container(path)
    if not trust_pickle:
        raise NammCheckpointError(
            f"{path} is a pickle, and loading a pickle can execute arbitrary code. If you trust this file, pass "
            "trust_pickle=True (CLI: --trust-pickle); otherwise export the parameter vector and statistics and use "
            "--params/--mean/--var")
    torch = _require_torch()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling a damaged file raises many exception types
        raise NammCheckpointError(
            f"{path} cannot be read as a torch.save checkpoint (truncated or corrupted): "
            f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("evolution_state"), dict):
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise NammCheckpointError(
            f"{path} is not an evo-memory trainer checkpoint: no 'evolution_state' dictionary (found {found})")
    state = {}
    for key, value in checkpoint["evolution_state"].items():
        key = str(key)
        while key.startswith(COMPILED_PREFIX):
            key = key[len(COMPILED_PREFIX):]
        state[key] = value
    for key in ("mean", MEAN_KEY, VAR_KEY):
        if key not in state:
            raise NammCheckpointError(
                f"{path}: evolution_state has no {key!r}; the keys present are {sorted(state)}. A NAMM checkpoint "
                "saved by the evo-memory trainer has the CMA-ES 'mean' and the normalisation statistics")
    iteration = checkpoint.get("iter_num")
    iteration = int(iteration) if isinstance(iteration, (int, np.integer)) else None
    source = f"{path.name}: evolution_state.mean (CMA-ES mean, not best_member)"
    if iteration is not None:
        source += f", iteration {iteration}"
    vector = validate_vector(_as_array(state["mean"], "mean", path), _as_array(state[MEAN_KEY], MEAN_KEY, path),
                             _as_array(state[VAR_KEY], VAR_KEY, path), source, iteration)
    if SETTINGS_KEY in checkpoint:
        vector.settings = validate_settings(checkpoint[SETTINGS_KEY], path)
    return vector


def validate_settings(settings, path) -> dict:
    """A run's recorded settings (SETTINGS_KEY), checked as the GGUF writer and the engine would check them."""
    def bad(what: str):
        raise NammCheckpointError(f"{path}: {SETTINGS_KEY} {what}; the file was not written by pymemory's trainer "
                                  "or is damaged (convert its vector with --params/--mean/--var instead)")

    if not isinstance(settings, dict):
        bad(f"is a {type(settings).__name__}, not a dictionary")
    out = {}
    delay, ema = settings.get("namm_delay", fmt.RELEASED.delay), settings.get("ema_coefficient",
                                                                              fmt.RELEASED.ema_coefficient)
    if not isinstance(delay, (int, np.integer)) or not isinstance(ema, (int, float, np.integer, np.floating)):
        bad(f"namm_delay must be an integer and ema_coefficient a number (got {delay!r}, {ema!r})")
    try:  # the GGUF's own checks of these hyper-parameters
        replace(fmt.RELEASED, delay=int(delay), ema_coefficient=float(ema)).check_supported()
    except ValueError as exc:
        bad(str(exc))
    out.update({k: v for k, v in (("namm_delay", int(delay)), ("ema_coefficient", float(ema))) if k in settings})
    correction = settings.get("ema_bias_correction", False)
    if not isinstance(correction, (bool, np.bool_)):
        bad(f"ema_bias_correction must be true or false (got {correction!r})")
    if "ema_bias_correction" in settings:
        out["ema_bias_correction"] = bool(correction)
    mode = settings.get("mode")
    if mode is not None:
        if mode not in fmt.DEPLOY_MODES:
            bad(f"mode must be one of {fmt.DEPLOY_MODES} (got {mode!r})")
        out["mode"] = mode
        quorum = settings.get("quorum", 1.0)
        if not isinstance(quorum, (int, float)) or not 0.0 < float(quorum) <= 1.0:
            bad(f"quorum must lie in (0, 1] (got {quorum!r})")
        out["quorum"] = float(quorum)
    deploy_delay = settings.get("deploy_delay")
    if deploy_delay is not None:
        if not isinstance(deploy_delay, (int, np.integer)) or deploy_delay <= 0 or deploy_delay % fmt.RELEASED.hop:
            bad(f"deploy_delay must be a positive multiple of {fmt.RELEASED.hop} (got {deploy_delay!r})")
        out["deploy_delay"] = int(deploy_delay)
    neighbours = settings.get("deploy_neighbours")
    if neighbours is not None:
        if not isinstance(neighbours, (int, np.integer)) or not 0 <= neighbours <= fmt.MAX_NEIGHBOURS:
            bad(f"deploy_neighbours must be an integer between 0 and {fmt.MAX_NEIGHBOURS} (got {neighbours!r})")
        out["deploy_neighbours"] = int(neighbours)
    key_weight = settings.get("deploy_key_weight")
    if key_weight is not None:
        if (isinstance(key_weight, bool) or not isinstance(key_weight, (int, float, np.integer, np.floating))
                or not 0 <= float(key_weight) <= fmt.MAX_KEY_WEIGHT):
            bad(f"deploy_key_weight must be a number between 0 and {fmt.MAX_KEY_WEIGHT:g} (got {key_weight!r})")
        out["deploy_key_weight"] = float(key_weight)
    merge = settings.get("deploy_merge_threshold")
    if merge is not None:
        if (isinstance(merge, bool) or not isinstance(merge, (int, float, np.integer, np.floating))
                or not -1.0 <= float(merge) <= 1.0):
            bad(f"deploy_merge_threshold must be a cosine between -1 and 1 (got {merge!r})")
        out["deploy_merge_threshold"] = float(merge)
    return out


# ---- plain vectors from other trainers ----------------------------------------------------------------------------

def _read_array(path: str | os.PathLike, what: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in (".pt", ".pth"):
            torch = _require_torch()
            value = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
            if not hasattr(value, "detach"):
                raise ValueError(f"it holds a {type(value).__name__}, expected one tensor")
            return value.detach().cpu().double().numpy()
        return np.loadtxt(path, dtype=np.float64, ndmin=1)
    except (ValueError, OSError, RuntimeError, EOFError) as exc:
        raise NammCheckpointError(
            f"{path}: cannot read the {what} ({exc}); use .npy, a .pt holding one tensor, or whitespace-separated "
            "text") from exc


def load_vectors(params: str | os.PathLike, mean: str | os.PathLike, var: str | os.PathLike) -> NammVector:
    """θ [4172] in the trainer's layout (spec §5.4) and the 17 feature means and variances, each as ``.npy``, a
    ``.pt`` holding one tensor (read with ``weights_only=True``), or whitespace-separated text (any other suffix)."""
    source = f"vectors {Path(params).name}, {Path(mean).name}, {Path(var).name}"
    return validate_vector(_read_array(params, "parameter vector"), _read_array(mean, "feature mean"),
                           _read_array(var, "feature variance"), source)


# ---- our NAMM GGUF ------------------------------------------------------------------------------------------------

def _field_value(reader, key: str, kind: str, path: Path):
    gguf = _require_gguf()
    expected_type = {"u32": gguf.GGUFValueType.UINT32, "i32": gguf.GGUFValueType.INT32,
                     "f32": gguf.GGUFValueType.FLOAT32, "str": gguf.GGUFValueType.STRING,
                     "bool": gguf.GGUFValueType.BOOL}[kind]
    field = reader.fields.get(key)
    if field is None:
        raise NammCheckpointError(f"{path}: metadata key {key!r} is missing; re-convert with pymemory convert-namm")
    if field.types != [expected_type]:
        raise NammCheckpointError(f"{path}: metadata {key!r} has type {field.types}, expected {kind}")
    value = field.contents()
    if kind == "f32":
        # f32 metadata stand for short decimals (0.99, 1e-07): take the shortest decimal that round-trips, so the
        # reader computes with the same double the converter wrote.
        return float(str(np.float32(value)))
    return value


def load_gguf(path: str | os.PathLike) -> tuple[NammVector, fmt.NammHparams]:
    """Reads a NAMM GGUF back (dequantising f16/q8_0/q4_0 matrices) with the checks of docs/namm-gguf.md."""
    _, vector, hparams = _read_gguf(path)
    return vector, hparams


def _read_gguf(path: str | os.PathLike):
    """load_gguf's work, also handing back the open reader for keys beyond the network's (run_settings)."""
    gguf = _require_gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NAMM GGUF not found: {str(path)!r}")
    try:
        reader = gguf.GGUFReader(os.fspath(path))
    except Exception as exc:  # the reader raises ValueError/struct.error/IndexError on foreign or truncated files
        raise NammCheckpointError(f"{path} is not a readable GGUF file (truncated or another format): {exc}") \
            from exc
    architecture = _field_value(reader, "general.architecture", "str", path)
    if architecture != fmt.ARCHITECTURE:
        raise NammCheckpointError(
            f"{path} is a GGUF of architecture {architecture!r}, not a NAMM; convert a NAMM checkpoint with "
            "pymemory convert-namm")
    version = _field_value(reader, fmt.KEY_FORMAT_VERSION, "u32", path)
    if version != fmt.FORMAT_VERSION:
        raise NammCheckpointError(
            f"{path} has NAMM format version {version}; this pymemory reads version {fmt.FORMAT_VERSION}: "
            "re-convert the checkpoint with this pymemory")
    absent = {key for name, (key, _) in fmt.METADATA_KEYS.items()
              if name in fmt.OPTIONAL_KEYS and key not in reader.fields}  # released values apply
    hparams = fmt.NammHparams(**{name: _field_value(reader, key, kind, path)
                                 for name, (key, kind) in fmt.METADATA_KEYS.items() if key not in absent})
    try:
        hparams.check_supported()
    except ValueError as exc:
        raise NammCheckpointError(f"{path}: {exc}") from exc
    for key, (kind, value) in hparams.metadata().items():
        if key not in absent and _field_value(reader, key, kind, path) != value:
            raise NammCheckpointError(f"{path}: metadata {key!r} must be {value} for this network")

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    if set(tensors) != set(fmt.TENSORS):
        raise NammCheckpointError(
            f"{path}: expected exactly the tensors {sorted(fmt.TENSORS)}, found {sorted(tensors)}")
    quantizable = {gguf.GGMLQuantizationType[name.upper()] for name in fmt.WEIGHT_TYPES}
    arrays = {}
    for name, (shape, may_quantize) in fmt.TENSORS.items():
        tensor = tensors[name]
        ggml_shape = tuple(int(d) for d in tensor.shape)  # ne0 first
        if ggml_shape != tuple(reversed(shape)):
            raise NammCheckpointError(
                f"{path}: tensor {name} has ggml shape {list(ggml_shape)}, expected {list(reversed(shape))}")
        allowed = quantizable if may_quantize else {gguf.GGMLQuantizationType.F32}
        if tensor.tensor_type not in allowed:
            raise NammCheckpointError(
                f"{path}: tensor {name} has type {tensor.tensor_type.name}, expected one of "
                f"{sorted(t.name for t in allowed)}")
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        arrays[name] = np.array(values, dtype=np.float32).reshape(shape)  # a copy, detached from the memory map
    qkv = arrays["namm.attn_qkv.weight"]  # [96, 32]
    if np.any(qkv[:, fmt.N_FEATURES:] != 0):
        raise NammCheckpointError(
            f"{path}: namm.attn_qkv.weight input columns {fmt.N_FEATURES}..{fmt.FEATURES_PADDED - 1} must be zero "
            "padding; the file was not written by pymemory convert-namm")
    theta = np.concatenate([  # back to the trainer's layout: undo padding and transposes
        qkv[:, :fmt.N_FEATURES].T.reshape(-1),  # W_qkv [25, 96]
        arrays["namm.attn_qkv.bias"],  # [96]
        arrays["namm.attn_out.weight"].T.reshape(-1),  # W_o [32, 50]
        arrays["namm.attn_out.bias"],  # [50]
        arrays["namm.out.weight"],  # [25]
        arrays["namm.out.bias"],  # [1]
    ])
    source = f"{path.name} ({_field_value(reader, fmt.KEY_SOURCE, 'str', path)})"
    vector = validate_vector(theta, arrays["namm.feat_mean"], arrays["namm.feat_var"], source)
    if fmt.KEY_SOURCE_ITERATION in reader.fields:
        vector.iteration = int(_field_value(reader, fmt.KEY_SOURCE_ITERATION, "i32", path))
    return reader, vector, hparams


def gguf_settings(path: str | os.PathLike) -> dict:
    """A NAMM GGUF's settings in the form a run records them (SETTINGS_KEY): the interval it was trained at
    (namm_delay), its moving average, and, when the file records them, the mode and quorum it was trained in and
    the interval it is deployed at (deploy_delay)."""
    reader, _, hparams = _read_gguf(path)
    return _settings_of(reader, hparams, Path(path))


def load_gguf_as_written(path: str | os.PathLike) -> NammVector:
    """A NAMM GGUF read back to be written again (another weight type or deployed interval): its vector with the
    provenance the file records (not wrapped in this file's name) and its settings, from one read."""
    reader, vector, hparams = _read_gguf(path)
    vector.source = _field_value(reader, fmt.KEY_SOURCE, "str", Path(path))
    vector.settings = _settings_of(reader, hparams, Path(path))
    return vector


def _settings_of(reader, hparams: fmt.NammHparams, path: Path) -> dict:
    out = {"namm_delay": hparams.delay, "ema_coefficient": hparams.ema_coefficient,
           "ema_bias_correction": hparams.ema_bias_correction}
    if fmt.KEY_DEPLOY_MODE in reader.fields:
        out["mode"] = _field_value(reader, fmt.KEY_DEPLOY_MODE, "str", path)
        out["quorum"] = float(_field_value(reader, fmt.KEY_DEPLOY_QUORUM, "f32", path)) \
            if fmt.KEY_DEPLOY_QUORUM in reader.fields else 1.0
    if fmt.KEY_DEPLOY_DELAY in reader.fields:
        out["deploy_delay"] = int(_field_value(reader, fmt.KEY_DEPLOY_DELAY, "u32", path))
    if fmt.KEY_DEPLOY_NEIGHBOURS in reader.fields:
        out["deploy_neighbours"] = int(_field_value(reader, fmt.KEY_DEPLOY_NEIGHBOURS, "u32", path))
    if fmt.KEY_DEPLOY_KEY_WEIGHT in reader.fields:
        out["deploy_key_weight"] = float(_field_value(reader, fmt.KEY_DEPLOY_KEY_WEIGHT, "f32", path))
    if fmt.KEY_DEPLOY_MERGE_THRESHOLD in reader.fields:
        out["deploy_merge_threshold"] = float(_field_value(reader, fmt.KEY_DEPLOY_MERGE_THRESHOLD, "f32", path))
    return validate_settings(out, path)


def run_settings(path: str | os.PathLike) -> dict:
    """How the engine runs a NAMM GGUF by default: its invocation interval (the deployed one when the file records
    one, else the trained one), the interval it was trained at, its moving average, the mode it was trained in
    (None when the file records none: the engine then uses quorum mode), its neighbours, its key weight (0 when
    none) and its merge threshold (None when it merges nothing)."""
    s = gguf_settings(path)
    return {"namm_delay": s.get("deploy_delay", s["namm_delay"]), "trained_delay": s["namm_delay"],
            "ema_coefficient": s["ema_coefficient"], "ema_bias_correction": s["ema_bias_correction"],
            "mode": s.get("mode"), "neighbours": s.get("deploy_neighbours", 0),
            "key_weight": s.get("deploy_key_weight", 0.0), "merge_threshold": s.get("deploy_merge_threshold")}
