"""The NAMM GGUF format, written down once (see docs/namm-gguf.md): key names, tensor names and layouts, and the
flat-parameter layout of the original trainer. Shared by the converter, the PyTorch reference and the tests; the C++
loader (cpp/namm/namm_model.cpp) reads the same names.
"""
from __future__ import annotations

ARCHITECTURE = "namm"
FORMAT_VERSION = 1

N_FFT = 32
HOP = 16
N_BINS = N_FFT // 2 + 1  # 17
RECENCY_DIM = 8
N_FEATURES = RECENCY_DIM + N_BINS  # 25: [recency || spectrum]
FEATURES_PADDED = 32  # q8_0 / q4_0 blocks are 32 wide along the input dimension
HIDDEN = 32
WEIGHT_TYPES = ("f32", "f16", "q8_0", "q4_0")

# Hyper-parameters of the released "NAMM BAM" configuration (namm-spec.md Appendix A), stored as metadata.
HPARAMS: dict[str, object] = {
    "namm.delay": 512,
    "namm.n_fft": N_FFT,
    "namm.hop": HOP,
    "namm.window": "hann_periodic",
    "namm.ema_coefficient": 0.99,
    "namm.recency.dim": RECENCY_DIM,
    "namm.recency.max_freq": 50000.0,
    "namm.recency.start": 0,
    "namm.feature_order": "recency,spectrum",
    "namm.hidden_dim": HIDDEN,
    "namm.n_heads": 1,
    "namm.mask": "backward",
    "namm.gate": "identity",
    "namm.threshold": 0.0,
    "namm.norm_eps": 1e-7,
    "namm.n_features": N_FEATURES,
    "namm.n_bins": N_BINS,
    "namm.attention_bias": True,
}

# name -> (numpy shape [out, in], may be quantised)
TENSORS: dict[str, tuple[tuple[int, ...], bool]] = {
    "namm.attn_qkv.weight": ((3 * HIDDEN, FEATURES_PADDED), True),
    "namm.attn_qkv.bias": ((3 * HIDDEN,), False),
    "namm.attn_out.weight": ((2 * N_FEATURES, HIDDEN), True),
    "namm.attn_out.bias": ((2 * N_FEATURES,), False),
    "namm.out.weight": ((N_FEATURES,), False),
    "namm.out.bias": ((1,), False),
    "namm.feat_mean": ((N_BINS,), False),
    "namm.feat_var": ((N_BINS,), False),
}


def param_count(hidden: int = HIDDEN, bias: bool = True) -> int:
    """Length of the trainer's flat vector (spec §5.5): 25·3H + 3H·b + H·50 + 50·b + 26."""
    b = int(bias)
    return N_FEATURES * 3 * hidden + 3 * hidden * b + hidden * 2 * N_FEATURES + 2 * N_FEATURES * b + N_FEATURES + 1


PARAM_COUNT = param_count()  # 4172

# Slices of the flat vector θ (spec §5.4); weights are row-major [in][out], used as x @ W + b.
PARAM_LAYOUT = {
    "W_qkv": (0, 2400, (N_FEATURES, 3 * HIDDEN)),
    "b_qkv": (2400, 2496, (3 * HIDDEN,)),
    "W_o": (2496, 4096, (HIDDEN, 2 * N_FEATURES)),
    "b_o": (4096, 4146, (2 * N_FEATURES,)),
    "w_out": (4146, 4171, (N_FEATURES,)),
    "b_out": (4171, 4172, (1,)),
}
