"""The HTML report: every linked figure exists at the size asked for, and the page renders offline."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from fleetprune.cli import main
from fleetprune.report import write_report, write_variants_report
from fleetprune.report.families import choose_family, family_of
from fleetprune.report.load import load_tables, load_variants

from report_fixtures import GROUPS, SMALL, SWEEP, TABLE_DEVICES, VARIANT_DEVICES, make_tables, make_variants


class _Page(HTMLParser):
    """The images, figure captions and external references of a report page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.captions: list[str] = []
        self.scripts = 0
        self.links: list[str] = []
        self._in_caption = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        elif tag == "figcaption":
            self._in_caption = True
            self.captions.append("")
        elif tag == "script":
            self.scripts += 1
        elif tag in ("link", "a"):
            self.links.append(a.get("href") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data: str) -> None:
        if self._in_caption:
            self.captions[-1] += data


def _parse(page: Path) -> _Page:
    parser = _Page()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _check_figures(page: Path) -> dict[str, tuple[int, int]]:
    """Assert every linked PNG exists, decodes, and has the size the page states; return name -> size."""
    parsed = _parse(page)
    assert parsed.scripts == 0 and not parsed.links, "the page must need no script or external asset"
    sizes = {}
    assert len(parsed.captions) == len(parsed.images)
    for img, caption in zip(parsed.images, parsed.captions):
        src = img["src"]
        assert "/" not in src and not src.startswith(("http:", "https:", "file:")), src
        assert img["alt"] and caption.startswith(img["alt"]), "each figure is named in its caption"
        with Image.open(page.parent / src) as im:
            im.load()
            assert im.format == "PNG"
            assert im.size == (int(img["width"]), int(img["height"]))
            sizes[src] = im.size
    return sizes


def test_variants_report_links_every_figure_at_its_size(tmp_path: Path) -> None:
    root = make_variants(tmp_path / "variants")
    page = write_variants_report(root)
    assert page == root / "report.html"
    sizes = _check_figures(page)
    assert sizes["report_widths.png"] == (900, 480)
    assert sizes["report_schedule.png"] == (1000, 400)  # two devices side by side, one row
    assert sizes["report_agreement.png"] == (800, 640)
    text = page.read_text()
    for device in VARIANT_DEVICES:
        assert device in text
    assert "Dashed outline: the dense width" in text
    # Dense widths come from report.json, or else from the plan in widths.json.
    assert [v.dense_widths for v in load_variants(root).variants] == [GROUPS, GROUPS]
    # The unmeasured device is called out, not silently dropped.
    assert "Predicted only (not measured on the device) for cuda-test-gpu" in text
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "no temp file left behind"


def test_variants_report_without_any_measurement_says_so(tmp_path: Path) -> None:
    root = make_variants(tmp_path / "variants", measured=(False, False))
    page = write_report(root)
    sizes = _check_figures(page)
    assert "report_agreement.png" not in sizes
    assert "No variant has both a predicted and a measured latency" in page.read_text()


def test_tables_report_default_and_chosen_staircase(tmp_path: Path) -> None:
    root = make_tables(tmp_path / "tables")
    page = write_report(root)
    sizes = _check_figures(page)
    ratio = f"report_ratio_{TABLE_DEVICES[0]}_vs_{TABLE_DEVICES[1]}.png"
    assert set(sizes) == {"report_staircase.png", ratio, "report_validation.png"}
    assert sizes["report_staircase.png"] == (1000, 600)
    assert sizes[ratio] == (1000, 420)
    captions = " ".join(_parse(page).captions)
    # The default is the family with the most widths common to both devices (16 vs 4).
    assert family_of(SWEEP.key) in captions and "16 widths" in captions

    assert main(["report", str(root), "--layer", "kh=1,cin=32"]) == 0
    captions = " ".join(_parse(page).captions)
    assert family_of(SMALL.key) in captions and "4 widths" in captions


def test_layer_choice_by_key_fragment_and_full_key(tmp_path: Path) -> None:
    tables = load_tables(make_tables(tmp_path / "tables", validation=False)).tables
    assert choose_family(tables).signature == family_of(SWEEP.key)
    # A full key picks its family even at a width nobody measured.
    chosen = choose_family(tables, SMALL.with_channels(32, 999).key)
    assert chosen.signature == family_of(SMALL.key) and chosen.common_couts == (16, 32, 48, 64)
    assert choose_family(tables, "k1x1,h8w8|ci32").signature == family_of(SMALL.key)


def test_tables_report_one_device_has_no_ratio(tmp_path: Path) -> None:
    root = make_tables(tmp_path / "tables", validation=False)
    assert main(["report", str(root), "--devices", TABLE_DEVICES[1]]) == 0
    page = root / "_report" / "report.html"
    sizes = _check_figures(page)
    assert set(sizes) == {"report_staircase.png"}
    text = page.read_text()
    assert "a ratio needs two" in text and "No validation rows" in text
    assert TABLE_DEVICES[0] not in text


def test_failed_figure_keeps_previous_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetprune.report import plots

    root = make_variants(tmp_path / "variants")
    page = write_variants_report(root)
    before = page.read_bytes()
    calls = 0
    real_save = plots.Plot.save

    def flaky_save(self: plots.Plot, path: Path) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("disk full")
        real_save(self, path)

    monkeypatch.setattr(plots.Plot, "save", flaky_save)
    with pytest.raises(RuntimeError):
        write_variants_report(root)
    assert page.read_bytes() == before
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_family_of_frees_dwconv_channels() -> None:
    from fleetprune.tables import LayerConfig

    dw = LayerConfig("dwconv", cin=32, cout=32, groups=32, kh=3, kw=3, in_h=8, in_w=8)
    assert family_of(dw.key) == family_of(dw.with_channels(64, 64).key)
    assert family_of(SWEEP.key) != family_of(SWEEP.with_channels(32, 8).key)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless chromium is not installed")
@pytest.mark.parametrize("kind", ["variants", "tables"])
def test_page_renders_in_headless_chromium(tmp_path: Path, kind: str) -> None:
    root = make_variants(tmp_path / kind) if kind == "variants" else make_tables(tmp_path / kind)
    page = write_report(root)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
         page.resolve().as_uri()],
        check=True, capture_output=True, timeout=90, env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"},
    )
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1200, 2000)
        colors = rgb.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 200, "the screenshot shows the plots, not a blank page"
    white = sum(n for n, c in colors if c == (255, 255, 255))
    assert white < 0.95 * 1200 * 2000
