"""The on-disk model repository: names, paths, symlinks, versions and configs."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from models.config import ModelConfig, VersionPolicy, parse_config
from models.repository import ModelRepository, ModelVersionFiles
from protocol.errors import ConfigError, ModelNotFound


def write_model(path: Path) -> Path:
    """A real, tiny ONNX model: ``output = Identity(input)``, FP32 [batch, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def add_versions(root: Path, name: str, *versions: int) -> Path:
    for version in versions:
        write_model(root / name / str(version) / "model.onnx")
    return root / name


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "repository"
    path.mkdir()
    return path


def test_the_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory") as caught:
        ModelRepository(tmp_path / "missing")
    assert caught.value.where == str(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        ModelRepository(tmp_path / "file")


def test_model_names_are_the_visible_directories_sorted(root: Path) -> None:
    add_versions(root, "b", 1)
    add_versions(root, "a", 1)
    (root / "a b").mkdir()
    (root / ".hidden").mkdir()
    (root / "README.md").write_text("not a model")
    assert ModelRepository(root).model_names() == ["a", "a b", "b"]


@pytest.mark.parametrize("name", ["../x", "a b", "..", ".", ".hidden", "", "a/b", "x\n"])
def test_invalid_model_names_are_refused(root: Path, name: str) -> None:
    (root / "x").mkdir()
    with pytest.raises(ConfigError, match="invalid model name") as caught:
        ModelRepository(root).model_dir(name)
    assert repr(name) in caught.value.message


def test_a_model_dir_symlinked_outside_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = add_versions(tmp_path, "outside", 1)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="outside the repository") as caught:
        ModelRepository(root).model_dir("escape")
    assert str(root / "escape") in caught.value.message
    assert str(outside) in caught.value.message


def test_a_model_dir_symlinked_inside_the_root_is_followed(root: Path) -> None:
    real = add_versions(root, "real", 1)
    (root / "alias").symlink_to(real, target_is_directory=True)
    repository = ModelRepository(root)
    assert repository.model_dir("alias") == real.resolve()
    [files] = repository.versions("alias", ModelConfig())
    assert files == ModelVersionFiles("alias", 1, real.resolve() / "1" / "model.onnx")


def test_a_missing_model_is_not_found(root: Path) -> None:
    (root / "file").write_text("")
    repository = ModelRepository(root)
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        repository.model_dir("nope")
    with pytest.raises(ModelNotFound, match="unknown model 'file'"):
        repository.model_dir("file")
    with pytest.raises(ModelNotFound):
        repository.load_config("nope", {"max_batch_size": 1})


@pytest.mark.parametrize(
    ("policy", "selected"),
    [
        ({"latest": 1}, [3]),
        ({"latest": 2}, [2, 3]),
        ({"latest": 10}, [1, 2, 3]),
        ({"all": True}, [1, 2, 3]),
        ({"specific": [1, 3]}, [1, 3]),
    ],
)
def test_version_policies_select_versions(
    root: Path, policy: dict[str, object], selected: list[int]
) -> None:
    model_dir = add_versions(root, "m", 1, 2, 3)
    config = parse_config({"version_policy": policy}, "test")
    found = ModelRepository(root).versions("m", config)
    assert found == [
        ModelVersionFiles("m", version, model_dir.resolve() / str(version) / "model.onnx")
        for version in selected
    ]


def test_a_missing_specific_version_is_named(root: Path) -> None:
    model_dir = add_versions(root, "m", 1, 2)
    config = ModelConfig(version_policy=VersionPolicy("specific", versions=(1, 3, 4)))
    with pytest.raises(ConfigError) as caught:
        ModelRepository(root).versions("m", config)
    assert caught.value.message == (
        f"{model_dir.resolve()}: version_policy.specific: version 3, 4 not found;"
        " versions on disk: 1, 2"
    )


def test_a_selected_version_without_model_onnx_is_an_error(root: Path) -> None:
    model_dir = add_versions(root, "m", 1)
    (model_dir / "2").mkdir()
    with pytest.raises(ConfigError, match=r"version 2 has no model\.onnx") as caught:
        ModelRepository(root).versions("m", ModelConfig())
    assert caught.value.where == str(model_dir.resolve() / "2")


def test_an_unselected_version_without_model_onnx_does_not_matter(root: Path) -> None:
    model_dir = add_versions(root, "m", 2)
    (model_dir / "1").mkdir()
    assert [f.version for f in ModelRepository(root).versions("m", ModelConfig())] == [2]


def test_entries_that_are_not_version_directories_are_ignored(root: Path) -> None:
    model_dir = add_versions(root, "m", 1)
    for other in ("0", "01", "v2", "latest", ".3", "-4", "6\n"):
        write_model(model_dir / other / "model.onnx")
    (model_dir / "5").write_text("a file, not a directory")
    config = ModelConfig(version_policy=VersionPolicy("all"))
    assert [f.version for f in ModelRepository(root).versions("m", config)] == [1]


def test_a_model_without_versions_is_an_error(root: Path) -> None:
    (root / "m" / "v1").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no versions") as caught:
        ModelRepository(root).versions("m", ModelConfig())
    assert caught.value.where == str((root / "m").resolve())


def test_a_model_file_symlinked_outside_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    outside = write_model(tmp_path / "elsewhere" / "model.onnx")
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.onnx").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside the repository") as caught:
        ModelRepository(root).versions("m", ModelConfig())
    assert str(outside) in caught.value.message


