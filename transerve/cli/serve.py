"""`transerve serve`: the actors and the Quart app on hypercorn, in one task group."""

from __future__ import annotations

import argparse
import json
import logging
import signal

import anyio

from transerve.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from transerve.engine.models import DEFAULT_MODEL, ModelNotFoundError, bundled_gguf_path

log = logging.getLogger("transerve")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.model and args.force_model and args.model != args.force_model:
        raise ValueError(f"MODEL ({args.model}) and --force-model ({args.force_model}) disagree; give one")
    if args.tensor_parallel_size > 1 and not (args.model or args.force_model):
        raise ValueError("--tensor-parallel-size needs MODEL: the ranks serve one model, loaded at start")
    return ServerConfig(
        host=args.host,
        port=args.port,
        model=args.force_model or args.model,
        preload=() if args.force_model or args.model or args.no_preload or bundled_gguf_path() is None else (DEFAULT_MODEL,),
        log_level=args.log_level,
        model_timeout_s=args.model_timeout if args.model_timeout > 0 else None,
        api_key=args.api_key,
        allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
        max_request_bytes=args.max_request_bytes,
        shutdown_timeout_s=args.shutdown_timeout,
        playground=not args.no_playground,
        engine=EngineConfig(
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
            enforce_eager=args.enforce_eager,
            tensor_parallel_size=args.tensor_parallel_size,
            quantization=args.quantization,
            cache=CacheConfig(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                              memory_fraction=args.memory_fraction, enable_prefix_caching=not args.no_prefix_caching,
                              kv_cache_dtype=args.kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                      max_model_len=args.max_model_len, max_queued_requests=args.max_queued_requests,
                                      async_scheduling=args.async_scheduling),
            override_generation_config=_json_object("--override-generation-config", args.override_generation_config),
        ),
    )


def _json_object(flag: str, text: str | None) -> tuple[tuple[str, object], ...]:
    try:
        value = json.loads(text) if text else {}
    except ValueError as exc:
        raise ValueError(f"{flag} is not valid JSON ({exc}); give an object like '{{\"temperature\": 0.7}}'") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object like '{{\"temperature\": 0.7}}', got {text}")
    return tuple(value.items())


async def serve(config: ServerConfig, ready: anyio.Event | None = None) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config as HypercornConfig

    from transerve.actors.registry import Models
    from transerve.http.app import create_app

    stop = anyio.Event()
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(_stop_on_signals, stop, config.shutdown_timeout_s)
        models = Models(config.engine, task_group, config.mailbox_size, forced=config.model, allow_download=True,
                        model_timeout=config.model_timeout_s)
        for spec in (config.model, *config.preload):
            if spec:
                await models.get(spec, task=None)  # any kind: a text, Whisper or embedding model
        hypercorn_config = HypercornConfig()
        hypercorn_config.bind = [f"{config.host}:{config.port}"]
        hypercorn_config.accesslog = logging.getLogger("transerve.access") if config.log_level == "debug" else None
        # On SIGTERM hypercorn stops accepting at once and gives in-flight requests this long.
        hypercorn_config.graceful_timeout = config.shutdown_timeout_s
        log.info("serving %s on http://%s:%d/v1", config.model or "models on demand", config.host, config.port)
        if ready is not None:
            ready.set()
        await hypercorn_serve(create_app(models, config), hypercorn_config, shutdown_trigger=stop.wait)
        # HTTP is drained; closing the engines' mailboxes lets every actor finish and return.
        stop.set()
        await models.aclose()
        task_group.cancel_scope.deadline = anyio.current_time() + ACTOR_SHUTDOWN_TIMEOUT_S


ACTOR_SHUTDOWN_TIMEOUT_S = 10.0


async def _stop_on_signals(stop: anyio.Event, shutdown_timeout_s: float) -> None:
    async with anyio.create_task_group() as task_group:
        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s: no new connections; in-flight requests have %.0f s to finish (signal "
                             "again to stop now)", signal.Signals(signum).name, shutdown_timeout_s)
                    stop.set()
                    return

        task_group.start_soon(watch)
        await stop.wait()
        task_group.cancel_scope.cancel()


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        anyio.run(serve, config)
    except (ValueError, ModelNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    except BaseExceptionGroup as group:  # raised inside the task group: a model that cannot load
        from transerve.parallel.steps import TensorParallelError

        rank_failed, group = group.split(TensorParallelError)
        if rank_failed is not None:  # already logged, with the rank
            return 1
        user_errors, other = group.split((ValueError, ModelNotFoundError))
        if other is not None or user_errors is None:
            raise
        for exc in _leaves(user_errors):
            log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        yield from _leaves(exc) if isinstance(exc, BaseExceptionGroup) else (exc,)
