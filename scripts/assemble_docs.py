"""Assemble docs/benchmarks.md and docs/results.md from the per-area parts in docs/_parts/.

    python scripts/assemble_docs.py
"""

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
PARTS = DOCS / "_parts"

BENCH = [
    ("benchmarks_cfm.md", "CFM per-stage inference and training"),
    ("bench_anomalib.md", "CFM against anomalib's CFM"),
    ("backbones.md", "Extractors (ViT-B/8, Point-MAE)"),
    ("benchmarks_deploy.md", "Backends: torch vs ONNX Runtime"),
    ("benchmarks_pipeline.md", "Pipeline (edge-run)"),
    ("benchmarks_alerts.md", "Alert path"),
    ("benchmarks_metrics.md", "Metrics"),
]
RESULTS = [
    ("results_offline.md", "CFM on offline extractors (EfficientNet-Lite + FPFH)"),
    ("results.md", "CFM with random-initialised extractors (before the offline extractors)"),
    ("results_ast.md", "AST"),
    ("results_dbrn.md", "DBRN"),
]
BENCH += [
    ("extractors.md", "Offline extractors (EfficientNet-Lite, FPFH)"),
    ("benchmarks_ast.md", "AST"),
    ("benchmarks_dbrn.md", "DBRN"),
    ("benchmarks_bridges.md", "Line bridges (OPC UA, MQTT)"),
]
# docs/methods.md: each part keeps its own top-level headings (no demotion, no header)
METHODS = ["methods_intro.md", "methods_cfm.md", "methods_ast.md", "methods_dbrn.md", "methods_common.md"]

HEAD = """# {title}

Every figure comes with the command that made it. Machine unless stated: a 2-core x86-64
CPU (AMD EPYC), 24 GiB, no GPU; torch 2.13.0 CPU. No GPU was available while these were
measured, so there are no GPU rows yet: the CUDA paths are written and gated on
availability but have not run (see docs/deploy.md).
"""


def body(name: str) -> str:
    lines = (PARTS / name).read_text().strip().splitlines()
    if lines and lines[0].startswith("#"):
        lines = lines[1:]
    out, fenced = [], False
    for line in lines:  # demote headings one level, leaving code blocks alone
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(out).strip()


def assemble(out: str, title: str, parts) -> None:
    text = [HEAD.format(title=title)]
    for name, section in parts:
        if (PARTS / name).exists():
            text.append(f"## {section}\n\n{body(name)}\n")
    (DOCS / out).write_text("\n".join(text))


def assemble_methods() -> None:
    """docs/methods.md: the intro part first, then every method's part, then the shared facts."""
    texts = []
    for i, name in enumerate(METHODS):
        if (PARTS / name).exists():
            text = (PARTS / name).read_text().strip()
            if i:  # sections below the page title
                out, fenced = [], False
                for line in text.splitlines():
                    if line.startswith("```"):
                        fenced = not fenced
                    out.append("#" + line if line.startswith("#") and not fenced else line)
                text = "\n".join(out)
            texts.append(text + "\n")
    (DOCS / "methods.md").write_text("\n".join(texts))


if __name__ == "__main__":
    assemble("benchmarks.md", "Benchmarks", BENCH)
    assemble("results.md", "Results", RESULTS)
    assemble_methods()
