"""Open a page in headless Chromium: the DOM after a probe script ran, and a screenshot.

The probe is appended to a copy of the page (the page under test is never changed). After the
``load`` event (every image fetched and decoded or failed) it records, as ``data-`` attributes
of ``<body>``, what a person would see: how many images there are and how many decoded
(``naturalWidth > 0``), the ids of the tables, and whether unticking a method's checkbox hides
that method's cells (computed style) and leaves the others shown. ``--dump-dom`` then prints
the DOM with those attributes.

Chromium is Debian's ``chromium`` (``make test`` installs it). Without it the browser tests
skip, except where ``PATTERNNET_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

PROBE = """
<script>
window.addEventListener("load", () => {
  const b = document.body.dataset;
  const images = Array.from(document.images);
  b.images = images.length;
  b.decoded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  b.tables = Array.from(document.querySelectorAll("table")).map((t) => t.id).join(",");
  const box = document.getElementById("show-m0");
  const own = document.querySelector("td.m0");
  const other = document.querySelector("td.m1");
  const input = document.querySelector("td.input");
  if (box && own && other) {
    const shown = (el) => getComputedStyle(el).display !== "none";
    const before = [shown(own), shown(other), shown(input)];
    box.click();
    const hidden = [shown(own), shown(other), shown(input), box.checked];
    box.click();
    b.toggle = JSON.stringify({before, hidden, restored: shown(own)});
    b.hiddenCells = document.querySelectorAll("td.m0").length;
  }
  b.probed = "yes";
});
</script>
"""


def chromium() -> str | None:
    """The Chromium executable, or None."""
    for name in (os.environ.get("PATTERNNET_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):  # fmt: skip
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def require_chromium() -> str:
    """Chromium's path; skips the test (fails under ``PATTERNNET_REQUIRE_BROWSER=1``)."""
    found = chromium()
    if found is None:
        reason = ("headless Chromium not found (apt-get install chromium, or set "
                  "PATTERNNET_CHROMIUM)")  # fmt: skip
        if os.environ.get("PATTERNNET_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; PATTERNNET_REQUIRE_BROWSER=1 requires it")
        pytest.skip(reason)
    return found


def _run(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="patternnet-chromium-") as profile:
        command = [require_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                   "--no-first-run", "--disable-extensions", "--hide-scrollbars",
                   f"--user-data-dir={profile}", *args]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)  # fmt: skip


def probe(page: Path) -> dict[str, str]:
    """Load a probed copy of ``page`` (file://) and return the ``data-`` attributes of body."""
    text = page.read_text(encoding="utf-8")
    if "</body>" not in text:
        raise AssertionError(f"{page} has no </body>")
    probed = page.with_name(page.stem + ".probe.html")
    probed.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        done = _run(["--virtual-time-budget=10000", "--dump-dom", probed.resolve().as_uri()])
    finally:
        probed.unlink()
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body is not None, f"no DOM from Chromium (exit {done.returncode}): {done.stderr[-2000:]}"
    found = re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1))
    return {name: html.unescape(value) for name, value in found}


def screenshot(page: Path, out: Path, width: int = 1400, height: int = 2400) -> Path:
    """A ``width``×``height`` PNG screenshot of ``page`` (file://) at ``out``."""
    done = _run([f"--window-size={width},{height}", f"--screenshot={out.resolve()}",
                 "--virtual-time-budget=10000", page.resolve().as_uri()])  # fmt: skip
    assert out.is_file(), f"no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    return out
