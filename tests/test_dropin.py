"""The folder as a drop-in for upstream's finetune_chatmodel_demo: upstream README's commands, run as a new user
would, in a ChatGLM3-shaped checkout holding nothing of this repository but the folder, with `THUDM/chatglm3-6b`
taken from a Hugging Face cache (written by huggingface_hub itself, from a local mirror) and HF_HUB_OFFLINE=1.
Plus each bad input of the drop-in path: one line naming the id or file:line, non-zero exit, nothing written.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "finetune_chatmodel_demo"
HUB_ID = "THUDM/chatglm3-6b"
CODE_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py")
AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}


# --- a local Hub mirror (HF_ENDPOINT) serving one repository -------------------------------------------------------
def serve_repo(repo_id: str, folder: Path):
    """A minimal Hub: repo info, file tree and file downloads of `folder` as `repo_id` at one commit; 404 with the
    Hub's error codes otherwise. Returns (server, endpoint URL)."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    commit = hashlib.sha1(b"".join(files.values())).hexdigest()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status, body=b"", headers=()):
            self.send_response(status)
            for key, value in [("Content-Length", str(len(body))), *headers]:
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self):
            path = self.path.split("?")[0]
            info, tree, resolve = f"/api/models/{repo_id}/revision/", f"/api/models/{repo_id}/tree/", f"/{repo_id}/resolve/"
            if path.startswith(info) and path[len(info):] in ("main", commit):
                return self.reply(200, json.dumps({"id": repo_id, "sha": commit}).encode())
            if path.startswith(info):
                return self.reply(404, headers=[("X-Error-Code", "RevisionNotFound")])
            if path.startswith(tree):
                entries = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for f, b in files.items()]
                return self.reply(200, json.dumps(entries).encode())
            if path.startswith(resolve) and path[len(resolve):].split("/", 1)[-1] in files:
                body = files[path[len(resolve):].split("/", 1)[1]]
                return self.reply(200, body, [("X-Repo-Commit", commit), ("ETag", f'"{hashlib.sha1(body).hexdigest()}"')])
            return self.reply(404, headers=[("X-Error-Code", "RepoNotFound")])

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def upstream_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model laid out as the official repository: plus upstream's code files (each would leave a marker
    file if anything imported it) and their auto_map."""
    folder = tmp_path_factory.mktemp("official") / "chatglm3-6b"
    shutil.copytree(tiny_model, folder)
    marker = folder.parent / "EXECUTED"
    for name in CODE_FILES:
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write({name!r})\n", encoding="utf-8")
    for name, auto_map in (("config.json", AUTO_MAP), ("tokenizer_config.json", TOKENIZER_AUTO_MAP)):
        data = json.loads((folder / name).read_text(encoding="utf-8"))
        data["auto_map"] = auto_map
        (folder / name).write_text(json.dumps(data, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def mirror(upstream_model):
    server, url = serve_repo(HUB_ID, upstream_model)
    yield url
    server.shutdown()


@pytest.fixture(scope="module")
def hf_home(upstream_model, mirror, tmp_path_factory) -> Path:
    """A Hugging Face cache holding THUDM/chatglm3-6b, written by huggingface_hub's own download from the mirror."""
    from huggingface_hub import scan_cache_dir, snapshot_download

    home = tmp_path_factory.mktemp("hf-home")
    snapshot_download(HUB_ID, cache_dir=home / "hub", endpoint=mirror)
    cached = {repo.repo_id: repo for repo in scan_cache_dir(home / "hub").repos}
    files = {f.file_name for revision in cached[HUB_ID].revisions for f in revision.files}
    assert {"config.json", "model.safetensors", "tokenizer.model", *CODE_FILES} <= files
    return home


