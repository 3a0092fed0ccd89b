"""Comparison report over run directories: one static HTML page (plots embedded, no CDN) plus a markdown summary.

``write_report(run_dirs, out)`` reads each ``RUN_DIR/results.json`` (written by ``slr compress``) and writes

  out            HTML: the run table and four matplotlib figures embedded as data: URIs (works offline, one file)
  out.md         markdown: the same table, linking the figures
  <out>_files/   the figures as PNG: ppl vs retained fraction and ppl vs bits per weight per method (one panel and one
                 dense line per model), per-layer per-matrix rank and kept fraction heatmaps, per-layer reconstruction
                 error, time breakdown by stage
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SLRError
from .fsutil import atomic_dir, check_writable_parent, write_text_atomic

# stage order in the time breakdown (results.json "seconds" keys); anything else is summed into "other"
STAGES = ("load", "eval_dense", "allocate", "compress.capture", "compress.hessian", "compress.solve",
          "compress.refine", "compress.propagate", "eval", "zeroshot", "save")


@dataclass
class Run:
    name: str
    path: Path
    results: dict

    def get(self, *keys, default=None):
        d = self.results
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return default
            d = d[k]
        return d



def _log_axes(fig, ax, xlabel: str, ylabel: str, title: str):
    """Log y axis, labels, grid and legend: the finish shared by the line plots."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig

def load_runs(run_dirs: list[str | os.PathLike]) -> list[Run]:
    """Read RUN_DIR/results.json for every directory (clear errors for a missing or unreadable file)."""
    if not run_dirs:
        raise SLRError("no run directories given", "pass one or more directories written by `slr compress --out`")
    runs = []
    for d in run_dirs:
        p = Path(d)
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise SLRError(f"{d} has no results.json", "pass directories written by `slr compress --out DIR`")
        try:
            r = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SLRError(f"cannot read {f}: {e.__class__.__name__}", "re-run `slr compress` for that run") from None
        if not isinstance(r, dict) or "method" not in r or "matrices" not in r:
            raise SLRError(f"{f} is not an slr compress results file", "pass directories written by `slr compress`")
        runs.append(Run(f.parent.name, f.parent, r))
    names = [r.name for r in runs]
    for r in runs:  # disambiguate equal directory names with their parent
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.name}"
    return runs


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _allocate(r: Run) -> str:
    """The allocator (results.json keeps it under config.alloc.method; older files under config.allocate)."""
    return r.get("config", "alloc", "method", default=None) or r.get("config", "allocate", default="uniform")


