"""Derive small GGUF files from a real model for negative tests (never committed; written to tmp dirs).

`to_mrope_model` turns a llama-architecture model into a `qwen2vl` one (multi-axis M-RoPE positions), keeping
its first layers. llama.cpp loads and runs it, but cannot shift its cached positions: exactly the kind of model
the engine must refuse with a clear error.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np


def _cut_copy(source: Path, target: Path, n_layers: int, new_arch: str | None, extra: dict[str, list]) -> Path:
    """`source`'s metadata and tensors cut to its first n_layers, the architecture renamed to new_arch (keys
    follow), plus `extra` array keys."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    new_arch = new_arch or arch
    writer = gguf.GGUFWriter(str(target), new_arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        new_name = f"{new_arch}.{name[len(arch) + 1:]}" if name.startswith(arch + ".") else name
        if new_name == f"{new_arch}.block_count":
            writer.add_uint32(new_name, n_layers)
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            if field.types[-1] == gguf.GGUFValueType.STRING:
                values = [str(bytes(field.parts[i]), "utf-8") for i in field.data]
            else:
                values = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(new_name, values)
        elif value_type == gguf.GGUFValueType.STRING:
            writer.add_string(new_name, str(bytes(field.parts[-1]), "utf-8"))
        else:
            writer.add_key_value(new_name, field.parts[-1].tolist()[0], value_type)
    for key, values in extra.items():
        writer.add_array(key.format(arch=new_arch), values)
    for tensor in reader.tensors:
        m = re.match(r"blk\.(\d+)\.", tensor.name)
        if m and int(m.group(1)) >= n_layers:
            continue
        # For quantized types the reader's data is the byte layout [rows, bytes per row]; the writer infers the
        # element shape from it.
        writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def to_mrope_model(source: Path, target: Path, n_layers: int = 2) -> Path:
    return _cut_copy(source, target, n_layers, "qwen2vl", {"{arch}.rope.dimension_sections": [8, 12, 12, 0]})


def with_swa_pattern(source: Path, target: Path, pattern: list[bool]) -> Path:
    """The same architecture cut to len(pattern) layers, with `<arch>.attention.sliding_window_pattern` set to this
    per-layer list (True = sliding-window layer), which llama.cpp reads instead of the architecture's default."""
    return _cut_copy(source, target, len(pattern), None,
                     {"{arch}.attention.sliding_window_pattern": [bool(p) for p in pattern]})


def _patched_copy(source: Path, target: Path, key: str, value_header: str, expected: tuple, value: bytes,
                  what: str) -> Path:
    """A copy of `source` whose metadata value for `key` (matched by the end of its name) is overwritten in place by
    `value`, after checking that the value's header (struct format `value_header`) is `expected`. Rewriting a GGUF
    with a 262k-token vocabulary takes a minute on a small machine; patching the copy takes a second."""
    import shutil
    import struct

    shutil.copyfile(source, target)
    with open(target, "r+b") as f:
        head = f.read(64 << 20)  # the metadata section, before the tensors
        at = head.find(key.encode())
        assert at > 0, f"no {key} key"
        at += len(key)
        assert struct.unpack_from(value_header, head, at) == expected, f"{key} is not {what}"
        f.seek(at + struct.calcsize(value_header))
        f.write(value)
    return target


def patch_swa_pattern(source: Path, target: Path, pattern: list[bool]) -> Path:
    """A copy of a with_swa_pattern() file with another pattern of the same length."""
    return _patched_copy(source, target, ".attention.sliding_window_pattern", "<IIQ", (9, 7, len(pattern)),
                         bytes(int(bool(p)) for p in pattern), "a bool array of that length")


def with_training_context(source: Path, target: Path, n_ctx_train: int) -> Path:
    """A copy of `source` whose `<arch>.context_length` (the training context llama.cpp reports as n_ctx_train) is
    n_ctx_train: the weights are untouched, so the model runs as before."""
    import struct

    return _patched_copy(source, target, ".context_length", "<I", (4,), struct.pack("<I", n_ctx_train), "a uint32")
