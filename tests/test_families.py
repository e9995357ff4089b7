"""The family registry: a model directory's family from its config file (confirmed by the classes
its yaml names), clear refusals, and the launcher's view of families not yet served."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosyserve import families
from cosyserve.errors import ModelConfigError, ModelDirectoryError
from cosyserve.nn.yaml_reader import parse_yaml_tree


def test_every_family_has_a_distinct_config_file_and_an_importable_package() -> None:
    files = [e.config_file for e in families.FAMILIES.values()]
    assert len(set(files)) == len(files)
    for entry in families.FAMILIES.values():
        package = entry.load()
        assert callable(package.load_config), entry.name


def test_a_v1_directory_is_cosyvoice1(tiny_model_dir: Path) -> None:
    assert families.detect(tiny_model_dir).name == "cosyvoice1"


def test_an_unknown_directory_names_the_families_cosyserve_knows(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("llm: {}\n")
    with pytest.raises(ModelDirectoryError) as err:
        families.detect(tmp_path)
    for entry in families.FAMILIES.values():
        assert entry.title in str(err.value) and entry.config_file in str(err.value)
    with pytest.raises(ModelDirectoryError, match="not found"):
        families.detect(tmp_path / "missing")


def test_two_configs_are_refused(tmp_path: Path) -> None:
    for name in ("cosyvoice.yaml", "cosyvoice2.yaml"):
        (tmp_path / name).write_text("{}\n")
    with pytest.raises(ModelDirectoryError, match="several families"):
        families.detect(tmp_path)


@pytest.mark.parametrize(
    ("target", "family"),
    [
        ("cosyvoice.llm.llm.TransformerLM", "cosyvoice1"),
        ("cosyvoice.llm.llm.Qwen2LM", "cosyvoice2"),
        ("cosyvoice.flow.flow.CausalMaskedDiffWithDiT", "cosyvoice3"),
        ("some.other.Model", None),
    ],
)
def test_detect_from_the_yaml_classes(target: str, family: str | None) -> None:
    tree = parse_yaml_tree(f"llm: !new:{target}\n  x: 1\n")
    found = families.detect_from_tree(tree)
    assert (found.name if found else None) == family


def test_unknown_family_name() -> None:
    with pytest.raises(ModelConfigError, match="cosyserve knows"):
        families.entry("cosyvoice9")
