"""`slr report` over three real tiny runs: HTML + markdown + PNGs, offline (no external URL), atomic; and the page
rendered in headless Chromium (Debian `chromium`, installed by scripts/install.sh) loads without errors with every
plot image decoded and non-empty."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess

import pytest
from test_cli import assert_one_line_error, make_hf_folder, run

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

RUNS = {  # three solvers / allocators, so the report has something to compare
    "wanda-nm24": ["--method", "wanda", "--pattern", "2:4"],
    "prune-lr-u60r4": ["--method", "prune+lr", "--sparsity", "0.6", "--rank", "4"],
    "admm-g50-knapsack": ["--method", "admm", "--sparsity", "0.6", "--rank", "4", "--budget", "0.5",
                          "--allocate", "knapsack", "--opt", "max_iters=20"],
}


FIGS = ["ppl_vs_retained", "ppl_vs_bpw", "plan_heatmap", "layer_error", "time_breakdown"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from slr.cli import main

    root = tmp_path_factory.mktemp("report")
    os.environ["SLR_CACHE"] = str(root / "cache")
    src = root / "tiny-llama"
    make_hf_folder(src)
    text = root / "text.txt"
    text.write_text(" ".join(f"w{(i * 37) % 100}" for i in range(1600)) + "\n")
    dirs = []
    for name, args in RUNS.items():
        d = root / name
        code = main([str(a) for a in ["compress", src, *args, "--calib-samples", 4, "--text", text, "--calib-text",
                                      text, "--windows", 2, "--out", d, "--device", "cpu", "--batch-size", 2]])
        assert code == 0
        dirs.append(d)
    return root, dirs


def _png_ok(png: bytes) -> None:
    import matplotlib.image as mpimg

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(io.BytesIO(png), format="png")
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas


def test_report_files(capsys, runs):
    root, dirs = runs
    out = root / "out" / "report.html"
    code, stdout, err = run(capsys, "report", *dirs, "--out", out)
    assert code == 0, err
    assert "5 figures" in stdout
    page = out.read_text()
    md = out.with_suffix(".md").read_text()
    for name in RUNS:
        assert name in page and name in md
    res = json.loads((dirs[2] / "results.json").read_text())
    assert f"{res['retained_fraction']:.4f}" in md and f"{res['ppl']['ppl']:.3f}" in md
    assert re.search(r"\| admm-g50-knapsack \| admm \| [^|]+ \| knapsack \|", md)  # the allocator, not "uniform"
    assert "| bpw |" in md and f"{res['bytes']['bpw']:.3f}" in md and res["bytes"]["bpw"] > 0
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing fetched from a CDN or any URL
    imgs = re.findall(r'<img id="([a-z_]+)"[^>]*src="data:image/png;base64,([^"]+)"', page)
    assert [i for i, _ in imgs] == FIGS
    for stem, b64 in imgs:
        png = base64.b64decode(b64)
        _png_ok(png)
        assert (root / "out" / "report_files" / f"{stem}.png").read_bytes() == png
        assert f"report_files/{stem}.png" in md
    assert not [p for p in (root / "out").iterdir() if p.name.startswith(".tmp-")]


def test_ppl_panels_one_per_model_with_its_own_dense_line():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slr.report import Run, fig_ppl_bpw

    def fake(name, model, ppl, dense, bpw):
        return Run(name, None, {"model": model, "method": "gptq", "ppl": {"ppl": ppl}, "dense_ppl": {"ppl": dense},
                                "bytes": {"bpw": bpw}, "retained_fraction": 1.0, "matrices": []})

    runs = [fake("a", "SmolLM2", 30.0, 20.0, 4.25), fake("b", "Qwen", 15.0, 12.0, 4.25),
            fake("c", "SmolLM2", 40.0, 20.0, 3.25), fake("d", "Qwen", 20.0, 12.0, 3.25)]
    fig = fig_ppl_bpw(runs, plt)
    axes = fig.get_axes()
    assert len(axes) == 2
    for ax, dense in zip(axes, (20.0, 12.0)):
        hlines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert len(hlines) == 1 and hlines[0].get_ydata()[0] == dense
        assert len(ax.get_lines()) == 2  # the method's line and the dense line
    plt.close(fig)


def test_report_bad_input(capsys, runs, tmp_path):
    root, dirs = runs
    code, _, err = run(capsys, "report", tmp_path / "nope", "--out", tmp_path / "r.html")
    assert_one_line_error(code, err, "has no results.json")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{truncated")
    code, _, err = run(capsys, "report", bad, "--out", tmp_path / "r.html")
    assert_one_line_error(code, err, "cannot read")
    code, _, err = run(capsys, "report", dirs[0], "--out", tmp_path / "r.pdf")
    assert_one_line_error(code, err, "not an .html file")
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "r_files").exists()


CHECK = """<script>
window.__errs = [];
window.addEventListener('error',
  e => window.__errs.push(String(e.message || (e.target && e.target.id) || e.type)), true);
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const pre = document.createElement('pre');
  pre.id = 'slr-check';
  pre.textContent = JSON.stringify({errors: window.__errs,
    images: imgs.map(i => ({id: i.id, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))});
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("SLR_SKIP_BROWSER") == "1":
            pytest.skip("SLR_SKIP_BROWSER=1")
        pytest.fail("headless Chromium not found: install Debian's `chromium` (scripts/install.sh does it as root), "
                    "or set SLR_SKIP_BROWSER=1 to skip this test explicitly")
    return exe


def test_report_renders_in_headless_chromium(capsys, runs):
    exe = _chromium()
    root, dirs = runs
    out = root / "chrome" / "report.html"
    code, _, err = run(capsys, "report", *dirs, "--out", out)
    assert code == 0, err
    # instrumented copy: the check script goes first in <head> so it sees every error of the page itself
    probe = out.with_name("probe.html")
    probe.write_text(out.read_text().replace("<head>", "<head>" + CHECK, 1))
    proc = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={root / 'chrome-profile'}",
         "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="slr-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"page did not finish loading (rc {proc.returncode}): {proc.stderr[-2000:]}"
    import html

    check = json.loads(html.unescape(m.group(1)))
    assert check["errors"] == []
    assert [i["id"] for i in check["images"]] == FIGS
    for i in check["images"]:
        assert i["complete"] and i["w"] > 100 and i["h"] > 100, i
