"""The docs stay true: the generated config reference is current, and the marked examples run.

A fenced ```bash block right after a `<!-- test -->` line is an example the tests run: all of one file's marked
blocks in order, as one `set -euo pipefail` script, in a fresh directory that links the repository's CLIs and configs
and holds a tiny stand-in for the `Qwen2.5-Coder-0.5B` hub directory (no network; `tools/stand_in.py` makes it).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "<!-- test -->"
BLOCK = re.compile(r"^<!-- test -->\n```bash\n(.*?)^```$", re.S | re.M)


def marked_blocks() -> dict[str, list[str]]:
    """{doc file name: its marked bash blocks}, for every docs/*.md with any."""
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        text = open(path, encoding="utf-8").read()
        blocks = BLOCK.findall(text)
        if text.count(MARK) != len(blocks):
            raise AssertionError(f"{path}: every {MARK} line must be followed directly by a ```bash block")
        if blocks:
            out[os.path.basename(path)] = blocks
    return out


def make_stand_in(path: str) -> None:
    """The stand-in as a user makes it: `python tools/stand_in.py DIR` (a tiny random Qwen2 with a small BPE, written
    like a hub checkpoint)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "stand_in.py"), path], capture_output=True,
                       text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), timeout=300)
    assert r.returncode == 0 and os.path.exists(os.path.join(path, "config.json")), r.stderr[-3000:]


def test_config_reference_is_current():
    """docs/config.md is what docs/gen_config_reference.py makes of the code (and every field has a meaning)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "gen_config_reference.py"), "--check"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_field_docs_parse_the_fields_section_and_reject_gaps():
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    import dataclasses

    import pytest

    from gen_config_reference import DocError, field_docs

    @dataclasses.dataclass
    class Good:
        """Summary.

        Fields:
        a: first
          continued.
        b: second.
        """

        a: int = 0
        b: int = 1

    @dataclasses.dataclass
    class Missing:
        """Summary.

        Fields:
        a: first.
        """

        a: int = 0
        b: int = 1

    assert field_docs(Good) == {"a": "first continued.", "b": "second."}
    with pytest.raises(DocError, match=r"undocumented fields \['b'\]"):
        field_docs(Missing)


def test_every_marker_marks_a_bash_block():
    assert "walkthrough.md" in marked_blocks()


@pytest.mark.slow  # ~2 min: 3 short training runs (pretrain, SFT, DPO), 3 sampling runs, 2 conversions
@pytest.mark.parametrize("doc", sorted(marked_blocks()))
def test_marked_examples_run(doc, tmp_path):
    for name in ("train.py", "infer.py", "configs"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    make_stand_in(str(tmp_path / "Qwen2.5-Coder-0.5B"))
    script = tmp_path / "examples.sh"
    script.write_text("set -euxo pipefail\n" + "\n".join(marked_blocks()[doc]))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"docs/{doc} examples failed:\n{r.stderr[-6000:]}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lowercased, punctuation dropped (hyphens and underscores kept), spaces to hyphens,
    repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_in_docs_resolve():
    """Every relative link in docs/*.md names an existing file and, with #anchor, an existing heading."""
    bad = []
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        text = open(path, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(full):
                bad.append(f"{os.path.basename(path)}: {target} (no such file)")
            elif anchor and full.endswith(".md") and anchor not in _anchors(open(full, encoding="utf-8").read()):
                bad.append(f"{os.path.basename(path)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)
