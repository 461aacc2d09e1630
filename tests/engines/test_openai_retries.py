"""The OpenAI-compatible backend's retry policy and request stream, against a loopback server that
injects faults (429, 503, dropped connections, 400, a slow answer). The real `vllm serve` path is in test_openai_vllm_server.py."""

import json
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from music_assets.common.engines import EngineError, Sampling
from music_assets.simulation.config import SimulationConfig
from music_assets.simulation.driver import Engines
from music_assets.simulation.simulate import simulate
from music_assets.simulation.state import Context, TurnStore
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
                    code, text = fault if isinstance(fault, tuple) else (fault, '{"error": "injected"}')
                    self.send_response(code)
                    self.end_headers()
                    self.wfile.write(text.encode())
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
    return OpenAIEngine(base_url=url, backoff_s=0.01, backoff_max_s=0.05, **{"model": "served", "max_concurrency": 1, **kw})


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


SYSTEM_REFUSED = (400, '{"error": {"message": "System role not supported", "type": "BadRequestError"}}')


@pytest.mark.parametrize("server", [[SYSTEM_REFUSED]], indirect=True)
def test_a_server_that_refuses_the_system_role_gets_it_folded_into_the_first_user_turn(server):
    """A vLLM server with Gemma-2's template answers a system message with HTTP 400. `auto` folds
    the system messages into the first user turn, retries, and keeps folding for that server."""
    conv = [{"role": "system", "content": "Play the user."}, {"role": "user", "content": "Hi"}]
    eng = engine(server.url, model="gemma-like")
    (out,) = eng.chat([conv], Sampling(max_tokens=4))
    assert out.text == "ok 0"
    first, second = server.requests
    assert first["messages"] == conv
    assert second["messages"] == [{"role": "user", "content": "Play the user.\n\nHi"}]
    eng.chat([conv], Sampling(max_tokens=4))
    assert server.requests[2]["messages"] == second["messages"]  # folded at once from now on
    # `native` never folds: the refusal is reported for that request
    native = engine(server.url, model="gemma-native", system_role="native")
    server.script = [SYSTEM_REFUSED]
    (refused,) = native.chat([conv], Sampling(max_tokens=4))
    assert refused.finish_reasons == ["error"] and "System role" in refused.error


@pytest.mark.parametrize("server", [[200]], indirect=True)
def test_a_final_assistant_message_asks_the_server_to_continue_it(server):
    eng = engine(server.url)
    eng.chat([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]], Sampling(max_tokens=4))
    eng.chat([[{"role": "user", "content": "Hi"}]], Sampling(max_tokens=4))
    cont, fresh = server.requests
    assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False
    assert "continue_final_message" not in fresh


@pytest.mark.parametrize("server", [[]], indirect=True)
def test_a_streamed_request_names_its_session_for_the_router(server):
    """vllm-router's consistent_hash keeps a session on one replica by this header; `chat` has no
    session to name, and `session_header: null` sends none."""
    for header, session in (("X-Session-ID", "ctx-1"), (None, "ctx-1"), ("X-Session-ID", None)):
        stream = engine(server.url, session_header=header).stream()
        stream.submit("k", [{"role": "user", "content": "hi"}], Sampling(), 1, session=session)
        stream.wait()
        stream.close()
    engine(server.url).chat([[{"role": "user", "content": "hi"}]], Sampling())
    sent = [{k.lower(): v for k, v in h.items()}.get("x-session-id") for h in server.headers]
    assert sent == ["ctx-1", None, None, None]


class NoStore(TurnStore):
    def load(self):
        return [], []

    def commit(self, rows, drops):
        pass


@pytest.mark.parametrize("server", [[]], indirect=True)
def test_the_simulation_sends_each_request_under_its_context_id(server):
    """The driver passes each job's context id down to the stream: every request of a simulation
    carries one, and each context's requests carry its own."""
    eng = engine(server.url)  # one request at a time: the server's lists of bodies and headers stay in step
    contexts = [Context(f"ctx-{i}", "s", [{"role": "user", "content": f"Question {i}?"},
                                           {"role": "assistant", "content": f"Answer {i}."}]) for i in range(3)]
    simulate(contexts, Engines(eng, eng, eng), SimulationConfig(turns=2), NoStore(), log=lambda _: None)
    sessions = [{k.lower(): v for k, v in h.items()}.get("x-session-id") for h in server.headers]
    assert sessions and set(sessions) <= {c.context_id for c in contexts}
    for body, session in zip(server.requests, sessions):
        assert f"Question {session[-1]}?" in json.dumps(body["messages"])
