"""PNG plots of result rows (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(i: int):
    import matplotlib

    return matplotlib.colormaps["tab20"](i % 20)


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, legend_outside: bool = True) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend_outside:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def throughput_vs_concurrency(steps: dict[str, list[dict]], ceilings: dict[str, float], path: Path) -> Path:
    """req/s per concurrency level, one line per step, ceilings as horizontal lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, rows) in enumerate(steps.items()):
        pts = sorted((r["concurrency"], r["req_per_s"]) for r in rows if r.get("mode") == "concurrency")
        if pts:
            ax.plot(*zip(*pts), marker="os^vD"[i % 5], color=_color(i), label=name)
    styles = iter(["--", ":", "-."])
    for label, value in ceilings.items():
        ax.axhline(value, linestyle=next(styles, "--"), color="black", alpha=0.6)
        ax.annotate(f"{label}: {value:.0f}", (1, value), textcoords="offset points", xytext=(2, 3), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return _finish(fig, ax, path, "API throughput per step, against the ceilings", "concurrent clients", "requests / s")


def latency_vs_throughput(steps: dict[str, list[dict]], path: Path) -> Path:
    """p50 (solid) and p99 (dashed) latency against achieved req/s, one colour per step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, rows) in enumerate(steps.items()):
        # in load order (concurrency, then rate), so each line walks up the load
        ordered = sorted((r for r in rows if r["latency_p50_ms"]), key=lambda r: (r.get("mode") != "concurrency",
                                                                               r.get("concurrency") or r.get("rate_per_s")))
        if not ordered:
            continue
        x, p50, p99 = zip(*((r["req_per_s"], r["latency_p50_ms"], r["latency_p99_ms"]) for r in ordered))
        color = _color(i)
        ax.plot(x, p50, marker="o", color=color, label=f"{name} p50")
        ax.plot(x, p99, marker="x", linestyle="--", color=color, alpha=0.7)
    ax.set_yscale("log")
    return _finish(fig, ax, path, "Latency against throughput", "requests / s", "latency ms (solid p50, dashed p99)")


def model_throughput(rows: list[dict], path: Path) -> Path:
    """Model-only img/s against batch size per runtime and precision, with each precision's compute roof."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))

    def key(r: dict) -> str:
        return f"{r.get('runtime', 'torch')} {r['precision']}"

    roofs = {}
    for i, name in enumerate(sorted({key(r) for r in rows})):
        mine = sorted((r["batch_size"], r["img_per_s"]) for r in rows if key(r) == name)
        ax.plot([m[0] for m in mine], [m[1] for m in mine], marker="o", color=f"C{i % 10}", label=name)
    for r in rows:  # int8 rows carry the bf16 roof (no int8 peak is measured): drawn once, as bf16's
        if r.get("compute_roof_img_per_s") and r["precision"] != "int8":
            roofs.setdefault(r["precision"], r["compute_roof_img_per_s"])
    for j, (precision, roof) in enumerate(sorted(roofs.items())):
        ax.axhline(roof, color="black", linestyle=(0, (4, 2 + 2 * j)), alpha=0.5, label=f"{precision} compute roof")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return _finish(fig, ax, path, "Model-only throughput against the compute roof", "batch size", "images / s", False)


def llm_decode_bars(steps: list[tuple[str, float | None, float | None, float | None]], path: Path) -> Path:
    """Decode tokens/s per step (served, and in-process) with each step's bandwidth roof as a marker."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5))
    names = [s[0] for s in steps]
    x = range(len(steps))
    ax.bar([i - 0.2 for i in x], [s[1] or 0 for s in steps], width=0.4, label="served (HTTP, streaming)")
    ax.bar([i + 0.2 for i in x], [s[2] or 0 for s in steps], width=0.4, label="in-process engine")
    roofs = [(i, s[3]) for i, s in zip(x, steps) if s[3]]
    if roofs:
        ax.scatter(*zip(*roofs), marker="_", s=900, color="black", label="bandwidth roof of the step's format")
    ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    return _finish(fig, ax, path, "LLM decode speed per step, against the memory-bandwidth roof", "",
                   "decode tokens / s (batch 1)", False)


def llm_concurrency(steps: dict[str, list[dict]], path: Path) -> Path:
    """Aggregate output tokens/s against concurrent users, one line per step, with each batched step's
    roof per batch size (the lower of its bandwidth and compute roofs) dotted: a roofline over batch size."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (name, rows) in enumerate(steps.items()):
        rows = sorted(rows, key=lambda r: r["concurrency"])
        color = _color(i)
        ax.plot([r["concurrency"] for r in rows], [r.get("output_tokens_per_s") or 0 for r in rows],
                marker="os^vD"[i % 5], color=color, label=name)
        roof = [(r["concurrency"], r["aggregate_roof_tokens_per_s"]) for r in rows if r.get("aggregate_roof_tokens_per_s")]
        if roof:
            ax.plot(*zip(*roof), linestyle=":", color=color, alpha=0.8, label=f"{name}: roof")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return _finish(fig, ax, path, "Many users: aggregate decode speed against the roof per batch size",
                   "concurrent users", "output tokens / s, all users")
