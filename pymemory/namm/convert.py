"""`pymemory convert-namm`: NAMM checkpoint -> NAMM GGUF (format: docs/namm-gguf.md, names: gguf_format.py).

Validates everything before writing (checkpoint.py), writes through a temporary file so a failure never leaves a
half-written GGUF, and prints a summary. Runs without the compiled extension.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from . import gguf_format as fmt
from .checkpoint import NammParams, load_checkpoint, load_vectors


def _require_gguf():
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover
        raise ImportError('writing GGUF files needs the gguf package: pip install "pymemory[namm]"') from exc
    return gguf


def ggml_tensors(params: NammParams) -> dict[str, np.ndarray]:
    """The network in ggml layout: numpy [out, in] (ne0 = in), W_qkv zero-padded from 25 to 32 inputs."""
    t = params.tensors()
    qkv = np.zeros((3 * fmt.HIDDEN, fmt.FEATURES_PADDED), dtype=np.float32)
    qkv[:, : fmt.N_FEATURES] = t["W_qkv"].T
    return {
        "namm.attn_qkv.weight": qkv,
        "namm.attn_qkv.bias": t["b_qkv"],
        "namm.attn_out.weight": np.ascontiguousarray(t["W_o"].T),
        "namm.attn_out.bias": t["b_o"],
        "namm.out.weight": t["w_out"],
        "namm.out.bias": t["b_out"],
        "namm.feat_mean": params.feat_mean,
        "namm.feat_var": params.feat_var,
    }


def write_gguf(params: NammParams, out: str | os.PathLike, weight_type: str = "f32") -> dict:
    """Writes the GGUF; returns a summary (tensors, types, sizes, quantisation errors)."""
    gguf = _require_gguf()
    if weight_type not in fmt.WEIGHT_TYPES:
        raise ValueError(f"weight type must be one of {fmt.WEIGHT_TYPES} (got {weight_type!r})")
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[weight_type]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), fmt.ARCHITECTURE)
    writer.add_uint32("namm.format_version", fmt.FORMAT_VERSION)
    for key, value in fmt.HPARAMS.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))
    writer.add_uint32("namm.param_count", fmt.PARAM_COUNT)
    writer.add_string("namm.source", params.source)
    writer.add_string("namm.weight_type", weight_type)
    if "iter_num" in params.extra:
        writer.add_int32("namm.source.iteration", int(params.extra["iter_num"]))

    summary = {"output": str(out), "source": params.source, "weight_type": weight_type, "tensors": []}
    for name, array in ggml_tensors(params).items():
        shape, may_quantize = fmt.TENSORS[name]
        assert array.shape == shape, (name, array.shape)
        entry = {"name": name, "shape": list(shape), "type": "f32"}
        if may_quantize and weight_type != "f32":
            data = gguf.quants.quantize(array, qtype)
            restored = gguf.quants.dequantize(data, qtype).reshape(shape)
            entry["type"] = weight_type
            entry["max_abs_error"] = float(np.max(np.abs(restored - array)))
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, array.astype(np.float32))
        summary["tensors"].append(entry)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, out)
    summary["bytes"] = out.stat().st_size
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"wrote {summary['output']} ({summary['bytes']:,} bytes, weights {summary['weight_type']})",
             f"  source: {summary['source']}"]
    for t in summary["tensors"]:
        err = f"  max |quantisation error| {t['max_abs_error']:.3g}" if "max_abs_error" in t else ""
        lines.append(f"  {t['name']:<24} {str(t['shape']):<10} {t['type']}{err}")
    return "\n".join(lines)


def convert(args: argparse.Namespace) -> int:
    if args.params or args.mean or args.var:
        if not (args.params and args.mean and args.var):
            raise ValueError("--params, --mean and --var go together (the vector and both statistics)")
        if args.checkpoint:
            raise ValueError("give either a ckpt.pt or --params/--mean/--var, not both")
        params = load_vectors(args.params, args.mean, args.var)
    elif args.checkpoint:
        params = load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
    else:
        raise ValueError("give a trainer checkpoint (ckpt.pt) or --params/--mean/--var")
    summary = write_gguf(params, args.output, args.type)
    print(format_summary(summary))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", default=None, help="evo-memory trainer ckpt.pt")
    parser.add_argument("-o", "--output", required=True, help="NAMM GGUF to write")
    parser.add_argument("--type", choices=fmt.WEIGHT_TYPES, default="f32", help="weight type of the two matrices")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow unpickling ckpt.pt (a pickle can run code: only for files you trust)")
    parser.add_argument("--params", help="flat parameter vector (4172 values; .npy, .pt or text) from another trainer")
    parser.add_argument("--mean", help="17 feature means (with --params)")
    parser.add_argument("--var", help="17 feature variances (with --params)")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert-namm", help="convert a NAMM checkpoint into a NAMM GGUF",
        description="Convert an evo-memory trainer checkpoint (CMA-ES mean + normalisation statistics), or a plain "
        "parameter vector with statistics, into the GGUF the NAMM scorer loads.",
    )
    add_arguments(p)
    p.set_defaults(func=convert)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert_namm", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return convert(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"convert_namm: error: {exc}", file=sys.stderr)
        return 1
