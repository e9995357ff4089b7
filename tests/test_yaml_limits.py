"""Hostile `cosyvoice.yaml` files (issue 15, defect 2): each is refused quickly, in bounded
memory, with a ModelConfigError that names the file, and a model directory holding one fails
once, before any acceleration plan is tried."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest

from cosyserve.errors import ModelConfigError
from cosyserve.nn.yaml_reader import load_yaml_tree, parse_yaml_tree

HOSTILE = {
    # A string doubled at every level of !ref: 2**33 characters at the end.
    "ref_doubling": "a0: ab\n" + "".join(f"a{i}: !ref <a{i - 1}><a{i - 1}>\n" for i in range(1, 34)),
    # Nine levels of nine aliases: 9**9 leaves once expanded ("billion laughs").
    "alias_bomb": 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    ),
    "recursive_alias": "a: &a [*a, *a]\n",
    # Arithmetic that builds ever larger numbers.
    "huge_number": "a: 10\n"
    + "".join(f"b{i}: !ref <{'a' if i == 0 else f'b{i - 1}'}> ** 64\n" for i in range(6)),
    "long_product": "a: 99999999999\nb: !ref " + " * ".join(["<a>"] * 3000) + "\n",
    # Each key refers to the next: resolving the first one recurses through all of them.
    "deep_ref_chain": "".join(f"k{i}: !ref <k{i + 1}>\n" for i in range(2000)) + "k2000: 1\n",
    "deep_nesting": "x: " + "[" * 20000 + "]" * 20000 + "\n",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_yaml_is_refused_fast_and_names_the_file(name: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.process_time()
    with pytest.raises(ModelConfigError) as info:
        parse_yaml_tree(HOSTILE[name], f"/models/{name}/cosyvoice.yaml")
    assert time.process_time() - started < 5.0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"peak memory grew by {grown_mb:.0f} MB"
    assert f"/models/{name}/cosyvoice.yaml" in info.value.message


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "cosyvoice.yaml"
    with path.open("w") as handle:
        handle.write("x: 1\n")
        handle.truncate(100 * 1024 * 1024)  # 100 MB, sparse: nothing to read if refused first
    started = time.perf_counter()
    with pytest.raises(ModelConfigError, match=str(path)) as info:
        load_yaml_tree(path)
    assert time.perf_counter() - started < 1.0
    from cosyserve.nn.yaml_reader import MAX_YAML_BYTES

    assert f"{MAX_YAML_BYTES:,}" in info.value.message


def test_the_limits_leave_room_for_real_configs(tiny_config_path: Path) -> None:
    from cosyserve.tools.bench import full_size_yaml

    for path in (tiny_config_path, full_size_yaml()):
        tree = load_yaml_tree(path)
        assert {"llm", "flow", "hift"} <= set(tree)
    # Interpolation, arithmetic and a long (but legal) chain of refs still resolve.
    tree = parse_yaml_tree(
        "a: 2\nb: !ref <a> * 3\nc: !ref <b>-<a>/x\n" + "".join(f"k{i}: !ref <b>\n" for i in range(500))
    )
    assert tree["b"] == 6 and tree["c"] == "6-2/x" and tree["k499"] == 6


@pytest.mark.timeout(120)
def test_a_hostile_model_directory_fails_once_before_any_plan(tiny_model_copy: Path, monkeypatch) -> None:
    from types import SimpleNamespace

    from cosyserve.acceleration import launcher
    from cosyserve.nn import yaml_reader

    (tiny_model_copy / "cosyvoice.yaml").write_text(HOSTILE["alias_bomb"])
    parses = []
    real_parse = yaml_reader.parse_yaml_tree

    def counting_parse(text: str, source: str = "<string>"):
        parses.append(source)
        return real_parse(text, source)

    monkeypatch.setattr(yaml_reader, "parse_yaml_tree", counting_parse)
    built = []
    monkeypatch.setattr(
        launcher, "build_backend", lambda *a, **k: built.append(a) or pytest.fail("plan tried")
    )
    settings = SimpleNamespace(model_dir=str(tiny_model_copy), force_config=None, auto=True)
    with pytest.raises(ModelConfigError) as info:
        launcher.create_backend(settings)
    assert "cosyvoice.yaml" in info.value.message and "no configuration could serve" not in info.value.message
    assert len(parses) == 1 and built == []
