"""The documents users read: every benchmark table comes from its committed JSON, the README fits on a screen, and its links lead somewhere."""

from __future__ import annotations

import re

from bench import report
from testbed.helpers import ROOT


def test_every_table_in_the_readme_and_docs_is_made_from_committed_results() -> None:
    assert report.main(["--check"]) == 0
    blocks = [m.group("name") for doc in report.documents() for m in report.BLOCK.finditer(doc.read_text())]
    assert blocks and all((ROOT / "bench" / "results" / f"{name}.json").exists() for name in blocks)
    assert all((ROOT / "bench" / "results" / f"{md.stem}.json").exists() for md in (ROOT / "bench" / "results").glob("*.md")), "a results table without its data"


def test_the_readme_fits_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert readme.startswith("# bakehouse\n\n```bash\nscripts/dev demo") and "scripts/dev test" in readme.split("```")[1]
    for target in re.findall(r"\]\(((?:docs/)[^)#]+)", readme):
        assert (ROOT / target).exists(), target
