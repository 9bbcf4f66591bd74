#!/usr/bin/env python
"""OpenAI 兼容的 ChatGLM3 服务 / An OpenAI-compatible server for ChatGLM3, base or fine-tuned.

  python api_server.py --model THUDM/chatglm3-6b [--pt-checkpoint DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

The model flags are every script's (chatglm3/cli.py: a base model, a full fine-tuning checkpoint, or a base with a
P-Tuning v2 checkpoint), loaded through the project's one loading path. Serves `GET /v1/models`,
`POST /v1/chat/completions` (streaming, tools) and a chat page at `/`. Requests that arrive together are decoded
together (--max-batch); at most --max-queue wait, more are answered 503. Tool calls are returned to the client,
never executed. The address is bound before the model loads, so a port in use is reported at once.
"""
import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from chatglm3 import ChatGLMError, limits

from chatglm3.cli import add_model_args, load_from_args

PAGE = Path(__file__).resolve().parent / "static" / "chat.html"


def ipaddress_is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def allowed_hosts(args: argparse.Namespace):
    """The Host headers to accept: --allowed-hosts ('*': any); by default any with a key, and without one the
    local names and --host (unless it is a wildcard such as 0.0.0.0)."""
    from chatglm3.serving.openai_api import LOCAL_HOSTS

    if args.allowed_hosts is not None:
        names = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
        return None if "*" in names else names
    if args.api_key is not None:
        return None
    try:
        wildcard = ipaddress.ip_address(args.host).is_unspecified
    except ValueError:
        wildcard = False
    return list(LOCAL_HOSTS) + ([] if wildcard else [args.host])


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port as uvicorn binds one (IPv6 when the host has a colon), not yet listening:
    connections are refused until the server starts."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        if os.name != "nt":  # as uvicorn does; on Windows the option would let two servers share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:  # a name that does not resolve, an address not on this machine, a port in use or reserved
        sock.close()
        reason = e.strerror or str(e)
        raise ChatGLMError(f"错误：无法监听 {host}:{port}（{reason}）；检查 --host，端口被占用时换一个 --port / Error: "
                           f"cannot listen on {host}:{port} ({reason}); check --host, or choose another --port if "
                           "this one is in use") from None
    return sock


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    server = parser.add_argument_group("服务 / server")
    server.add_argument("--host", default="127.0.0.1",
                        help="监听地址，默认仅本机 / address to listen on (default: 127.0.0.1, this machine only)")
    server.add_argument("--port", type=limits.PORT.argument_type(), default=8000, help="端口 / port (default: 8000)")
    server.add_argument("--api-key", default=os.environ.get("API_KEY"),
                        help="要求 Authorization: Bearer KEY（默认读取环境变量 API_KEY；须是非空的可见 ASCII 字符）/ "
                             "require this bearer key (default: $API_KEY; visible ASCII, not empty; none: no key "
                             "needed)")
    server.add_argument("--allowed-hosts", default=None, metavar="HOST[,HOST...]",
                        help="接受的 Host 请求头，逗号分隔，* 为任意；默认：有 key 时任意，没有 key 时只接受 localhost、"
                             "127.0.0.1、[::1] 和 --host（防止 DNS 重绑定）/ Host headers to accept, comma-separated, "
                             "* for any (default: any with a key; without one localhost, 127.0.0.1, [::1] and --host, "
                             "against DNS rebinding)")
    server.add_argument("--served-model-name", default=None,
                        help="客户端使用的模型名，默认为 --model 的目录名 / the model name clients use "
                             "(default: the last part of --model)")
    bounds = parser.add_argument_group("限制 / limits")
    bounds.add_argument("--max-batch", type=limits.AT_LEAST_1.argument_type(), default=8,
                        help="同时解码的请求数 / requests decoded together (default: 8)")
    bounds.add_argument("--max-queue", type=limits.AT_LEAST_1.argument_type(), default=16,
                        help="排队请求数上限，超出返回 503 / requests waiting at most; more get 503 (default: 16)")
    bounds.add_argument("--max-tokens", type=limits.AT_LEAST_1.argument_type(), default=2048,
                        help="单个请求最多生成的 token 数 / most new tokens one request may ask for (default: 2048)")
    bounds.add_argument("--max-messages", type=limits.AT_LEAST_1.argument_type(), default=128,
                        help="单个请求的消息数上限 / most messages in one request (default: 128)")
    bounds.add_argument("--max-request-bytes", type=limits.AT_LEAST_1.argument_type(), default=1 << 20,
                        help="请求体字节数上限 / largest request body in bytes (default: 1048576)")
    bounds.add_argument("--body-timeout", type=limits.TIMEOUT_SECONDS.argument_type(), default=30.0,
                        help="请求体须在这么多秒内传完，否则 408 / seconds a request body may take to arrive; "
                             "408 beyond (default: 30)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import uvicorn

    from chatglm3.model.conversation import stop_token_ids
    from chatglm3.serving.openai_api import Limits, api_key_problem, create_app
    from chatglm3.serving.engine import Engine

    problem = api_key_problem(args.api_key)
    if problem:
        print(f"错误：--api-key（或环境变量 API_KEY）{problem[0]}；不需要 key 时不要设置它 / Error: --api-key "
              f"(or $API_KEY) {problem[1]}; leave it unset for no key", file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
        model, tokenizer = load_from_args(args)
    except ChatGLMError as e:
        print(e, file=sys.stderr)
        return 2
    engine = Engine(model, stop_token_ids(tokenizer), max_batch=args.max_batch, max_queue=args.max_queue)
    name = args.served_model_name or Path(args.model).resolve().name  # (`--model .` names the folder, not "")
    request_limits = Limits(max_request_bytes=args.max_request_bytes, max_messages=args.max_messages,
                            max_tokens=args.max_tokens, body_timeout_s=args.body_timeout)
    hosts = allowed_hosts(args)
    app = create_app(engine, tokenizer, name, model.config.seq_length, request_limits, api_key=args.api_key, page=PAGE,
                     allowed_hosts=hosts)
    if args.api_key is None and not ipaddress_is_loopback(args.host):
        print(f"警告：{args.host} 对外可见却没有 --api-key；只接受 Host 为 {', '.join(hosts or ['*'])} 的请求（--allowed-hosts "
              f"可添加）/ warning: {args.host} is reachable from other machines and no --api-key is set; requests are "
              f"accepted for Host {', '.join(hosts or ['*'])} only (add more with --allowed-hosts)", file=sys.stderr)
    print(f"服务地址 / serving {name!r} at http://{args.host}:{args.port}/ (API: /v1)", file=sys.stderr)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
