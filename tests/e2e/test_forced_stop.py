"""A second stop signal stops at once: a real ``infercore serve`` process with a slow model.

The first SIGTERM starts the graceful stop (in-flight and queued requests would finish); the
second must stop waiting: nothing more runs through the model, every queued request and every
request whose model call is running is answered 503 ``shutting_down`` at once (the running ONNX
Runtime call is terminated), the log says how many were cut short, and the process exits 0.
Before, the queue was drained through the model for up to 2 s (200s after the second signal),
the rest cut off when the event loop closed, and the process exited 1 ("components did not
stop within 2.0s"). Requests still reading their bodies (clients that stalled mid-body) are
answered 503 too, counted in the same line: before, each also wrote a line of its own, "request
cut off by the shutdown timeout", though no timeout had passed.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import select
import signal
import socket
import threading
import time
from pathlib import Path

import e2e_support as e2e
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.e2e

REQUESTS = 30
#: How long one model call should take: long enough that most requests are still queued at the
#: second signal, whatever the machine's speed (the model is scaled to it).
CALL_S = 0.25
BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
)
CUT_LINE = re.compile(r"stopped at once: (\d+) request\(s\) in progress answered 503")
NOT_WAITED = re.compile(r"again: stopping without waiting for (\d+) request\(s\)")


def slow_model(layers: int, size: int = 1000) -> onnx.ModelProto:
    """``y = x`` after ``layers`` products of ``size``² matrices built from ``x`` (their sum
    times 0 is added to ``x``), so that ONNX Runtime can neither fold nor skip them."""
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["xs"], keepdims=0),
        helper.make_node("Mul", ["xs", "zero"], ["x0"]),
        helper.make_node("Add", ["M", "x0"], ["P0"]),
    ]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"P{i}", "M"], [f"P{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"P{layers}"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["s0"]),
        helper.make_node("Add", ["x", "s0"], ["y"]),
    ]
    m = np.full((size, size), 1e-3, np.float32)
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(m, "M"), numpy_helper.from_array(np.float32(0), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def call_s(model: onnx.ModelProto) -> float:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    x = np.ones((1, 4), np.float32)
    session.run(None, {"x": x})
    t0 = time.perf_counter()
    session.run(None, {"x": x})
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def slow_recipes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recipes folder serving model ``slow``: one call takes about :data:`CALL_S`."""
    folder = tmp_path_factory.mktemp("forced-stop")
    layers = max(1, min(100, math.ceil(CALL_S / call_s(slow_model(1)))))
    onnx.save(slow_model(layers), str(folder / "slow.onnx"))
    (folder / "slow.yaml").write_text(
        "# @package _global_\n"
        "model_root: .\n"
        "models:\n"
        "  slow:\n"
        "    versions:\n"
        '      "1":\n'
        "        loader: {kind: onnx, path: slow.onnx, run_on: thread}\n"
    )
    return folder


def _post(port: int, out: list[tuple[float, int, str, str | None]], lock: threading.Lock) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v2/models/slow/infer", BODY, {"content-type": "application/json"})
        r = conn.getresponse()
        reason = json.loads(r.read()).get("reason", "")
        with lock:
            out.append((time.monotonic(), r.status, reason, r.getheader("retry-after")))
    except OSError as exc:
        with lock:
            out.append((time.monotonic(), 0, f"{type(exc).__name__}: {exc}", None))
    finally:
        conn.close()


BATCHING = {
    "none": ["batching=none", "+batching.max_concurrency=1"],
    "dynamic": ["batching=dynamic", "batching.max_batch_size=2"],
}
#: Every request waits its turn, however long (the queue's own bounds are not under test).
QUEUE = ["max_queue_size=64", "queue_timeout_ms=60000", "reject_expected_timeouts=false"]


