"""The README's ```python examples run as written and give what they say (```py marks snippets that need a run)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

# What each example promises, keyed by the variable it leaves behind; every example must leave one of them.
PROMISES = {
    "sparsifier": lambda ns: abs(ns["sparsifier"].report()["totals"]["sparsity_all"] - 0.9) <= 1e-4,
    "keep": lambda ns: int(ns["keep"].sum()) == 100_000 and ns["sol"].budget_error <= 1e-6,
}


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    checked = set()
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        promised = [name for name in PROMISES if name in namespace]
        assert promised, f"a README example leaves none of {sorted(PROMISES)}: {block[:80]!r}"
        for name in promised:
            assert PROMISES[name](namespace), f"the README example leaving {name!r} does not do what it says"
        checked.update(promised)
    assert checked == set(PROMISES)
