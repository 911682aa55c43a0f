"""The docs site: it builds with warnings as errors (mkdocs --strict, where mkdocs is
installed), every relative link in the Markdown resolves to a file, and the tutorials' Python
code runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: Pages the build generates (docs/hooks/): links to them resolve in the site only.
GENERATED = {DOCS / "reference" / "cli.md"}


def test_every_relative_link_resolves():
    broken = []
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() and path not in GENERATED:
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_own_model_tutorial_runs(tmp_path):
    text = (DOCS / "tutorials" / "own-model.md").read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))
    script = tmp_path / "tutorial.py"
    script.write_text(code, encoding="utf-8")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) < 0.2  # the ADC is recovered (µm²/ms)


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent
                                                          / "mkdocs").exists(),
                    reason="mkdocs is not installed (pip install -e '.[dev]')")
def test_docs_build_without_warnings(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    r = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").exists()
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert "load_model" in api and "predict" in api