def hub_env(hf_home: Path, offline=True, endpoint=None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    return env


def run(command, cwd, env, stdin=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


def ok(result):
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return result


def one_line_error(result, status, *fragments):
    assert result.returncode == status, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- upstream's example data, in the shapes of ToolAlpaca and AdvertiseGen ----------------------------------------
def tool_alpaca_record(n: int) -> dict:
    names = ["皮卡丘", "妙蛙种子", "小火龙", "杰尼龟"]
    instances = []
    for i, name in enumerate(names[:n]):
        call = json.dumps({"name": name}, ensure_ascii=False)
        instances.append({
            "input": f"{name}是什么属性？",
            "output": f"{name}的属性已经查到。",
            "Final Thought": "I have the answer.",
            "intermediate_steps": [[["getPokemon", call, f"I should look {name} up.\nAction: getPokemon\nAction Input: {call}"],
                                    json.dumps({"types": ["电"] if i == 0 else ["草"]}, ensure_ascii=False)]],
        })
    return {"Name": "Pokedex", "Description": "Pokémon facts",
            "NLDocumentation": "getPokemon: Look up a Pokémon.\nParameters: {\"name\": \"Required. string.\"}",
            "Instances": instances}


ADVERTISE_GEN = [
    {"content": "类型#裙*颜色#红色*风格#复古", "summary": "复古的红色连衣裙，端庄又大方。"},
    {"content": "类型#上衣*材质#棉*风格#简约", "summary": "纯棉简约上衣，舒适百搭。"},
    {"content": "类型#裤*版型#宽松*颜色#黑色", "summary": "宽松黑色长裤，显瘦又有型。"},
    {"content": "类型#外套*风格#休闲", "summary": "休闲外套，随性自在。"},
]


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A ChatGLM3 checkout: only this project's finetune_chatmodel_demo/, with the data sets unpacked in it as
    upstream's README says."""
    demo = tmp_path / "ChatGLM3" / "finetune_chatmodel_demo"
    shutil.copytree(DEMO, demo, ignore=shutil.ignore_patterns("__pycache__", "output"))
    (demo / "ToolAlpaca" / "data").mkdir(parents=True)
    (demo / "ToolAlpaca" / "data" / "train_data.json").write_text(
        json.dumps([tool_alpaca_record(4), tool_alpaca_record(2)], ensure_ascii=False, indent=2), encoding="utf-8")
    (demo / "AdvertiseGen").mkdir()
    (demo / "AdvertiseGen" / "train.json").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ADVERTISE_GEN), encoding="utf-8")
    return demo


def only(pattern: str, demo: Path) -> Path:
    found = list(demo.glob(pattern))
    assert len(found) == 1, (pattern, sorted(p.name for p in (demo / "output").iterdir()))
    return found[0]


TINY = {"MAX_STEP": "2", "SAVE_INTERVAL": "2", "LOG_INTERVAL": "1", "EXTRA_ARGS": "--disable_tqdm true"}


