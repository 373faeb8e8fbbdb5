"""The clients of `centra bench-server`, in a process of their own: `python -m centra.measure.bench_clients`.

A server does not share its process with its callers. Client threads in the server's process would
compete with its event loop and engine worker for one interpreter lock, a cost no deployment pays (it
took 5-7 points off the server/in-process ratio at 16 clients on 2 cores); they still share the
machine's cores here, so the figures stay a lower bound for a server on a machine of its own.

Protocol, one JSON object per line: the parent writes the job (target, concurrency, calls, timeout); this
process, its imports done, writes {"ready": true}; the parent writes the window ({"start": t0, "end": t1},
wall-clock seconds, t0 a warm-up away); the clients open one channel each, build their requests and call
Classify back to back until t1 (the calls before t0 are the warm-up), and this process writes the result:
calls answered within the window, errors, the first error, and the latency of every call started within
it. With "flood_senders": N, N more threads each send one ClassifyRequest of "flood_inputs" empty inputs
at the start of every second of the window (N at once), and the result adds each one's time and code.
The job's "protocol" picks the door: "grpc" (centra.v1 Classify, the raw stub), "rest" (POST /v1/classify,
one keep-alive HTTP connection per client, http.client), "oip-grpc" (the Open Inference Protocol's
ModelInfer with TEXT, TEXT_PAIR and TASKS, the raw stub: against `centra serve` or a Triton server).
Imports grpc and the generated messages only.
"""

from __future__ import annotations

import json
import sys
import threading
import time


def run(job: dict, window: dict, huge: bytes = b"") -> dict:
    import grpc

    from centra.serve.v1 import centra_pb2 as pb
    from centra.serve.v1 import centra_pb2_grpc

    calls = job["calls"]
    concurrency = job["concurrency"]
    lock = threading.Lock()
    result = {"calls": 0, "errors": 0, "first_error": "", "latencies": []}
    clients = []
    protocol = job.get("protocol", "grpc")
    for index in range(concurrency):
        first = index * len(calls) // concurrency  # the clients start at different calls
        mine = calls[first:] + calls[:first]
        if protocol == "rest":
            clients.append(rest_client(job["target"], mine, job["timeout"]))
            continue
        # A channel of its own and a connection of its own (not grpc's process-wide subchannel pool).
        channel = grpc.insecure_channel(job["target"], options=[("grpc.use_local_subchannel_pool", 1)])
        if protocol == "oip-grpc":
            clients.append((channel, oip_caller(channel, job["timeout"]), oip_requests(mine)))
            continue
        requests = [pb.ClassifyRequest(inputs=[pb.Input(text=text)], tasks=tasks) for text, tasks in mine]
        classify = centra_pb2_grpc.ClassifierStub(channel).Classify
        clients.append((channel, lambda r, c=classify: len(c(r, timeout=job["timeout"]).results) == 1, requests))

    def client(classify, requests) -> None:
        start, end = window["start"], window["end"]
        latencies, answered, errors, first_error, i = [], 0, 0, "", 0
        while (sent := time.time()) < end:
            try:
                ok = classify(requests[i % len(requests)])
            except grpc.RpcError as exc:
                ok, first_error = False, first_error or f"{exc.code().name}: {exc.details()}"
            except Exception as exc:  # the HTTP client: a refused or broken connection
                ok, first_error = False, first_error or f"{type(exc).__name__}: {exc}"
            done = time.time()
            i += 1
            if sent >= start:
                latencies.append(done - sent)
            if start <= done <= end:
                answered += ok
                errors += not ok
        with lock:
            result["calls"] += answered
            result["errors"] += errors
            result["first_error"] = result["first_error"] or first_error
            result["latencies"] += latencies

    def flooder(channel) -> None:  # oversized calls, each answer's code and time kept
        call = channel.unary_unary("/centra.v1.Classifier/Classify", request_serializer=None,
                                   response_deserializer=None)
        times, codes, tick = [], {}, window["start"]
        while (sent := time.time()) < window["end"]:
            if sent < tick:  # one call per sender per second, all senders at once: a burst every second
                time.sleep(tick - sent)
                continue
            tick += 1.0
            try:
                call(huge, timeout=job["timeout"])
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            times.append(time.time() - sent)
            codes[code] = codes.get(code, 0) + 1
        with lock:
            result["flood_latencies"] += times
            for code, count in codes.items():
                result["flood_codes"][code] = result["flood_codes"].get(code, 0) + count

    threads = [threading.Thread(target=client, args=(classify, requests), daemon=True)
               for _channel, classify, requests in clients]
    flood = job.get("flood_senders", 0)
    if flood:
        result.update(flood_latencies=[], flood_codes={})
        for _ in range(flood):
            channel = grpc.insecure_channel(job["target"], options=[("grpc.use_local_subchannel_pool", 1),
                                                                    ("grpc.max_send_message_length", -1)])
            clients.append((channel, None, None))
            threads.append(threading.Thread(target=flooder, args=(channel,), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(window["end"] - time.time() + job["timeout"] + 10)
    for channel, _classify, _requests in clients:
        channel.close()
    return result


def oip_requests(calls: list) -> list:
    """One ModelInferRequest per call: TEXT, TEXT_PAIR (empty) and TASKS, BYTES [1, 1] in raw contents."""
    import struct

    from centra.serve.inference import open_inference_grpc_pb2 as ip

    out = []
    for text, tasks in calls:
        request = ip.ModelInferRequest(model_name="centra")
        for name, value in (("TEXT", text), ("TEXT_PAIR", ""), ("TASKS", ",".join(tasks))):
            request.inputs.add(name=name, datatype="BYTES", shape=[1, 1])
            data = value.encode()
            request.raw_input_contents.append(struct.pack("<I", len(data)) + data)
        out.append(request)
    return out


def oip_caller(channel, timeout: float):
    from centra.serve.inference import open_inference_grpc_pb2 as ip

    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=ip.ModelInferRequest.SerializeToString,
                                response_deserializer=ip.ModelInferResponse.FromString)
    return lambda request: len(infer(request, timeout=timeout).outputs) > 0


def rest_client(target: str, calls: list, timeout: float):
    """(connection, call, request bodies) of one REST client: one keep-alive connection."""
    import http.client

    host, port = target.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    bodies = [json.dumps({"inputs": [{"text": text}], "tasks": list(tasks)}).encode() for text, tasks in calls]

    def call(body: bytes) -> bool:
        try:
            conn.request("POST", "/v1/classify", body=body, headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            data = reply.read()
        except (OSError, http.client.HTTPException):
            conn.close()  # reconnects at the next call
            raise
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {data[:200]!r}")
        return True
    return conn, call, bodies


def main() -> None:
    import grpc  # noqa: F401  (imported before "ready": the warm-up is not spent importing)

    from centra.serve.v1 import centra_pb2

    job = json.loads(sys.stdin.readline())
    huge = b""
    if job.get("flood_senders"):  # built before "ready": it takes a second or two
        huge = centra_pb2.ClassifyRequest(inputs=[centra_pb2.Input()] * job["flood_inputs"]).SerializeToString()
    print(json.dumps({"ready": True}), flush=True)
    window = json.loads(sys.stdin.readline())
    print(json.dumps(run(job, window, huge)), flush=True)


if __name__ == "__main__":
    main()
