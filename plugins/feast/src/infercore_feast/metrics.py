"""The feature source's Prometheus families, registered once per registry.

Several models may each have a ``feast`` feature source in one app; they share the families
of the app's registry and differ by the ``model`` label. Until the core hands components its
registry, a source without one gets a private registry (see the README).
"""

from __future__ import annotations

import threading
import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Feast reads of a few rows take well under a millisecond; a timeout is tens of ms.
_READ_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
)
_ENTITY_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class FeatureMetrics:
    """Every family the ``feast`` source reports into, for one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.fetch_seconds = Histogram(
            "infercore_feature_fetch_seconds",
            "Duration of one online read from the feature store (one merged read).",
            ("model",),
            buckets=_READ_BUCKETS,
            registry=r,
        )
        self.read_entities = Histogram(
            "infercore_feature_read_entities",
            "Distinct entity keys per online read (after merging and de-duplication).",
            ("model",),
            buckets=_ENTITY_BUCKETS,
            registry=r,
        )
        self.failures = Counter(
            "infercore_feature_fetch_failures",
            "Requests whose feature fetch got no values from the feature store (once per "
            "request, grouped or not), by reason (timeout, error, breaker_open, empty: the "
            "store has lost its rows). A request whose deadline passed while it waited is "
            "not one: it is the server's 504 deadline_exceeded.",
            ("model", "reason"),
            registry=r,
        )
        self.degraded = Counter(
            "infercore_feature_degraded",
            "Feature fetches answered with default values because the feature store failed "
            "(on_failure: fail_open), by reason.",
            ("model", "reason"),
            registry=r,
        )
        self.stale_rows = Counter(
            "infercore_feature_stale_rows",
            "Entity rows served from the cache after their TTL because a read failed "
            "(serve_stale_s).",
            ("model",),
            registry=r,
        )
        self.defaults = Counter(
            "infercore_feature_defaults",
            "Feature values replaced by their default because the store had none for the "
            "entity (unknown entity or null value).",
            ("model", "feature"),
            registry=r,
        )
        self.cache_hits = Counter(
            "infercore_feature_cache_hits",
            "Entity lookups answered from the feature cache.",
            ("model",),
            registry=r,
        )
        self.cache_misses = Counter(
            "infercore_feature_cache_misses",
            "Entity lookups that needed a feature store read.",
            ("model",),
            registry=r,
        )
        self.breaker_open = Gauge(
            "infercore_feature_breaker_open",
            "1 while the feature store circuit breaker is open or half-open, else 0.",
            ("model",),
            registry=r,
            # Several workers: 1 while any live worker's breaker is open, one series per
            # model (the default, "all", keeps a series per pid, a dead worker's too).
            multiprocess_mode="livemax",
        )
        self.store_empty = Gauge(
            "infercore_feature_store_empty",
            "1 while the online store is known to have lost the rows of this feature view "
            "(none of its marker entities found, or its table gone; checked every "
            "empty_check_s) and they are not back yet, else 0.",
            ("model", "view"),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.restores = Counter(
            "infercore_feature_store_restores",
            "Lost views restored: materialized by this process (outcome materialized), its "
            "materialization failed (failed), or found restored by another process that held "
            "the materialization lock (elsewhere).",
            ("model", "outcome"),
            registry=r,
        )


_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, FeatureMetrics] = (
    weakref.WeakKeyDictionary()
)


def feature_metrics(registry: CollectorRegistry) -> FeatureMetrics:
    """The families of ``registry``, registered on first use."""
    with _lock:
        found = _by_registry.get(registry)
        if found is None:
            found = _by_registry[registry] = FeatureMetrics(registry)
        return found
