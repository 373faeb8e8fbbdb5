"""Hostile calls against `centra serve`, door by door: how long each takes to be refused, what it adds to
the server's resident memory and whether that memory comes back; and a valid client's latency alone and
beside a few hostile calls a second.

    python -m centra.measure.hostile MODEL [--seconds 20] [--rate 4]

Each hostile call is the largest of its kind under the door's byte cap: REST a body of ~700,000 empty
inputs; OIP JSON ~700,000 empty strings; OIP gRPC ~1,000,000 empty bytes_contents elements; centra.v1 the
same count of empty inputs. The server runs in a child process on loopback (its RSS from /proc).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

SETTLE_S = 5.0  # memory is read again this long after a refusal


def hostile_calls(grpc_target: str, http_target: str):
    """(door, callable that sends one hostile call and returns its status) for each door."""
    import http.client

    import grpc

    from centra.serve.inference import open_inference_grpc_pb2 as ip
    from centra.serve.inference import open_inference_grpc_pb2_grpc as ip_grpc

    host, port = http_target.split(":")

    def post(path: str, body: bytes) -> str:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        status = conn.getresponse().status
        conn.close()
        return str(status)

    channel = grpc.insecure_channel(grpc_target, options=[("grpc.max_send_message_length", 64 << 20)])
    raw = channel.unary_unary("/centra.v1.Classifier/Classify")
    infer = ip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
    tensor = ip.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1_000_000, 1])
    tensor.contents.bytes_contents.extend([b""] * 1_000_000)
    oip_request = ip.ModelInferRequest(model_name="centra", inputs=[tensor])

    def grpc_call(method, request) -> str:
        try:
            method(request, timeout=60)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    rest_body = b'{"inputs": [' + b",".join([b"{}"] * 700_000) + b"]}"
    oip_body = (b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [700000, 1], "data": ['
                + b",".join([b'""'] * 700_000) + b"]}]}")
    return channel, [("REST", lambda: post("/v1/classify", rest_body)),
                     ("OIP HTTP", lambda: post("/v2/models/centra/infer", oip_body)),
                     ("OIP gRPC", lambda: grpc_call(infer, oip_request)),
                     ("centra.v1", lambda: grpc_call(raw, b"\n\x00" * 1_000_000))]


def valid_latencies(grpc_target: str, seconds: float) -> list[float]:
    import grpc

    from centra.serve.v1 import centra_pb2 as pb
    from centra.serve.v1 import centra_pb2_grpc

    out = []
    with grpc.insecure_channel(grpc_target) as channel:
        stub = centra_pb2_grpc.ClassifierStub(channel)
        request = pb.ClassifyRequest(inputs=[pb.Input(text="where is my parcel?")])
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            stub.Classify(request, timeout=30)
            out.append(time.perf_counter() - start)
    return out


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] * 1000 if len(values) > 2 else float("nan")


def measure(model: Path, seconds: float, rate: float) -> dict:
    from centra.measure.memory import process_memory
    from centra.measure.soak_control import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(["--model", str(model), "--no-metrics"], Path(tmp) / "server.log")
        grpc_target = server.start(300)
        try:
            channel, calls = hostile_calls(grpc_target, server.http_target)
            valid_latencies(grpc_target, 2)  # warm-up
            doors = {}
            for door, send in calls:
                before = process_memory(server.pid)[0]
                start = time.perf_counter()
                status = send()
                took = time.perf_counter() - start
                after = process_memory(server.pid)[0]
                time.sleep(SETTLE_S)
                settled = process_memory(server.pid)[0]
                doors[door] = {"status": status, "ms": round(took * 1000, 1), "rss_mb_after": round(after - before, 1),
                               f"rss_mb_{SETTLE_S:g}s_later": round(settled - before, 1)}
            alone = valid_latencies(grpc_target, seconds)
            stop = threading.Event()

            def hostile_loop() -> None:
                while not stop.is_set():
                    for _, send in calls:
                        if stop.is_set():
                            return
                        send()
                        time.sleep(1 / rate)

            thread = threading.Thread(target=hostile_loop, daemon=True)
            thread.start()
            beside = valid_latencies(grpc_target, seconds)
            stop.set()
            thread.join(120)
            channel.close()
            log = server.log()
            return {"doors": doors, "valid_p99_ms_alone": round(p99(alone), 2),
                    "valid_p99_ms_beside_hostile": round(p99(beside), 2), "hostile_per_s": rate,
                    "tracebacks_in_log": log.count("Traceback")}
        finally:
            server.stop(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=4.0, help="hostile calls per second beside the valid client")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.model, args.seconds, args.rate)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
