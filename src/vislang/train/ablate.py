"""``vislang ablate-fusion``: every fusion on the same data, model and budget; a markdown and a PNG table."""

from __future__ import annotations

import json
from pathlib import Path

from .config import VQATrainConfig
from .tasks.vqa import train_vqa


def results_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    types = sorted({t for r in rows for t in r["test"]["per_type"]})
    header = ["fusion", "test acc", "holdout acc", *types, "parameters", "train s"]
    body = []
    for r in rows:
        hold = r.get("holdout", {}).get("overall")
        body.append(
            [r["fusion"], f"{100 * r['test']['overall']:.1f}", "-" if hold is None else f"{100 * hold:.1f}"]
            + [f"{100 * r['test']['per_type'].get(t, float('nan')):.1f}" for t in types]
            + [f"{r['parameters']:,}", f"{r['train_time_s']:.0f}"]
        )
    return header, body


def write_png(header: list[str], body: list[list[str]], path: Path) -> None:
    import matplotlib  # here, not at the top: only this table needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.1 * len(header) + 1, 0.4 * len(body) + 0.8))
    ax.axis("off")
    ax.table(cellText=body, colLabels=header, loc="center").scale(1, 1.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def ablate_fusion(
    out_dir: str,
    fusions: list[str],
    n_train: int = 3000,
    n_test: int = 500,
    epochs: int = 5,
    time_budget_s: float | None = None,
    data: str = "shapes",
    test_data: str | None = None,
    overrides: tuple[str, ...] = (),
) -> Path:
    """Train one VQA model per fusion; returns the path of ``ablation.md`` (``ablation.png`` beside it)."""
    out = Path(out_dir)
    rows = []
    for kind in fusions:
        cfg = VQATrainConfig(
            overrides=(*overrides, f"fusion.kind={kind}"),
            data=data,
            test_data=test_data,
            n_train=n_train,
            n_test=n_test,
            epochs=epochs,
            time_budget_s=time_budget_s,
            out_dir=str(out / kind),
        )
        rows.append(train_vqa(cfg, progress=False))
    header, body = results_table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    md = out / "ablation.md"
    md.write_text("# Fusion ablation (VQA accuracy %, same data and budget)\n\n" + "\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    write_png(header, body, out / "ablation.png")
    return md
