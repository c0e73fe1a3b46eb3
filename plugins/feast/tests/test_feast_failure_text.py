"""What a store failure says: one line that names the fault and its fix, with no entity keys, no
binary data and no password (S6). A Redis server that requires a password the URL does not
give, a Redis pipeline's error (which carries its command: Feast's binary entity keys), and a
corrupt Feast registry file, at start-up and on a request."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from feast_test_support import (
    RedisProcess,
    card,
    latest,
    make_source,
    needs_redis,
    run,
    source_node,
)

from infercore.errors import PluginError
from infercore.testing import async_app_client, runtime_from_dict
from infercore_feast import store as feast_store
from infercore_feast.failures import clean, corrupt_registry, redis_needs_auth

SECRET_CARD = card(3182)  # the entity whose key a failed pipeline command carried

# What Redis 7 answers a client that has not authenticated: a small command gets NOAUTH, one
# with more than a few arguments (Feast's HMGET of a view's fields) a protocol error.
NEEDS_AUTH = [
    "ERR Protocol error: unauthenticated multibulk length",
    "ERR Protocol error: unauthenticated bulk length",
    "NOAUTH Authentication required.",
]
AUTH_MESSAGE = (
    "features: the Feast redis store could not be prepared: the Redis server requires "
    "authentication and redis_url has no password"
)
AUTH_HINT = (
    "put the password in INFERCORE_REDIS_URL (redis_url): redis://:PASSWORD@host:port/db, "
    "or redis://USER:PASSWORD@host:port/db for an ACL user"
)


def pipeline_error(answer: str, key: str = SECRET_CARD, *, pipelined: bool = True) -> Exception:
    """The exception redis-py raises when Redis answers ``-<answer>`` to Feast's read of
    ``key``: parsed by redis-py's own parser and, for a pipeline, annotated by redis-py's
    pipeline with the command (``HMGET <entity key bytes> <field hashes> _ts:<view>``)."""
    import redis
    from feast.infra.online_stores.helpers import _mmh3, _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    from redis.connection import BaseParser

    exc: Exception = BaseParser.parse_error(answer)
    if pipelined:
        entity = EntityKey(join_keys=["card_id"], entity_values=[Value(string_val=key)])
        command = (
            "HMGET",
            _redis_key("fraud", entity, entity_key_serialization_version=2),
            _mmh3("card_features:txn_count_24h"),
            _mmh3("card_features:amount_sum_24h"),
            "_ts:card_features",
        )
        # No connection is made until a pipeline is executed.
        redis.Redis(host="127.0.0.1", port=1).pipeline().annotate_exception(exc, 1, command)
    return exc


def assert_fit(text: str, key: str = SECRET_CARD) -> None:
    """``text`` carries no entity key, no pipeline command and nothing that does not print."""
    assert key not in text, text
    assert "HMGET" not in text and "Command #" not in text, text
    assert all(ch.isprintable() for ch in text), ascii(text)
    assert "\ufffd" not in text, text


def failing_start(
    model_root: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception, **options: Any
) -> PluginError:
    """What ``start()`` raises when preparing the store raises ``exc``."""

    def prepare_store(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(feast_store, "prepare_store", prepare_store)
    source = make_source(model_root, online_store="redis", **options)
    with pytest.raises(PluginError) as info:
        run(source.start())
    return info.value


def test_the_audits_pipeline_error_carries_binary_keys() -> None:
    """The exception the tests build is the one the audit saw (else the tests prove nothing)."""
    raw = str(pipeline_error(NEEDS_AUTH[0]))
    assert raw.startswith("Command # 1 (HMGET ")
    assert SECRET_CARD in raw
    assert not all(ch.isprintable() for ch in raw)
    assert raw.endswith(
        ") of pipeline caused error: Protocol error: unauthenticated multibulk length"
    )


@pytest.mark.parametrize("answer", NEEDS_AUTH)
def test_a_redis_that_requires_a_password_is_named_at_start(
    model_root: Path, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    err = failing_start(
        model_root, monkeypatch, pipeline_error(answer, pipelined="NOAUTH" not in answer)
    )
    assert str(err) == f"{AUTH_MESSAGE} (hint: {AUTH_HINT})"
    assert err.hint == AUTH_HINT
    assert_fit(str(err))


def test_a_url_with_a_password_is_not_said_to_lack_one(
    model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    err = failing_start(
        model_root,
        monkeypatch,
        pipeline_error("NOAUTH Authentication required.", pipelined=False),
        redis_url="redis://:hunter2@127.0.0.1:6379/0",
    )
    assert str(err).startswith(
        "features: the Feast redis store could not be prepared: the Redis server requires "
        "authentication (hint: put the password in INFERCORE_REDIS_URL"
    )
    assert "hunter2" not in str(err)


def test_a_wrong_password_keeps_its_own_words(
    model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = pipeline_error(
        "WRONGPASS invalid username-password pair or user is disabled.", pipelined=False
    )
    assert not redis_needs_auth(wrong)
    err = failing_start(model_root, monkeypatch, wrong)
    assert str(err) == (
        "features: the Feast redis store could not be prepared: AuthenticationError: invalid "
        "username-password pair or user is disabled. (hint: check INFERCORE_REDIS_URL "
        "(redis_url) and that the server is up)"
    )


def test_any_pipeline_error_keeps_only_the_error_after_its_command(
    model_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = "WRONGTYPE Operation against a key holding the wrong kind of value"
    err = failing_start(model_root, monkeypatch, pipeline_error(answer))
    assert str(err).startswith(
        f"features: the Feast redis store could not be prepared: ResponseError: {answer} (hint:"
    )
    assert_fit(str(err))


def test_clean_leaves_no_binary_and_no_key() -> None:
    text = "before \x00\x01\ufffd\x7f after\n\tline Command # 3 (GET \x00c_000001\xff) of "
    text += "pipeline caused error: boom"
    assert clean(text) == "before ? after line boom"
    assert clean("é ünïcode stays") == "é ünïcode stays"
    assert len(clean("x" * 1000)) == 300


@needs_redis
def test_a_real_redis_that_requires_a_password(
    model_root: Path, redis_process: RedisProcess
) -> None:
    """The audit's case on a real server: the message, then the hint's fix, which works."""
    import redis

    admin = redis.Redis.from_url(redis_process.url(2))
    try:
        admin.config_set("requirepass", "realpass")
    finally:
        admin.close()
    source = make_source(model_root, online_store="redis", redis_url=redis_process.url(2))
    with pytest.raises(PluginError) as info:
        run(source.start())
    assert str(info.value) == f"{AUTH_MESSAGE} (hint: {AUTH_HINT})"
    url = f"redis://:realpass@127.0.0.1:{redis_process.port}/2"  # what the hint says
    source = make_source(model_root, online_store="redis", redis_url=url)
    run(source.start())
    run(source.stop())


def fraud_runtime(model_root: Path) -> Any:
    return runtime_from_dict(
        {
            "model_root": str(model_root),
            "features": {"kind": "feast", **source_node(layout="matrix", matrix_input="x")},
            "models": {"fraud": {"versions": {"1": {"loader": {"kind": "fake", "features": 5}}}}},
        }
    )


@pytest.mark.parametrize(
    "answer", [NEEDS_AUTH[0], "WRONGTYPE Operation against a key holding the wrong kind of value"]
)
def test_a_failed_read_says_nothing_of_its_keys(
    model_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    answer: str,
) -> None:
    """On a request: the 503's body and every log line are free of the pipeline's command;
    the log line says what failed."""
    online_reader = feast_store.online_reader

    def failing_reader(*args: Any, **kwargs: Any) -> Any:
        real, how = online_reader(*args, **kwargs)

        def reader(keys: list[str]) -> Any:
            if keys == ["__infercore_warmup__"]:
                return real(keys)
            raise pipeline_error(answer, keys[0])

        return reader, how

    monkeypatch.setattr(feast_store, "online_reader", failing_reader)
    caplog.set_level(logging.INFO)
    body = {
        "inputs": [
            {"name": "card_id", "datatype": "BYTES", "shape": [1], "data": [SECRET_CARD]},
            {"name": "amount", "datatype": "FP32", "shape": [1], "data": [1.0]},
        ]
    }

    async def scenario() -> tuple[int, dict[str, Any]]:
        async with async_app_client(fraud_runtime(model_root)) as client:
            r = await client.post("/v2/models/fraud/infer", json=body)
            return r.status_code, r.json()

    status, doc = run(scenario())
    assert status == 503 and doc["reason"] == "feature_store_unavailable", doc
    assert_fit(repr(doc))
    # INFO and up (S6); the DEBUG dump of Feast's console output keeps its colour codes.
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    for line in lines:
        assert_fit(line)
    said = [line for line in lines if line.startswith("feast read of 1 keys failed: ")]
    assert said, lines
    if "unauthenticated" in answer:
        assert said[0] == (
            "feast read of 1 keys failed: the Redis server requires authentication and "
            f"redis_url has no password; {AUTH_HINT}"
        )
    else:
        assert said[0] == f"feast read of 1 keys failed: ResponseError: {answer}"


# -- a corrupt registry ------------------------------------------------------------------------


def registry_file(model_root: Path) -> Path:
    return model_root / "fraud" / "feature_repo" / "data" / "registry.db"


def built(model_root: Path) -> None:
    """The registry and the online store, as a first start leaves them."""

    async def first() -> None:
        source = make_source(model_root)
        await source.start()
        await source.stop()

    run(first())


def corrupt_registry_file(model_root: Path) -> Path:
    path = registry_file(model_root)
    assert path.exists()
    path.write_bytes(random.Random(7).randbytes(4096))
    return path


def test_a_corrupt_registry_is_told_to_be_deleted_and_start_rebuilds_it(model_root: Path) -> None:
    built(model_root)
    path = corrupt_registry_file(model_root)
    with pytest.raises(PluginError, match="could not be prepared: DecodeError") as info:
        run(make_source(model_root).start())
    assert info.value.hint == (
        "the Feast registry file (registry_path, default data/registry.db in the repo folder) "
        "is corrupt: delete it; materialize_on_start applies the repo's definitions and "
        "rebuilds it at the next start"
    )
    assert str(model_root) not in str(info.value)
    path.unlink()  # what the hint says

    async def served() -> int:
        source = make_source(model_root)
        await source.start()
        try:
            out = await source.fetch(
                {"card_id": np.array([card(2)]), "amount": np.array([1.0])},
                deadline=asyncio.get_running_loop().time() + 10,
            )
            return int(out["txn_count_24h"][0, 0])
        finally:
            await source.stop()

    assert run(served()) == latest(2)["txn_count_24h"]


def test_without_materialize_on_start_a_corrupt_registry_is_rebuilt_with_feast_apply(
    model_root: Path,
) -> None:
    built(model_root)
    corrupt_registry_file(model_root)
    with pytest.raises(PluginError, match="DecodeError") as info:
        run(
            make_source(
                model_root, materialize_on_start=False, registry_path="data/registry.db"
            ).start()
        )
    assert info.value.hint == (
        "the Feast registry file (registry_path: data/registry.db in the repo folder) is "
        "corrupt: delete it; rebuild it with `feast apply` in the repo folder, or set "
        "materialize_on_start: true to have it rebuilt at start-up"
    )


def test_only_the_registry_s_decode_errors_are_a_corrupt_registry() -> None:
    from feast.protos.feast.core.Registry_pb2 import Registry
    from feast.protos.feast.types.Value_pb2 import Value
    from google.protobuf.message import DecodeError

    def parse(message: Any) -> DecodeError:
        with pytest.raises(DecodeError) as info:
            message.ParseFromString(b"\xff\xff\xff")
        return info.value

    assert corrupt_registry(parse(Registry()))
    assert not corrupt_registry(parse(Value()))  # a damaged value in the online store
    assert not corrupt_registry(ValueError("feast.core.Registry"))


def test_a_registry_decode_error_without_its_type_name_is_found_by_where_it_was_raised() -> None:
    """protobuf's pure-Python parser says only ``Truncated message.``: the registry's own
    parsing code raised it (Feast's ``feast/infra/registry/``), or it is not the registry."""
    from google.protobuf.message import DecodeError

    def raised_in(filename: str) -> DecodeError:
        code = compile("raise DecodeError('Truncated message.')", filename, "exec")
        with pytest.raises(DecodeError) as info:
            exec(code, {"DecodeError": DecodeError})
        return info.value

    sep = os.sep
    assert corrupt_registry(raised_in(sep.join(["", "x", "feast", "infra", "registry", "file.py"])))
    assert not corrupt_registry(
        raised_in(sep.join(["", "x", "feast", "infra", "online_stores", "redis.py"]))
    )
