"""The OpenAI-compatible backend's retry policy and request stream, against a loopback server that
injects faults (429, 503, dropped connections, 400, a slow answer). The real `vllm serve` path is in test_openai_vllm_server.py."""

import json
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from music_assets.common.engines import EngineError, Sampling
from resources.openai_engine import OpenAIEngine


class FaultServer:
    """Answers POST /v1/chat/completions following a script of faults, then with a completion."""

    def __init__(self, script):
        self.script, self.requests, self.headers = list(script), [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                fault = outer.script.pop(0) if outer.script else 200
                if fault == "drop":
                    self.connection.shutdown(2)  # close without any response
                    return
                if fault != 200:
                    self.send_response(fault)
                    self.end_headers()
                    self.wfile.write(b'{"error": "injected"}')
                    return
                if "slow" in json.dumps(body["messages"]):
                    time.sleep(1.5)
                n = body.get("n", 1)
                payload = {"choices": [{"index": i, "message": {"role": "assistant", "content": f"ok {i}"},
                                        "finish_reason": "stop"} for i in range(n)],
                           "usage": {"completion_tokens": 2 * n, "prompt_tokens": 5}}
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(socketserver.ThreadingMixIn, HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(request):
    srv = FaultServer(request.param)
    yield srv
    srv.close()


def engine(url, **kw):
    return OpenAIEngine(model="served", base_url=url, backoff_s=0.01, backoff_max_s=0.05, **{"max_concurrency": 1, **kw})


@pytest.mark.parametrize("server", [[429, 503, "drop"]], indirect=True)
def test_retries_429_5xx_and_dropped_connections(server):
    out = engine(server.url, max_retries=3).chat([[{"role": "user", "content": "hi"}]], Sampling(n=2), seeds=[7])
    assert out[0].texts == ["ok 0", "ok 1"] and out[0].completion_tokens == 4
    assert len(server.requests) == 4
    assert server.requests[-1]["seed"] == 7 and server.requests[-1]["n"] == 2


@pytest.mark.parametrize("server", [[503, 503, 503]], indirect=True)
def test_gives_up_after_the_retry_budget_with_a_clear_error(server):
    with pytest.raises(EngineError, match=r"failed after 3 attempts; last error: HTTP 503"):
        engine(server.url, max_retries=2).chat([[{"role": "user", "content": "hi"}]], Sampling())


@pytest.mark.parametrize("server", [[400]], indirect=True)
def test_client_errors_are_not_retried_and_reported_per_request(server):
    out = engine(server.url, max_retries=5).chat([[{"role": "user", "content": "hi"}]], Sampling())
    assert out[0].finish_reasons == ["error"] and "rejected the request (HTTP 400" in out[0].error
    assert len(server.requests) == 1


def test_connection_refused_is_retried_then_reported():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EngineError, match="ConnectError"):
        engine(f"http://127.0.0.1:{port}/v1", max_retries=1).chat([[{"role": "user", "content": "hi"}]], Sampling())


@pytest.mark.parametrize("server", [[]], indirect=True)
def test_api_key_comes_from_the_environment_and_is_never_exposed(server, monkeypatch):
    monkeypatch.setenv("MUSIC_TEST_KEY", "sk-secret-123")
    eng = engine(server.url, api_key_env="MUSIC_TEST_KEY")
    eng.chat([[{"role": "user", "content": "hi"}]], Sampling())
    assert server.headers[0]["Authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in json.dumps(eng.identity())
    assert "sk-secret" not in repr(eng)


@pytest.mark.parametrize("server", [[]], indirect=True)
def test_batch_is_fanned_out_with_bounded_concurrency(server):
    eng = OpenAIEngine(model="served", base_url=server.url, max_concurrency=4)
    out = eng.chat([[{"role": "user", "content": f"q{i}"}] for i in range(10)], Sampling(), seeds=list(range(10)))
    assert len(out) == 10 and sorted(r["seed"] for r in server.requests) == list(range(10))


@pytest.mark.parametrize("server", [[]], indirect=True)
def test_stream_hands_back_each_response_as_it_arrives(server):
    stream = engine(server.url, max_concurrency=2).stream()
    try:
        stream.submit("slow", [{"role": "user", "content": "a slow one"}], Sampling(), 1)
        stream.submit("fast", [{"role": "user", "content": "hi"}], Sampling(), 2)
        assert [k for k, _ in stream.wait()] == ["fast"] and stream.pending == 1
        stream.submit("next", [{"role": "user", "content": "hi again"}], Sampling(), 3)  # while slow runs
        assert [k for k, _ in stream.wait()] == ["next"]
        (key, generation), = stream.wait()
        assert key == "slow" and generation.text == "ok 0" and stream.pending == 0
    finally:
        stream.close()
    assert [r["seed"] for r in server.requests] in ([1, 2, 3], [2, 1, 3])
