"""``edgekv serve ARTIFACTS``: an OpenAI-compatible HTTP server on the device runtime."""

from __future__ import annotations

import signal

import typer

from edgekv.cli import command, field_option
from edgekv.runtime.runtime import RuntimeConfig
from edgekv.runtime.server import ServeConfig


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (a service manager, ``docker stop``) end ``serve_forever`` cleanly, also
    when the parent started the server with SIGINT ignored (a background job, a test runner's
    worker: Python then installs no KeyboardInterrupt handler of its own)."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


@command("serve")
def serve_cmd(
    artifacts: str = typer.Argument(..., help="Folder written by `edgekv export`."),
    memory: str = typer.Option(None, "--memory", help="Memory file (.ekv) to retrieve from."),
    host: str = field_option(ServeConfig, "host", "--host"),
    port: int = field_option(ServeConfig, "port", "--port"),
    model_name: str = field_option(ServeConfig, "model_name", "--model-name"),
    max_tokens_limit: int = field_option(ServeConfig, "max_tokens_limit", "--max-tokens-limit"),
    default_max_tokens: int = field_option(ServeConfig, "default_max_tokens", "--default-max-tokens"),
    max_concurrent: int = field_option(ServeConfig, "max_concurrent", "--max-concurrent"),
    k: int = field_option(RuntimeConfig, "k", "-k", "--entries"),
    threads: int = field_option(RuntimeConfig, "threads", "--threads", "-t"),
    retrieval: str = field_option(RuntimeConfig, "retrieval", "--retrieval"),
    trust: str = typer.Option(None, "--trust", envvar="EDGEKV_TRUST",
                              help="Public key file (.pub of `edgekv keys generate`): refuse artifacts and a memory "
                                   "that this key did not sign."),
) -> None:
    """Serve /v1/chat/completions, /v1/completions and /v1/models (OpenAI API) until Ctrl-C or SIGTERM."""
    from edgekv.runtime import Runtime
    from edgekv.runtime.server import make_server

    cfg = ServeConfig(host=host, port=port, model_name=model_name, max_tokens_limit=max_tokens_limit,
                      default_max_tokens=default_max_tokens, max_concurrent=max_concurrent)
    with Runtime.load(artifacts, memory=memory, k=k, threads=threads, retrieval=retrieval, trust=trust) as rt:
        server = make_server(rt, cfg)
        h, p = server.server_address[:2]
        what = f"memory {memory} (k = {rt.config.k})" if memory else "no memory"
        typer.echo(f"edgekv: serving {artifacts} with {what} on http://{h}:{p}/v1 (Ctrl-C stops)", err=True)
        _stop_on_signals()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
