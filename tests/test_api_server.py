"""api_server.py as clients see it: the real server in a subprocess on a free localhost port, a tiny model, the
official `openai` client."""
import asyncio
import http.client
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

from chatglm3.model import conversation
from chatglm3.checkpoint.loading import load_model_and_tokenizer

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "finetune_chatmodel_demo" / "api_server.py"
API_KEY = "test-key-123"

# What the trained fixture model learns: to call the tool for QUESTION, to answer from the tool's result, and to
# greet (a plain streamed answer).
TOOL = {"name": "pokedex", "description": "图鉴", "parameters": {"name": "str"}}
QUESTION, CALL, OBSERVATION, ANSWER = "皮卡丘是什么属性？", {"name": "皮卡丘"}, {"type": "电"}, "皮卡丘是电属性。"
GREETING, GREETING_ANSWER = "你好", "你好！我是宝可梦图鉴助手。"
TRAINING = [
    {"tools": [TOOL], "conversations": [{"role": "user", "content": QUESTION},
                                        {"role": "tool", "name": TOOL["name"], "parameters": CALL, "observation": OBSERVATION},
                                        {"role": "assistant", "content": ANSWER}]},
    {"conversations": [{"role": "user", "content": GREETING}, {"role": "assistant", "content": GREETING_ANSWER}]},
]
OPENAI_TOOLS = [{"type": "function", "function": TOOL}]


def train_chat_model(base: Path, out: Path, max_steps: int = 300) -> Path:
    """Fine-tunes the tiny model on TRAINING (ids and labels from conversation.encode_sample, as finetune.py)
    until it has learnt it; saves model and tokenizer to `out`."""
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(str(base))
    encoded = [conversation.encode_sample(tokenizer, sample) for sample in TRAINING]
    length = max(len(ids) for ids, _ in encoded)
    ids = torch.tensor([[0] * (length - len(i)) + i for i, _ in encoded])
    labels = torch.tensor([[-100] * (length - len(l)) + l for _, l in encoded])
    mask = torch.tensor([[0] * (length - len(i)) + [1] * len(i) for i, _ in encoded])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains several times faster on one thread of a busy machine
    try:
        for _ in range(max_steps):
            loss = model(ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if loss.item() < 0.005:
                break
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def trained_model(tiny_model, tmp_path_factory) -> Path:
    return train_chat_model(tiny_model, tmp_path_factory.mktemp("tool-model"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """api_server.py in a subprocess on 127.0.0.1; `.stop()` ends it (also on a failed start)."""

    def __init__(self, model: Path, *flags: str, api_key: str = API_KEY, log: Path = None):
        self.port, self.api_key, self.model = free_port(), api_key, model.name
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "wb") if log else subprocess.DEVNULL
        command = [sys.executable, str(SERVER), "--model", str(model), "--port", str(self.port), *flags]
        if api_key:
            command += ["--api-key", api_key]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=self.log)
        try:
            self._wait_ready()
        except Exception:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}")
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout} s")

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, timeout=120, **kwargs)

    def post(self, body: bytes, headers: dict = None) -> tuple[int, dict]:
        """A raw POST to /v1/chat/completions: (status, JSON body)."""
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with Server(tiny_model, "--max-batch", "4", "--max-queue", "16", "--max-messages", "64",
                "--max-request-bytes", "200000", log=log) as s:
        yield s


