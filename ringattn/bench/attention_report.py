"""Benchmark reporting: the printed table, ratios, a markdown table and PNG plots."""

from __future__ import annotations

import os

import jax

MiB = 2**20


_COLUMNS = (  # (title, width, format)
    ("impl", 9, "{impl}"),
    ("mask", 6, "{mask}"),
    ("mode", 6, "{mode}"),
    ("T", 9, "{seq_len}"),
    ("dev", 3, "{devices}"),
    ("time ms", 10, "{time_ms}"),
    ("GFLOP/s", 8, "{gflops}"),
    ("%matmul", 7, "{frac}"),
    ("temp MiB/dev", 12, "{temp}"),
    ("args MiB/dev", 12, "{args}"),
    ("temp/q_shard", 12, "{ratio}"),
    ("compile s", 9, "{compile}"),
)


def header(cfg, devices) -> str:
    platform = devices[0].platform
    simulated = f" (simulated on {os.cpu_count()} CPU cores)" if platform == "cpu" else ""
    lines = [
        f"jax {jax.__version__}, {len(devices)} x {platform}{simulated}",
        f"B={cfg.batch} H={cfg.num_heads} K={cfg.num_kv_heads} D={cfg.head_dim} {cfg.dtype} "
        f"mask={','.join(cfg.masks or (cfg.mask,))}"
        + (f" window={cfg.window}" if "window" in (cfg.masks or (cfg.mask,)) else "")
        + f" block_q={cfg.block_q} block_k={cfg.block_k}"
        + (" DRY RUN (compile only)" if cfg.dry_run else f" warmup={cfg.warmup} iters={cfg.iters}"),
        "GFLOP/s counts visible pairs only: fwd 4*D, fwd+bwd 14*D flops per (query, key) pair "
        "per head; dense/blockwise run on 1 device, ring/original on all.",
    ]
    return "\n".join(lines)


def column_titles() -> str:
    return " ".join(title.rjust(width) for title, width, _ in _COLUMNS)


def format_row(row: dict) -> str:
    def num(key, scale=1.0, fmt="{:.1f}"):
        return fmt.format(row[key] * scale) if key in row else "-"

    values = dict(
        impl=row["impl"],
        mask=row["mask"],
        mode=row["mode"],
        seq_len=row["seq_len"],
        devices=row["devices"],
        time_ms=num("time_s", 1e3),
        gflops=num("gflops_per_s"),
        frac=num("frac_of_matmul", 100, "{:.0f}%"),
        temp=num("temp_bytes", 1 / MiB),
        args=num("arg_bytes", 1 / MiB),
        ratio=num("temp_over_q_shard", 1, "{:.2f}"),
        compile=num("compile_s"),
    )
    line = " ".join(fmt.format(**values).rjust(width) for _, width, fmt in _COLUMNS)
    if "skipped" in row:
        line += f"  skipped: {row['skipped']}"
    if "error" in row:
        line += f"  ERROR: {row['error']}"
    return line


def _baseline(rows: list[dict]) -> str | None:
    impls = [r["impl"] for r in rows]
    return next((b for b in ("original", "dense") if b in impls), None)


