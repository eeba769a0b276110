"""`pymemory convert-namm`: NAMM checkpoint -> NAMM GGUF (format: docs/namm-gguf.md, names: gguf_format.py).

Validates everything before writing (checkpoint.py), writes through a temporary file so a failure never leaves a
half-written GGUF, and prints a summary. Runs without the compiled extension.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

from . import gguf_format as fmt
from .checkpoint import NammVector, _require_gguf, load_checkpoint, load_gguf_as_written, load_vectors


def ggml_tensors(vector: NammVector) -> dict[str, np.ndarray]:
    """The network in ggml layout: numpy [out, in] (ne0 = in), W_qkv zero-padded from 25 to 32 inputs."""
    t = vector.tensors()
    qkv = np.zeros((3 * fmt.HIDDEN, fmt.FEATURES_PADDED), dtype=np.float32)  # [96, 32]
    qkv[:, :fmt.N_FEATURES] = t["W_qkv"].T  # [96, 25]; the scorer pads its features with zeros to match
    return {
        "namm.attn_qkv.weight": qkv,
        "namm.attn_qkv.bias": t["b_qkv"],  # [96]
        "namm.attn_out.weight": np.ascontiguousarray(t["W_o"].T),  # [50, 32]
        "namm.attn_out.bias": t["b_o"],  # [50]
        "namm.out.weight": t["w_out"],  # [25]
        "namm.out.bias": t["b_out"].reshape(1),  # [1]
        "namm.feat_mean": vector.feat_mean.astype(np.float32),  # [17]
        "namm.feat_var": vector.feat_var.astype(np.float32),  # [17]
    }


def write_gguf(vector: NammVector, out: str | os.PathLike, weight_type: str = "f32", *, delay: int | None = None,
               deploy: dict | None = None, ema_coefficient: float | None = None,
               ema_bias_correction: bool | None = None, deploy_delay: int | None = None,
               deploy_neighbours: int | None = None, deploy_key_weight: float | None = None,
               deploy_merge_threshold: float | None = None) -> dict:
    """Writes the NAMM GGUF; only the two weight matrices take ``weight_type`` (f32, f16, q8_0, q4_0).
    ``delay`` overrides the invocation period, ``ema_coefficient`` the spectrogram's per-token moving-average
    coefficient, ``ema_bias_correction`` whether the engine divides that average by its weight so far (defaults:
    the settings a pymemory run recorded in the vector, else the released 512, 0.99 and no correction);
    ``deploy`` (default likewise the run's) records how the NAMM was
    trained to be used ({"mode": one of gguf_format.DEPLOY_MODES, "quorum": float}), which the engine then takes by
    default; ``deploy_delay`` (default the run's recorded one, else none) the interval the engine then runs it at
    instead of ``delay``, the one it was trained at; ``deploy_neighbours`` (default likewise; 0 writes none) how many
    nearest cached tokens on each side a token's ranking score takes the highest of in the budget modes;
    ``deploy_key_weight`` (default likewise; 0 writes none) how many standard deviations of its keys' distinctiveness
    a token's ranking score gains in the budget modes; ``deploy_merge_threshold`` (default likewise; None writes
    none) the centred cosine at which the values of the tokens it gives up merge into kept ones (cpp/value_merge.h).
    Returns a summary: output, source, weight_type, bytes, tensors (name, shape, type, max_abs_error)."""
    gguf = _require_gguf()
    if weight_type not in fmt.WEIGHT_TYPES:
        raise ValueError(f"weight type must be one of {', '.join(fmt.WEIGHT_TYPES)} (got {weight_type!r})")
    qtype = gguf.GGMLQuantizationType[weight_type.upper()]
    recorded = vector.settings or {}
    delay = recorded.get("namm_delay") if delay is None else delay
    ema_coefficient = recorded.get("ema_coefficient") if ema_coefficient is None else ema_coefficient
    if ema_bias_correction is None:
        ema_bias_correction = recorded.get("ema_bias_correction")
    if deploy is None and "mode" in recorded:
        deploy = {"mode": recorded["mode"], "quorum": recorded["quorum"]}
    deploy_delay = recorded.get("deploy_delay") if deploy_delay is None else int(deploy_delay)
    if deploy_delay is not None and (deploy_delay <= 0 or deploy_delay % fmt.RELEASED.hop):
        raise ValueError(f"the deployed interval must be a positive multiple of {fmt.RELEASED.hop} tokens (got "
                         f"{deploy_delay})")
    deploy_neighbours = recorded.get("deploy_neighbours") if deploy_neighbours is None else int(deploy_neighbours)
    if deploy_neighbours is not None and not 0 <= deploy_neighbours <= fmt.MAX_NEIGHBOURS:
        raise ValueError(f"the deployed neighbours must lie between 0 and {fmt.MAX_NEIGHBOURS} (got "
                         f"{deploy_neighbours})")
    deploy_key_weight = (recorded.get("deploy_key_weight") if deploy_key_weight is None
                         else float(deploy_key_weight))
    if deploy_key_weight is not None and not 0 <= deploy_key_weight <= fmt.MAX_KEY_WEIGHT:
        raise ValueError(f"the deployed key weight must lie between 0 and {fmt.MAX_KEY_WEIGHT:g} (got "
                         f"{deploy_key_weight})")
    deploy_merge_threshold = (recorded.get("deploy_merge_threshold") if deploy_merge_threshold is None
                              else float(deploy_merge_threshold))
    if deploy_merge_threshold is not None and not -1.0 <= deploy_merge_threshold <= 1.0:
        raise ValueError(f"the deployed merge threshold is a cosine between -1 and 1 (got {deploy_merge_threshold})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    summary = {"output": str(out), "source": vector.source, "weight_type": weight_type, "tensors": []}
    writer = gguf.GGUFWriter(str(partial), fmt.ARCHITECTURE)
    try:
        writer.add_uint32(fmt.KEY_FORMAT_VERSION, fmt.FORMAT_VERSION)
        add = {"u32": writer.add_uint32, "f32": writer.add_float32, "str": writer.add_string,
               "bool": writer.add_bool}
        overrides = {"delay": None if delay is None else int(delay),
                     "ema_coefficient": None if ema_coefficient is None else float(ema_coefficient),
                     "ema_bias_correction": None if ema_bias_correction is None else bool(ema_bias_correction)}
        hparams = dataclasses.replace(fmt.RELEASED, **{k: v for k, v in overrides.items() if v is not None})
        hparams.check_supported()
        summary["settings"] = {"delay": hparams.delay, "ema_coefficient": hparams.ema_coefficient,
                               "ema_bias_correction": hparams.ema_bias_correction,
                               "deploy": dict(deploy) if deploy else None, "deploy_delay": deploy_delay,
                               "deploy_neighbours": deploy_neighbours or 0,
                               "deploy_key_weight": deploy_key_weight or 0.0,
                               "deploy_merge_threshold": deploy_merge_threshold}
        for key, (kind, value) in hparams.metadata().items():
            add[kind](key, value)
        if deploy:
            if deploy.get("mode") not in fmt.DEPLOY_MODES:
                raise ValueError(f"deploy mode must be one of {fmt.DEPLOY_MODES} (got {deploy.get('mode')!r})")
            writer.add_string(fmt.KEY_DEPLOY_MODE, deploy["mode"])
            writer.add_float32(fmt.KEY_DEPLOY_QUORUM, float(deploy.get("quorum", 1.0)))
        if deploy_delay is not None:
            writer.add_uint32(fmt.KEY_DEPLOY_DELAY, deploy_delay)
        if deploy_neighbours:
            writer.add_uint32(fmt.KEY_DEPLOY_NEIGHBOURS, deploy_neighbours)
        if deploy_key_weight:
            writer.add_float32(fmt.KEY_DEPLOY_KEY_WEIGHT, deploy_key_weight)
        if deploy_merge_threshold is not None:
            writer.add_float32(fmt.KEY_DEPLOY_MERGE_THRESHOLD, deploy_merge_threshold)
        writer.add_string(fmt.KEY_SOURCE, vector.source)
        if vector.iteration is not None:
            writer.add_int32(fmt.KEY_SOURCE_ITERATION, vector.iteration)
        writer.add_string(fmt.KEY_WEIGHT_TYPE, weight_type)
        for name, array in ggml_tensors(vector).items():
            shape, may_quantize = fmt.TENSORS[name]
            entry = {"name": name, "shape": list(shape), "type": "f32"}
            if may_quantize and weight_type != "f32":
                data = gguf.quants.quantize(array, qtype)
                restored = gguf.quants.dequantize(data, qtype).reshape(shape)
                entry["type"] = weight_type
                entry["max_abs_error"] = float(np.max(np.abs(restored - array)))
                writer.add_tensor(name, data, raw_dtype=qtype)
            else:
                writer.add_tensor(name, array)
            summary["tensors"].append(entry)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    summary["bytes"] = out.stat().st_size
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"wrote {summary['output']} ({summary['bytes']:,} bytes, weight type {summary['weight_type']})",
             f"  source: {summary['source']}"]
    s = summary.get("settings")
    if s:
        deploy = f", trained for {s['deploy']['mode']} mode" if s.get("deploy") else ""
        corrected = " (bias-corrected)" if s.get("ema_bias_correction") else ""
        every = (f"runs every {s['deploy_delay']} tokens (trained every {s['delay']})" if s.get("deploy_delay")
                 else f"runs every {s['delay']} tokens")
        pooled = (f", ranks each token with its {s['deploy_neighbours']} nearest cached neighbours on each side"
                  if s.get("deploy_neighbours") else "")
        keyed = (f", adds {s['deploy_key_weight']:g} standard deviations of key distinctiveness to each token's rank"
                 if s.get("deploy_key_weight") else "")
        merged = (f", merges given-up values at centred cosine >= {s['deploy_merge_threshold']:g}"
                  if s.get("deploy_merge_threshold") is not None else "")
        lines.append(f"  {every}, spectrogram moving average {s['ema_coefficient']:g} per token{corrected}{deploy}"
                     f"{pooled}{keyed}{merged}")
    for t in summary["tensors"]:
        error = f"  max |quantisation error| {t['max_abs_error']:.3g}" if "max_abs_error" in t else ""
        lines.append(f"  {t['name']:<24} {str(t['shape']):<10} {t['type']:<5}{error}")
    return "\n".join(lines)


def convert(args: argparse.Namespace) -> int:
    """The convert-namm command: reads a ckpt.pt or --params/--mean/--var, writes the GGUF, prints a summary."""
    vectors = (args.params, args.mean, args.var)
    try:
        if any(vectors):
            if not all(vectors):
                raise ValueError("--params, --mean and --var go together (the vector and both statistics)")
            if args.checkpoint:
                raise ValueError("give either a ckpt.pt or --params/--mean/--var, not both")
            vector = load_vectors(*vectors)
        elif args.checkpoint and Path(args.checkpoint).suffix.lower() == ".gguf":
            # Another weight type or deployed interval for a NAMM GGUF: its vector and settings carry over.
            if Path(args.checkpoint).resolve() == Path(args.output).resolve():
                raise ValueError("write the re-converted NAMM to another file (-o) than the one it is read from")
            vector = load_gguf_as_written(args.checkpoint)
        elif args.checkpoint:
            vector = load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
        else:
            raise ValueError("give a trainer checkpoint (ckpt.pt), a NAMM GGUF, or --params/--mean/--var")
        summary = write_gguf(vector, args.output, args.type, deploy_delay=args.deploy_delay,
                             deploy_neighbours=args.deploy_neighbours, deploy_key_weight=args.deploy_key_weight,
                             deploy_merge_threshold=args.deploy_merge_threshold)
    except ImportError as exc:  # a missing optional dependency: one line that says what to install
        raise RuntimeError(str(exc)) from exc
    print(format_summary(summary))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", default=None, help="evo-memory trainer ckpt.pt, or a NAMM GGUF "
                        "to write again with another --type, --deploy-delay, --deploy-neighbours, --deploy-key-weight or "
                        "--deploy-merge-threshold")
    parser.add_argument("-o", "--output", required=True, help="NAMM GGUF to write")
    parser.add_argument("--type", choices=fmt.WEIGHT_TYPES, default="f32",
                        help="type of the two weight matrices (everything else stays f32); default f32")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow unpickling ckpt.pt (a pickle can run code: only for files you trust)")
    parser.add_argument("--params", help="flat parameter vector θ (4172 values in the trainer's layout; .npy, .pt "
                        "holding one tensor, or text) from another trainer")
    parser.add_argument("--mean", help="the 17 feature means μ (with --params)")
    parser.add_argument("--var", help="the 17 feature variances σ² (with --params)")
    parser.add_argument("--deploy-delay", type=int, default=None, metavar="TOKENS",
                        help="run the NAMM every TOKENS tokens by default (a multiple of 16) instead of the interval "
                        "it was trained at; the features are the same, only read more or less often")
    parser.add_argument("--deploy-neighbours", type=int, default=None, metavar="N",
                        help="in the budget modes rank each token by the highest score among itself and its N "
                        "nearest cached tokens on each side by default (0: its own score; docs/namm.md)")
    parser.add_argument("--deploy-key-weight", type=float, default=None, metavar="W",
                        help="in the budget modes add W standard deviations of each token's key distinctiveness "
                        "(KeyDiff on the keys before RoPE) to the score it ranks by, by default (0: attention "
                        "alone; docs/namm.md, \"Keys\")")
    parser.add_argument("--deploy-merge-threshold", type=float, default=None, metavar="COSINE",
                        help="merge the values of each token the NAMM gives up into the kept token of the most "
                        "similar key at this centred cosine or more (-1..1), by default (docs/namm.md, \"Merged "
                        "values\")")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-namm", help="convert a NAMM checkpoint into a NAMM GGUF",
        description="Convert an evo-memory trainer checkpoint (CMA-ES mean and normalisation statistics), or a "
        "plain parameter vector with statistics, into the GGUF that the NAMM scorer loads (docs/namm-gguf.md).")
    add_arguments(parser)
    parser.set_defaults(func=convert)


def main(argv: list[str] | None = None) -> int:
    """Entry of tools/convert_namm.py: the same arguments as ``pymemory convert-namm``."""
    parser = argparse.ArgumentParser(prog="convert_namm.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return convert(args)
    except (ValueError, OSError, RuntimeError) as exc:  # our messages say what to do: no traceback
        print(f"convert_namm.py: error: {exc}", file=sys.stderr)
        return 1
