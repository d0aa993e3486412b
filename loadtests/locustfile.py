"""Locust users for any Open Inference Protocol (v2) server: bazaar, Triton, KServe, MLServer.

Run it through ``bazaar loadtest`` (which adds the verdict, report and plot), or by hand::

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --scenario steady \\
        --peak-users 20 --scenario-duration 60 --model-mix digits:3,mlp:1

or with Locust's own options and no scenario, on every model the server has ready::

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 5 -r 5 -t 30s

When a test starts, every process that sends load reads each model's metadata from
``/v2/models/{m}`` and builds a small pool of random bodies per model, encoding, priority and
shape mode (``loadtests.payloads``), so a request costs a pick from the pool, not the building
of a body. A request picks its model by the mix weights, binary or JSON by ``--binary-ratio``,
a priority from ``--priorities`` and a wrong shape by ``--wrong-shape-ratio``.

Accounting: 200 is a success; 429 and 503 are ``shed``, 504 ``expired``, other 4xx
``client_error``, other statuses ``server_error`` and a failed connection
``transport_error``. Each failure reaches Locust under its own message (``503 shed``), so its
tables never lump them together, and ``Tally`` counts them per model along with a latency
histogram of successful requests only (a fast 503 must not improve p99). Workers send their
tally to the master with every stats report; the master (or a lone local process) writes the
total to ``--tally-file`` on exit.

Load shape: one ``ScenarioShape`` plays ``loadtests.shapes``. Closed-loop scenarios run
``InferenceUser``: each sends a request, waits for the answer, sends the next. The open-loop
scenario runs ``OpenLoopUser`` schedule keepers that share ``--arrival-rate`` between them:
each fires a request every ``users / rate`` seconds in a greenlet of its own and never waits
for the answer, so a slow server cannot slow the offered load down. The trace scenario runs
``TraceUser`` keepers that take the due times of ``--schedule-file`` in turn from one shared
iterator (gevent switches only where a keeper sleeps, so each due time is taken once): a
keeper sleeps until its request falls due and fires it the same way. The schedule is the
whole test's, so the trace scenario runs in one process, as ``bazaar loadtest`` runs it.
Outstanding requests per keeper are bounded (``--max-outstanding`` shared out); a request due
while the bound is reached is not sent and counts as ``missed schedule`` — it is load the
server was offered and did not get, and it counts against the error rate. A keeper that wakes
late sends what fell due at once, so the arrival count holds even when the generator itself
lags. Open-loop sends are counted per second of the test (``sent_per_s`` in the tally), so the
rate that left can be set against the rate that was due.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import gevent.pool
import locust.stats
from locust import FastHttpUser, LoadTestShape, User, constant, events, task
from locust.contrib.fasthttp import FastHttpSession
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtests.payloads import ModelSpec, Payload, build_payload
from loadtests.shapes import OPEN_LOOP, SCENARIOS, TRACE, users_at
from loadtests.target import fetch_spec, ready_models
from loadtests.verdict import classify, latency_bucket

logger = logging.getLogger("bazaar.loadtest")

POOL_SIZE = 8
"""Random bodies per (model, encoding, priority, shape mode)."""
TALLY_KEY = "bazaar_tally"
STOP_GRACE_S = 10.0
"""How long a stopping open-loop keeper waits for its outstanding requests."""
TIMELINE_INTERVAL_S = 1.0

# Locust's own HTML report charts the percentile the verdict judges (p99, not its default
# p95), and a point a second rather than one every five.
locust.stats.PERCENTILES_TO_CHART = [0.5, 0.99]
locust.stats.HISTORY_STATS_INTERVAL_SEC = 1


class Tally:
    """Outcomes per model, missed schedule slots and the latency histogram of successes."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        """``model/outcome`` -> requests; ``model/missed_schedule`` for open-loop misses."""
        self.ok_ms: Counter[str] = Counter()
        """Rounded milliseconds (as a string: it crosses msgpack) -> successful requests."""
        self.sent_per_s: Counter[str] = Counter()
        """Open loop: whole seconds since the test started (a string, as above) -> requests
        sent in that second."""
        self.started: float | None = None
        self.stopped: float | None = None

    def record(self, model: str, outcome: str, response_ms: float) -> None:
        self.outcomes[f"{model}/{outcome}"] += 1
        if outcome == "ok":
            self.ok_ms[str(latency_bucket(response_ms))] += 1

    def drain(self) -> dict[str, Any]:
        """What a worker reports to the master: the counts since its last report."""
        report = {
            "outcomes": dict(self.outcomes),
            "ok_ms": dict(self.ok_ms),
            "sent_per_s": dict(self.sent_per_s),
        }
        self.outcomes.clear()
        self.ok_ms.clear()
        self.sent_per_s.clear()
        return report

    def merge(self, report: dict[str, Any]) -> None:
        self.outcomes.update(report["outcomes"])
        self.ok_ms.update(report["ok_ms"])
        self.sent_per_s.update(report["sent_per_s"])

    def to_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "stopped": self.stopped,
            "outcomes": dict(sorted(self.outcomes.items())),
            "ok_ms": dict(sorted(self.ok_ms.items(), key=lambda item: int(item[0]))),
            "sent_per_s": dict(sorted(self.sent_per_s.items(), key=lambda item: int(item[0]))),
        }


@dataclass(frozen=True, slots=True)
class Request:
    model: str
    name: str
    """The name Locust files its statistics under, e.g. ``mlp binary``."""
    payload: Payload


class Workload:
    """What requests to send, from the custom arguments; bodies built once per process."""

    def __init__(
        self, options: Any, mix: str, specs: dict[str, ModelSpec], rng: random.Random
    ) -> None:
        self.models, self.weights = parse_mix(mix)
        self.binary_ratio: float = options.binary_ratio
        self.wrong_shape_ratio: float = options.wrong_shape_ratio
        levels = [int(p) for p in options.priorities.split(",") if p.strip()]
        self.priorities: list[int | None] = list(levels) or [None]
        parameters: dict[int | None, dict[str, int]] = {}
        for priority in self.priorities:
            parameters[priority] = {}
            if priority is not None:
                parameters[priority]["priority"] = priority
            if options.timeout_ms:
                parameters[priority]["timeout"] = int(options.timeout_ms * 1000)
        self.pools: dict[tuple[str, bool, int | None, bool], list[Payload]] = {}
        for model in self.models:
            for binary in (False, True):
                for priority in self.priorities:
                    for wrong in (False, True):
                        self.pools[(model, binary, priority, wrong)] = [
                            build_payload(
                                specs[model],
                                rng,
                                binary=binary,
                                rows=options.rows,
                                wrong_shape=wrong,
                                parameters=parameters[priority],
                            )
                            for _ in range(POOL_SIZE)
                        ]

    def pick(self, rng: random.Random) -> Request:
        model = rng.choices(self.models, self.weights)[0]
        binary = rng.random() < self.binary_ratio
        priority = rng.choice(self.priorities)
        wrong = rng.random() < self.wrong_shape_ratio
        name = f"{model} {'binary' if binary else 'json'}"
        if len(self.priorities) > 1:
            name += f" p{priority}"
        if wrong:
            name += " wrong-shape"
        return Request(model, name, rng.choice(self.pools[(model, binary, priority, wrong)]))


def parse_mix(mix: str) -> tuple[list[str], list[float]]:
    """``digits:3,mlp:1`` (or ``digits,mlp``, equal weights) -> names and weights."""
    models: list[str] = []
    weights: list[float] = []
    for item in mix.split(","):
        name, _, weight = item.strip().partition(":")
        if name:
            models.append(name)
            weights.append(float(weight) if weight else 1.0)
    if not models or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--model-mix {mix!r}: expected NAME[:WEIGHT],... with a positive weight")
    return models, weights


TALLY = Tally()
WORKLOAD: Workload | None = None
SCHEDULE: Iterator[float] = iter(())
"""The trace scenario's due times, seconds after ``started``, taken in turn by its keepers."""
started = time.monotonic()
"""When the test started (reset by ``test_start``): the open loops' time zero."""
_first_failures: set[str] = set()


