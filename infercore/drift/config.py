"""The ``drift:`` node of a model: the closed schema of :class:`~infercore.drift.DriftMonitor`.

Detector and action nodes stay plain mappings here (``{kind: NAME, ...options}``) and are
validated against their kind's own ``Config`` by the registry when the monitor is built.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Node = dict[str, Any]

#: Detector names become metric label values and config path segments.
DETECTOR_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"


class DriftConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """How one model's live inputs are sampled, windowed, tested and acted on.

    Example (a model's ``drift:`` node)::

        drift:
          sample_rate: 0.5
          window_size: 1000
          detectors:
            inputs_ks: {kind: ks, reference: fraud/artifacts/reference_served.parquet}
          actions:
            - {kind: log}
            - {kind: webhook, url: "http://127.0.0.1:9000/drift", allow_hosts: [127.0.0.1]}
          cooldown_s: 600
    """

    #: Share of requests whose rows are offered to the detectors (0 turns sampling off).
    sample_rate: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0
    #: Most rows waiting to be windowed; rows offered beyond it are dropped and counted.
    queue_size: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    #: Rows per window (``window`` schedule), or the most rows of one window (``interval``).
    window_size: Annotated[int, msgspec.Meta(ge=2)] = 1000
    #: ``window``: test as soon as ``window_size`` rows are waiting; ``interval``: test what
    #: is waiting (at least ``min_samples``, at most ``window_size`` rows) every ``interval_s``.
    schedule: Literal["window", "interval"] = "window"
    #: Seconds between tests with the ``interval`` schedule.
    interval_s: Annotated[float, msgspec.Meta(gt=0.0)] = 60.0
    #: Fewest rows an ``interval`` window may have; fewer wait for the next tick.
    min_samples: Annotated[int, msgspec.Meta(ge=2)] = 100
    #: Detector name -> ``{kind: ..., ...options}``; each tests every window.
    detectors: dict[str, Node] = msgspec.field(default_factory=dict)
    #: ``[{kind: ..., ...options}]`` run on a drift event (see ``action_order``).
    actions: list[Node] = msgspec.field(default_factory=list)
    #: ``concurrent``: every action of an event starts at once, each as its own task.
    #: ``sequential``: one after the other in list order, each seeing the results of those
    #: before it (``DriftEvent.actions``): a retraining ``command`` then ``register_candidate``.
    action_order: Literal["concurrent", "sequential"] = "concurrent"
    #: Seconds after actions ran during which a further drift event runs none (it is still
    #: recorded in the event history).
    cooldown_s: Annotated[float, msgspec.Meta(ge=0.0)] = 600.0
    #: Input tensor names to monitor; ``null`` monitors every input.
    features: list[str] | None = None
    #: Output tensor names to monitor as well (prediction drift); default none.
    outputs: list[str] = msgspec.field(default_factory=list)
    #: Drift events kept in memory for the admin API and ``infercore events``.
    history_size: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100
    #: Seed of the sampling RNG (tests and reproducible benchmarks); ``null``: random.
    seed: int | None = None
