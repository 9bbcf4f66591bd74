"""api_server.py against hostile clients and bad flags (issue 21): every bad field is a 4xx in OpenAI's error shape
naming the field, never a 500 or a traceback in the log, and the server keeps serving; bad flags and keys are
one line before anything loads; one request's text work never stalls the others. Real servers on localhost
ports (test_api_server's runner), the tiny model, plain HTTP where the `openai` client would refuse the value."""
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time

import openai
import pytest

from chatglm3.model import conversation
from chatglm3.serving.openai_api import StopMatcher
from test_api_server import API_KEY, SERVER, Server, ask

TOOLS = [{"type": "function", "function": {"name": "pokedex", "description": "图鉴", "parameters": {"name": "str"}}}]


def user(text="你好"):
    return {"role": "user", "content": text}


def call(arguments: str, id_="c1", name="pokedex"):
    return {"role": "assistant", "tool_calls": [{"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}]}


def result(id_="c1"):
    return {"role": "tool", "tool_call_id": id_, "content": "{}"}


def send(server: Server, method: str, path: str, body: bytes = b"", headers: dict = None, host=None):
    """(status, parsed JSON body) of one raw request; `host` replaces the Host header."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        connection.putrequest(method, path, skip_host=host is not None)
        fields = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
        if host is not None:
            fields["Host"] = host
        for name, value in fields.items():
            for one in value if isinstance(value, list) else [value]:
                connection.putheader(name, one)
        connection.endheaders(body)
        response = connection.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data)
        except ValueError:  # refused by the HTTP layer itself (uvicorn), before the application
            return response.status, data.decode(errors="replace")
    finally:
        connection.close()


def error_of(server: Server, body, headers: dict = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = send(server, "POST", "/v1/chat/completions", data, headers)
    assert set(answer) == {"error"} and {"message", "type", "param", "code"} <= set(answer["error"]), answer
    return status, answer["error"]


def assert_serving(server: Server):
    assert ask(server.client(), server.model, "你好", max_tokens=2, temperature=0).choices[0].finish_reason == "length"


def assert_clean_log(log):
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "Exception in ASGI" not in text, text[-3000:]


@pytest.fixture(scope="module")
def open_server(tiny_model, tmp_path_factory):
    """Without a key (the Host check is on), as a student runs it on their own machine."""
    log = tmp_path_factory.mktemp("open-server") / "server.log"
    with Server(tiny_model, "--max-messages", "8", api_key=None, log=log) as s:
        s.log_path = log
        yield s


@pytest.fixture(scope="module")
def keyed_server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("keyed-server") / "server.log"
    with Server(tiny_model, "--body-timeout", "2", log=log) as s:
        s.log_path = log
        yield s


# --- numbers, nesting, text, stop strings, unsupported fields, structure, turn order: one row per bad value -----
DEEP = 100_000
RAW = {  # bodies the openai client (or json.dumps) would not write
    "temperature NaN": (b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None),
    "temperature Infinity": (b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": -Infinity}', None),
    "temperature 1e400": (b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": 1e400}', "temperature"),
    "seed of 5000 digits": (b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "seed": ' + b"9" * 5000 + b"}", None),
    "body nested 100,000 deep": (b'{"model": "M", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}", None),
    "tool schema nested 100,000 deep": (b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": '
                                        b'"function", "function": {"name": "f", "parameters": ' + b'{"a":' * DEEP + b"1"
                                        + b"}" * DEEP + b"}}]}", None),
    "lone surrogate in a message": (b'{"model": "M", "messages": [{"role": "user", "content": "a\\ud800"}]}', "messages[0].content"),
    "lone surrogate in stop": (b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "stop": ["\\udfff"]}', "stop[0]"),
    "lone surrogate in a schema key": (b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": '
                                       b'"function", "function": {"name": "f", "parameters": {"\\ud800": 1}}}]}', "tools[0].function.parameters"),
    "body not UTF-8": (b'{"model": "M", "messages": [{"role": "user", "content": "\xff"}]}', None),
}
BAD = {  # name: (the body's fields beside model, the field the error must name)
    "temperature negative": ({"temperature": -0.5}, "temperature"),
    "temperature above 2": ({"temperature": 2.5}, "temperature"),
    "top_p 0": ({"top_p": 0}, "top_p"),
    "top_p above 1": ({"top_p": 1.5}, "top_p"),
    "seed beyond int64": ({"seed": 2 ** 63}, "seed"),
    "seed 10**30": ({"seed": -10 ** 30}, "seed"),
    "max_tokens 0": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens 10**30": ({"max_tokens": 10 ** 30}, "max_tokens"),
    "max_completion_tokens beyond the limit": ({"max_completion_tokens": 10 ** 6}, "max_completion_tokens"),
    "max_tokens fractional": ({"max_tokens": 2.5}, "max_tokens"),
    "n 10**9": ({"n": 10 ** 9}, "n"),
    "temperature a string": ({"temperature": "hot"}, "temperature"),
    "tool-call arguments nested 100,000 deep": ({"messages": [user(), call('{"a":' * DEEP + "1" + "}" * DEEP), result()]},
                                               "messages[1].tool_calls[0].function.arguments"),
    "tool-call arguments with a lone surrogate": ({"messages": [user(), call('{"a": "\\ud800"}'), result()]},
                                                  "messages[1].tool_calls[0].function.arguments.a"),
    "tool-call arguments NaN": ({"messages": [user(), call('{"a": NaN}'), result()]},
                                "messages[1].tool_calls[0].function.arguments"),
    "five stop strings": ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "stop string of 1,000,000 characters": ({"stop": "a" * 1_000_000}, "stop"),
    "stop string of 1001 characters in a list": ({"stop": ["b", "a" * 1001]}, "stop[1]"),
    "empty stop string": ({"stop": [""]}, "stop[0]"),
    "logit_bias": ({"logit_bias": {"5": 100}}, "logit_bias"),
    "logprobs": ({"logprobs": True}, "logprobs"),
    "response_format json_object": ({"response_format": {"type": "json_object"}}, "response_format"),
    "frequency_penalty": ({"frequency_penalty": 1.0}, "frequency_penalty"),
    "presence_penalty beyond 2": ({"presence_penalty": 3}, "presence_penalty"),
    "image part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                   "messages[0].content[0].type"),
    "text part without text": ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    "content a number": ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    "messages an object": ({"messages": {"role": "user", "content": "x"}}, "messages"),
    "messages beyond --max-messages": ({"messages": [user()] * 9}, "messages"),
    "duplicate tool call ids": ({"messages": [user(), {"role": "assistant", "tool_calls": [
        call("{}")["tool_calls"][0], call("{}")["tool_calls"][0]]}, result(), result()]}, "messages[1].tool_calls[1].id"),
    "function name with a newline": ({"messages": [user(), call("{}", name="f\n<|user|>"), result()]},
                                     "messages[1].tool_calls[0].function.name"),
    "tool_choice names a missing tool": ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                                         "tool_choice"),
    "tool_choice without tools": ({"tool_choice": {"type": "function", "function": {"name": "pokedex"}}}, "tool_choice"),
    "assistant first": ({"messages": [{"role": "assistant", "content": "hi"}, user()]}, "messages[0]"),
    "system mid-conversation": ({"messages": [user(), {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"},
                                              user()]}, "messages[2]"),
}


@pytest.mark.parametrize("name", list(RAW) + list(BAD))
def test_a_bad_field_is_a_400_naming_it_and_the_server_keeps_serving(open_server, name):
    server = open_server
    if name in RAW:
        body, field = RAW[name]
        body = body.replace(b'"M"', json.dumps(server.model).encode())
    else:
        fields, field = BAD[name]
        body = {"model": server.model, "messages": [user()], **fields}
    status, error = error_of(server, body)
    assert status == 400 and error["type"] == "invalid_request_error", error
    assert error["param"] == field, error
    assert (field or "请求体 / the request body") in error["message"] and "/" in error["message"]  # Chinese / English
    assert "Traceback" not in error["message"] and "\n" not in error["message"]
    assert server.health()["status"] == "ok"


def test_the_server_refuses_the_turn_orders_training_refuses(open_server):
    """The same rule and words as the data reader (conversation.role_order_error)."""
    body = {"model": open_server.model, "messages": [user(), {"role": "assistant", "content": "a"},
                                                     {"role": "system", "content": "s"}, user()]}
    _, reason = conversation.role_order_error(["user", "assistant", "system", "user"])
    assert error_of(open_server, body)[1]["message"] == f"messages[2]: {reason}"


def test_extreme_but_valid_values_are_answered(open_server):
    client = open_server.client()
    greedy = ask(client, open_server.model, "火恐龙", temperature=0, max_tokens=6).choices[0].message.content
    # 1/temperature overflows float32: answered greedily, the limit, instead of failing on infinite logits
    assert ask(client, open_server.model, "火恐龙", temperature=1e-300, max_tokens=6).choices[0].message.content == greedy
    for extreme in ({"top_p": 1e-300}, {"seed": 2 ** 63 - 1}, {"seed": -2 ** 63}, {"stop": ["a" * 1000] * 4},
                    {"logit_bias": {}, "presence_penalty": 0, "response_format": {"type": "text"}}):
        assert ask(client, open_server.model, "火恐龙", max_tokens=4, **extreme).choices[0].finish_reason in ("length", "stop")


def test_the_log_has_no_traceback_after_the_bad_requests(open_server):
    assert_serving(open_server)
    assert_clean_log(open_server.log_path)


# --- Host header (DNS rebinding) and the API key ------------------------------------------------------------------
@pytest.mark.parametrize("host, status", [("evil.example", 400), ("evil.example:80", 400), ("127.0.0.1.evil.example", 400),
                                          ("localhost", 200), ("LOCALHOST:8000", 200), ("127.0.0.1", 200),
                                          ("[::1]:8000", 200), (["localhost", "evil.example"], 400)])
def test_a_keyless_server_answers_local_host_names_only(open_server, host, status):
    got, answer = send(open_server, "GET", "/v1/models", host=host)  # (a list: two Host headers)
    assert got == status, answer
    if status == 400 and isinstance(host, str):  # (two Host headers are already refused by uvicorn's HTTP parser)
        assert answer["error"]["code"] == "invalid_host" and "--allowed-hosts" in answer["error"]["message"]


def test_allowed_hosts_flag_replaces_the_local_names(tiny_model, tmp_path):
    with Server(tiny_model, "--allowed-hosts", "lan.example, 127.0.0.1", api_key=None, log=tmp_path / "log") as server:
        assert send(server, "GET", "/v1/models", host="lan.example:8000")[0] == 200
        assert send(server, "GET", "/v1/models", host="localhost")[0] == 400
    with Server(tiny_model, "--allowed-hosts", "*", api_key=None, log=tmp_path / "log2") as server:
        assert send(server, "GET", "/v1/models", host="anything.example")[0] == 200


@pytest.mark.parametrize("authorization, status", [
    (None, 401), ("Bearer ", 401), ("Bearer", 401), (f"Basic {API_KEY}", 401), (f"Bearer {API_KEY}x", 401),
    (f"Bearer {API_KEY[:-1]}", 401), ("Bearer 密钥".encode().decode("latin-1"), 401),
    (f"bearer {API_KEY}", 200), (f"Bearer  {API_KEY} ", 200)])
def test_only_the_key_opens_a_keyed_server_from_any_host(keyed_server, authorization, status):
    headers = {} if authorization is None else {"Authorization": authorization}
    got, answer = send(keyed_server, "GET", "/v1/models", headers=headers, host="lan.example")
    assert got == status, answer
    if status == 401:
        assert answer["error"]["code"] == "invalid_api_key"


def test_a_body_that_never_finishes_arriving_is_a_408(keyed_server):
    """Slow loris: the headers promise 100 bytes, 10 come; the connection is answered after --body-timeout (2 s)."""
    with socket.create_connection(("127.0.0.1", keyed_server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\": ")
        assert keyed_server.health()["status"] == "ok"  # others are served meanwhile
        answer = b""
        while b'"code":"request_timeout"' not in answer and (chunk := sock.recv(65536)):
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and '"code":"request_timeout"' in answer, answer
    assert_serving(keyed_server)
    assert_clean_log(keyed_server.log_path)


# --- flags: one line before anything loads ------------------------------------------------------------------------
def start(*flags, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SERVER), *flags], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("flags, env, says", [
    (["--api-key", ""], None, "--api-key"),
    ([], {"API_KEY": ""}, "API_KEY"),
    (["--api-key", "密钥"], None, "ASCII"),
    (["--api-key", "two words"], None, "ASCII"),
])
def test_an_empty_or_unsendable_key_is_refused_at_start(tiny_model, flags, env, says):
    result = start("--model", str(tiny_model), *flags, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr and result.stderr.startswith("错误")


def test_a_port_in_use_or_a_bad_host_is_one_line_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        # the model does not exist: the address is checked first, so the error is about the port
        result = start("--model", str(tmp_path / "missing"), "--port", port)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--port" in result.stderr, result.stderr
    result = start("--model", str(tmp_path / "missing"), "--host", "no-such-host.invalid")
    assert result.returncode == 2 and "--host" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, says", [(["--port", "0"], "--port"), (["--port", "65536"], "--port"),
                                         (["--port", "²"], "--port"), (["--body-timeout", "nan"], "--body-timeout"),
                                         (["--body-timeout", "0"], "--body-timeout"), (["--max-batch", "0"], "--max-batch"),
                                         (["--max-bat", "4"], "--max-bat")])  # no abbreviations
def test_bad_numbers_in_flags_are_refused(tmp_path, flags, says):
    result = start("--model", str(tmp_path), *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr and says in result.stderr.splitlines()[-1]


# --- one request's text work never stalls the others -------------------------------------------------------------
@pytest.mark.parametrize("stop", ["a", "ab" * 7, "aab", "abcab", "aaaa"])
def test_stop_matcher_equals_the_naive_rule(stop):
    rng = random.Random(stop)
    for _ in range(2000):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        naive = max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        assert StopMatcher(stop).held(text) == naive, (stop, text)


def health_latencies(server: Server, busy: threading.Event, polls: int = 8) -> list:
    latencies = []
    busy.wait(120)
    for _ in range(polls):
        start_s = time.perf_counter()
        server.health()
        latencies.append(time.perf_counter() - start_s)
        time.sleep(0.2)
    return latencies


def test_health_answers_while_the_longest_stop_strings_stream(open_server, capsys):
    """Figures printed, not asserted (timings belong to benchmarks): /health latency while a reply streams with four
    stop strings of the maximum length (before the fix a 1,000,000-character one held /health for 200 s)."""
    server = open_server
    body = {"model": server.model, "messages": [user()], "max_tokens": 300, "temperature": 0, "stream": True,
            "stop": ["a" * 1000] * 4, "tools": TOOLS, "tool_choice": "none"}  # (the reply opens with its metadata line)
    started, chunks = threading.Event(), []

    def stream():
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        connection.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = connection.getresponse()
        started.set()
        chunks.extend(response.read().decode().split("\n\n"))
        connection.close()

    thread = threading.Thread(target=stream)
    thread.start()
    latencies = health_latencies(server, started)
    thread.join()
    assert chunks[-2] == "data: [DONE]"
    with capsys.disabled():
        print(f"\n/health while 4 stop strings of 1000 characters stream: median {statistics.median(latencies) * 1000:.0f} ms, "
              f"max {max(latencies) * 1000:.0f} ms over {len(latencies)} polls")


def test_health_answers_while_a_megabyte_prompt_is_tokenized(tiny_model, tmp_path, capsys):
    with Server(tiny_model, "--max-request-bytes", str(4 << 20), api_key=None, log=tmp_path / "log") as server:
        body = json.dumps({"model": server.model, "messages": [user("皮卡丘 " * 300_000)]}, ensure_ascii=False).encode()
        sent, outcome = threading.Event(), []
        thread = threading.Thread(target=lambda: (sent.set(), outcome.append(error_of(server, body))))
        thread.start()
        latencies = health_latencies(server, sent, polls=5)
        thread.join()
        assert outcome[0][0] == 400 and outcome[0][1]["code"] == "context_length_exceeded"
    with capsys.disabled():
        print(f"\n/health while a {len(body) / 2**20:.1f} MiB prompt is tokenized: median "
              f"{statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")


def test_openai_client_sees_openai_errors(open_server):
    client = open_server.client()
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, open_server.model, "你好", temperature=3)
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, open_server.model, "你好", stop=["x"] * 5)
    assert caught.value.body["param"] == "stop"
