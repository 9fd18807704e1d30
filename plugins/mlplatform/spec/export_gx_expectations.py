"""Write ``gx_expectations.json``: every Great Expectations core expectation type -> its required kwargs.

The spec loader reads that file at parse time, so a mistyped expectation is caught without importing GX
(6-8 s). Rerun after upgrading great-expectations::

    python -m mlplatform.spec.export_gx_expectations
"""

from __future__ import annotations

import json
from pathlib import Path

OUTPUT = Path(__file__).with_name("gx_expectations.json")
_CORE_MODULE = "great_expectations.expectations.core."


def core_expectations() -> dict[str, list[str]]:
    """``expect_*`` types GX registers from its core package, each with its required kwargs in declared order."""
    from great_expectations.expectations.registry import (
        get_expectation_impl,
        list_registered_expectation_implementations,
        register_core_expectations,
    )

    register_core_expectations()
    out = {}
    for name in list_registered_expectation_implementations():
        impl = get_expectation_impl(name)
        if name.startswith("expect_") and impl.__module__.startswith(_CORE_MODULE):
            out[name] = [field.alias for field in impl.__fields__.values() if field.required]
    return dict(sorted(out.items()))


def render(expectations: dict[str, list[str]]) -> str:
    """The file's exact text."""
    return json.dumps(expectations, indent=1, sort_keys=True) + "\n"


def main() -> None:
    expectations = core_expectations()
    OUTPUT.write_text(render(expectations))
    print(f"wrote {len(expectations)} expectation types to {OUTPUT}")


if __name__ == "__main__":
    main()
