"""The parameter report: total / trainable / frozen, by component (docs/recipe.md, "OELM").

`parameter_report(model)` counts from the model itself (DTensors with their global
size, so it is the same before and after FSDP/TP); `write_parameter_report` puts it
in `<dump_folder>/param_report.md` and `.json`, from rank 0, when training starts.
"""

import json
import os

from torch import nn

from titan_linear.models.hybrid.model import component_of

# The report's rows, in order (component_of decides each parameter's row).
COMPONENTS = (
    "embeddings", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
    "feed_forward", "norms", "output",
)


def parameter_report(model: nn.Module) -> dict:
    """{"components": {name: {"total", "trainable", "frozen"}}, "total", "trainable", "frozen"}."""
    comps = {c: {"total": 0, "trainable": 0, "frozen": 0} for c in COMPONENTS}
    for name, p in model.named_parameters():
        row = comps.setdefault(component_of(name), {"total": 0, "trainable": 0, "frozen": 0})
        n = p.numel()
        row["total"] += n
        row["trainable" if p.requires_grad else "frozen"] += n
    out = {"components": comps}
    for key in ("total", "trainable", "frozen"):
        out[key] = sum(r[key] for r in comps.values())
    args = getattr(model, "model_args", None)
    if args is not None and hasattr(args, "freeze_map"):
        out["freeze_map"] = args.freeze_map
        out["oelm_freeze"] = args.oelm_freeze
        out["freeze_ratio"] = args.freeze_ratio
    return out


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def report_markdown(report: dict, title: str = "Parameters") -> str:
    total = report["total"]
    lines = [
        f"## {title}",
        "",
        "| component | params | trainable | frozen |",
        "|---|---:|---:|---:|",
    ]
    for name, r in report["components"].items():
        if r["total"]:
            lines.append(f"| {name} | {r['total']:,} | {r['trainable']:,} | {r['frozen']:,} |")
    lines += [
        f"| **total** | **{total:,}** | **{report['trainable']:,}** | **{report['frozen']:,}** |",
        "",
        f"Total parameters: {total:,} ({total / 1e6:.1f}M)",
        f"Trainable parameters: {report['trainable']:,} ({_pct(report['trainable'], total)})",
        f"Frozen parameters: {report['frozen']:,} ({_pct(report['frozen'], total)})",
    ]
    if "freeze_map" in report:
        lines.append(
            f"Freeze: oelm_freeze = {report['oelm_freeze']}, freeze_ratio = {report['freeze_ratio']}, "
            f"map {report['freeze_map']} (F = frozen orthogonal projections, T = trainable)"
        )
    return "\n".join(lines) + "\n"


def write_parameter_report(report: dict, folder: str, title: str = "Parameters") -> tuple[str, str]:
    """Write param_report.md and param_report.json into `folder`; return both paths."""
    os.makedirs(folder, exist_ok=True)
    md = os.path.join(folder, "param_report.md")
    js = os.path.join(folder, "param_report.json")
    with open(md, "w") as f:
        f.write(report_markdown(report, title))
    with open(js, "w") as f:
        json.dump(report, f, indent=2)
    return md, js
