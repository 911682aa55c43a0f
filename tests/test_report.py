"""The HTML report of a fit: written by `mixmap fit` (and Fit.save) unless --no-report, one
self-contained file, and in a real headless browser (Chromium, where installed) it loads
without errors and every image renders."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from mixmap.cli import app


def fit(scan, out, *extra):
    return CliRunner().invoke(app, [
        "fit", str(scan / "dwi.nii.gz"), "--bvals", str(scan / "dwi.bval"), "--bvecs",
        str(scan / "dwi.bvec"), "--mask", str(scan / "mask.nii.gz"), "--model", "msdki",
        "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def reports(tiny_msdki_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    lsq = fit(tiny_msdki_dir, out / "lsq", "--method", "lsq")
    gmm = fit(tiny_msdki_dir, out / "gmm", "--method", "vae-gmm", "--epochs", "6",
              "--eb-rounds", "1")
    assert lsq.exit_code == 0 and gmm.exit_code == 0, (lsq.output, gmm.output)
    return out / "lsq" / "model-msdki_report.html", out / "gmm" / "model-msdki_report.html"


def test_fit_writes_a_self_contained_report(reports):
    lsq, gmm = (p.read_text(encoding="utf-8") for p in reports)
    for text in (lsq, gmm):
        assert "<h2>Maps</h2>" in text and "<h2>Goodness of fit</h2>" in text
        assert "Voxels at a bound" in text and "Acquisition" in text and "Command:" in text
        sources = re.findall(r"(?:src|href)='([^']*)'", text)
        assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
        assert "http://" not in text and "https://" not in text
        assert "µm²/ms" in text and "neurological" in text
    assert "What each voxel borrowed" in gmm and "Learned mixture" in gmm
    assert "Training" in gmm
    assert "What each voxel borrowed" not in lsq and "Learned mixture" not in lsq


def test_no_report_writes_none(tiny_msdki_dir, tmp_path):
    assert fit(tiny_msdki_dir, tmp_path / "o", "--method", "lsq", "--no-report").exit_code == 0
    assert not list((tmp_path / "o").glob("*.html"))


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0));
  document.body.insertAdjacentHTML('beforeend', `<pre id="verdict">images=${imgs.length} `
    + `broken=${bad.length} errors=${window.__errors.length}</pre>`);
});
</script>"""


@pytest.mark.skipif(BROWSER is None, reason="no Chromium here (apt-get install chromium)")
def test_report_renders_in_a_real_browser(reports, tmp_path):
    for i, report in enumerate(reports):
        page = tmp_path / f"page{i}.html"
        page.write_text(report.read_text(encoding="utf-8").replace("</head>", CHECK + "</head>"),
                        encoding="utf-8")
        dom = subprocess.run(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu",
             "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120).stdout
        verdict = re.search(r"images=(\d+) broken=(\d+) errors=(\d+)", dom)
        assert verdict, dom[-500:]
        images, broken, errors = map(int, verdict.groups())
        assert images >= 7 and broken == 0 and errors == 0, verdict.group(0)


def test_voxels_at_a_bound_are_counted_in_the_maps_units(tiny_msdki_dir):
    """S0's bounds are declared relative to the scan's signal scale: the report compares the
    S0 map (input units) with them times that scale, so a plain fit has no S0 at a bound."""
    import numpy as np

    import mixmap
    from mixmap.report import _bounds_rows

    d = tiny_msdki_dir
    fit = mixmap.fit(d / "dwi.nii.gz", bvals=d / "dwi.bval", bvecs=d / "dwi.bvec",
                     mask=d / "mask.nii.gz", model="msdki", method="lsq")
    scale = fit.result.settings["signal_scale"]
    rows = {r[0]: r for r in _bounds_rows(fit)}
    assert rows["S0"][1] == f"[0, {4 * scale:.4g}] a.u." and rows["S0"][3] == "0.00%"
    d_map = fit.result.params["D"]
    before = np.mean(d_map[: d_map.size // 4] >= 4.0 - 4e-4)
    d_map[: d_map.size // 4] = 4.0  # a quarter of the voxels at D's upper bound
    row = _bounds_rows(fit)[1]
    assert row[0] == "D" and row[1] == "[0, 4] µm²/ms"
    share = float(rows["D"][3].rstrip("%")) / 100 + 0.25 * (1 - before)
    assert row[3] == f"{share:.2%}"
