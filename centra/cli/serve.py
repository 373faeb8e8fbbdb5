"""Commands over the gRPC server: serve a merged model, classify texts with a running server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from centra.cli import flags_named
from centra.errors import CentraError

DEFAULT_HTTP_PORT = 8000


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        # Until the server's own handlers are installed (imports and checks take seconds), a SIGHUP ("check
        # for a new model") must not take its default action, which ends the process.
        signal.signal(signal.SIGHUP, lambda signum, frame: None)
    from centra.serve.memory import fix_mmap_threshold

    fix_mmap_threshold()  # first, before the model and torch allocate (serve/memory.py)
    import asyncio
    import logging

    from centra.serve.app import AppOptions, serve_model
    from centra.serve.server import ServeOptions
    from centra.serve.shadow import ALL, ShadowOptions
    from centra.serve.status import host_port

    options = ServeOptions(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                           max_queue=args.max_queue, max_inputs_per_call=args.max_inputs_per_call,
                           max_call_bytes=args.max_call_bytes, max_concurrent_rpcs=args.max_concurrent_rpcs,
                           drain_s=args.drain_s, grace_s=args.grace_s,
                           http_port=None if args.no_http else http_port(args),
                           cors_origins=tuple(args.cors_origin or ()))
    app = AppOptions(metrics_host=args.host, metrics_port=None if args.no_metrics else args.metrics_port,
                     watch=not args.no_watch, tls_cert=_path(args.tls_cert), tls_key=_path(args.tls_key),
                     token_file=_path(args.token_file), engine=args.engine,
                     shadow=ShadowOptions(canary=canary_args(args.canary), sample_file=_path(args.shadow_sample),
                                          sample_size=args.shadow_sample_size))
    with flags_named():  # before the model is loaded
        options.check()
        app.check()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    def ready(server, metrics_port) -> None:
        print(f"serving {len(server.engine.specs)} tasks of {args.model} version {server.engine.version} "
              f"({server.engine.runtime}) on {host_port(options.host, server.port)}", flush=True)
        if server.http is not None:
            scheme = "https" if args.tls_cert else "http"
            print(f"  REST and Open Inference Protocol at {scheme}://{host_port(options.host, server.http.port)} "
                  "(/v1/classify, /v2/models/centra/infer, /openapi.json)", flush=True)
        extras = [f"metrics at http://{host_port(args.host, metrics_port)}/metrics" if metrics_port is not None else
                  "no metrics", "follows new versions (SIGHUP: check now)" if not args.no_watch else "no reload",
                  "TLS" if args.tls_cert else "plaintext", "token required" if args.token_file else "no token",
                  f"CORS for {', '.join(options.cors_origins)}" if options.cors_origins else "no CORS"]
        print(f"  {'; '.join(extras)}", flush=True)
        shadowed = server.engine.candidates
        for task in sorted(t for t in app.shadow.canary if t != ALL and t not in shadowed):
            print(f"  warning: --canary {task}=...: {task} has no candidate head in version {server.engine.version} "
                  "(no canary until a version gives it one)", flush=True)

    asyncio.run(serve_model(Path(args.model), options, app, ready=ready))
    return 0


def http_port(args: argparse.Namespace) -> int:
    """--http-port; by default 8000, or any free port when --port is 0 (two servers started with --port 0
    must not both try 8000)."""
    if args.http_port is not None:
        return args.http_port
    return 0 if args.port == 0 else DEFAULT_HTTP_PORT


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def canary_args(values: list[str] | None) -> dict[str, float]:
    """--canary FRACTION (every task with a candidate head) or TASK=FRACTION, repeatable."""
    from centra.serve.shadow import ALL

    found: dict[str, float] = {}
    for value in values or ():
        task, sep, share = value.rpartition("=")
        try:
            fraction = float(share)
        except ValueError:
            raise CentraError(f"serve: --canary expects FRACTION or TASK=FRACTION, not {value!r}") from None
        if sep and not task:
            raise CentraError(f"serve: --canary expects FRACTION or TASK=FRACTION, not {value!r}")
        found[task or ALL] = fraction
    return found


def cmd_classify(args: argparse.Namespace) -> int:
    from centra.cli.models import read_inputs
    from centra.client import Client

    if not args.timeout > 0:
        raise CentraError(f"classify: --timeout must be > 0 seconds, not {args.timeout}")
    texts, pairs = read_inputs(args)  # one --pair applies to every text, as in predict
    credentials, metadata = None, ()
    if args.tls_ca:
        from centra.serve.security import channel_credentials

        credentials = channel_credentials(Path(args.tls_ca))
    if args.token_file:
        from centra.serve.security import read_token

        metadata = (("authorization", f"Bearer {read_token(Path(args.token_file))}"),)
    with Client(args.server, timeout=args.timeout, credentials=credentials, metadata=metadata) as client:
        answers = client.classify(texts, args.task, pairs, head=args.head, request_id=args.request_id)
    for answer in answers:  # the dicts of Engine.predict: the lines of `centra predict`, exactly
        print(json.dumps(answer, ensure_ascii=False))
    return 0


def port_number(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535 (0: any free port), got {number}")
    return number


def add_parsers(sub, common) -> None:
    from centra.cli import non_negative_float, positive_int
    from centra.cli.models import add_engine_arg, add_input_args

    p = sub.add_parser("serve", parents=[common], help="serve a merged model over gRPC (Ctrl-C or SIGTERM stops)")
    p.add_argument("--model", required=True, help="merged model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=port_number, default=50051, help="default 50051; 0: any free port")
    p.add_argument("--max-batch", type=positive_int, default=32, help="rows per engine run (default 32)")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=0.0,
                   help="calls queued behind a running batch form the next batch when it ends; this lets them wait "
                   "at most so long past its end for more calls (default 0). A call that finds the engine idle "
                   "always runs at once")
    p.add_argument("--max-queue", type=positive_int, default=1024,
                   help="queued rows beyond which calls are refused with RESOURCE_EXHAUSTED (default 1024)")
    p.add_argument("--max-inputs-per-call", type=positive_int, default=256)
    p.add_argument("--max-call-bytes", type=positive_int, default=1 << 20,
                   help="UTF-8 bytes of texts, pairs, ids and task names in one call (default 1 MiB)")
    p.add_argument("--max-concurrent-rpcs", type=positive_int, default=128,
                   help="calls in progress at once; more get RESOURCE_EXHAUSTED from gRPC (default 128)")
    p.add_argument("--metrics-port", type=port_number, default=9400,
                   help="Prometheus /metrics on --host at this port, plain HTTP with no token (default 9400; 0: any "
                   "free port)")
    p.add_argument("--no-metrics", action="store_true", help="no metrics endpoint")
    p.add_argument("--http-port", type=port_number,
                   help="REST JSON (/v1/classify) and the Open Inference Protocol (/v2/...) over HTTP on --host at "
                   "this port, with the same token, TLS and limits as gRPC (default 8000, or any free port when "
                   "--port is 0; 0: any free port)")
    p.add_argument("--no-http", action="store_true", help="no HTTP server (gRPC only)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let browser scripts from this origin (scheme://host[:port], e.g. https://app.example.com) "
                   "call the HTTP port: CORS preflights answered and Access-Control-Allow-Origin sent for it alone; "
                   "repeat for more origins (default: none, CORS off)")
    p.add_argument("--drain-s", type=non_negative_float, default=1.0,
                   help="on SIGTERM, health says NOT_SERVING this long before the port closes (default 1)")
    p.add_argument("--grace-s", type=non_negative_float, default=5.0,
                   help="then in-flight calls get this long to finish (default 5)")
    p.add_argument("--no-watch", action="store_true",
                   help="do not follow the published `current` pointer (default: reload new versions; SIGHUP "
                   "checks at once)")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve over TLS (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--token-file", help="file holding a bearer token every call must carry (never logged)")
    p.add_argument("--canary", action="append", metavar="[TASK=]FRACTION",
                   help="tasks with a candidate head: this share of request ids (a hash: one id, one head) is "
                   "answered by the candidate; FRACTION alone for every such task (default 0: shadow only)")
    p.add_argument("--shadow-sample", metavar="FILE",
                   help="keep disagreeing inputs of shadowed tasks in FILE (JSON lines, owner-readable, texts cut "
                   "to 200 characters; default: none kept, texts never logged)")
    p.add_argument("--shadow-sample-size", type=positive_int, default=100,
                   help="at most this many lines in --shadow-sample (default 100)")
    add_engine_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("classify", parents=[common],
                       help="classify texts with a running server, the JSON lines of `centra predict`")
    p.add_argument("--server", required=True, help="HOST:PORT of a `centra serve`")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer (default 10)")
    p.add_argument("--tls-ca", help="PEM root certificate to verify a TLS server (turns TLS on)")
    p.add_argument("--token-file", help="file holding the server's bearer token")
    p.add_argument("--head", choices=("active", "candidate"), help="tasks with a candidate head: the head that "
                   "answers (default: the server's choice)")
    p.add_argument("--request-id", help="what the server's canary fraction is drawn by (keep one per caller)")
    add_input_args(p)
    p.set_defaults(func=cmd_classify)