def send(client: FastHttpSession, rng: random.Random) -> None:
    """One request, accounted for by outcome."""
    assert WORKLOAD is not None, "test_start builds the workload before any user runs"
    request = WORKLOAD.pick(rng)
    with client.post(
        f"/v2/models/{request.model}/infer",
        data=request.payload.body,  # type: ignore[arg-type]  # bytes go through as they are
        headers=dict(request.payload.headers),
        name=request.name,
        catch_response=True,
    ) as response:
        status = response.status_code or 0
        outcome = classify(status)
        TALLY.record(request.model, outcome, response.request_meta["response_time"])
        if outcome == "ok":
            response.success()
            return
        message = f"{status} {outcome.replace('_', ' ')}" if status else "transport error"
        if message not in _first_failures:
            # The first body of each kind of failure says why; later ones would only repeat it.
            _first_failures.add(message)
            detail = response.text if status else repr(response.error)
            logger.warning("first %s on %s: %.300s", message, request.name, detail)
        response.failure(message)


class InferenceUser(FastHttpUser):
    """Closed loop: the next request leaves when the last one is answered."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.rng = random.Random()

    @task
    def infer(self) -> None:
        send(self.client, self.rng)


class ScheduleKeeper(FastHttpUser):
    """Open loop: fires each request when it falls due, in a greenlet of its own."""

    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.outstanding = gevent.pool.Pool(self.concurrency)

    def fire(self) -> None:
        """The request now due: sent without waiting for it, or missed at the bound."""
        if self.outstanding.full():
            assert WORKLOAD is not None
            model = self.rng.choices(WORKLOAD.models, WORKLOAD.weights)[0]
            TALLY.outcomes[f"{model}/missed_schedule"] += 1
            return
        TALLY.sent_per_s[str(int(time.monotonic() - started))] += 1
        self.outstanding.spawn(send, self.client, self.rng)

    def on_stop(self) -> None:
        self.outstanding.join(timeout=STOP_GRACE_S)


class OpenLoopUser(ScheduleKeeper):
    """Open loop: one schedule keeper, firing its share of the arrival rate on time."""

    def on_start(self) -> None:
        super().on_start()
        options = self.environment.parsed_options
        self.interval_s = options.peak_users / options.arrival_rate
        # A random phase, so keepers do not fire in lockstep.
        self.next_at = time.monotonic() + self.rng.random() * self.interval_s

    @task
    def keep_schedule(self) -> None:
        delay = self.next_at - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        self.next_at += self.interval_s
        self.fire()


class TraceUser(ScheduleKeeper):
    """Open loop on a schedule: one keeper of the shared due times of ``--schedule-file``."""

    @task
    def keep_schedule(self) -> None:
        due_s = next(SCHEDULE, None)
        if due_s is None:
            # Every due time is taken; the shape ends the test at the schedule's end.
            gevent.sleep(TIMELINE_INTERVAL_S)
            return
        delay = started + due_s - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        self.fire()


class ScenarioShape(LoadTestShape):
    """Plays ``--scenario`` for ``--scenario-duration`` seconds, then stops the test.

    Without ``--scenario`` it plays Locust's own options instead: ``-u`` closed-loop users
    started at ``-r`` a second, for ``-t`` (or until stopped).
    """

    use_common_options = True

    def tick(self) -> tuple[int, float, list[type[User]] | None] | None:
        assert self.runner is not None
        options: Any = self.runner.environment.parsed_options
        elapsed_s = time.perf_counter() - self.start_time  # get_run_time(), which is untyped
        if not options.scenario:
            if options.run_time and elapsed_s >= options.run_time:
                return None
            return options.num_users or 1, options.spawn_rate or 1.0, [InferenceUser]
        users = users_at(options.scenario, elapsed_s, options.scenario_duration, options.peak_users)
        if users is None:
            return None
        user_class = {OPEN_LOOP: OpenLoopUser, TRACE: TraceUser}.get(
            options.scenario, InferenceUser
        )
        # Fast enough that every scenario's steps (the spike above all) are steep.
        return users, float(max(100, users)), [user_class]


def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("bazaar", "the v2 inference workload (loadtests/)")
    group.add_argument(
        "--scenario",
        choices=list(SCENARIOS),
        default=None,
        help="default: none, Locust's own -u/-r/-t (closed loop)",
    )
    group.add_argument("--scenario-duration", type=float, default=30.0, help="seconds")
    group.add_argument(
        "--peak-users", type=int, default=10, help="users (schedule keepers in open loop)"
    )
    group.add_argument(
        "--arrival-rate", type=float, default=50.0, help="requests/s (open loop only)"
    )
    group.add_argument(
        "--schedule-file",
        default="",
        help="the trace scenario's due times: seconds from the start, one a line, in order",
    )
    group.add_argument(
        "--max-outstanding",
        type=int,
        default=1000,
        help="requests in flight at most, all open-loop keepers together",
    )
    group.add_argument(
        "--model-mix", default="", help="NAME[:WEIGHT],... (default: every ready model, equally)"
    )
    group.add_argument("--binary-ratio", type=float, default=0.5)
    group.add_argument("--priorities", default="", help="e.g. 1,2: each request picks one")
    group.add_argument("--timeout-ms", type=float, default=0.0, help="0 = none")
    group.add_argument("--rows", type=int, default=1, help="batch rows per request")
    group.add_argument("--wrong-shape-ratio", type=float, default=0.0)
    group.add_argument("--tally-file", default="", help="where the master writes the tally")
    group.add_argument(
        "--timeline-file", default="", help="where the master appends a JSON line a second"
    )


def _init(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is not None and options.scenario in (OPEN_LOOP, TRACE):
        # The HTTP client's connection pool must not hold back what the schedule sends.
        keepers = max(1, options.peak_users)
        ScheduleKeeper.concurrency = max(1, options.max_outstanding // keepers)
    if isinstance(environment.runner, WorkerRunner):
        _on(
            environment.events.report_to_master,
            lambda client_id, data: data.__setitem__(TALLY_KEY, TALLY.drain()),
        )
    if isinstance(environment.runner, MasterRunner):
        _on(
            environment.events.worker_report,
            lambda client_id, data: TALLY.merge(data[TALLY_KEY]) if TALLY_KEY in data else None,
        )


def _write_timeline(environment: Environment, path: Path) -> None:
    """Every second: users, totals so far and Locust's percentiles over the last 10 s."""
    runner = environment.runner
    assert runner is not None
    with path.open("a") as timeline:
        while True:
            total = runner.stats.total
            point = {
                "t": time.time(),
                "users": runner.user_count,
                "p50_ms": total.get_current_response_time_percentile(0.5),
                "p99_ms": total.get_current_response_time_percentile(0.99),
                "requests": total.num_requests,
                "failures": total.num_failures,
            }
            timeline.write(json.dumps(point) + "\n")
            timeline.flush()
            gevent.sleep(TIMELINE_INTERVAL_S)


