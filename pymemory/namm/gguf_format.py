"""The NAMM GGUF format, written down once (docs/namm-gguf.md): hyper-parameters, key names, tensor names and
layouts, and the layout of the trainer's flat parameter vector. Shared by the converter, the readers and the tests;
the C++ loader (cpp/namm/namm_model.cpp) reads the same strings. Needs neither torch nor gguf.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

ARCHITECTURE = "namm"
FORMAT_VERSION = 1
WEIGHT_TYPES = ("f32", "f16", "q8_0", "q4_0")
# Shared-cell rules a NAMM can be deployed with (cpp/namm_policy.h says what each does; the C++ list is
# namm::kDeployModes): quorum of drop votes; the cache held at max_cells by votes then mean score, by each token's
# highest score over the (layer, KV head) pairs, by its highest score standardised within each pair, or by the mean
# with a reserve of max_cells / 8 cells for the highest standardised scores.
DEPLOY_MODES = ("quorum", "budget", "budget_max", "budget_zmax", "budget_mix")
MAX_MODES = ("budget_max", "budget_zmax")  # the modes that rank by a maximum over the pairs


@dataclass(frozen=True)
class NammHparams:
    """Every constant of the released "NAMM BAM" configuration (namm-spec.md Appendix A)."""

    delay: int = 512  # absolute tokens between invocations = attention rows per invocation
    n_fft: int = 32  # STFT window (periodic Hann, center=False, one-sided magnitude)
    hop: int = 16
    window: str = "hann_periodic"
    ema_coefficient: float = 0.99  # per token; per frame a = 0.99^hop
    # pymemory extension (not in the released NAMM): divide the EMA by the weight 1 − c^max(queries, hop) the
    # token's queries carry, so its spectrum averages over its lifetime instead of starting from zero.
    ema_bias_correction: bool = False
    recency_dim: int = 8  # [sin(age·ω_0..3) ‖ cos(age·ω_0..3)]
    recency_max_freq: float = 50000.0  # ω_i = max_freq^(−i/(dim/2))
    recency_start: int = 0  # age = p_now − p + start
    feature_order: str = "recency,spectrum"
    hidden_dim: int = 32  # BAM attention width
    n_heads: int = 1
    mask: str = "backward"  # token i attends to tokens j >= i
    gate: str = "identity"  # H = X ⊙ (1 + g) + r, no nonlinearity on g
    threshold: float = 0.0  # evict when score < threshold
    norm_eps: float = 1e-7  # (E − μ) / max(√σ², eps)
    attention_bias: bool = True

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1  # 17, DC and Nyquist included

    @property
    def n_features(self) -> int:
        return self.recency_dim + self.n_bins  # 25

    @property
    def history(self) -> int:
        """Attention values per token carried to the next invocation (n_fft − hop = 16)."""
        return self.n_fft - self.hop

    @property
    def frames(self) -> int:
        """STFT frames per invocation: (history + delay − n_fft) / hop + 1 = delay / hop = 32."""
        return self.delay // self.hop

    @property
    def ema_per_frame(self) -> float:
        return self.ema_coefficient ** self.hop  # a = 0.8514577710948755

    def check_supported(self) -> "NammHparams":
        """Raises ValueError unless these are the released network's structure (the only one the scorers
        implement) with sane tunable values; returns self."""
        released = NammHparams()
        fixed = ("n_fft", "hop", "window", "recency_dim", "feature_order", "hidden_dim", "n_heads", "mask", "gate",
                 "attention_bias")
        different = [f"{name}={getattr(self, name)!r} (supported: {getattr(released, name)!r})"
                     for name in fixed if getattr(self, name) != getattr(released, name)]
        if different:
            raise ValueError("unsupported NAMM configuration: " + ", ".join(different) +
                             "; only the released NAMM BAM network is implemented")
        if self.delay <= 0 or self.delay % self.hop:
            raise ValueError(f"delay must be a positive multiple of {self.hop} (got {self.delay})")
        if not 0.0 < self.ema_coefficient < 1.0:
            raise ValueError(f"ema_coefficient must lie in (0, 1) (got {self.ema_coefficient})")
        if not (self.recency_max_freq > 0 and self.norm_eps > 0 and self.recency_start >= 0):
            raise ValueError("recency_max_freq and norm_eps must be > 0 and recency_start >= 0")
        return self

    def metadata(self) -> dict[str, tuple[str, object]]:
        """{GGUF key: (value type, value)} of every field plus the derived sizes; types are u32/f32/str/bool."""
        out = {key: (kind, getattr(self, name)) for name, (key, kind) in METADATA_KEYS.items()}
        out["namm.n_features"] = ("u32", self.n_features)
        out["namm.n_bins"] = ("u32", self.n_bins)
        out["namm.param_count"] = ("u32", param_count(self.hidden_dim, self.attention_bias))
        return out


# NammHparams field -> (GGUF key, value type). The C++ loader reads these exact keys and types.
METADATA_KEYS: dict[str, tuple[str, str]] = {
    "delay": ("namm.delay", "u32"),
    "n_fft": ("namm.n_fft", "u32"),
    "hop": ("namm.hop", "u32"),
    "window": ("namm.window", "str"),
    "ema_coefficient": ("namm.ema_coefficient", "f32"),
    "ema_bias_correction": ("namm.ema_bias_correction", "bool"),
    "recency_dim": ("namm.recency.dim", "u32"),
    "recency_max_freq": ("namm.recency.max_freq", "f32"),
    "recency_start": ("namm.recency.start", "u32"),
    "feature_order": ("namm.feature_order", "str"),
    "hidden_dim": ("namm.hidden_dim", "u32"),
    "n_heads": ("namm.n_heads", "u32"),
    "mask": ("namm.mask", "str"),
    "gate": ("namm.gate", "str"),
    "threshold": ("namm.threshold", "f32"),
    "norm_eps": ("namm.norm_eps", "f32"),
    "attention_bias": ("namm.attention_bias", "bool"),
}
assert set(METADATA_KEYS) == {f.name for f in fields(NammHparams)}
# Keys that files written before they existed lack: a reader takes the released value when one is absent.
OPTIONAL_KEYS = frozenset({"ema_bias_correction"})

KEY_FORMAT_VERSION = "namm.format_version"  # u32
KEY_SOURCE = "namm.source"  # str: file and vector the parameters came from
KEY_SOURCE_ITERATION = "namm.source.iteration"  # i32, only when the checkpoint records it
KEY_WEIGHT_TYPE = "namm.weight_type"  # str: type of the two matrices
KEY_DEPLOY_MODE = "namm.deploy.mode"  # str, optional: one of DEPLOY_MODES, the mode a trained NAMM was evolved in
KEY_DEPLOY_QUORUM = "namm.deploy.quorum"  # f32, optional: its quorum
# u32, optional: tokens between invocations when deployed, chosen by measurement after training (namm.delay is the
# interval it was trained at; the features do not depend on it, only how often they are read)
KEY_DEPLOY_DELAY = "namm.deploy.delay"
# u32, optional: in the budget modes a token ranks by the highest score among itself and this many nearest cached
# tokens on each side (chosen by measurement; absent = 0, each token by its own score)
KEY_DEPLOY_NEIGHBOURS = "namm.deploy.neighbours"
MAX_NEIGHBOURS = 64  # the engine's bound (cpp/namm/namm_model.h kMaxNeighbours)
# f32, optional: in the budget modes a token's ranked score gains this many standard deviations of its keys'
# distinctiveness (KeyDiff on the keys before RoPE; chosen by measurement; absent = 0, attention alone)
KEY_DEPLOY_KEY_WEIGHT = "namm.deploy.key_weight"
MAX_KEY_WEIGHT = 100.0  # the engine's bound (cpp/namm/namm_model.h kMaxKeyWeight)
# f32, optional: the values of each token the NAMM gives up are merged into the kept token of the most similar key
# when their centred cosine reaches this (-1..1; cpp/value_merge.h; chosen by measurement; absent = no merging)
KEY_DEPLOY_MERGE_THRESHOLD = "namm.deploy.merge_threshold"

RELEASED = NammHparams()
N_BINS = RELEASED.n_bins  # 17
N_FEATURES = RELEASED.n_features  # 25
HIDDEN = RELEASED.hidden_dim  # 32
FEATURES_PADDED = 32  # q8_0 / q4_0 blocks are 32 values wide along ne0 (the input dimension)


def param_count(hidden: int = HIDDEN, bias: bool = True) -> int:
    """Length of the trainer's flat vector (spec §5.5): 25·3H + 3H·b + H·50 + 50·b + 26."""
    b = int(bias)
    return N_FEATURES * 3 * hidden + 3 * hidden * b + hidden * 2 * N_FEATURES + 2 * N_FEATURES * b + N_FEATURES + 1