@pytest.fixture(scope="module")
def long_server(tiny_model, tmp_path_factory):
    """The tiny model with a 32k context, so that a greedy reply (which never stops on this random model) runs for
    many seconds: a disconnect is then seen long before the reply could end by itself, however loaded the machine."""
    model = tmp_path_factory.mktemp("long-context") / "tiny-32k"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "seq_length": 32768}))
    with Server(model, "--max-tokens", "30000", log=model.parent / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The same tiny model in this process, for `model.chat`."""
    return load_model_and_tokenizer(str(tiny_model))


def chat_greedy(reference, query: str, max_new_tokens: int, history=None):
    model, tokenizer = reference
    response, _ = model.chat(tokenizer, query, history=history or [], do_sample=False, max_new_tokens=max_new_tokens)
    return response


def ask(client, model: str, query: str, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": query}], **kwargs)


def streamed(client, model: str, messages: list, **kwargs) -> tuple[list, list, str]:
    """(content pieces, tool-call deltas, finish_reason) of a streamed reply."""
    pieces, calls, finish = [], [], None
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, **kwargs):
        choice = chunk.choices[0]
        if choice.delta.content:
            pieces.append(choice.delta.content)
        calls += choice.delta.tool_calls or []
        finish = choice.finish_reason or finish
    return pieces, calls, finish


QUESTIONS = ["你好", "皮卡丘是什么属性？", "介绍一下妙蛙种子", "hello there, how are you today?", "火恐龙", "水箭龟的特性"]


def test_models_and_answers_equal_model_chat(server, reference):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [server.model]
    for query in QUESTIONS[:3]:
        expected = chat_greedy(reference, query, 24)
        answer = ask(client, server.model, query, temperature=0, max_tokens=24)
        assert answer.choices[0].message.content == expected
        assert answer.choices[0].finish_reason == "length"
        prompt_len = len(conversation.prompt_ids(reference[1], [], query))
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_len, 24)
        pieces, calls, finish = streamed(client, server.model, [{"role": "user", "content": query}], temperature=0, max_tokens=24)
        assert ("".join(pieces), calls, finish) == (expected, [], "length")


def test_multi_turn_and_system_prompt_equal_model_chat(server, reference):
    history = [{"role": "system", "content": "你是图鉴"}, {"role": "user", "content": "你好"},
               {"role": "assistant", "metadata": "", "content": "你好呀"}]
    expected = chat_greedy(reference, "皮卡丘", 16, history)
    messages = [{"role": "system", "content": "你是图鉴"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好呀"}, {"role": "user", "content": "皮卡丘"}]
    answer = server.client().chat.completions.create(model=server.model, messages=messages, temperature=0, max_tokens=16)
    assert answer.choices[0].message.content == expected


def together(server, questions: list, max_tokens) -> list:
    """Greedy answers to all `questions`, sent at once; question i asks for max_tokens(i) new tokens."""
    async def send():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as aclient:
            replies = await asyncio.gather(*[
                aclient.chat.completions.create(model=server.model, messages=[{"role": "user", "content": q}],
                                                temperature=0, max_tokens=max_tokens(i))
                for i, q in enumerate(questions)])
        return [r.choices[0].message.content for r in replies]

    return asyncio.run(send())


def test_batched_answers_equal_one_at_a_time(server):
    client = server.client()
    alone = [ask(client, server.model, q, temperature=0, max_tokens=12 + 3 * i).choices[0].message.content
             for i, q in enumerate(QUESTIONS)]
    assert together(server, QUESTIONS, lambda i: 12 + 3 * i) == alone


@pytest.fixture(scope="module")
def ptuning_checkpoint(tiny_model, tmp_path_factory) -> Path:
    """A P-Tuning v2 checkpoint for the tiny model: a random prefix of 4, large enough to change the answers."""
    model, _ = load_model_and_tokenizer(str(tiny_model), pre_seq_len=4)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.transformer.prefix_encoder.embedding.weight, std=1.0)
    out = tmp_path_factory.mktemp("ptuning")
    model.save_pretrained(out)
    return out


def test_ptuning_answers_equal_model_chat_alone_and_batched(tiny_model, ptuning_checkpoint, reference, tmp_path):
    tuned = load_model_and_tokenizer(str(tiny_model), pt_checkpoint=str(ptuning_checkpoint))
    expected = [chat_greedy(tuned, q, 10 + 2 * i) for i, q in enumerate(QUESTIONS[:4])]
    assert expected != [chat_greedy(reference, q, 10 + 2 * i) for i, q in enumerate(QUESTIONS[:4])]
    with Server(tiny_model, "--pt-checkpoint", str(ptuning_checkpoint), log=tmp_path / "server.log") as server:
        client = server.client()
        alone = [ask(client, server.model, q, temperature=0, max_tokens=10 + 2 * i).choices[0].message.content
                 for i, q in enumerate(QUESTIONS[:4])]
        assert alone == expected
        assert together(server, QUESTIONS[:4], lambda i: 10 + 2 * i) == expected


@pytest.mark.parametrize("text, stop", [("\n我是[[训练时间]]训练的模型。", []), ("\n皮卡丘是电属性。它很可爱", ["它很", "属性吗"]),
                                        ("\n一二三四五六", ["四五"]), ("\n一二 三", ["三"])])
def test_streamed_pieces_add_up_to_the_answer(reference, text, stop):
    """Token by token, as the server streams: the pieces never need taking back."""
    from chatglm3.serving.openai_api import Prompt, Reply

    _, tokenizer = reference
    reply = Reply(tokenizer, Prompt([], []), stop)
    pieces = []
    for token in tokenizer.tokenizer.encode(text):
        reply.add([token])
        pieces.append(reply.delta(final=False))
        if reply.hit_stop:
            break
    pieces.append(reply.delta(final=True))
    message, finish = reply.message("stop")
    assert "".join(pieces) == message["content"] and "[[" not in message["content"]
    assert reply.hit_stop == bool(stop)


def test_text_before_a_tool_call_is_kept_streamed_or_not(reference):
    """ChatGLM3 may write a thought, then `<|assistant|>tool` and the call: content and tool_calls together."""
    from chatglm3.serving.openai_api import Prompt, Reply

    _, tokenizer = reference
    ids = tokenizer.tokenizer.encode("\n我先查一下图鉴") + [tokenizer.get_command("<|assistant|>")] + \
        tokenizer.tokenizer.encode("pokedex\n" + conversation.format_tool_call(CALL))
    reply = Reply(tokenizer, Prompt([], []), [])
    pieces = []
    for token in ids:
        reply.add([token])
        pieces.append(reply.delta(final=False))
    pieces.append(reply.delta(final=True))
    message, finish = reply.message("stop")
    assert (message["content"], "".join(pieces), finish) == ("我先查一下图鉴", "我先查一下图鉴", "tool_calls")
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == CALL


def test_stop_strings_and_seeded_sampling(server):
    client = server.client()
    full = ask(client, server.model, "介绍一下妙蛙种子", temperature=0, max_tokens=24).choices[0].message.content
    stop = full[8:10]
    cut = ask(client, server.model, "介绍一下妙蛙种子", temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    pieces, _, finish = streamed(client, server.model, [{"role": "user", "content": "介绍一下妙蛙种子"}],
                                 temperature=0, max_tokens=24, stop=stop)
    assert ("".join(pieces), finish) == (full[:full.index(stop)], "stop")
    sampled = [ask(client, server.model, "火恐龙", temperature=1.0, top_p=0.9, seed=7, max_tokens=16).choices[0].message.content
               for _ in range(2)]
    other = ask(client, server.model, "火恐龙", temperature=1.0, top_p=0.9, seed=8, max_tokens=16).choices[0].message.content
    assert sampled[0] == sampled[1] != other


def test_tool_call_round_trip(trained_model, tmp_path):
    with Server(trained_model, log=tmp_path / "server.log") as server:
        client = server.client()
        _, tokenizer = load_model_and_tokenizer(str(trained_model))
        messages = [{"role": "user", "content": QUESTION}]
        first = client.chat.completions.create(model=server.model, messages=messages, tools=OPENAI_TOOLS, temperature=0)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == (TOOL["name"], CALL)

        # The client runs the tool and sends its result back; the model answers from it.
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps(OBSERVATION, ensure_ascii=False)}]
        second = client.chat.completions.create(model=server.model, messages=messages, tools=OPENAI_TOOLS, temperature=0)
        assert (second.choices[0].message.content, second.choices[0].finish_reason) == (ANSWER, "stop")
        # The served prompt is training's ids for the same conversation prefix.
        training_ids, _ = conversation.encode_sample(tokenizer, TRAINING[0])
        expected = conversation.prompt_ids(tokenizer, conversation.sample_to_messages(TRAINING[0])[:-1])
        assert training_ids[:len(expected)] == expected and second.usage.prompt_tokens == len(expected)

        pieces, calls, finish = streamed(client, server.model, messages[:1], tools=OPENAI_TOOLS, temperature=0)
        assert (pieces, finish) == ([], "tool_calls")
        assert (calls[0].function.name, json.loads(calls[0].function.arguments)) == (TOOL["name"], CALL)

        named = client.chat.completions.create(model=server.model, messages=messages[:1], tools=OPENAI_TOOLS, temperature=0,
                                               tool_choice={"type": "function", "function": {"name": TOOL["name"]}})
        assert json.loads(named.choices[0].message.tool_calls[0].function.arguments) == CALL
        plain = client.chat.completions.create(model=server.model, messages=messages[:1], tools=OPENAI_TOOLS, temperature=0,
                                               tool_choice="none", max_tokens=20)
        assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason in ("stop", "length")

        pieces, _, finish = streamed(client, server.model, [{"role": "user", "content": GREETING}], temperature=0)
        assert ("".join(pieces), finish) == (GREETING_ANSWER, "stop")
        assert len(pieces) > 1  # streamed as it was generated, not in one piece


def error_of(server, body, headers=None) -> tuple[int, dict]:
    status, data = server.post(body if isinstance(body, bytes) else json.dumps(body).encode(), headers)
    assert set(data) == {"error"} and {"message", "type", "param", "code"} <= set(data["error"]), data
    return status, data["error"]


def user(text="你好"):
    return {"role": "user", "content": text}


BAD_REQUESTS = [
    ("empty messages", {"messages": []}, 400),
    ("assistant first", {"messages": [{"role": "assistant", "content": "hi"}, user()]}, 400),
    ("ends with assistant", {"messages": [user(), {"role": "assistant", "content": "hi"}]}, 400),
    ("system after user", {"messages": [user(), {"role": "system", "content": "s"}]}, 400),
    ("tool without a call", {"messages": [user(), {"role": "tool", "tool_call_id": "x", "content": "1"}]}, 400),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("max_tokens 0", {"messages": [user()], "max_tokens": 0}, 400),
    ("max_tokens negative", {"messages": [user()], "max_tokens": -5}, 400),
    ("max_tokens beyond the context", {"messages": [user()], "max_tokens": 10 ** 6}, 400),
    ("prompt beyond the context", {"messages": [user("皮卡丘" * 1500)], "max_tokens": 10}, 400),
    ("too many messages", {"messages": [user()] * 65}, 400),
    ("n > 1", {"messages": [user()], "n": 2}, 400),
    ("temperature > 2", {"messages": [user()], "temperature": 3}, 400),
    ("invalid tool_choice", {"messages": [user()], "tools": OPENAI_TOOLS, "tool_choice": "required"}, 400),
    ("tool_choice names an unknown function", {"messages": [user()], "tools": OPENAI_TOOLS,
                                               "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400),
    ("unknown tool in a tool message", {"tools": OPENAI_TOOLS, "messages": [
        user(), {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "rm_rf", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"}]}, 400),
    ("tool message for an unknown call id", {"tools": OPENAI_TOOLS, "messages": [
        user(), {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "pokedex", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "done"}]}, 400),
    ("arguments not JSON", {"tools": OPENAI_TOOLS, "messages": [
        user(), {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                      "function": {"name": "pokedex", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"}]}, 400),
    ("unknown model", {"model": "gpt-4", "messages": [user()]}, 404),
]


@pytest.mark.parametrize("name, body, status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server, name, body, status):
    got, error = error_of(server, {"model": server.model, **body})
    assert got == status, error
    assert error["message"]


def test_malformed_too_large_and_unauthorised(server):
    assert error_of(server, b'{"model": "x", "messages": [')[0] == 400
    assert error_of(server, b"\xff\xfe")[0] == 400
    assert error_of(server, json.dumps({"model": server.model, "messages": [user("a" * 300_000)]}).encode())[0] == 413
    status, error = error_of(server, {"model": server.model, "messages": [user()]}, {"Authorization": "Bearer wrong"})
    assert (status, error["code"]) == (401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        server.client(default_headers={"Authorization": ""}).models.list()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    # the server keeps serving
    assert ask(server.client(), server.model, "你好", max_tokens=4, temperature=0).choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not streamed"])
def test_a_client_that_disconnects_has_its_reply_cancelled(long_server, stream):
    server = long_server
    before = server.health()["finished"]
    body = json.dumps({"model": server.model, "messages": [user()], "max_tokens": 30000, "temperature": 0,
                       "stream": stream})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=body.encode(),
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    if stream:
        assert connection.getresponse().readline().startswith(b"data: ")  # the stream has started
    else:
        wait_until(lambda: server.health()["running"] == 1)
    connection.close()
    wait_until(lambda: sum(server.health()["finished"].values()) > sum(before.values()))
    finished = server.health()["finished"]
    assert finished.get("cancelled", 0) == before.get("cancelled", 0) + 1, finished  # not "length" or "stop"
    assert sum(finished.values()) == sum(before.values()) + 1
    assert ask(server.client(), server.model, "你好", max_tokens=4, temperature=0).choices[0].finish_reason == "length"


def wait_until(condition, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_burst_beyond_the_queue_gets_503_and_nothing_is_lost(server):
    async def burst(n: int) -> list:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300) as aclient:
            async def one(i):
                try:
                    return await aclient.chat.completions.create(model=server.model, messages=[user(QUESTIONS[i % 6])],
                                                                 temperature=0, max_tokens=8)
                except openai.APIStatusError as e:
                    return e
            return await asyncio.gather(*[one(i) for i in range(n)])

    asyncio.run(burst(20))  # warm-up: the batch at full size
    warm_rss = server.rss_kib()
    before = server.health()["finished"]
    results = asyncio.run(burst(200))
    answered = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(answered) + len(refused) == 200
    assert len(answered) >= 16 and refused, (len(answered), len(refused))
    assert all(r.status_code == 503 and r.body["code"] == "server_overloaded" for r in refused)
    assert all(r.choices[0].finish_reason == "length" for r in answered)
    after = server.health()
    assert after["running"] == after["waiting"] == 0
    ended = sum(after["finished"].values()) - sum(before.values())
    assert ended == len(answered)  # every accepted request ended exactly once
    assert server.rss_kib() <= 1.1 * warm_rss, (warm_rss, server.rss_kib())
    assert ask(server.client(), server.model, "你好", max_tokens=4, temperature=0).choices[0].finish_reason == "length"


@pytest.mark.parametrize("flags, says", [(["--model", "{tmp}/missing"], "missing"),
                                         (["--model", "{tmp}", "--port", "70000"], "--port")])
def test_bad_flags_exit_cleanly(tmp_path, flags, says):
    result = subprocess.run([sys.executable, str(SERVER), *[f.format(tmp=tmp_path) for f in flags]],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert says in result.stderr


@pytest.mark.slow
def test_benchmark_script_prints_its_table(tiny_model):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_server.py"), "--model", str(tiny_model),
                             "--clients", "1", "2", "--requests-per-client", "1", "--max-tokens", "4", "--rounds", "1",
                             "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout.splitlines()[-1])
    assert [(r["clients"], r["serving"]) for r in rows] == [(1, "one at a time"), (1, "batched"), (2, "one at a time"), (2, "batched")]
    assert all(r["requests"] == r["clients"] and 0 < r["tokens"] <= 4 * r["clients"] for r in rows)
    assert result.stdout.count("| one at a time |") == 2
