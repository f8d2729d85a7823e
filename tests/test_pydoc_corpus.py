import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from nanoforge.data.pydoc_corpus import CorpusConfig, build_corpus, stdlib_modules

# modules whose pages print the environment, paths of this installation or object addresses
LEAKY = ["os", "cgi", "sys", "site", "collections", "shutil", "platform", "json", "rlcompleter"]


def _texts(out: Path) -> dict[str, str]:
    t = pq.read_table(next(out.glob("*.parquet"))).to_pydict()
    return dict(zip(t["id"], t["text"], strict=True))


def test_corpus_leaks_no_environment_and_is_the_same_from_anywhere(tmp_path):
    modules = [m for m in LEAKY if m in stdlib_modules()]
    # the corpus (text) and the docs site's HTML pages, whose longer reprs show more of sys.path & co.
    code = ("import sys, json; from pathlib import Path; from nanoforge.data.pydoc_corpus import *; "
            f"build_corpus(CorpusConfig(modules={modules!r}, workers=1), Path(sys.argv[1])); "
            f"Path(sys.argv[1] + '.html').write_text(json.dumps(render_modules({modules!r}, 1, 'html')))")
    src = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "bin" / "build-corpus"  # the second run is launched as a script (as `nanoforge` is)
    script.parent.mkdir()
    script.write_text("if __name__ == '__main__':\n    " + code.replace("; ", "\n    ") + "\n")
    outs = []
    for i, secret in enumerate(["canary-value-31337", "another-canary-4242"]):
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        # the second also has one more PYTHONPATH entry: neither the launch nor the path shows in a page
        path = src if i == 0 else os.pathsep.join([str(cwd), src])
        env = {**os.environ, "NANOFORGE_TEST_SECRET": secret, "PYTHONPATH": path}
        launch = ["-c", code] if i == 0 else [str(script)]
        subprocess.run([sys.executable, *launch, str(tmp_path / f"out{i}")], cwd=cwd, env=env, check=True,
                       capture_output=True)
        texts = _texts(tmp_path / f"out{i}")
        assert set(texts) == set(modules)
        joined = "\n".join(texts.values())
        assert secret not in joined and "NANOFORGE_TEST_SECRET" not in joined
        assert " at 0x" not in joined and str(cwd) not in joined
        pages = json.loads((tmp_path / f"out{i}.html").read_text())
        assert secret not in "".join(pages.values()) and str(cwd) not in "".join(pages.values())
        outs.append((texts, pages))
    assert outs[0][0] == outs[1][0]
    for name in modules:
        assert outs[0][1][name] == outs[1][1][name], name


def test_corpus_documents_are_pydoc_pages(tmp_path):
    m = build_corpus(CorpusConfig(modules=["json", "no_such_module_xyz"], workers=1), tmp_path / "c")
    texts = _texts(tmp_path / "c")
    assert list(texts) == ["json"] and texts["json"].startswith("Python Library Documentation: package json")
    assert "FUNCTIONS" in texts["json"] and "dumps(" in texts["json"]
    assert m["figures"]["modules_skipped"] == ["no_such_module_xyz"] and m["figures"]["documents"] == 1


def test_a_page_does_not_depend_on_which_modules_its_process_rendered_before():
    """pydoc lists pyexpat's ExpatError only while xml.parsers.expat (which plistlib imports) is not loaded,
    and the warnings registry counts filter changes made anywhere in the process. Every rendering process
    imports all the run's modules first and the registry is dropped, so rendering order changes nothing."""
    from nanoforge.data.pydoc_corpus import render_modules

    first = render_modules(["plistlib", "pyexpat", "asynchat"], workers=1, fmt="html")
    second = render_modules(["pyexpat", "asynchat", "plistlib"], workers=1, fmt="html")
    assert first == second
    assert first["pyexpat"] and first["plistlib"]  # asynchat (it warns on import) is gone from Python 3.12 on
    assert all("__warningregistry__" not in page for page in first.values() if page)