_timeline: gevent.Greenlet | None = None


def _start(environment: Environment, **_: Any) -> None:
    global WORKLOAD, SCHEDULE, _timeline, started
    TALLY.started = time.time()
    started = time.monotonic()
    options = environment.parsed_options
    assert options is not None and environment.host is not None
    if options.timeline_file and not isinstance(environment.runner, WorkerRunner):
        _timeline = gevent.spawn(_write_timeline, environment, Path(options.timeline_file))
    if isinstance(environment.runner, MasterRunner):
        return
    try:
        mix = options.model_mix or ",".join(ready_models(environment.host))
        models = parse_mix(mix)[0]
        specs = {model: fetch_spec(environment.host, model) for model in models}
        WORKLOAD = Workload(options, mix, specs, random.Random())
        if options.scenario == TRACE:
            lines = Path(options.schedule_file).read_text().split()
            SCHEDULE = iter([float(line) for line in lines])
    except Exception as exc:
        logger.error("cannot build the workload against %s: %s", environment.host, exc)
        environment.process_exit_code = 2
        assert environment.runner is not None
        environment.runner.quit()


def _stop(environment: Environment, **_: Any) -> None:
    TALLY.stopped = time.time()
    if _timeline is not None:
        _timeline.kill()


def _write_tally(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None or not options.tally_file or isinstance(environment.runner, WorkerRunner):
        return
    Path(options.tally_file).write_text(json.dumps(TALLY.to_json(), indent=1))


def _on(hook: Any, listener: Callable[..., None]) -> None:
    """``hook.add_listener(listener)``, for Locust's untyped event hooks."""
    hook.add_listener(listener)


_on(events.init_command_line_parser, _arguments)
_on(events.init, _init)
_on(events.test_start, _start)
_on(events.test_stop, _stop)
_on(events.quitting, _write_tally)
