"""The eval report: a markdown table of the summary (answer agreement with the full prefill, speedups vs
`full` and vs the model's own forward, `hf`), an optional quality-vs-TTFT plot, and the budget curve
(agreement per recompute ratio, one line per strategy)."""

from __future__ import annotations

from pathlib import Path

COLUMNS = (
    "same_answer",
    "agree_prefix",
    "f1_vs_full",
    "same_answer_streamed",
    "same_answer_unguarded",
    "agree_prefix_unguarded",
    "exact_switch",
    "taken_back",
    "f1",
    "rouge_l",
    "kl_first_token",
    "kl_mean",
    "top1_agreement",
    "rouge_l_vs_full",
    "ttft_ms_median",
    "speedup_vs_full",
    "speedup_vs_hf",
    "recompute_fraction",
    "recomputed_chunk_tokens",
    "variants_used",
)
CURVE_METRICS = (
    ("same_answer", "same answer as full"),
    ("agree_prefix", "agreeing prefix of full's answer"),
    ("top1_agreement", "teacher-forced top-1"),
    ("kl_mean", "teacher-forced KL (nats)"),
)


def markdown_table(results: dict[str, dict]) -> str:
    """One row per strategy label, the columns of `COLUMNS`."""
    lines = ["| strategy | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, row in results.items():
        cells = [
            "-"
            if c not in row
            else f"{row[c]:.0f}"
            if c in ("ttft_ms_median", "recomputed_chunk_tokens")
            else f"{row[c]:.4f}"
            if c.startswith("kl")
            else f"{row[c]:.3f}"
            for c in COLUMNS
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str | Path, title: str = "") -> None:
    """Scatter of quality (ROUGE-L vs full, and top-1 agreement) against median TTFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, row in results.items():
        ax.scatter(row["ttft_ms_median"], row["top1_agreement"], marker="o")
        ax.annotate(
            label, (row["ttft_ms_median"], row["top1_agreement"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("median TTFT (ms, log scale)")
    ax.set_ylabel("top-1 agreement with full prefill")
    ax.set_title(title or "quality vs time to first token")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curve_points(results: dict[str, dict]) -> dict[str, list[tuple[float, dict]]]:
    """Per strategy, its (recompute fraction used, summary row) points in the order of the requested
    ratios: the x is what was spent (cacheblend's full early layers included, an adaptive budget's
    mean), not the ratio asked for. `naive` and `full` are reference lines, not curves."""
    lines: dict[str, list[tuple[float, dict]]] = {}
    for row in results.values():
        if row["strategy"] not in ("full", "naive", "prefix"):
            lines.setdefault(row["strategy"], []).append((row["ratio"], row))
    return {
        name: [(row["recompute_fraction"], row) for _, row in sorted(points, key=lambda p: p[0])]
        for name, points in lines.items()
    }


def plot_curve(results: dict[str, dict], path: str | Path, title: str = "") -> None:
    """Answer agreement (same answer, agreeing prefix), top-1 and KL against the recompute ratio; the
    agreement of the fused KV's own answer (no answer guard) dashed where it differs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9.6, 6.4), sharex=True)
    lines = curve_points(results)
    naive = next((r for r in results.values() if r["strategy"] == "naive"), None)
    for ax, (metric, name) in zip(axes.flat, CURVE_METRICS):
        for strategy, points in lines.items():
            xs = [p[0] for p in points]
            (line,) = ax.plot(xs, [p[1][metric] for p in points], marker="o", label=strategy)
            raw = [p[1].get(f"{metric}_unguarded", p[1][metric]) for p in points]
            if raw != [p[1][metric] for p in points]:
                ax.plot(xs, raw, marker=".", linestyle="--", color=line.get_color(), label=f"{strategy}, unguarded")
        if naive is not None:
            ax.axhline(naive[metric], color="grey", linestyle=":", label="naive")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        if metric in ("same_answer", "agree_prefix"):
            ax.set_ylim(-0.02, 1.02)  # shares: the whole range, so a flat line reads as flat
    for ax in axes[1]:
        ax.set_xlabel("recompute fraction used (mean over questions)")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title or "answer agreement with the full prefill vs recompute budget", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
