"""Figures for the evaluation commands (matplotlib, imported lazily: pip install "pymemory[eval]")."""
from __future__ import annotations

import os


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover
        raise ImportError('plots need matplotlib: pip install "pymemory[eval]"') from exc
    return plt


def perplexity_curves(results: list[dict], title: str, path: str | os.PathLike) -> None:
    """Running log-perplexity against tokens, one line per policy; per-segment PPL below (log scale)."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for r in results:
        xs, ys = zip(*r["nll_curve"])
        top.plot(xs, ys, label=f"{r['label']} (PPL {r['ppl']:.2f})")
        seg = r["segment_tokens"]
        bottom.plot([seg * (i + 0.5) for i in range(len(r["segment_ppl"]))], r["segment_ppl"], marker=".")
    # the first hundred tokens have no context and would squash the curves that matter into one line
    settled = [y for r in results for x, y in r["nll_curve"] if x >= 100]
    if settled:
        top.set_ylim(min(settled) - 0.1, max(settled) + 0.1)
    top.set_ylabel("running log-perplexity (mean NLL)")
    top.set_title(title)
    top.legend(fontsize=8)
    bottom.set_yscale("log")
    bottom.set_ylabel(f"PPL per {results[0]['segment_tokens']} tokens")
    bottom.set_xlabel("tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_heatmaps(cells: list[dict], row_key: str, row_label: str, title: str, path: str | os.PathLike) -> None:
    """One heat map per policy: accuracy by (row_key, cache capacity)."""
    plt = _pyplot()
    policies = list(dict.fromkeys(c["policy"] for c in cells))
    fig, axes = plt.subplots(1, len(policies), figsize=(4.5 * len(policies), 4), squeeze=False)
    for ax, policy in zip(axes[0], policies):
        mine = [c for c in cells if c["policy"] == policy]
        rows = sorted({c[row_key] for c in mine})
        cols = sorted({c["capacity"] for c in mine})
        grid = [[next((c["accuracy"] for c in mine if c[row_key] == r and c["capacity"] == k), float("nan"))
                 for k in cols] for r in rows]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(cols)), [str(k) for k in cols])
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set_xlabel("cache (cells)")
        ax.set_ylabel(row_label)
        ax.set_title(policy)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ruler_curves(result: dict, title: str, path: str | os.PathLike) -> None:
    """Score against cache fraction, one panel per task plus the mean over tasks, one line per policy; the full
    cache as a dashed horizontal reference."""
    plt = _pyplot()
    tasks = list(result["settings"]["tasks"]) + ["mean"]
    summary = result["summary"]
    ncols = min(4, len(tasks))
    nrows = (len(tasks) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False, sharey=True)
    specs = list(dict.fromkeys(r["spec"] for r in summary))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes.flat, tasks):
        for i, spec in enumerate(specs):
            rows = sorted((r for r in summary if r["spec"] == spec), key=lambda r: r["ratio"])
            ys = [r["mean_score"] if task == "mean" else r["tasks"][task] for r in rows]
            if rows[0]["cache_cells"] is None:  # full cache
                ax.axhline(ys[0], color="k", linestyle="--", linewidth=1, label="full cache")
            else:
                # Scores often coincide (0 or 1): markers of decreasing size keep every policy visible.
                ax.plot([r["ratio"] for r in rows], ys, marker="osD^v"[i % 5], markersize=9 - 1.2 * (i % 5),
                        color=colors[i % len(colors)], alpha=0.85, label=spec)
        ax.set_title(task)
        ax.set_xscale("log", base=2)
        ratios = result["settings"]["ratios"]
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("cache / context")
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    for row in axes:
        row[0].set_ylabel("score")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
