"""Per-model configuration: ``<repository>/<model>/config.yaml``.

The file is optional and every key has a default, so a directory holding only
``1/model.onnx`` serves. ``parse_config`` validates the whole mapping once, at load time, and
raises ``ConfigError`` naming the file, the dotted key and the bad value; nothing downstream
checks again. The same parser reads the ``config`` parameter of a load request (Triton's
repository API), which replaces the file.

What the config says about tensors can only be checked once ONNX Runtime has opened the graph,
so that check is a separate pure function, ``resolve_metadata``, fed the graph's specs by the
runtime. It also settles ``max_batch_size`` when the config leaves it out: 32 when every input
and output has a variable first dimension, else 0 (the model does not batch).

Shapes are full shapes, batch dimension included, as in ``protocol.schema.TensorSpec``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeGuard

import yaml

from protocol.errors import ConfigError
from protocol.schema import DATATYPES, ModelMetadata, TensorSpec
from protocol.traffic import TrafficPolicy, parse_traffic

PLATFORM = "onnxruntime_onnx"

DEFAULT_MAX_BATCH_SIZE = 32
"""``max_batch_size`` when the config leaves it out and every tensor can batch."""

Device = Literal["cpu", "cuda", "auto"]
DEVICES: tuple[Device, ...] = ("cpu", "cuda", "auto")


@dataclass(frozen=True, slots=True)
class DynamicBatching:
    """How the gateway's dispatcher queues and batches requests for one model."""

    max_queue_delay_ms: float = 0.0
    """Milliseconds a queued request may wait for a batch to fill; default 0 (run whatever is
    queued as soon as an instance is free)."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes worth waiting for, ascending and unique, each 1..max_batch_size; default
    none."""
    max_queue_size: int = 4096
    """Requests queued at most; the queue is always bounded. Default 4096: the gateway's
    requests in progress, so that clients waiting in a closed loop queue rather than cycle
    through 503s (each queued request is one in progress)."""
    default_timeout_ms: float = 0.0
    """Deadline in milliseconds for requests that set none; default 0 (no deadline)."""
    priority_levels: int = 1
    """Number of priority levels; level 1 is served first. Default 1."""
    default_priority_level: int = 1
    """Level of requests that set none, 1..priority_levels. The loader defaults it to the
    middle level, (priority_levels + 1) // 2, so callers can go either way from it."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["preferred_batch_sizes"] = list(self.preferred_batch_sizes)
        return data


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which of the versions on disk are served (Triton's ``version_policy``)."""

    kind: Literal["latest", "all", "specific"]
    """``latest``: the ``latest`` highest versions; ``all``; ``specific``: ``versions``."""
    latest: int = 1
    """How many of the highest versions ``latest`` serves; default 1."""
    versions: tuple[int, ...] = ()
    """The versions ``specific`` serves, ascending and unique."""

    def select(self, available: Sequence[int]) -> list[int]:
        """The served versions among ``available``, ascending.

        Specific versions that are not available are left out; the repository reports them.
        """
        ordered = sorted(set(available))
        if self.kind == "latest":
            return ordered[-self.latest :]
        if self.kind == "all":
            return ordered
        return [version for version in ordered if version in self.versions]

    def to_json(self) -> dict[str, Any]:
        if self.kind == "latest":
            return {"latest": self.latest}
        if self.kind == "all":
            return {"all": True}
        return {"specific": list(self.versions)}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One model's ``config.yaml``, validated."""

    max_batch_size: int | None = None
    """Rows per request along the first dimension, 0 = no batching. Default None: decided from
    the graph by ``resolve_metadata``."""
    dynamic_batching: DynamicBatching = DynamicBatching()
    """Queueing and batching in the gateway; default ``DynamicBatching()``."""
    version_policy: VersionPolicy = VersionPolicy("latest")
    """Versions served; default the latest one."""
    instances: int = 1
    """Batches of this model executing at once; default 1."""
    intra_op_threads: int = 1
    """ONNX Runtime threads inside one operator, per instance; 0 = ONNX Runtime's default.
    Default 1."""
    inter_op_threads: int = 1
    """ONNX Runtime threads across independent operators, per instance; 0 = ONNX Runtime's
    default. Default 1."""
    device: Device = "cpu"
    """``cpu``, ``cuda``, or ``auto`` (CUDA when ONNX Runtime has it, else CPU); default cpu."""
    min_batch_time_ms: float = 0.0
    """A benchmark aid, off by default (0): every batch takes at least this long in wall
    time (its instance sleeps for the rest, busy meanwhile), so a worker's capacity is bounded
    by wall time, as an accelerator's batch time hardly depends on the batch, and not by this
    machine's cores. It lets several local workers scale really on a small machine
    (``bazaar replay``)."""
    inputs: tuple[TensorSpec, ...] = ()
    """Declared inputs, checked against the graph; a declared shape may fix a variable
    dimension. Default none: the graph's inputs as they are."""
    outputs: tuple[TensorSpec, ...] = ()
    """Declared outputs, as ``inputs``."""
    traffic: TrafficPolicy | None = None
    """How the gateway shares the model's unversioned requests among its versions
    (``protocol.traffic``); served in the config for the gateway. Default none: the highest."""

    def to_json(self) -> dict[str, Any]:
        """The config as ``parse_config`` reads it back (``max_batch_size`` only when set)."""
        data: dict[str, Any] = {}
        if self.max_batch_size is not None:
            data["max_batch_size"] = self.max_batch_size
        data["dynamic_batching"] = self.dynamic_batching.to_json()
        data["version_policy"] = self.version_policy.to_json()
        data["instances"] = self.instances
        data["intra_op_threads"] = self.intra_op_threads
        data["inter_op_threads"] = self.inter_op_threads
        data["device"] = self.device
        data["min_batch_time_ms"] = self.min_batch_time_ms
        data["inputs"] = [spec.to_json() for spec in self.inputs]
        data["outputs"] = [spec.to_json() for spec in self.outputs]
        if self.traffic is not None:
            data["traffic"] = self.traffic.to_json()
        return data


