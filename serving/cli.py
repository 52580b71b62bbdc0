"""`loraplex prepare`, `loraplex chat`, `loraplex serve`."""

from __future__ import annotations

import os
import signal
import time

from loraplex.cli import CLIError

DEFAULT_CONFIG = "configs/serve.yaml"


def register(sub) -> None:
    p = sub.add_parser("prepare", help="convert the default model into the data directory (once)")
    p.add_argument("--force", action="store_true", help="convert again even if already converted")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("chat", help="chat with a model in the terminal (runs the engine in this process)")
    p.add_argument("--model", default=None, help="model name, HF id or folder (default: the default model)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--kv-cache-memory", default="256MiB")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible API on Ray Serve")
    p.add_argument("--config", default=None,
                   help=f"serve config YAML (default: {DEFAULT_CONFIG} if present, else built-in defaults)")
    p.add_argument("--host", default=None, help="bind address (overrides server.host)")
    p.add_argument("--port", type=int, default=None, help="port (overrides server.port)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address to join (default: $RAY_ADDRESS, else a local Ray instance)")
    p.set_defaults(func=cmd_serve)


def cmd_prepare(args) -> int:
    from serving.models import ModelNotFoundError, embedding_model_path, prepare_default_model

    try:
        path = prepare_default_model(force=args.force)
        emb = embedding_model_path()
    except ModelNotFoundError as exc:
        raise CLIError(str(exc)) from None
    import torch

    import kernels

    print(f"default model: {path}")
    print(f"embedding model: {emb}")
    from serving.engine.linear import cpu_path

    print(f"CPU kernels: {kernels.prepare(torch.device('cpu'), torch.float32)}")
    for label, dtype, quant in (("float32", torch.float32, None), ("bfloat16", torch.bfloat16, None),
                                ("int8", torch.bfloat16, "int8"), ("int4", torch.bfloat16, "int4")):
        print(f"CPU weights, {label}: {cpu_path(dtype, quant)}")
    return 0


def load_serve_config(path: str | None, host: str | None = None, port: int | None = None):
    from serving.config import ConfigError, load_config

    if path is None and os.path.isfile(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    if host is not None:
        cfg.server.host = host
    if port is not None:
        if not 0 <= port <= 65535:
            raise CLIError(f"--port must be 0..65535, got {port}")
        cfg.server.port = port
    return cfg


def cmd_serve(args) -> int:
    cfg = load_serve_config(args.config, args.host, args.port)
    import ray
    from ray import serve

    from serving.app import APP_NAME, build_app

    address = args.address or os.environ.get("RAY_ADDRESS") or None
    local = address is None
    proxy_port = _direct_ingress(cfg, local)
    if local:
        _one_loop_per_replica()
    print(f"loraplex: starting Ray {'(local)' if local else 'at ' + address} ...", flush=True)
    if local:
        # address="local": always a fresh instance, never someone else's cluster on this machine.
        ray.init(address="local", include_dashboard=False, configure_logging=True, logging_level="warning")
    else:
        ray.init(address=address)
    # Ctrl-C and SIGTERM both end in the `finally` below; SIGINT is set explicitly because a shell starts
    # background jobs with it ignored, and Python keeps an ignored SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        http = {"host": cfg.server.host, "port": proxy_port or cfg.server.port}
        if cfg.server.request_timeout_s:
            http["request_timeout_s"] = cfg.server.request_timeout_s
        serve.start(http_options=http, proxy_location=cfg.server.proxy_location)
        print(f"loraplex: deploying {', '.join(m.name for m in cfg.models)} ...", flush=True)
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{cfg.server.host}:{cfg.server.port}"
        print(f"loraplex: serving {url}/v1, the portal at {url}/ui (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("loraplex: shutting down", flush=True)
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)  # leave the cluster's Serve instance to its owner
        finally:
            ray.shutdown()
    return 0


# Serve runs a replica's user code on an event loop of its own in a second thread, and a handle's router on a
# third, so a blocked user loop cannot stall the replica's control calls. Ours keeps long work off its loop
# (engines run in threads of their own; tokenising, files and stores go to to_thread), and each streamed chunk
# crossing those threads cost GIL handoffs:
# int8 on the 2-core VM, one loop each, tok/s x32 +5-7% and the first token 17 -> 13 ms (direct ingress), 40 -> 37
# (split). What Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED sets; the local Ray instance only, a value already set wins.
ONE_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def _one_loop_per_replica() -> None:
    for key, value in ONE_LOOP_ENV.items():
        os.environ.setdefault(key, value)


def _direct_ingress(cfg, local: bool) -> int | None:
    """With server.direct_ingress, Ray Serve's direct ingress: the gateway replica binds server.port itself (the
    controller hands out ports from a one-port range) and Serve's proxy, which still starts, moves to a free port
    of its own. Released ports and drains wait for a load balancer that is not there: both off. Returns the
    proxy's port, or None without direct ingress."""
    if not cfg.server.direct_ingress:
        return None
    if not local:
        raise CLIError("server.direct_ingress needs the local Ray instance that `loraplex serve` starts (on a "
                       "cluster, Serve reads RAY_SERVE_ENABLE_DIRECT_INGRESS on every node): leave out --address "
                       "and RAY_ADDRESS, or the key")
    if cfg.server.port == 0:
        raise CLIError("server.direct_ingress needs a fixed port, not 0")
    import socket

    from serving.router.sim import free_port

    port = cfg.server.port
    with socket.socket() as probe:  # the replica would retry a taken port without end; say it now
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Serve binds it
        try:
            probe.bind((cfg.server.host, port))
        except OSError as exc:
            raise CLIError(f"server.port: {cfg.server.host}:{port} is in use ({exc.strerror})") from None
    os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
                       "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1), "RAY_SERVE_PORT_QUARANTINE_S": "0",
                       "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"})
    return free_port()


