"""OpenAI-compatible serving with continuous batching (``omni-jax serve``).

    from omni_jax.serve import Engine, ServeLimits, build_app
    engine = Engine(omni_jax.load(path), ServeLimits(max_batch=8)).start()
    app = build_app(engine, model_name="qwen2.5-omni", api_key="secret")   # any ASGI server

Modules: :mod:`.batch` (the fixed-shape slot batches on device), :mod:`.scheduler` (the engine
thread, queue, limits and metrics), :mod:`.openai_format` (request parsing, media decoding,
response building), :mod:`.app` (the Starlette app).
"""

from __future__ import annotations

from .scheduler import Engine, GenParams, Metrics, QueueFull, ServeLimits, ServeRequest

__all__ = ["Engine", "GenParams", "Metrics", "QueueFull", "ServeLimits", "ServeRequest", "build_app", "listen_socket",
           "serve"]


def build_app(*args, **kwargs):
    from .app import build_app as _build

    return _build(*args, **kwargs)


def listen_socket(host: str, port: int):
    """A TCP socket bound to ``host:port`` (the CLI binds before loading a model, so a port in use
    or an unknown address is reported in a second, not after minutes of loading). Raises
    :class:`~omni_jax.errors.InputError` naming the address and the reason."""
    import socket

    from ..errors import InputError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"cannot listen on {host}:{port}: unknown address ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str = "omni-jax", limits: ServeLimits | None = None, allow_local_media: bool = False,
          log_level: str = "info", sock=None):
    """Run the server until interrupted (uvicorn on ``host:port``, or on the bound socket ``sock``
    from :func:`listen_socket`, which it then owns and closes)."""
    import socket
    import sys

    import uvicorn

    sock = sock if sock is not None else listen_socket(host, port)
    try:
        engine = Engine(model, limits).start()
        try:
            app = build_app(engine, model_name=model_name, api_key=api_key, allow_local_media=allow_local_media)
            config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                                    ws_max_size=engine.limits.max_body_bytes)  # a larger realtime event: closed (1009)
            bound = sock.getsockname()
            shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
            print(f"omni-jax serve: http://{shown}:{bound[1]} (Ctrl+C stops)", file=sys.stderr, flush=True)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            engine.stop()
    finally:
        sock.close()
