"""The README and docs/ stand on their own: no references to files outside the
repository, links that resolve, and the data URLs the code actually uses."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from per.data.cifar import _layout
from per.data.corpus import CORPORA

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_references_outside_the_repository(page):
    text = page.read_text()
    assert "DESIGN.md" not in text and "REFERENCES.md" not in text
    assert "../shared" not in text


SHIPPED = [ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / "environment.yml",
           *(f for d in ("per", "experiments", "scripts", "configs")
             for f in sorted((ROOT / d).rglob("*")) if f.suffix in (".py", ".yaml", ".sh"))]


def test_shipped_code_and_configs_cite_only_what_ships():
    """Code and configs point to the README and docs/, not to the team's own notes."""
    for path in SHIPPED:
        text = path.read_text()
        for outside in ("DESIGN.md", "REFERENCES.md", "shared/"):
            assert outside not in text, f"{path.relative_to(ROOT)} cites {outside}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_readme_links_docs_and_has_gpu_and_data_instructions():
    readme = (ROOT / "README.md").read_text()
    assert "](docs/method.md)" in readme and "](docs/protocols.md)" in readme
    assert "## GPU setup" in readme and "nvidia-smi" in readme and "RUNS_PER_GPU" in readme
    urls = [_layout(name).url for name in ("cifar10", "cifar100")] + [s.url for s in CORPORA.values()]
    for url in urls:
        assert url in readme, f"README's data section lacks {url}"


def test_the_readmes_own_model_example_runs(capsys):
    """The snippet of "PER in your own model", pasted as it stands."""
    section = (ROOT / "README.md").read_text().split("## PER in your own model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("['2', '5']\n") and "grad_ratio/2" in out