@pytest.mark.slow
def test_upstream_readme_walkthroughs_work_unchanged(checkout, hf_home, upstream_model):
    demo, env = checkout, hub_env(hf_home)

    # Multi-turn (ToolAlpaca): format, then both launchers. Upstream's spelling GRAD_ACCUMULARION_STEPS is honoured.
    formatted = ok(run(["./scripts/format_tool_alpaca.py", "--path", "ToolAlpaca/data/train_data.json"], demo, env))
    assert "train_examples" in formatted.stdout
    assert len((demo / "formatted_data" / "tool_alpaca.jsonl").read_text(encoding="utf-8").splitlines()) == 6
    pt = ok(run(["./scripts/finetune_pt_multiturn.sh"], demo, {**env, **TINY, "PRE_SEQ_LEN": "4", "MAX_SEQ_LEN": "256",
                                                               "GRAD_ACCUMULARION_STEPS": "3"}))
    assert "Sanity Check >>>>>>>>>>>>>" in pt.stdout and "<<<<<<<<<<<<< Sanity Check" in pt.stdout
    assert "--gradient_accumulation_steps 3" in pt.stdout
    pt_run = only("output/tool_alpaca_pt-*-4-2e-2", demo)
    assert (pt_run / "checkpoint-2" / "pytorch_model.bin").is_file() and (pt_run / "train.log").is_file()
    ok(run(["./scripts/finetune_ds_multiturn.sh"], demo, {**env, **TINY, "MAX_SEQ_LEN": "256", "DEV_BATCH_SIZE": "2"}))
    ft_run = only("output/tool_alpaca_ft-*-1e-4", demo)
    assert (ft_run / "checkpoint-2" / "global_step2").is_dir()

    # Input-output (AdvertiseGen): format, then both launchers (the other spelling of grad accumulation).
    ok(run(["./scripts/format_advertise_gen.py", "--path", "AdvertiseGen/train.json"], demo, env))
    io = {**env, **TINY, "MAX_SOURCE_LEN": "64", "MAX_TARGET_LEN": "32", "GRAD_ACCUMULATION_STEPS": "1"}
    ok(run(["./scripts/finetune_pt.sh"], demo, {**io, "PRE_SEQ_LEN": "4"}))
    ok(run(["./scripts/finetune_ds.sh"], demo, {**io, "DEV_BATCH_SIZE": "2"}))
    io_pt = only("output/advertise_gen_pt-*-4-2e-2", demo) / "checkpoint-2"
    io_ft = only("output/advertise_gen_ft-*-1e-4", demo)

    # The full checkpoint opens in upstream's tools: their code files, auto_map, tokenizer and generation config.
    for checkpoint in (io_ft, io_ft / "checkpoint-2", ft_run):
        for name in CODE_FILES + ("generation_config.json", "tokenizer.model"):
            assert (checkpoint / name).read_bytes() == (upstream_model / name).read_bytes(), (checkpoint, name)
        assert json.loads((checkpoint / "config.json").read_text())["auto_map"] == AUTO_MAP
        assert json.loads((checkpoint / "tokenizer_config.json").read_text())["auto_map"] == TOKENIZER_AUTO_MAP
    assert json.loads((io_ft / "config.json").read_text())["train_format"] == "input-output"
    assert json.loads((ft_run / "config.json").read_text())["train_format"] == "multi-turn"

    # Upstream README's two inference commands: input-output models are asked with the raw prompt, by themselves.
    prompt = ADVERTISE_GEN[0]["content"] + "\n"
    for command in (["python", "inference.py", "--pt-checkpoint", str(io_pt), "--model", HUB_ID],
                    ["python", "inference.py", "--tokenizer", HUB_ID, "--model", str(io_ft)]):
        answered = ok(run(command + ["--max-new-tokens", "8"], demo, env, stdin=prompt))
        assert answered.stdout.count("ChatGLM：") == 1
        assert "input-output" in answered.stderr
    # ... and multi-turn models in the chat format; evaluate.py follows the record too.
    chat = ok(run(["python", "inference.py", "--model", str(ft_run), "--prompt", "你好", "--max-new-tokens", "4"], demo, env))
    assert "multi-turn" in chat.stderr
    scored = ok(run(["python", "evaluate.py", "--data", "formatted_data/advertise_gen.jsonl", "--model", str(io_ft),
                     "--max-samples", "2", "--max-new-tokens", "4", "--output", "eval.jsonl"], demo, env))
    assert json.loads(scored.stdout.strip().splitlines()[-1])["samples"] == 2 and "input-output" in scored.stderr

    assert not (upstream_model.parent / "EXECUTED").exists(), "a model code file was executed"


# --- bad input ---------------------------------------------------------------------------------------------------
def finetune_command(model: str, data: Path, out: Path, *extra) -> list:
    return [sys.executable, str(DEMO / "finetune.py"), "--model_name_or_path", model, "--train_file", str(data),
            "--output_dir", str(out), "--max_steps", "1", "--use_cpu", "--report_to", "none", *extra]


@pytest.fixture
def conversations(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"conversations": [{"role": "user", "content": "你好"},
                                                  {"role": "assistant", "content": "你好！"}]}, ensure_ascii=False) + "\n")
    return path


def test_a_hub_id_that_does_not_exist_is_one_line(tmp_path, mirror, conversations):
    result = run(finetune_command("THUDM/chatglm3-6b-nope", conversations, tmp_path / "out"), tmp_path,
                 hub_env(tmp_path / "hf", offline=False, endpoint=mirror))
    one_line_error(result, 1, "THUDM/chatglm3-6b-nope", mirror)
    assert not (tmp_path / "out").exists()