def cmd_chat(args) -> int:
    import asyncio

    from rich.console import Console
    from rich.prompt import Prompt

    from serving.engine import EngineConfig, SamplingParams
    from serving.engine.async_engine import AsyncEngine
    from serving.engine.errors import EngineError
    from serving.models import DEFAULT_MODEL, ModelNotFoundError

    console = Console()
    model = args.model or DEFAULT_MODEL
    with console.status(f"loading {model} ..."):
        try:
            engine = AsyncEngine(EngineConfig(model=model, kv_cache_memory=args.kv_cache_memory))
        except (ModelNotFoundError, EngineError) as exc:
            raise CLIError(str(exc)) from None
    console.print(f"[bold]{engine.name}[/] — /reset clears the conversation, /exit quits")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []

    async def reply(messages) -> str:
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        room = engine.max_model_len - len(ids)
        if room <= 0:
            raise CLIError("the conversation no longer fits the context; /reset it")
        params = SamplingParams(max_tokens=min(args.max_tokens, room), temperature=args.temperature,
                                top_p=args.top_p).validate()
        parts = []
        async for out in engine.generate(ids, params):
            for c in out.outputs:
                parts.append(c.text)
                console.print(c.text, end="", soft_wrap=True, highlight=False, markup=False)
        console.print()
        return "".join(parts)

    try:
        while True:
            try:
                user = Prompt.ask("[bold cyan]you[/]")
            except EOFError:
                break
            if user.strip() in ("/exit", "/quit"):
                break
            if user.strip() == "/reset":
                history.clear()
                console.print("[dim]conversation cleared[/]")
                continue
            if not user.strip():
                continue
            history.append({"role": "user", "content": user})
            console.print("[bold green]assistant[/] ", end="")
            try:
                answer = asyncio.run(reply(system + history))
            except CLIError as exc:
                console.print(f"[red]{exc}[/]")
                history.pop()
                continue
            history.append({"role": "assistant", "content": answer})
    finally:
        engine.shutdown()
    return 0

