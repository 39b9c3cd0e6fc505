"""Korean in every picture: a font with Hangul installed on the machine is found even when
matplotlib's font cache was built before it was installed (Colab after `apt install fonts-nanum`);
without one, one line says so, once per process, and nothing else is printed."""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

import metrics
from metrics import save_figure

DRAW = (
    "import sys; sys.path.insert(0, {root!r}); from metrics import korean_fonts, save_figure; "
    "save_figure({png!r}, lambda fig: fig.add_subplot().set_title('부정 긍정 기쁨'), (3, 2)); "
    "print(korean_fonts())"
)


def test_a_font_installed_after_the_cache_was_built_is_found(tmp_path):
    if not metrics.korean_fonts():
        pytest.skip("no font with Hangul on this machine (CI installs fonts-noto-cjk)")
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl")}
    subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], env=env, check=True)
    cache = glob.glob(str(tmp_path / "mpl" / "fontlist-*.json"))[0]
    fonts = json.loads(open(cache).read())
    korean = set(metrics.korean_fonts())
    fonts["ttflist"] = [
        f for f in fonts["ttflist"] if f["name"] not in korean
    ]  # as if installed later
    with open(cache, "w") as f:
        json.dump(fonts, f)
    result = subprocess.run(
        [sys.executable, "-c", DRAW.format(root=ROOT, png=str(tmp_path / "k.png"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        result.returncode == 0 and result.stderr == ""
    ), result.stderr  # no glyph warnings, no note
    assert (
        set(ast.literal_eval(result.stdout)) & korean
    )  # the font the cache did not list draws the Hangul


def test_without_a_korean_font_one_line_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(metrics, "korean_fonts", lambda: [])
    metrics.note_no_korean_font.cache_clear()
    for i in range(3):
        save_figure(
            str(tmp_path / f"{i}.png"), lambda fig: fig.add_subplot().set_title("부정 긍정"), (3, 2)
        )
    save_figure(
        str(tmp_path / "latin.png"), lambda fig: fig.add_subplot().set_title("loss"), (3, 2)
    )
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "note: no font with Hangul is installed, so Korean names are drawn as boxes; install "
        "one (apt install fonts-nanum, or any Noto Sans CJK font) and run again"
    ]
    metrics.note_no_korean_font.cache_clear()