def ratios(rows: list[dict]) -> str:
    """Each impl's time (or temp memory, in a dry run) over the baseline's ("original" when it
    ran, else "dense") at equal device count, T and mode."""
    base = _baseline(rows) or ""
    metric = "time_s" if any("time_s" in r for r in rows) else "temp_bytes"
    title = "time" if metric == "time_s" else "temp memory per device"
    lines = [f"ratios of {title} to {base} (< 1: better than {base}):"] if base else []
    by_key = {(r["impl"], r["mask"], r["devices"], r["seq_len"], r["mode"]): r for r in rows}
    for r in rows:
        if r["impl"] == base or not r.get(metric):
            continue
        # single-device baselines (dense) are compared at their own device count of 1
        for devices in (r["devices"], 1):
            b = by_key.get((base, r["mask"], devices, r["seq_len"], r["mode"]), {})
            if b.get(metric):
                lines.append(
                    f"  n={r['devices']:<2} T={r['seq_len']:<8} {r['mode']:<6} {r['mask']:<7} "
                    f"{r['impl']}/{base} = {r[metric] / b[metric]:.3g}"
                )
                break
    variants = [r for r in rows if "+" in r["impl"] and r.get(metric)]
    if variants:  # an impl with variants against the same impl without them
        lines.append(f"ratios of {title} with variants to without (the variants' cost):")
        for r in variants:
            base_impl = r["impl"].split("+")[0]
            b = by_key.get((base_impl, r["mask"], r["devices"], r["seq_len"], r["mode"]), {})
            if b.get(metric):
                lines.append(
                    f"  n={r['devices']:<2} T={r['seq_len']:<8} {r['mode']:<6} {r['mask']:<7} "
                    f"{r['impl']}/{base_impl} = {r[metric] / b[metric]:.3g}"
                )
    masks = list(dict.fromkeys(r["mask"] for r in rows))
    if len(masks) > 1:  # the same impl under each mask, against the first mask swept
        lines.append(f"ratios of {title} to mask {masks[0]} (is masked work really skipped?):")
        for r in rows:
            b = by_key.get((r["impl"], masks[0], r["devices"], r["seq_len"], r["mode"]), {})
            if r["mask"] != masks[0] and r.get(metric) and b.get(metric):
                lines.append(
                    f"  n={r['devices']:<2} T={r['seq_len']:<8} {r['mode']:<6} {r['impl']}: "
                    f"{r['mask']}/{masks[0]} = {r[metric] / b[metric]:.3g}"
                )
    return "\n".join(lines) if lines else "ratios: nothing to compare"


def markdown(rows: list[dict], cfg) -> str:
    """A markdown table of the rows (for the README), with the settings it was measured at."""
    lines = [
        f"B={cfg.batch} H={cfg.num_heads} K={cfg.num_kv_heads} D={cfg.head_dim} {cfg.dtype} "
        f"jax {jax.__version__} on {jax.devices()[0].platform}",
        "",
        "| impl | mask | mode | devices | T | time ms | GFLOP/s | temp MiB/dev | temp / q shard |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r or "error" in r:
            continue
        t = f"{r['time_s'] * 1e3:.1f}" if "time_s" in r else "-"
        g = f"{r['gflops_per_s']:.1f}" if "gflops_per_s" in r else "-"
        mem = f"{r['temp_bytes'] / MiB:.1f}" if "temp_bytes" in r else "-"
        ratio = f"{r['temp_over_q_shard']:.2f}" if "temp_over_q_shard" in r else "-"
        lines.append(
            f"| {r['impl']} | {r['mask']} | {r['mode']} | {r['devices']} | {r['seq_len']} | "
            f"{t} | {g} | {mem} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], plot_dir: str) -> list[str]:
    """Time and temp memory per device against T, one line per impl; one PNG per quantity,
    mode and device count. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    paths = []
    groups = sorted({(r["mode"], r["devices"]) for r in rows if r["impl"] not in ("dense",)})
    for key, label, scale in (
        ("time_s", "time (ms)", 1e3),
        ("temp_bytes", "temp MiB / device", 1 / MiB),
    ):
        for mode, devices in groups:
            fig, ax = plt.subplots(figsize=(6, 4))
            for impl in dict.fromkeys(r["impl"] for r in rows):
                pts = sorted(
                    (r["seq_len"], r[key] * scale)
                    for r in rows
                    if r["impl"] == impl
                    and r["mode"] == mode
                    and key in r
                    and (r["devices"] == devices or r["devices"] == 1)
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
            if not ax.lines:
                plt.close(fig)
                continue
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="sequence length T",
                ylabel=label,
                title=f"{mode}, {devices} devices",
            )
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            path = os.path.join(plot_dir, f"{key.split('_')[0]}_{mode}_{devices}dev.png")
            fig.tight_layout()
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
    return paths