@pytest.mark.parametrize("batching", sorted(BATCHING))
def test_a_second_sigterm_answers_queued_and_running_requests_at_once_and_exits_0(
    launcher: e2e.Launcher,
    slow_recipes: Path,
    monkeypatch: pytest.MonkeyPatch,
    batching: str,
) -> None:
    monkeypatch.setenv("INFERCORE_RECIPES_DIR", str(slow_recipes))
    server = launcher.start(
        [
            "+recipe=slow",
            *BATCHING[batching],
            *(f"{'+' if batching == 'none' else ''}batching.{option}" for option in QUEUE),
            "server.request_timeout_ms=120000",
            "server.drain_delay_s=0",
            "server.graceful_timeout_s=60",
        ]
    )
    out: list[tuple[float, int, str, str | None]] = []
    lock = threading.Lock()
    threads = [
        threading.Thread(target=_post, args=(server.port, out, lock), daemon=True)
        for _ in range(REQUESTS)
    ]
    for t in threads:
        t.start()
    time.sleep(0.4)  # every request sent and queued; the model busy with the first ones
    server.process.send_signal(signal.SIGTERM)  # graceful: would finish all of them
    time.sleep(0.3)
    assert server.process.poll() is None
    t_second = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout=15.0)
    for t in threads:
        t.join(timeout=10.0)
    log = server.log_text()

    assert code == 0, log
    assert len(out) == REQUESTS, log
    statuses = [(status, reason) for _, status, reason, _ in out]
    assert set(statuses) <= {(200, ""), (503, "shutting_down")}, statuses
    cut = [o for o in out if o[1] == 503]
    served = [o for o in out if o[1] == 200]
    assert all(retry == "1" for *_, retry in cut)
    # Most were still queued at the second signal; none of them ran, and the log's count is
    # what the clients got.
    found = CUT_LINE.findall(log)
    assert len(found) == 1, log
    assert int(found[0]) == len(cut) >= REQUESTS // 2, (found, len(cut), log)
    # "Not waited for": each was answered at once, 503, or 200 when its answer was ready.
    in_progress = [int(n) for n in NOT_WAITED.findall(log)]
    assert len(in_progress) == 1 and len(cut) <= in_progress[0] <= REQUESTS, log
    # Nothing was answered from the model after the second signal: the 200s had left before
    # it (a response on its way may be read just after: not a model call that came later).
    assert all(done < t_second + CALL_S for done, *_ in served), (t_second, served)
    assert "components did not stop" not in log, log
    # One line for them all: no timeout passed, and none is named as one.
    assert "cut off by the shutdown timeout" not in log, log
    assert "Traceback" not in log and "Exception in" not in log, log


#: Clients that send a request's head and the start of its body, then nothing more.
STALLED = 4
#: Whole requests beside them, queued behind one another (the model runs one at a time).
WHOLE = 6
HEAD = (
    b"POST /v2/models/slow/infer HTTP/1.1\r\nhost: 127.0.0.1\r\n"
    b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY)
)


def _read_to_eof(sock: socket.socket) -> tuple[int, str]:
    """The status and ``reason`` of the one answer on ``sock``, read until the server closed
    the connection (an EOF; a reset or a timeout fails)."""
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status == 503:
        assert b"\r\nconnection: close" in head.lower() and b"\r\nretry-after: 1" in head, data
    return status, json.loads(body).get("reason", "")


def test_a_second_sigterm_answers_requests_stalled_mid_body_503_in_the_one_line(
    launcher: e2e.Launcher, slow_recipes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request whose client stalled mid-body waits in the request path's body read, where no
    # batcher holds it: the forced stop cancels it once uvicorn has returned
    # (cli._ForcedStop.finish) and ShutdownMiddleware answers it 503. No timeout passed, so no
    # "cut off by the shutdown timeout" line: the summary line counts it with the others.
    monkeypatch.setenv("INFERCORE_RECIPES_DIR", str(slow_recipes))
    server = launcher.start(
        [
            "+recipe=slow",
            *BATCHING["none"],
            *(f"+batching.{option}" for option in QUEUE),
            "server.request_timeout_ms=120000",  # no deadline ends a stalled body first
            "server.drain_delay_s=0",
            "server.graceful_timeout_s=60",
        ]
    )
    stalled = [
        socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(STALLED)
    ]
    whole = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(WHOLE)]
    for sock in stalled:
        sock.sendall(HEAD + BODY.encode()[:10])
    for sock in whole:
        sock.sendall(HEAD + BODY.encode())
    # A request sent after them is answered once the server has read theirs (one event loop):
    # all of them are in progress before the signal, none a late arrival.
    probe = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    probe.request("GET", "/v2/health/live")
    assert probe.getresponse().status == 200
    probe.close()
    server.process.send_signal(signal.SIGTERM)  # graceful: would wait for the bodies
    time.sleep(0.3)  # the model still runs the whole ones, one at a time
    assert server.process.poll() is None
    # Still waiting for their bodies: nothing answered, nothing closed (a request answered
    # before the second signal would not test it).
    assert select.select(stalled, [], [], 0)[0] == [], server.log_text()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout=15.0)
    log = server.log_text()
    stalled_answers = [_read_to_eof(sock) for sock in stalled]
    whole_answers = [_read_to_eof(sock) for sock in whole]

    assert code == 0, log
    # Each stalled client is answered 503 shutting_down, and its connection closed.
    assert stalled_answers == [(503, "shutting_down")] * STALLED, (stalled_answers, log)
    assert set(whole_answers) <= {(200, ""), (503, "shutting_down")}, (whole_answers, log)
    cut = STALLED + whole_answers.count((503, "shutting_down"))
    assert cut > STALLED, whole_answers  # whole ones were cut too (six calls outlast 0.3 s)
    # One line for them all, with what the clients got; none of its own for any of them.
    found = CUT_LINE.findall(log)
    assert len(found) == 1, log
    assert int(found[0]) == cut, (found, cut, log)
    in_progress = [int(n) for n in NOT_WAITED.findall(log)]
    assert len(in_progress) == 1 and cut <= in_progress[0] <= STALLED + WHOLE, log
    assert "cut off by the shutdown timeout" not in log, log
    assert "components did not stop" not in log, log
    assert "Traceback" not in log and "Exception in" not in log, log