def test_offline_without_a_cache_is_one_line(tmp_path):
    result = run([sys.executable, str(DEMO / "inference.py"), "--model", HUB_ID, "--prompt", "你好"], tmp_path,
                 hub_env(tmp_path / "empty-hf-home"))
    one_line_error(result, 2, HUB_ID, "HF_HUB_OFFLINE=1", str(tmp_path / "empty-hf-home"))


def test_automodel_and_autotokenizer_take_the_hub_id_from_the_cache(tmp_path, hf_home, upstream_model):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import chatglm3; "
            "from transformers import AutoModel, AutoTokenizer; "
            "model = AutoModel.from_pretrained('THUDM/chatglm3-6b'); tokenizer = AutoTokenizer.from_pretrained('THUDM/chatglm3-6b'); "
            "print(type(model).__name__, type(tokenizer).__name__, model.config.num_layers)")
    result = ok(run([sys.executable, "-c", code, str(DEMO)], tmp_path, hub_env(hf_home)))
    assert result.stdout.split() == ["ChatGLMForConditionalGeneration", "ChatGLMTokenizer", "2"]
    assert not (upstream_model.parent / "EXECUTED").exists()


def test_a_local_folder_wins_over_the_hub_id(tmp_path, tiny_model, monkeypatch):
    from chatglm3 import hub

    shutil.copytree(tiny_model, tmp_path / "THUDM" / "chatglm3-6b")
    monkeypatch.chdir(tmp_path)
    assert hub.resolve(HUB_ID) == HUB_ID and hub.resolve(HUB_ID, need="tokenizer") == HUB_ID


@pytest.mark.parametrize("flags, status, fragments", [
    (["--model_revision", "v9"], 1, [HUB_ID, "v9"]),
    (["--resize_position_embeddings", "maybe"], 2, ["--resize_position_embeddings", "maybe"]),
    (["--use_fast_tokenizer", "sometimes"], 2, ["--use_fast_tokenizer"]),
])
def test_an_upstream_flag_with_a_bad_value_is_one_line(tmp_path, mirror, conversations, flags, status, fragments):
    result = run(finetune_command(HUB_ID, conversations, tmp_path / "out", *flags), tmp_path,
                 hub_env(tmp_path / "hf", offline=False, endpoint=mirror))
    one_line_error(result, status, *fragments)


def test_upstream_flags_without_effect_are_accepted_and_named(tmp_path, hf_home, conversations):
    result = ok(run(finetune_command(HUB_ID, conversations, tmp_path / "out", "--use_fast_tokenizer", "false",
                                     "--overwrite_cache", "--config_name", "x", "--use_auth_token", "true"),
                    tmp_path, hub_env(hf_home)))
    for flag in ("--use_fast_tokenizer", "--overwrite_cache", "--config_name", "--use_auth_token"):
        assert sum(flag in line for line in result.stdout.splitlines()) == 1, flag