def _refine(r: Run) -> str:
    """"tm", "kd", "tm + kd" or "-" (config.refine is a table or, in older files, a name)."""
    tm = r.get("config", "refine")
    tm = tm.get("method") if isinstance(tm, dict) else tm
    parts = [p for p in (tm, "kd" if r.get("config", "distill") else None) if p]
    return " + ".join(parts) or "-"


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table."""
    head = ["run", "method", "spec", "allocate", "refine", "retained", "bpw", "bytes", "ppl", "dense ppl",
            "zero-shot avg", "compress s"]
    rows = []
    for r in runs:
        total = r.get("bytes", "on_disk", default=r.get("bytes", "total"))
        zs = r.get("zeroshot", "average")
        rows.append([r.name, r.get("method"), str(r.get("spec", default="")),
                     _allocate(r), _refine(r),
                     _fmt(r.get("retained_fraction"), ".4f"), _fmt(r.get("bytes", "bpw"), ".3f"),
                     "not saved" if total is None else f"{total / 2**20:.1f} MiB", _fmt(r.get("ppl", "ppl"), ".3f"),
                     _fmt(r.get("dense_ppl", "ppl"), ".3f"), _fmt(zs, ".4f"),
                     _fmt(r.get("seconds", "compress"), ".1f")])
    return head, rows


# ----------------------------------------------------------------------------------------------------- figures
def _names(runs: list[Run]) -> list[str]:
    """Matrix names in first-seen order over all runs."""
    out: list[str] = []
    for r in runs:
        for m in r.results["matrices"]:
            if m["name"] not in out:
                out.append(m["name"])
    return out


def _short(name: str) -> str:
    return name.split(".")[-1].replace("_proj", "")


def _by_model(runs: list[Run], x) -> dict[str, list[Run]]:
    """Runs with a ppl and an x value, grouped by model (first-seen order)."""
    out: dict[str, list[Run]] = {}
    for r in runs:
        if r.get("ppl", "ppl") is not None and x(r) is not None:
            out.setdefault(str(r.get("model", default="?")), []).append(r)
    return out


def _ppl_panels(runs: list[Run], plt, x, xlabel: str, title: str):
    """ppl against ``x(run)``: one panel per model, a line per method, and that model's own dense ppl."""
    models = _by_model(runs, x)
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(7 * max(len(models), 1), 4.5), squeeze=False)
    if not models:
        axes[0][0].text(0.5, 0.5, "no run has both a ppl and this value", ha="center", va="center")
        axes[0][0].set_title(title)
        return fig
    for ax, (model, mruns) in zip(axes[0], models.items()):
        by_method: dict[str, list[Run]] = {}
        for r in mruns:
            by_method.setdefault(r.get("method"), []).append(r)
        for method, rs in sorted(by_method.items()):
            rs = sorted(rs, key=x)
            xs, ys = [x(r) for r in rs], [r.get("ppl", "ppl") for r in rs]
            ax.plot(xs, ys, marker="o", label=method)
            for r, xv, yv in zip(rs, xs, ys):
                ax.annotate(r.name, (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
        dense = [r.get("dense_ppl", "ppl") for r in mruns if r.get("dense_ppl", "ppl") is not None]
        if dense:
            ax.axhline(dense[0], color="gray", ls="--", lw=1, label=f"dense ({dense[0]:.2f})")
        _log_axes(fig, ax, xlabel, "perplexity (log scale)", f"{title}: {model}" if len(models) > 1 else title)
    fig.tight_layout()
    return fig


def fig_ppl(runs: list[Run], plt):
    return _ppl_panels(runs, plt, lambda r: r.get("retained_fraction"), "retained fraction of the compressed linears",
                       "Perplexity vs retained fraction")


def fig_ppl_bpw(runs: list[Run], plt):
    return _ppl_panels(runs, plt, lambda r: r.get("bytes", "bpw"), "bits per weight of the compressed linears",
                       "Perplexity vs bits per weight")


def _grid(r: Run, names: list[str], field: str):
    blocks = 1 + max(m["block"] for m in r.results["matrices"])
    g = np.full((blocks, len(names)), np.nan)
    for m in r.results["matrices"]:
        d_out, d_in = m["shape"]
        if field == "rank":
            v = m.get("rank", 0)
        elif field == "density":
            v = m.get("kept", 0) / (d_out * d_in)
        else:
            v = m.get("rel_error")
        g[m["block"], names.index(m["name"])] = np.nan if v is None else v
    return g


def fig_heatmaps(runs: list[Run], plt):
    names = _names(runs)
    fig, axes = plt.subplots(len(runs), 2, figsize=(9, 2.6 + 2.4 * len(runs)), squeeze=False)
    for row, r in zip(axes, runs):
        for ax, field, title, cmap in ((row[0], "rank", "rank", "viridis"),
                                       (row[1], "density", "kept fraction of S", "magma")):
            g = _grid(r, names, field)
            im = ax.imshow(g.T, aspect="auto", cmap=cmap, interpolation="nearest")
            ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
            ax.set_xlabel("block")
            # the run's name once per row, on the left panel and wrapped, so long names do not run into each other
            ax.set_title(textwrap.fill(f"{r.name}: {title}", 48) if ax is row[0] else title, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    return fig


def fig_errors(runs: list[Run], plt):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = _names(runs)
    for r in runs:
        g = _grid(r, names, "error")
        if np.isnan(g).all():
            continue
        ax.plot(range(g.shape[0]), np.nanmean(g, axis=1), marker=".", label=r.name)
    return _log_axes(fig, ax, "block", "mean relative layer error",
                     "Per-layer reconstruction error (mean over the block's matrices)")


def stage_times(r: Run) -> dict[str, float]:
    """Seconds per stage; "compress" is split into its sub-stages (the rest of it is "compress.other")."""
    sec = {k: float(v) for k, v in (r.get("seconds") or {}).items() if isinstance(v, int | float)}
    out = {s: sec[s] for s in STAGES if s in sec}
    sub = sum(v for k, v in sec.items() if k.startswith("compress."))
    if "compress" in sec:
        out["compress.other"] = max(sec["compress"] - sub, 0.0)
    for k, v in sec.items():
        if k not in out and k != "compress" and not k.startswith("compress."):
            out[k] = v
    return out


def fig_times(runs: list[Run], plt):
    fig, ax = plt.subplots(figsize=(8, 2.6 + 0.5 * len(runs)))
    stages: list[str] = []
    per = [stage_times(r) for r in runs]
    for t in per:
        stages += [s for s in t if s not in stages]
    cmap = plt.get_cmap("tab20")
    left = [0.0] * len(runs)
    for j, s in enumerate(stages):
        vals = [t.get(s, 0.0) for t in per]
        ax.barh(range(len(runs)), vals, left=left, color=cmap(j % 20), label=s)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(runs)), [r.name for r in runs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("Time by stage")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    return fig


FIGURES = (("ppl_vs_retained", "Perplexity vs retained fraction", fig_ppl),
           ("ppl_vs_bpw", "Perplexity vs bits per weight", fig_ppl_bpw),
           ("plan_heatmap", "Per-layer, per-matrix rank and kept fraction", fig_heatmaps),
           ("layer_error", "Per-layer reconstruction error", fig_errors),
           ("time_breakdown", "Time by stage", fig_times))


def render_figures(runs: list[Run]) -> list[tuple[str, str, bytes]]:
    """[(file stem, title, PNG bytes)] for every figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    for stem, title, fn in FIGURES:
        fig = fn(runs, plt)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out.append((stem, title, buf.getvalue()))
    return out


# ----------------------------------------------------------------------------------------------------- writers
def _html(runs: list[Run], figs: list[tuple[str, str, bytes]]) -> str:
    head, rows = table(runs)
    esc = html.escape
    t = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    t += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows]
    t.append("</table>")
    protos = sorted({str(r.get("ppl", "protocol")) for r in runs if r.get("ppl", "protocol")})
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>slr report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}</style>",
             "</head><body>", "<h1>slr comparison report</h1>",
             f"<p>{len(runs)} runs. Perplexity protocol: {esc('; '.join(protos) or 'n/a')}.</p>", *t]
    for stem, title, png in figs:
        b64 = base64.b64encode(png).decode("ascii")
        parts += [f"<h2>{esc(title)}</h2>", f'<img id="{stem}" alt="{esc(title)}" src="data:image/png;base64,{b64}">']
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _markdown(runs: list[Run], figs: list[tuple[str, str, bytes]], files_dir: str) -> str:
    head, rows = table(runs)
    lines = ["# slr comparison report", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    lines.append("")
    for stem, title, _ in figs:
        lines += [f"## {title}", "", f"![{title}]({files_dir}/{stem}.png)", ""]
    return "\n".join(lines)


def write_report(run_dirs: list[str | os.PathLike], out: str | os.PathLike = "report.html") -> dict:
    """Write the HTML report to ``out``, the markdown to ``out`` with suffix .md and the PNGs to <stem>_files/.

    Every file is written to a temporary name and renamed, so an interrupted run leaves the old report intact.
    Returns {"html", "markdown", "figures": [paths]}.
    """
    runs = load_runs(run_dirs)
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise SLRError(f"--out {out} is not an .html file", "pass e.g. --out report.html")
    if out.exists() and out.is_dir():
        raise SLRError(f"--out {out} is a directory", "pass a file name such as report.html")
    check_writable_parent(out, "--out")  # before rendering, not when writing
    figs = render_figures(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = out.with_name(out.stem + "_files")
    with atomic_dir(files, overwrite=True) as tmp:
        for stem, _, png in figs:
            (tmp / f"{stem}.png").write_bytes(png)  # atomic_dir gives the files their normal mode
    md = out.with_suffix(".md")
    write_text_atomic(md, _markdown(runs, figs, files.name))
    write_text_atomic(out, _html(runs, figs))
    return {"html": str(out), "markdown": str(md), "figures": [str(files / f"{s}.png") for s, _, _ in figs]}
