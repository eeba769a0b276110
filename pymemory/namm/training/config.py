"""What a NAMM training run is: every setting, validated before any work is spent (docs/namm-training.md).

A run is identified by its configuration: resuming a run directory with different settings is refused, so a
run's log always describes one experiment.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ...errors import InvalidArgumentError
from ..gguf_format import DEPLOY_MODES, MAX_KEY_WEIGHT, MAX_MODES
from .warm_start import TARGETS as WARM_START_TARGETS

DATA_SOURCES = ("austen", "shakespeare", "paul-graham-essays", "passkey", "kv")
TEXT_SOURCES = ("austen", "shakespeare", "paul-graham-essays")
RETRIEVAL_SOURCES = ("passkey", "kv")
COVARIANCES = ("diagonal", "full")
MODES = DEPLOY_MODES
WARM_STARTS = ("imitation", "none")  # or a NAMM GGUF (a path or a shipped name): evolution continues from it
CONFIG_FILE = "config.json"


@dataclass
class TrainConfig:
    """Settings of one `pymemory train-namm` run. Defaults follow the original trainer (namm-spec.md §6) where the
    engine allows it: population 32, σ₀ 0.065, mean 0; `covariance` is diagonal by default (see
    docs/namm-training.md for why) and samples are short, so a run fits in a few CPU hours."""

    model: str = "smollm2-135m-instruct"  # GGUF path or asset name
    out_dir: str = "namm-run"
    data: list[str] = field(default_factory=lambda: ["austen", "passkey", "kv"])
    # Samples and memory.
    sample_tokens: int = 1024  # tokens per sample (prompt + scored continuation)
    scored_tokens: int = 256  # text samples: the last tokens, scored; retrieval samples score only the answer
    cache_fraction: float = 0.25  # peak cells = this fraction of sample_tokens (what a user's memory buys)
    n_sink: int = 4
    namm_delay: int = 64  # tokens between NAMM invocations
    # Per-token coefficient of the spectrogram moving average the NAMM reads (spec §2.3; the released NAMM: 0.99,
    # about 100 queries of memory). Longer memories keep the attention a token drew when it arrived.
    ema_coefficient: float = 0.99
    # Divide that average by the weight its queries carry so far (1 - c^queries): a token's spectrum then averages
    # its whole life instead of starting from zero, so new tokens are not ranked low for being new (a pymemory
    # extension written into the NAMM GGUF; the released NAMM does not correct).
    ema_bias_correction: bool = False
    mode: str = "budget"  # how per-(layer, head) decisions become cell evictions (namm_policy.h)
    quorum: float = 1.0  # quorum mode only
    # Budget modes: standard deviations of each token's key distinctiveness (docs/namm.md, "Keys") added to the
    # NAMM's ranked score while training, so the NAMM is evolved for the ranking it is deployed with; written into
    # the run's ckpt.pt and GGUF (namm.deploy.key_weight). 0 = attention alone, as the original.
    key_weight: float = 0.0
    # Where evolution starts: "imitation" fits θ by gradient descent to predict the attention each cached token
    # will receive (warm_start.py); "none" starts from θ = 0, as the original does; a NAMM GGUF (a path or a
    # shipped name) starts from that NAMM as it is, weights and normalisation statistics (fine-tuning, or
    # continuing a NAMM trained on another model on this one).
    warm_start: str = "imitation"
    warm_start_samples: int = 9  # training-split samples captured for the fit (two thirds text)
    warm_start_horizon: int = 256  # tokens of future queries whose attention a token's target counts
    warm_start_steps: int = 600  # Adam steps
    # What the fit predicts: the whole model's future attention from the mean score over every (layer, KV head)
    # ("pooled"), which is what budget mode ranks by, or each pair's own ("per_head"); pooled measured better on
    # held-out text (docs/results/namm_warm_targets.md, warm_start.py). "max" (budget_max only): the highest
    # score over the pairs predicts the highest pair's attention (docs/results/namm_warm_max.md).
    warm_start_target: str = "pooled"
    # Evolution (pycma).
    population: int = 32
    sigma0: float = 0.065
    covariance: str = "diagonal"
    generations: int = 200
    text_samples: int = 2  # text samples per generation, shared by all members
    retrieval_samples: int = 2  # retrieval samples per generation, shared by all members
    fixed_samples: bool = False  # score every generation on generation 0's samples (a fixed training set)
    heldout_every: int = 10  # generations between held-out evaluations of the CMA mean
    heldout_text: int = 8
    heldout_retrieval: int = 8
    calibration_samples: int = 2  # text samples for the normalisation statistics (all-zero NAMM, no eviction)
    seed: int = 0
    # Compute.
    workers: int = 1  # local worker processes (0 = evaluate in this process)
    threads: int = 0  # CPU threads per worker (0 = cores / workers)
    dask: str = ""  # "" | "local:N" (a LocalCluster of N processes) | a Dask scheduler address (tcp://host:port)

    @property
    def capacity(self) -> int:
        return int(round(self.sample_tokens * self.cache_fraction))

    @property
    def max_cells(self) -> int:
        """Cells kept after each invocation in budget mode: the cache then grows back to `capacity` by the next."""
        return self.capacity - self.namm_delay

    def text_sources(self) -> list[str]:
        return [d for d in self.data if d in TEXT_SOURCES]

    def retrieval_sources(self) -> list[str]:
        return [d for d in self.data if d in RETRIEVAL_SOURCES]

    def validate(self) -> "TrainConfig":
        """Raises InvalidArgumentError naming the setting and what to do; checks nothing that needs the model."""
        unknown = [d for d in self.data if d not in DATA_SOURCES]
        if not self.data or unknown:
            raise InvalidArgumentError(
                f"--data {unknown or self.data!r}: give one or more of {', '.join(DATA_SOURCES)}")
        if not self.text_sources():
            raise InvalidArgumentError("--data needs at least one text source (austen, shakespeare, "
                                       "paul-graham-essays): text is the held-out perplexity and the haystack")
        if self.population < 2:
            raise InvalidArgumentError(f"--population must be at least 2 for CMA-ES (got {self.population})")
        if self.namm_delay < 16 or self.namm_delay % 16:
            raise InvalidArgumentError(f"--namm-delay must be a positive multiple of 16, the STFT hop "
                                       f"(got {self.namm_delay})")
        if not 0.0 < self.ema_coefficient < 1.0:
            raise InvalidArgumentError(f"--ema-coefficient must lie in (0, 1) (got {self.ema_coefficient}); the "
                                       "released NAMM uses 0.99")
        if self.sample_tokens < 256:
            raise InvalidArgumentError(f"--sample-tokens must be at least 256 (got {self.sample_tokens})")
        if not 0.0 < self.cache_fraction < 1.0:
            raise InvalidArgumentError(
                f"--cache-fraction must be in (0, 1): the budget must be below the sample length, or nothing is "
                f"ever evicted (got {self.cache_fraction}, i.e. {self.capacity} of {self.sample_tokens} tokens)")
        if self.capacity < self.n_sink + 2 * self.namm_delay:
            raise InvalidArgumentError(
                f"the cache ({self.capacity} cells = {self.cache_fraction} x {self.sample_tokens}) must hold n_sink + "
                f"2 x namm_delay = {self.n_sink + 2 * self.namm_delay}: raise --cache-fraction or --sample-tokens, "
                "or lower --namm-delay")
        if not 0 < self.scored_tokens <= self.sample_tokens - self.capacity:
            raise InvalidArgumentError(
                f"--scored-tokens must be in (0, sample_tokens - cache] = (0, {self.sample_tokens - self.capacity}] "
                f"so that every scored token comes after evictions began (got {self.scored_tokens})")
        if self.mode not in MODES:
            raise InvalidArgumentError(f"--mode must be one of {MODES} (got {self.mode!r})")
        if not 0.0 < self.quorum <= 1.0:
            raise InvalidArgumentError(f"--quorum must be in (0, 1] (got {self.quorum})")
        if not 0.0 <= self.key_weight <= MAX_KEY_WEIGHT:
            raise InvalidArgumentError(f"--key-weight must be between 0 and {MAX_KEY_WEIGHT:g} (got {self.key_weight})")
        if self.key_weight and self.mode == "quorum":
            raise InvalidArgumentError("--key-weight adds to the score a budget mode ranks by; quorum mode ranks "
                                       "none: use a budget mode (e.g. --mode budget_zmax) or --key-weight 0")
        if self.warm_start not in WARM_STARTS:
            self._check_warm_start_namm()
        if self.warm_start == "imitation":
            if self.warm_start_horizon < self.namm_delay or self.warm_start_horizon % self.namm_delay or \
                    self.warm_start_horizon + self.namm_delay >= self.sample_tokens:
                raise InvalidArgumentError(
                    f"--warm-start-horizon must be a multiple of --namm-delay ({self.namm_delay}) and leave at least "
                    f"one invocation before it in a sample: at most {self.sample_tokens - 2 * self.namm_delay} "
                    f"(got {self.warm_start_horizon})")
            if self.warm_start_target not in WARM_START_TARGETS:
                raise InvalidArgumentError(f"--warm-start-target must be one of {WARM_START_TARGETS} "
                                           f"(got {self.warm_start_target!r})")
            if self.warm_start_target == "max" and self.mode not in MAX_MODES:
                raise InvalidArgumentError("--warm-start-target max fits what --mode budget_max ranks by (each "
                                           f"token's highest score over the pairs); use it with --mode "
                                           f"{' or '.join(MAX_MODES)} (got --mode {self.mode})")
            for name in ("warm_start_samples", "warm_start_steps"):
                if getattr(self, name) < 1:
                    raise InvalidArgumentError(f"--{name.replace('_', '-')} must be at least 1 (or --warm-start none)")
        if self.covariance not in COVARIANCES:
            raise InvalidArgumentError(f"--covariance must be one of {COVARIANCES} (got {self.covariance!r})")
        if not self.sigma0 > 0:
            raise InvalidArgumentError(f"--sigma0 must be > 0 (got {self.sigma0})")
        for name in ("generations", "heldout_every", "calibration_samples"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("text_samples", "retrieval_samples", "heldout_text", "heldout_retrieval", "workers", "threads"):
            if getattr(self, name) < 0:
                raise InvalidArgumentError(f"--{name.replace('_', '-')} must be >= 0")
        if self.text_samples + (self.retrieval_samples if self.retrieval_sources() else 0) < 1:
            raise InvalidArgumentError("each generation needs at least one sample (--text-samples/--retrieval-samples)")
        if self.heldout_text + (self.heldout_retrieval if self.retrieval_sources() else 0) < 1:
            raise InvalidArgumentError("the held-out set needs at least one sample (--heldout-text/--heldout-retrieval)")
        if self.dask and not (self.dask.startswith("local:") or "://" in self.dask):
            raise InvalidArgumentError(f"--dask must be local:N or a scheduler address like tcp://host:8786 "
                                       f"(got {self.dask!r})")
        return self

    def warm_start_namm(self) -> str | None:
        """The NAMM GGUF this run starts from (--warm-start FILE or a shipped name), or None (imitation, none)."""
        if self.warm_start in WARM_STARTS:
            return None
        from ..packaged import resolve_namm

        return resolve_namm(self.warm_start)

    def _check_warm_start_namm(self) -> None:
        """A NAMM to start from must exist and read its attention as this run will: its weights mean what they mean
        only under its moving average and mode (the invocation interval may differ: features do not depend on it)."""
        from ...errors import PymemoryError
        from ..checkpoint import gguf_settings

        try:
            path = self.warm_start_namm()
            settings = gguf_settings(path)
        except (PymemoryError, OSError, ValueError) as exc:
            raise InvalidArgumentError(f"--warm-start must be one of {', '.join(WARM_STARTS)}, or a NAMM GGUF to "
                                       f"continue from (a path or a shipped name): {exc}") from exc
        wanted = {"mode": self.mode, "ema_coefficient": self.ema_coefficient,
                  "ema_bias_correction": self.ema_bias_correction}
        differ = [k for k, v in wanted.items() if k in settings and
                  (abs(settings[k] - v) > 1e-6 if isinstance(v, float) else settings[k] != v)]
        if differ:
            flags = " ".join(f"--{k.replace('_', '-')} {settings[k]}" for k in differ if k != "ema_bias_correction")
            if "ema_bias_correction" in differ:
                flags += " --ema-bias-correction" if settings["ema_bias_correction"] else \
                    " (without --ema-bias-correction)"
            raise InvalidArgumentError(
                f"--warm-start {self.warm_start}: that NAMM was trained with other settings ({', '.join(differ)}); "
                f"train it as it reads its attention: {flags.strip()}")

    def identity(self) -> dict:
        """Settings that define the experiment (a resumed run must match them); compute settings may change."""
        d = asdict(self)
        for name in ("out_dir", "generations", "workers", "threads", "dask"):
            d.pop(name)
        return d

    def to_dict(self) -> dict:
        return asdict(self)

    def namm_hparams(self):
        """The NAMM's hyper-parameters this run trains (released, with its delay and how it reads its EMA)."""
        from dataclasses import replace

        from ..gguf_format import RELEASED

        return replace(RELEASED, delay=self.namm_delay, ema_coefficient=self.ema_coefficient,
                       ema_bias_correction=self.ema_bias_correction)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        # Runs saved before the warm start existed started from θ = 0; before its pooled target, fitted per head.
        d = {"warm_start": "none", "warm_start_target": "per_head", **d}
        return cls(**{k: v for k, v in d.items() if k in known})


def prepare_out_dir(config: TrainConfig) -> tuple[Path, bool]:
    """Creates (or checks) the run directory; returns (path, resuming). Refuses an unwritable directory, and a
    directory holding another experiment's run."""
    out = Path(config.out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write to the output directory {os.fspath(out)!r} ({exc.strerror}); "
                                   "choose another --out") from exc
    saved = out / CONFIG_FILE
    if saved.exists():
        previous = TrainConfig.from_dict(json.loads(saved.read_text()))
        if previous.identity() != config.identity():
            changed = sorted(k for k, v in config.identity().items() if previous.identity().get(k) != v)
            raise InvalidArgumentError(
                f"{os.fspath(out)!r} holds a run with other settings ({', '.join(changed)} differ); resume it with "
                "the same settings or choose another --out")
        return out, True
    saved.write_text(json.dumps(config.to_dict(), indent=2))
    return out, False
