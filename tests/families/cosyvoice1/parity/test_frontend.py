"""Text frontend parity: every item of every set's ``frontend.json``, every field, exact equality.

One test per (set, field); a failure lists every item that differs, with both values.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cosyserve.errors import CosyserveError
from cosyserve.text.frontend import TextFrontend

pytestmark = pytest.mark.parity

FIELDS = (
    "tokens_raw",
    "normalized_split",
    "tokens_split",
    "normalized_nosplit",
    "normalized_split_no_tn",
    "tokens_split_no_tn",
    "normalized_split_no_frontend",
)


@pytest.fixture(scope="module")
def frontends() -> dict[str, TextFrontend]:
    return {mode: TextFrontend(normalizer=mode) for mode in ("wetext", "none", "off")}


def _producers(fe: dict[str, TextFrontend]) -> dict[str, Callable[[str], object]]:
    wetext, none, off = fe["wetext"], fe["none"], fe["off"]
    return {
        "tokens_raw": wetext.tokenize,
        "normalized_split": wetext.normalize,
        "tokens_split": lambda t: [wetext.tokenize(s) for s in wetext.normalize(t)],
        "normalized_nosplit": lambda t: wetext.normalize(t, split=False)[0],
        "normalized_split_no_tn": none.normalize,
        "tokens_split_no_tn": lambda t: [none.tokenize(s) for s in none.normalize(t)],
        "normalized_split_no_frontend": off.normalize,
    }


@pytest.mark.parametrize("field", FIELDS)
def test_frontend_field(parity_set, frontends, field: str) -> None:
    produce = _producers(frontends)[field]
    items = parity_set.frontend["items"]
    assert items, f"{parity_set.name}: frontend.json has no items"
    failures: list[str] = []
    checked = 0
    for index, item in enumerate(items):
        name = item.get("id", index)
        if f"{field}_error" in item:
            # upstream raised on this input: so must we (with a clear error, not a crash)
            try:
                produce(item["text"])
            except CosyserveError:
                checked += 1
                continue
            failures.append(f"item {name!r}: upstream raised {item[f'{field}_error']!r}, we did not")
            continue
        if field not in item:
            continue
        try:
            got = produce(item["text"])
        except Exception as error:  # report every item, not just the first failure
            failures.append(f"item {name!r}: raised {type(error).__name__}: {error}")
            continue
        checked += 1
        if got != item[field]:
            failures.append(f"item {name!r} field {field!r}:\n  expected {item[field]!r}\n  got      {got!r}")
    assert not failures, f"{parity_set.name}: {len(failures)} item(s) differ\n" + "\n".join(failures)
    assert checked, f"{parity_set.name}: no item has {field!r}"