def load_script(name: str):
    """A script of scripts/ as a module, to call its main(argv) in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), DEMO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, text, fragment", [
    ("format_tool_alpaca.py", '[\n  {"NLDocumentation": "x", "Instances": []},\n  {"Name": "no instances"}\n]\n', ":3:"),
    ("format_tool_alpaca.py", '[\n  {"NLDocumentation": "x",\n   "Instances": [}\n]\n', ":3:"),
    ("format_advertise_gen.py", '{"content": "a", "summary": "b"}\n{"content": "a"}\n', ":2:"),
    ("format_advertise_gen.py", '{"content": "a", "summary": "b"}\n{"content": \n', ":2:"),
])
def test_a_malformed_record_is_one_line_and_nothing_is_written(tmp_path, capsys, script, text, fragment):
    source, output = tmp_path / "train.json", tmp_path / "formatted_data" / "out.jsonl"
    source.write_text(text, encoding="utf-8")
    output.parent.mkdir()
    output.write_text("earlier output\n", encoding="utf-8")
    status = load_script(script).main(["--path", str(source), "--output", str(output)])
    err = capsys.readouterr().err
    assert status == 1 and len(err.strip().splitlines()) == 1 and f"{source}{fragment}" in err, err
    assert output.read_text(encoding="utf-8") == "earlier output\n"
    assert os.listdir(output.parent) == ["out.jsonl"]


def test_tool_alpaca_instances_that_cannot_be_converted_are_listed(tmp_path):
    from chatglm3.data.example_data import tool_alpaca_samples

    record = tool_alpaca_record(3)
    record["Instances"][1]["intermediate_steps"][0][0][1] = "name=妙蛙种子"  # not JSON: upstream's err_count
    del record["Instances"][2]["Final Thought"]
    source = tmp_path / "train_data.json"
    source.write_text(json.dumps([record], ensure_ascii=False, indent=2), encoding="utf-8")
    samples, skipped = tool_alpaca_samples(source)
    assert len(samples) == 1 and samples[0]["tools"] == [record["NLDocumentation"]]
    assert [s.split(": ")[:2] for s in skipped] == [[f"{source}:2", "Instances[1]"], [f"{source}:2", "Instances[2]"]]
    assert "Final Thought" in skipped[1]


# --- the folder alone: no data pipeline, no Pokémon; a tool plug-in from outside ---------------------------------
@pytest.mark.slow
def test_the_folder_copied_alone_trains_chats_with_a_plugin_tool_evaluates_and_exports(tmp_path):
    """Only finetune_chatmodel_demo/ (no data_processing/ beside it, nothing installed on PYTHONPATH): build a tiny
    model, train a few steps on the example tool data, chat with the example plug-in (examples/tools/), evaluate
    tool use with it, export."""
    demo = tmp_path / "ChatGLM3" / "finetune_chatmodel_demo"
    shutil.copytree(DEMO, demo, ignore=shutil.ignore_patterns("__pycache__", "output", "formatted_data"))
    assert sorted(p.name for p in demo.parent.iterdir()) == ["finetune_chatmodel_demo"]
    assert not [p for p in demo.rglob("*.py") if p.stem in ("pokedex", "pokemon_types", "quiz_types", "pokedex_tool")]
    tools = tmp_path / "my_tools"
    shutil.copytree(REPO / "examples" / "tools", tools)
    data, plugin = tools / "convert_length.jsonl", tools / "convert_length.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))

    ok(run([sys.executable, "scripts/build_tiny_model.py", "--corpus", str(data), "--out", "tiny", "--layers", "1",
            "--hidden", "32", "--heads", "2", "--kv-groups", "1", "--vocab-size", "400"], demo, env))
    ok(run([sys.executable, "finetune.py", "--model_name_or_path", "tiny", "--train_file", str(data), "--output_dir",
            "output/run", "--max_steps", "3", "--max_seq_length", "512", "--use_cpu", "--report_to", "none",
            "--disable_tqdm", "true"], demo, env))
    chat = ok(run([sys.executable, "inference.py", "--model", "output/run", "--tools", str(plugin), "--prompt",
                   "3 千米是多少米？", "--greedy", "--max-new-tokens", "8"], demo, env))
    assert "工具 / Tools: convert_length" in chat.stderr and chat.stdout.startswith("ChatGLM：")
    scored = ok(run([sys.executable, "evaluate.py", "--data", str(data), "--model", "output/run", "--tools",
                     str(plugin), "--max-new-tokens", "8", "--output", "eval.jsonl"], demo, env))
    summary = json.loads(scored.stdout.strip().splitlines()[-1])
    assert {"tool_call_rate", "tool_args_exact", "stopped_share"} <= set(summary) and "answer_types_correct" not in summary
    assert len((demo / "eval.jsonl").read_text(encoding="utf-8").splitlines()) == 9  # one line per user turn
    ok(run([sys.executable, "scripts/export.py", "--model", "output/run", "--output", "exported"], demo, env))
    assert (demo / "exported" / "config.json").is_file() and (demo / "exported" / "tokenizer.model").is_file()
