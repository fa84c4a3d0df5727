"""Plots of a streaming result (ringattn/evals/streaming.py): perplexity against position per
method, and the share of attention on the first tokens per layer and head."""

from __future__ import annotations

import numpy as np


def plot(result, path=None):
    """Perplexity against position for every method (left) and each method's ratio to its
    model's recomputed window on the positions both scored (right); the cache length marked, a
    second model dashed."""
    import matplotlib.pyplot as plt

    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.2))
    methods = result["methods"]
    for r in methods.values():
        ls = "--" if r["model"] else "-"
        line = ax.plot(r["bin_start"], r["perplexity"], ls=ls, marker="o", ms=3, label=r["label"])
        ref = methods.get(f"{r['model']}_recompute" if r["model"] else "recompute")
        if ref is not None and r["method"] != "recompute":
            ratio = np.asarray(_common(r)) / np.asarray(_common(ref))
            ax_ratio.plot(r["bin_start"], ratio, ls=ls, marker="o", ms=3, color=line[0].get_color())
    for a in (ax, ax_ratio):
        a.axvline(result["cache_len"], color="gray", ls=":", lw=1)
        a.set_xlabel("position in the stream (tokens; dotted: the cache is full)")
        a.set_yscale("log")
    stride = result.get("recompute_stride", 1)
    every = "" if stride == 1 else f", recomputed every {stride}th position"
    ax.set_ylabel(f"perplexity (bins of {result['bin_size']}{every})")
    ax.legend(fontsize=7)
    ax_ratio.axhline(1.0, color="gray", lw=0.8)
    ax_ratio.set_ylabel("perplexity / recomputed window (same positions)")
    fig.suptitle(
        f"Streaming: cache of {result['cache_len']} tokens ({result['num_sinks']} sinks), "
        f"{result['num_streams']} streams of {result['stream_len']}",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


def _common(method):
    return method.get("perplexity_common", method["perplexity"])


def plot_attention(result, path=None, max_bars=64):
    """Per layer and head, the share of attention on the first tokens (and on a learned sink
    logit) against an even spread over the visible keys: one panel per model; bars for small
    models, a layers x heads map of the share / the even spread for larger ones."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    models = result["attention"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, (name, a) in zip(axes[0], models.items(), strict=True):
        first = np.asarray(a["first_tokens"])
        layers, heads = first.shape
        title = "no learned sink" if name == "model" else name
        if layers * heads > max_bars:
            im = ax.imshow(
                first.T / a["even_spread"], aspect="auto", cmap="viridis", norm=LogNorm()
            )
            fig.colorbar(im, ax=ax, label=f"share on the first {result['num_sinks']} / even spread")
            ax.set_xlabel("layer")
            ax.set_ylabel("head")
            ax.set_title(f"{title} (even spread: {a['even_spread']:.3f})", fontsize=10)
            continue
        x = np.arange(layers * heads) + np.repeat(np.arange(layers), heads)  # gaps between layers
        width = 0.4 if a["sink_logit"] is not None else 0.8
        ax.bar(x, first.ravel(), width, label=f"first {result['num_sinks']} tokens")
        if a["sink_logit"] is not None:
            ax.bar(x + width, np.asarray(a["sink_logit"]).ravel(), width, label="learned sink")
        ax.axhline(a["even_spread"], color="k", ls="--", lw=1, label="even spread")
        ax.set_xticks(x, [f"{h}" for _ in range(layers) for h in range(heads)], fontsize=7)
        ax.set_xlabel("head, grouped by layer (0, 1, ...)")
        ax.set_ylabel("share of attention")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Attention of the queries in the second half of a {result['cache_len']}-token window",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path):
    if path is not None:
        import matplotlib.pyplot as plt

        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig
