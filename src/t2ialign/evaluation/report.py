"""The demo's report: ``report.md`` and a self-contained ``report.html`` (images inlined, no network)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from t2ialign.world.viz import labelled_grid


def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _curves_png(curve: list[dict], reward_curve: list[dict] | None, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 if reward_curve else 1
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.4), squeeze=False)
    ax = axes[0, 0]
    steps = [r["step"] for r in curve]
    for key, label in (
        ("loss", "total"),
        ("model_loss", "reward-weighted term"),
        ("pre_loss", "pre-training term"),
    ):
        vals = np.array([r.get(key, np.nan) for r in curve], dtype=float)
        if len(vals) and np.isfinite(vals).any():
            k = max(1, len(vals) // 30)
            smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("reward-weighted fine-tuning")
    ax.legend(fontsize=8)
    if reward_curve:
        ax = axes[0, 1]
        ep = [r["epoch"] for r in reward_curve]
        for key in ("train_total", "val_total"):
            if key in reward_curve[0]:
                ax.plot(ep, [r[key] for r in reward_curve], label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_title("reward model")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pick(prompts: list[str], tasks: list[str], per_task: int = 2) -> list[int]:
    idx, count = [], {}
    for i, t in enumerate(tasks):
        if count.get(t, 0) < per_task:
            idx.append(i)
            count[t] = count.get(t, 0) + 1
    return idx


def _fmt(v, pct=True):
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def _before_after_table(results: dict) -> list[list[str]]:
    rows = []
    for split in ("seen", "unseen"):
        b, a = results["before"][split], results["after"][split]
        for t in sorted(b["tasks"]):
            bt, at = b["tasks"][t], a["tasks"].get(t, {})
            rows.append(
                [
                    split,
                    t,
                    _fmt(bt["accuracy"]),
                    _fmt(at.get("accuracy")),
                    f"{100 * (at.get('accuracy', 0) - bt['accuracy']):+.1f}",
                    str(bt["n"]),
                ]
            )
        rows.append(
            [
                split,
                "**overall**",
                _fmt(b["overall"]),
                _fmt(a["overall"]),
                f"{100 * (a['overall'] - b['overall']):+.1f}",
                str(b["n"]),
            ]
        )
        rows.append([split, "FID", f"{b['fid']:.2f}", f"{a['fid']:.2f}", f"{a['fid'] - b['fid']:+.2f}", ""])
        rows.append(
            [
                split,
                "mean reward",
                f"{b.get('mean_reward', 0):.3f}",
                f"{a.get('mean_reward', 0):.3f}",
                f"{a.get('mean_reward', 0) - b.get('mean_reward', 0):+.3f}",
                "",
            ]
        )
    return rows


def _ci(row: dict) -> str:
    """The Wilson 95% interval of an accuracy row that carries its ``n`` (else empty)."""
    from t2ialign.world.imagefolder import wilson_interval

    n = row.get("n")
    if not n:
        return ""
    lo, hi = wilson_interval(round(row["accuracy"] * n), n)
    return f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def _md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip('*'))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(
    out: Path,
    results: dict,
    before: dict,
    after: dict,
    curve: list[dict],
    reward_curve: list[dict] | None = None,
) -> None:
    out = Path(out)
    headers = ["split", "task", "before (%)", "after (%)", "change", "n"]
    table = _before_after_table(results)
    # grids: the same prompts and seeds before and after
    tasks = [p for p in before["seen"]["prompts"]]
    from t2ialign.world.grammar import parse

    task_of = [parse(p).task for p in tasks]
    idx = _pick(tasks, task_of, per_task=2)[:16]
    grids = {}
    for name, res in (("before", before["seen"]), ("after", after["seen"])):
        caps = [("ok  " if res["correct"][i] else "no  ") + res["prompts"][i] for i in idx]
        grids[name] = labelled_grid([res["images"][i] for i in idx], caps, cols=8, cell=96, caption_lines=4)
        grids[name].save(out / f"grid_{name}.png")
    _curves_png(curve, reward_curve, out / "curves.png")
    t3_rows = None
    if results.get("table3"):
        t3_rows = [
            [r["training data"], f"{r['fid']:.2f}", f"{r['reward']:.3f}", _fmt(r["accuracy"]), _ci(r)]
            for r in results["table3"]
        ]
    t3_headers = ["training data", "FID", "reward", "seen accuracy (%)", "95% CI"]
    rounds = results.get("rounds") or []
    r_headers = ["round", "labelled images", "seen (%)", "unseen (%)", "FID seen", "FID unseen"]
    r_rows = [
        [
            "base",
            "0",
            _fmt(before["seen"]["overall"]),
            _fmt(before["unseen"]["overall"]),
            f"{before['seen']['fid']:.2f}",
            f"{before['unseen']['fid']:.2f}",
        ]
    ]
    r_rows += [
        [
            str(r["round"]),
            str(r["labelled_images"]),
            _fmt(r["seen"]),
            _fmt(r["unseen"]),
            f"{r['fid_seen']:.2f}",
            f"{r['fid_unseen']:.2f}",
        ]
        for r in rounds
    ]
    fb = results["feedback"]
    intro = (
        f"Base model `{results['base_model']}` -> fine-tuned `{results['tuned_model']}`. "
        f"{fb['images']} images labelled by a simulated rater (good rate {100 * fb['good_rate']:.1f}%), "
        f"{fb['pseudo_images']} unlabelled images scored by the reward model "
        f"({100 * fb['pseudo_kept']:.1f}% kept). Wall time {results['wall_seconds']:.0f} s."
    )

    md = [
        "# t2ialign demo report",
        "",
        intro,
        "",
        "## Alignment and fidelity, before and after",
        "",
        _md_table(headers, table),
        "",
        "Accuracy is ShapesEval's verdict (the exact checker); FID is measured in the shipped encoder's "
        "image features against true renders of the same prompts; mean reward is the learned reward model's.",
        "",
        "## Samples (same prompts and seeds)",
        "",
        "Before:",
        "",
        "![before](grid_before.png)",
        "",
        "After:",
        "",
        "![after](grid_after.png)",
        "",
        "## Training curves",
        "",
        "![curves](curves.png)",
        "",
    ]
    if len(rounds) > 1:
        md += ["## Relabelling rounds", "", _md_table(r_headers, r_rows), ""]
    if t3_rows:
        md += ["## Table 3 of the paper, in this world", "", _md_table(t3_headers, t3_rows), ""]
    md += ["## Reward model", "", "```", str(results.get("reward_model")), "```", ""]
    (out / "report.md").write_text("\n".join(md))

    css = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}td:nth-child(-n+2){text-align:left}"
        "img{max-width:100%;image-rendering:pixelated}h1{font-size:1.6em}"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>t2ialign demo report</title>"
        f"<style>{css}</style></head><body><h1>t2ialign demo report</h1><p>{html.escape(intro)}</p>",
        "<h2>Alignment and fidelity, before and after</h2>",
        _html_table(headers, table),
        "<h2>Samples (same prompts and seeds)</h2><h3>Before</h3>",
        f"<img alt='before' src='data:image/png;base64,{_png_b64(grids['before'])}'>",
        "<h3>After</h3>",
        f"<img alt='after' src='data:image/png;base64,{_png_b64(grids['after'])}'>",
        "<h2>Training curves</h2>",
        f"<img alt='curves' src='data:image/png;base64,"
        f"{base64.b64encode((out / 'curves.png').read_bytes()).decode()}'>",
    ]
    if len(rounds) > 1:
        parts += ["<h2>Relabelling rounds</h2>", _html_table(r_headers, r_rows)]
    if t3_rows:
        parts += ["<h2>Table 3 of the paper, in this world</h2>", _html_table(t3_headers, t3_rows)]
    parts.append("</body></html>")
    (out / "report.html").write_text("".join(parts))