def load_config(path: Path) -> ModelConfig:
    """The config in ``path``; the defaults when there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ModelConfig()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), None, f"invalid YAML{at}: {problem}") from exc
    # An empty file, or one holding only comments, means all defaults.
    return parse_config({} if data is None else data, str(path))


def parse_config(data: Mapping[str, Any], where: str) -> ModelConfig:
    """Validate a parsed config; ``where`` (a file, or the load request) starts every error."""
    default = ModelConfig()
    top = _mapping(data, where, None, _field_names(ModelConfig))
    max_batch_size = None
    if "max_batch_size" in top:
        max_batch_size = _int(top["max_batch_size"], where, "max_batch_size", 0)
    dynamic_batching = _dynamic_batching(top.get("dynamic_batching", {}), where)
    if max_batch_size is not None:
        _check_preferred(dynamic_batching.preferred_batch_sizes, max_batch_size, where)
    return ModelConfig(
        max_batch_size=max_batch_size,
        dynamic_batching=dynamic_batching,
        version_policy=_version_policy(
            top.get("version_policy", default.version_policy.to_json()), where
        ),
        instances=_int(top.get("instances", default.instances), where, "instances", 1),
        intra_op_threads=_int(
            top.get("intra_op_threads", default.intra_op_threads), where, "intra_op_threads", 0
        ),
        inter_op_threads=_int(
            top.get("inter_op_threads", default.inter_op_threads), where, "inter_op_threads", 0
        ),
        device=_device(top.get("device", default.device), where),
        min_batch_time_ms=_ms(
            top.get("min_batch_time_ms", default.min_batch_time_ms), where, "min_batch_time_ms"
        ),
        inputs=_tensor_specs(top.get("inputs", []), where, "inputs"),
        outputs=_tensor_specs(top.get("outputs", []), where, "outputs"),
        traffic=parse_traffic(top["traffic"], where) if "traffic" in top else None,
    )


def resolve_metadata(
    name: str,
    version: str,
    config: ModelConfig,
    graph_inputs: Sequence[TensorSpec],
    graph_outputs: Sequence[TensorSpec],
    where: str,
) -> ModelMetadata:
    """The metadata clients see: the graph's tensors, narrowed by the config's declarations.

    ``graph_inputs`` and ``graph_outputs`` come from ONNX Runtime, -1 for variable dimensions.
    Raises ``ConfigError`` when a declaration does not match the graph, or when
    ``max_batch_size > 0`` but some tensor's first dimension is fixed.
    """
    inputs = _resolve_tensors("input", config.inputs, graph_inputs, where)
    outputs = _resolve_tensors("output", config.outputs, graph_outputs, where)
    unbatchable = [spec for spec in inputs + outputs if not spec.shape or spec.shape[0] != -1]
    if config.max_batch_size is None:
        max_batch_size = 0 if unbatchable else DEFAULT_MAX_BATCH_SIZE
    else:
        max_batch_size = config.max_batch_size
        if max_batch_size > 0 and unbatchable:
            spec = unbatchable[0]
            raise ConfigError(
                where,
                "max_batch_size",
                f"{max_batch_size} needs a variable first dimension on every input and output,"
                f" but {spec.name!r} has shape {list(spec.shape)}",
            )
    _check_preferred(config.dynamic_batching.preferred_batch_sizes, max_batch_size, where)
    return ModelMetadata(name, version, PLATFORM, inputs, outputs, max_batch_size)


def _resolve_tensors(
    kind: str, declared: Sequence[TensorSpec], graph: Sequence[TensorSpec], where: str
) -> tuple[TensorSpec, ...]:
    by_name = {spec.name: spec for spec in graph}
    resolved = dict(by_name)
    for index, spec in enumerate(declared):
        at = f"{kind}s[{index}]"
        actual = by_name.get(spec.name)
        if actual is None:
            names = ", ".join(repr(name) for name in by_name)
            raise ConfigError(
                where,
                f"{at}.name",
                f"{kind} {spec.name!r} is not in the graph; the graph has {names}",
            )
        if spec.datatype != actual.datatype:
            raise ConfigError(
                where,
                f"{at}.datatype",
                f"{spec.datatype!r} does not match the graph's {actual.datatype!r}"
                f" for {kind} {spec.name!r}",
            )
        fits = len(spec.shape) == len(actual.shape) and all(
            graph_dim in (-1, dim) for dim, graph_dim in zip(spec.shape, actual.shape, strict=True)
        )
        if not fits:
            raise ConfigError(
                where,
                f"{at}.shape",
                f"{list(spec.shape)} does not fit the graph's {list(actual.shape)}"
                f" for {kind} {spec.name!r}; a declaration may only fix a variable (-1)"
                " dimension",
            )
        resolved[spec.name] = spec
    return tuple(resolved[spec.name] for spec in graph)


def _check_preferred(sizes: Sequence[int], max_batch_size: int, where: str) -> None:
    if any(size > max_batch_size for size in sizes):
        raise ConfigError(
            where,
            "dynamic_batching.preferred_batch_sizes",
            f"each must be at most max_batch_size ({max_batch_size}), got {list(sizes)}",
        )


def _dynamic_batching(value: object, where: str) -> DynamicBatching:
    section = _mapping(value, where, "dynamic_batching", _field_names(DynamicBatching))
    defaults = DynamicBatching().to_json()

    def get(name: str) -> tuple[object, str, str]:
        return section.get(name, defaults[name]), where, f"dynamic_batching.{name}"

    levels = _int(*get("priority_levels"), minimum=1)
    default_level = _int(
        section.get("default_priority_level", (levels + 1) // 2),
        where,
        "dynamic_batching.default_priority_level",
        minimum=1,
        maximum=levels,
    )
    return DynamicBatching(
        max_queue_delay_ms=_ms(*get("max_queue_delay_ms")),
        preferred_batch_sizes=_positive_ints(*get("preferred_batch_sizes")),
        max_queue_size=_int(*get("max_queue_size"), minimum=1),
        default_timeout_ms=_ms(*get("default_timeout_ms")),
        priority_levels=levels,
        default_priority_level=default_level,
    )


def _version_policy(value: object, where: str) -> VersionPolicy:
    key = "version_policy"
    section = _mapping(value, where, key, ("latest", "all", "specific"))
    if len(section) != 1:
        raise ConfigError(
            where, key, f"must hold exactly one of latest, all, specific; got {dict(section)!r}"
        )
    ((kind, argument),) = section.items()
    if kind == "latest":
        return VersionPolicy("latest", latest=_int(argument, where, f"{key}.latest", 1))
    if kind == "all":
        if argument is not True:
            raise ConfigError(where, f"{key}.all", f"must be true, got {argument!r}")
        return VersionPolicy("all")
    versions = _positive_ints(argument, where, f"{key}.specific")
    if not versions:
        raise ConfigError(where, f"{key}.specific", "must list at least one version, got []")
    return VersionPolicy("specific", versions=versions)


def _device(value: object, where: str) -> Device:
    for device in DEVICES:
        if value == device:
            return device
    raise ConfigError(where, "device", f"must be one of {', '.join(DEVICES)}; got {value!r}")


def _tensor_specs(value: object, where: str, key: str) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list):
        raise ConfigError(where, key, f"must be a list of {{name, datatype, shape}}, got {value!r}")
    specs: list[TensorSpec] = []
    for index, item in enumerate(value):
        at = f"{key}[{index}]"
        spec = _mapping(item, where, at, ("name", "datatype", "shape"))
        missing = [name for name in ("name", "datatype", "shape") if name not in spec]
        if missing:
            raise ConfigError(where, at, f"missing {', '.join(missing)}; got {dict(spec)!r}")
        name, datatype, shape = spec["name"], spec["datatype"], spec["shape"]
        if not isinstance(name, str) or not name:
            raise ConfigError(where, f"{at}.name", f"must be a non-empty string, got {name!r}")
        if any(other.name == name for other in specs):
            raise ConfigError(where, f"{at}.name", f"{name!r} is declared twice")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise ConfigError(
                where,
                f"{at}.datatype",
                f"unknown datatype {datatype!r}; valid datatypes are {', '.join(DATATYPES)}",
            )
        if not isinstance(shape, list) or not all(
            _is_int(dim) and (dim == -1 or dim >= 1) for dim in shape
        ):
            raise ConfigError(
                where,
                f"{at}.shape",
                f"must be a list of dimensions, each -1 (any size) or >= 1; got {shape!r}",
            )
        specs.append(TensorSpec(name, datatype, tuple(shape)))
    return tuple(specs)


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(field.name for field in fields(cls))


def _mapping(value: object, where: str, key: str | None, valid: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(where, key, f"must be a mapping, got {value!r}")
    for name in value:
        if name not in valid:
            dotted = f"{key}.{name}" if key else str(name)
            raise ConfigError(where, dotted, f"unknown key; valid keys are {', '.join(valid)}")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    # bool is a subclass of int, and YAML reads yes/no/on/off as booleans.
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: object, where: str, key: str, minimum: int, maximum: int | None = None) -> int:
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ConfigError(where, key, f"must be an integer {bound}, got {value!r}")
    return value


def _ms(value: object, where: str, key: str) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(where, key, f"must be a number of milliseconds >= 0, got {value!r}")
    return float(value)


def _positive_ints(value: object, where: str, key: str) -> tuple[int, ...]:
    """A list of integers >= 1, sorted and deduplicated (order and repeats carry no meaning)."""
    if not isinstance(value, list):
        raise ConfigError(where, key, f"must be a list of integers >= 1, got {value!r}")
    return tuple(
        sorted({_int(item, where, f"{key}[{index}]", 1) for index, item in enumerate(value)})
    )