def test_a_model_file_symlinked_inside_the_root_is_followed(root: Path) -> None:
    shared = write_model(root / "m" / "1" / "model.onnx")
    (root / "m" / "2").mkdir()
    (root / "m" / "2" / "model.onnx").symlink_to(shared)
    files = ModelRepository(root).versions("m", ModelConfig())
    assert files == [ModelVersionFiles("m", 2, shared.resolve())]


def test_a_model_file_that_is_a_directory_is_refused(root: Path) -> None:
    (root / "m" / "1" / "model.onnx").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"model\.onnx: is not a file"):
        ModelRepository(root).versions("m", ModelConfig())


def test_the_selected_files_are_real_models(root: Path) -> None:
    add_versions(root, "m", 1, 2)
    [files] = ModelRepository(root).versions("m", ModelConfig())
    session = ort.InferenceSession(str(files.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]


def test_load_config_reads_config_yaml(root: Path) -> None:
    model_dir = add_versions(root, "m", 1)
    repository = ModelRepository(root)
    assert repository.load_config("m") == ModelConfig()
    (model_dir / "config.yaml").write_text("max_batch_size: 8\ninstances: 2\n")
    assert repository.load_config("m") == ModelConfig(max_batch_size=8, instances=2)


def test_a_bad_config_yaml_names_its_path(root: Path) -> None:
    model_dir = add_versions(root, "m", 1)
    (model_dir / "config.yaml").write_text("instances: 0\n")
    with pytest.raises(ConfigError) as caught:
        ModelRepository(root).load_config("m")
    assert caught.value.message.startswith(f"{model_dir.resolve() / 'config.yaml'}: instances: ")


def test_overrides_replace_config_yaml(root: Path) -> None:
    model_dir = add_versions(root, "m", 1)
    (model_dir / "config.yaml").write_text("max_batch_size: 8\ninstances: 2\n")
    # The override is a whole config, not merged: instances falls back to its default.
    config = ModelRepository(root).load_config("m", {"max_batch_size": 4})
    assert config == ModelConfig(max_batch_size=4)


def test_invalid_overrides_name_the_load_request(root: Path) -> None:
    add_versions(root, "m", 1)
    with pytest.raises(ConfigError) as caught:
        ModelRepository(root).load_config("m", {"max_batch_size": -1})
    assert caught.value.message == (
        "load request for model 'm': max_batch_size: must be an integer >= 0, got -1"
    )
