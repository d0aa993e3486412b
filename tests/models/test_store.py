"""The model table: bounded whatever the API is asked, readiness from the start-up models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from models.config import ModelConfig
from models.limits import ModelLimits, ModelTableFull, cpu_count
from models.repository import ModelRepository
from models.store import ModelStore
from protocol.errors import ConfigError, ModelNotFound


@pytest.fixture
def repository(demo_repository: Path, tmp_path: Path) -> ModelRepository:
    root = tmp_path / "repository"
    for model in ("digits", "mlp"):
        shutil.copytree(demo_repository / model, root / model)
    for copy in ("digits2", "digits3"):
        shutil.copytree(demo_repository / "digits", root / copy)
    return ModelRepository(root)


async def test_bogus_names_leave_no_entries(repository: ModelRepository) -> None:
    store = ModelStore(repository, ["digits"])
    await store.load_all()
    for i in range(20_000):
        with pytest.raises(ModelNotFound):
            await store.load(f"bogus{i}")
        with pytest.raises(ModelNotFound):
            await store.unload(f"bogus{i}")
    assert set(store.states) == {"digits"}
    assert not store._locks
    assert store.ready()
    store.close()


async def test_a_model_deleted_from_the_repository_leaves_the_index(
    repository: ModelRepository,
) -> None:
    store = ModelStore(repository, ["digits"])
    await store.load_all()
    await store.unload("digits2")  # never loaded: nothing to record
    assert "digits2" not in store.states
    with pytest.raises(ConfigError):
        await store.load("digits2", {"max_batch_size": "lots"})
    assert store.states["digits2"].state == "UNAVAILABLE"
    shutil.rmtree(repository.root / "digits2")
    assert "digits2" not in {entry["name"] for entry in store.index()}
    assert "digits2" not in store.states
    store.close()


async def test_the_table_holds_at_most_max_models(repository: ModelRepository) -> None:
    store = ModelStore(repository, ["digits"], limits=ModelLimits(max_models=2))
    await store.load_all()
    await store.load("digits2")
    with pytest.raises(ModelTableFull, match="2 models"):
        await store.load("digits3")
    assert set(store.states) == {"digits", "digits2"}
    # An unloaded entry makes room: the oldest one that is not a start-up model goes.
    await store.unload("digits2")
    await store.load("digits3")
    assert set(store.states) == {"digits", "digits3"}
    # A failed entry makes room too.
    with pytest.raises(ModelTableFull):
        await store.load("mlp")
    await store.unload("digits3")
    with pytest.raises(ConfigError):
        await store.load("mlp", {"instances": 0})
    await store.load("digits2")
    assert set(store.states) == {"digits", "digits2"}
    assert len(store.index()) == 4  # every model on disk is listed, entries or not
    store.close()


async def test_readiness_is_the_start_up_models(repository: ModelRepository) -> None:
    store = ModelStore(repository, ["digits", "ghost"])
    assert not store.ready()
    await store.load_all()
    assert not store.ready()  # the pod was started to serve ghost, which it cannot
    assert store.states["ghost"].state == "UNAVAILABLE"
    assert "ghost" in store.states["ghost"].reason
    with pytest.raises(ConfigError):
        await store.load("mlp", {"max_batch_size": 4194304})
    await store.unload("ghost")  # the operator no longer asks for it
    assert store.ready()
    store.close()


def test_limits_name_the_key_the_value_and_the_limit() -> None:
    limits = ModelLimits(max_batch_size=64, max_threads=4, max_instances=2)
    limits.check_override(ModelConfig(max_batch_size=64, intra_op_threads=0, instances=2), "w")
    cases = [
        (ModelConfig(max_batch_size=65), "w: max_batch_size: 65 is over this pod's limit of 64"),
        (ModelConfig(intra_op_threads=5), "w: intra_op_threads: 5 is over this pod's limit of 4"),
        (ModelConfig(inter_op_threads=5), "w: inter_op_threads: 5 is over this pod's limit of 4"),
        (ModelConfig(instances=3), "w: instances: 3 is over this pod's limit of 2"),
        (
            ModelConfig(min_batch_time_ms=100.0),
            "w: min_batch_time_ms: 100.0 is over this pod's limit of 0",
        ),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError) as refused:
            limits.check_override(config, "w")
        assert refused.value.message == message
    assert ModelLimits().max_threads == cpu_count() >= 1


async def test_config_files_are_not_bounded(repository: ModelRepository) -> None:
    """The repository's configs are the operator's own: only API overrides are bounded."""
    (repository.root / "mlp" / "config.yaml").write_text("max_batch_size: 16\ninstances: 2\n")
    store = ModelStore(repository, ["mlp"], limits=ModelLimits(max_batch_size=8, max_instances=1))
    await store.load_all()
    assert store.ready()
    assert store.get("mlp").metadata.max_batch_size == 16
    store.close()
