"""README.ko.md and README.md cannot drift apart: every command in the Korean README's code blocks
stands in the English one, which holds the reference."""

import os
import re

from conftest import ROOT


def code_lines(path):
    with open(path, encoding="utf-8") as f:
        blocks = re.findall(r"^```\n(.*?)^```", f.read(), flags=re.S | re.M)
    # each README comments its commands in its own language: the commands themselves must agree
    lines = [
        re.sub(r"(^|\s+)#.*$", "", line).strip() for block in blocks for line in block.splitlines()
    ]
    return [line for line in lines if line]


def test_every_korean_readme_command_stands_in_the_english_readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        english = f.read()
    commands = code_lines(os.path.join(ROOT, "README.ko.md"))
    # install, quick start, own data, multi-label, resume, predict, serve, tests
    assert len(commands) >= 10
    missing = [line for line in commands if line not in english]
    assert not missing, missing


def test_both_readmes_link_to_each_other():
    for name, other in (("README.md", "README.ko.md"), ("README.ko.md", "README.md")):
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            assert f"]({other})" in f.read().split("\n## ")[0]  # near the top


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the very test command the README gives (its Tests section)."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = [line.strip() for line in f if "pytest" in line and not line.startswith("#")]
    readme = code_lines(os.path.join(ROOT, "README.md"))
    assert len(ci) == 1 and ci[0] in readme, ci
