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

__all__ = ["Engine", "GenParams", "Metrics", "QueueFull", "ServeLimits", "ServeRequest", "build_app", "serve"]


def build_app(*args, **kwargs):
    from .app import build_app as _build

    return _build(*args, **kwargs)


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str = "omni-jax", limits: ServeLimits | None = None, allow_local_media: bool = False,
          log_level: str = "info"):
    """Run the server until interrupted (uvicorn on ``host:port``)."""
    import uvicorn

    engine = Engine(model, limits).start()
    try:
        app = build_app(engine, model_name=model_name, api_key=api_key, allow_local_media=allow_local_media)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.stop()
