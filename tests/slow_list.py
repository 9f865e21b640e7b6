"""Write tests/slow.txt, the tests that `-m "not slow"` leaves out besides those marked in their files, from a full
run's JUnit XML: every test whose setup + call + teardown took longer than --seconds on the 2-core machine.

    python -m pytest -q --junitxml=/tmp/suite.xml        # the whole suite, as CI runs it
    python tests/slow_list.py /tmp/suite.xml --seconds 2

tests/conftest.py marks the listed tests `slow`. A module-scoped fixture's cost lands on the first test that uses
it: rerun after a list changes and list again until the fast subset's time holds.
"""
from __future__ import annotations

import argparse
import os
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("junit_xml")
    p.add_argument("--seconds", type=float, default=2.0, help="list tests slower than this (default 2)")
    p.add_argument("--out", default=os.path.join(HERE, "slow.txt"))
    a = p.parse_args()
    rows = []
    for case in ET.parse(a.junit_xml).getroot().iter("testcase"):
        t = float(case.get("time", 0))
        if t > a.seconds:
            path = case.get("classname", "").replace(".", "/") + ".py"
            rows.append((f"{path}::{case.get('name')}", t))
    keep = set()
    if os.path.exists(a.out):  # tests listed before keep their place (a rerun of the fast subset lists the rest)
        keep = {line.split()[0] for line in open(a.out) if line.strip() and not line.startswith("#")}
    ids = {i: t for i, t in rows} | {i: 0.0 for i in keep if i not in dict(rows)}
    with open(a.out + ".tmp", "w") as f:
        f.write(f"# tests slower than {a.seconds:g} s on the 2-core machine (tests/slow_list.py); conftest marks them "
                "slow\n")
        for i in sorted(ids):
            f.write(f"{i}\n")
    os.replace(a.out + ".tmp", a.out)
    print(f"{len(ids)} tests listed in {a.out}")


if __name__ == "__main__":
    main()
