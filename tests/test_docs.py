"""The docs stay true: the generated config reference is current, and the marked examples run."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
