"""`layertap report`: one self-contained HTML file, checked in a real headless browser (Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import layertap as lt
from layertap.cli import app as cli


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href")]


@pytest.fixture(scope="module")
def report(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    shutil.copytree(image_dir, images)
    (images / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    model = lt.load_model("resnet18", weights="random", seed=0)
    lt.extract(model, images, ["layer3", "penultimate"], root / "acts", progress=False, reduce="avg")
    assert cli.main(["report", str(root / "acts"), "--out", str(root / "report.html")]) == 0
    return root / "report.html"


def test_report_is_self_contained(report: Path) -> None:
    text = report.read_text()
    refs = _Refs()
    refs.feed(text)
    assert "script" not in refs.tags and "link" not in refs.tags  # nothing to run, nothing to fetch
    assert refs.refs and all(r.startswith("data:image/") for r in refs.refs)
    assert len([r for r in refs.refs if r.startswith("data:image/jpeg")]) == 9  # one thumbnail per stored image
    assert len([r for r in refs.refs if r.startswith("data:image/png")]) == 3  # 2 RDMs + layer x layer
    assert "<code>fc:input (penultimate)</code></td><td>512</td><td>float32</td>" in text
    assert "Skipped images (1)" in text and "cat/broken.jpg" in text
    assert "<h1>layertap run: torchvision:resnet18</h1>" in text and re.search(r"images/s</td>", text)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (make test installs it as root)")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*base, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0
    assert "Uncaught" not in dom.stderr and "CONSOLE" not in dom.stderr  # no console errors
    # the browser's DOM holds the layers table, the thumbnails with their classes, and the figures
    assert "fc:input (penultimate)" in dom.stdout and "layer3" in dom.stdout
    assert len(re.findall(r'<img src="data:image/jpeg', dom.stdout)) == 9
    assert re.search(r"<b>dog</b><br>dog/img00\.jpg", dom.stdout)
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and shot.stat().st_size > 20_000  # a rendered page, not a blank one