PARAM_COUNT = param_count()  # 4172


def _layout() -> dict[str, tuple[int, int, tuple[int, ...]]]:
    # Spec §5.4: ops in order qkv, attention output, final linear; each stored weight then bias, weights row-major
    # [in][out] (used as x @ W + b).
    shapes = {"W_qkv": (N_FEATURES, 3 * HIDDEN), "b_qkv": (3 * HIDDEN,),
              "W_o": (HIDDEN, 2 * N_FEATURES), "b_o": (2 * N_FEATURES,),
              "w_out": (N_FEATURES,), "b_out": ()}
    layout, offset = {}, 0
    for name, shape in shapes.items():
        size = 1
        for dim in shape:
            size *= dim
        layout[name] = (offset, offset + size, shape)
        offset += size
    assert offset == PARAM_COUNT
    return layout


# name -> (start, end, shape) in θ: W_qkv [0, 2400), b_qkv [2400, 2496), W_o [2496, 4096), b_o [4096, 4146),
# w_out [4146, 4171), b_out 4171.
PARAM_LAYOUT = _layout()

# GGUF tensor name -> (numpy shape [out, in], ggml ne = reversed; may take the requested weight type).
TENSORS: dict[str, tuple[tuple[int, ...], bool]] = {
    "namm.attn_qkv.weight": ((3 * HIDDEN, FEATURES_PADDED), True),  # W_qkvᵀ, inputs 25..31 zero
    "namm.attn_qkv.bias": ((3 * HIDDEN,), False),
    "namm.attn_out.weight": ((2 * N_FEATURES, HIDDEN), True),  # W_oᵀ
    "namm.attn_out.bias": ((2 * N_FEATURES,), False),
    "namm.out.weight": ((N_FEATURES,), False),
    "namm.out.bias": ((1,), False),
    "namm.feat_mean": ((N_BINS,), False),
    "namm.feat_var": ((N_BINS,), False),
}
