"""The eval report: a markdown table of the summary (speedups vs `full` and vs the model's own forward,
`hf`), and an optional quality-vs-TTFT plot."""

from __future__ import annotations

from pathlib import Path

COLUMNS = (
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


def markdown_table(results: dict[str, dict]) -> str:
    """One row per strategy label, the columns of `COLUMNS`."""
    lines = ["| strategy | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, row in results.items():
        cells = [
            f"{row[c]:.0f}"
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
