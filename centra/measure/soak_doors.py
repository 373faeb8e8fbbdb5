"""The soak's doors: every call class in the wire form of each door `centra serve` opens, sent through one
client's connections, and every OK answer read back as the checker's SoakAnswer.

    v1        centra.v1 over gRPC (the raw stub: every status code as the server sent it)
    rest      POST /v1/classify: protobuf's JSON mapping of the same ClassifyRequest
    oip_http  POST /v2/models/centra/infer: OIP JSON tensors TEXT, TEXT_PAIR, TASKS; output ANSWERS
    oip_grpc  inference.GRPCInferenceService/ModelInfer: the same tensors, as bytes_contents or raw contents

A call is made once (soak_calls.Workload, a centra.v1 ClassifyRequest) and translated here; the classes
without a ClassifyRequest have a form per door: huge_message (REST: hundreds of thousands of `{}` inputs,
or tens of thousands under the body cap; OIP: as many "" elements), bad_utf8 (HTTP: a body with invalid
UTF-8 bytes; OIP gRPC: a BYTES element b"\\xff\\xfe"). Over HTTP a refusal's code is its JSON body's
"code" (else the HTTP status's, HTTP_CODES); `cancel` closes the connection early (CANCELLED);
`deadline` is the request parameter `timeout` of 1000 µs on OIP and a client-side 1 ms read timeout on
REST (DEADLINE_EXCEEDED, or OK when the answer was faster). OIP answers carry no ids and no model_id: the
checker finds their version by name (soak_check).
"""

from __future__ import annotations

import http.client
import itertools
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from centra.core.protocol import ANSWERS, MODEL, TASKS, TEXT, TEXT_PAIR
from centra.measure.soak_calls import SoakCall, Tally, Workload
from centra.measure.soak_check import SoakAnswer, answered_from_pb, asked, v1_result

DOORS = ("v1", "rest", "oip_http", "oip_grpc")
REST_PATH, OIP_PATH = "/v1/classify", f"/v2/models/{MODEL}/infer"
HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED",
              413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
              504: "DEADLINE_EXCEEDED"}
HUGE_ELEMENTS = 300_000  # inputs or elements of a huge message over the body cap ("{}," or '"",': 3 bytes each)
DEADLINE_US = 1000  # OIP's `timeout` parameter of a deadline call
BAD_UTF8_REST = b'{"inputs": [{"text": "\xff\xfe"}]}'
BAD_UTF8_OIP = b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": ["\xff\xfe"]}]}'


# ---------------------------------------------------------------------------------------- translations


def rest_body(request) -> bytes:
    """A ClassifyRequest as REST's body (protobuf's JSON mapping)."""
    from google.protobuf import json_format

    return json_format.MessageToJson(request, indent=None).encode("utf-8")


def oip_inputs(request) -> list[tuple[str, list[str]]]:
    """A ClassifyRequest as OIP's input tensors, (name, elements): TEXT, TEXT_PAIR when any input has a
    pair, TASKS (one element, comma-separated) when it names tasks. Ids have no place in OIP."""
    out = [(TEXT, [item.text for item in request.inputs])]
    if any(item.text_pair for item in request.inputs):
        out.append((TEXT_PAIR, [item.text_pair for item in request.inputs]))
    if request.tasks:
        out.append((TASKS, [",".join(request.tasks)]))
    return out


def oip_json(request, timeout_us: int | None = None) -> bytes:
    doc: dict = {"inputs": [{"name": name, "datatype": "BYTES", "shape": [len(values), 1], "data": values}
                            for name, values in oip_inputs(request)], "outputs": [{"name": ANSWERS}]}
    if timeout_us:
        doc["parameters"] = {"timeout": timeout_us}
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def oip_pb(request, timeout_us: int | None = None, raw: bool = False):
    """A ClassifyRequest as a ModelInferRequest: BYTES in bytes_contents, or in raw_input_contents."""
    from centra.serve.doors.oip_tensors import serialize_bytes
    from centra.serve.inference import open_inference_grpc_pb2 as ip

    message = ip.ModelInferRequest(model_name=MODEL)
    for name, values in oip_inputs(request):
        tensor = message.inputs.add(name=name, datatype="BYTES", shape=[len(values), 1])
        data = [value.encode("utf-8") for value in values]
        if raw:
            message.raw_input_contents.append(serialize_bytes(data))
        else:
            tensor.contents.bytes_contents.extend(data)
    message.outputs.add(name=ANSWERS)
    if timeout_us:
        message.parameters["timeout"].int64_param = timeout_us
    return message


def answered_from_rest(request, body: bytes) -> SoakAnswer:
    from google.protobuf import json_format

    from centra.serve.v1 import centra_pb2 as pb

    response = json_format.Parse(body, pb.ClassifyResponse(), ignore_unknown_fields=True)
    return answered_from_pb(request, response, door="rest")


def answered_from_oip(request, version: str, rows: list, door: str) -> SoakAnswer:
    """An OIP answer (ANSWERS' rows: JSON objects {task: answer}) as the checker reads it: no model_id (the
    version by name), ids "" on both sides (so that the count of rows is still checked)."""
    texts, pairs = asked(request)
    results = tuple({task: v1_result(task, answer) for task, answer in json.loads(row).items()} for row in rows)
    return SoakAnswer("", version, texts, pairs, tuple(request.tasks), ("",) * len(texts), ("",) * len(rows),
                      results, door)


# ------------------------------------------------------------------------------- hostile forms per door


def huge_http(door: str, count: int) -> bytes:
    """`count` empty inputs (REST) or "" elements (OIP) in one body: 3 bytes each."""
    if door == "rest":
        return b'{"inputs": [' + b"{}," * (count - 1) + b"{}]}"
    return (b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [%d, 1], "data": [' % count
            + b'"",' * (count - 1) + b'""]}]}')


def huge_pb(count: int, raw: bool):
    from centra.serve.inference import open_inference_grpc_pb2 as ip

    message = ip.ModelInferRequest(model_name=MODEL)
    tensor = message.inputs.add(name=TEXT, datatype="BYTES", shape=[count, 1])
    if raw:
        message.raw_input_contents.append(b"\x00\x00\x00\x00" * count)
    else:
        tensor.contents.bytes_contents.extend([b""] * count)
    return message


def bad_utf8_pb(raw: bool):
    from centra.serve.inference import open_inference_grpc_pb2 as ip

    message = ip.ModelInferRequest(model_name=MODEL)
    tensor = message.inputs.add(name=TEXT, datatype="BYTES", shape=[1, 1])
    if raw:
        message.raw_input_contents.append(b"\x02\x00\x00\x00\xff\xfe")
    else:
        tensor.contents.bytes_contents.append(b"\xff\xfe")
    return message


def huge_count(cap: int, rng: random.Random) -> int:
    """Hundreds of thousands (over the body cap), or as many as fit under it (refused by count)."""
    return HUGE_ELEMENTS if rng.random() < 0.5 else max(1000, (cap * 9 // 10) // 3)


def http_body(door: str, call: SoakCall, cap: int, rng: random.Random) -> bytes:
    if call.cls == "huge_message":
        return huge_http(door, huge_count(cap, rng))
    if call.cls == "bad_utf8":
        return BAD_UTF8_REST if door == "rest" else BAD_UTF8_OIP
    if door == "rest":
        return rest_body(call.request)
    return oip_json(call.request, DEADLINE_US if call.cls == "deadline" else None)


def oip_message(call: SoakCall, cap: int, rng: random.Random):
    raw = rng.random() < 0.5
    if call.cls == "huge_message":
        return huge_pb(huge_count(cap, rng), raw)
    if call.cls == "bad_utf8":
        return bad_utf8_pb(raw)
    return oip_pb(call.request, DEADLINE_US if call.cls == "deadline" else None, raw)


def http_code(status: int, body: bytes) -> tuple[str, str]:
    """(code name, details) of an HTTP answer: the JSON body's "code" and "error", else the status's."""
    if status == 200:
        return "OK", ""
    try:
        doc = json.loads(body)
        return str(doc["code"]), str(doc.get("error", ""))
    except (ValueError, KeyError, TypeError):
        return HTTP_CODES.get(status, f"HTTP_{status}"), body[:200].decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------- a client


class DoorClient:
    """One client thread's ways in: a gRPC channel (centra.v1 and OIP) and a keep-alive HTTP connection."""

    def __init__(self, target: str, http_target: str, token: str, cap: int):
        import grpc

        from centra.serve.inference import open_inference_grpc_pb2 as ip
        from centra.serve.v1 import centra_pb2 as pb

        self.channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.v1 = self.channel.unary_unary("/centra.v1.Classifier/Classify", request_serializer=None,
                                           response_deserializer=pb.ClassifyResponse.FromString)
        self.oip = self.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                            request_serializer=None,
                                            response_deserializer=ip.ModelInferResponse.FromString)
        host, _, port = http_target.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.token, self.cap = token, cap
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        self.channel.close()
        self.drop()

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(self, door: str, call: SoakCall, rng: random.Random) -> tuple[str, str, SoakAnswer | None]:
        """(status code name, details, the answer to check or None) of one call through `door`."""
        if door in ("v1", "oip_grpc"):
            return self.grpc(door, call, rng)
        return self.http(door, call, rng)

    def grpc(self, door: str, call: SoakCall, rng: random.Random):
        import grpc

        token = self.token if call.token_ok else f"x{self.token}"
        metadata = (("authorization", f"Bearer {token}"),)
        if door == "v1":
            method, message = self.v1, call.request
            timeout = call.timeout
        else:  # OIP's deadline is its `timeout` parameter; the transport's is the usual one
            method, message = self.oip, oip_message(call, self.cap, rng)
            timeout = max(call.timeout, 30.0)
        data = message if isinstance(message, bytes) else message.SerializeToString()
        try:
            if call.cancel_after is None:
                response = method(data, timeout=timeout, metadata=metadata)
            else:
                future = method.future(data, timeout=timeout, metadata=metadata)
                time.sleep(call.cancel_after)
                future.cancel()
                response = future.result()
        except grpc.FutureCancelledError:
            return "CANCELLED", "cancelled by the client", None
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or "", None
        if isinstance(call.request, bytes):
            return "OK", "", None
        if door == "v1":
            return "OK", "", answered_from_pb(call.request, response)
        from centra.serve.doors.oip_tensors import deserialize_bytes

        names = [output.name for output in response.outputs]
        rows = deserialize_bytes(response.raw_output_contents[names.index(ANSWERS)], ANSWERS)
        return "OK", "", answered_from_oip(call.request, response.model_version, rows, door)

    def http(self, door: str, call: SoakCall, rng: random.Random):
        token = self.token if call.token_ok else f"x{self.token}"
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        path, body = (REST_PATH if door == "rest" else OIP_PATH), http_body(door, call, self.cap, rng)
        if call.cancel_after is not None:  # the request in full, then the connection closed under it
            conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                conn.request("POST", path, body, headers)
                time.sleep(call.cancel_after)
            finally:
                conn.close()
            return "CANCELLED", "the client closed the connection", None
        if door == "rest" and call.cls == "deadline":  # REST has no deadline field: the client's read timeout
            conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                conn.connect()
                conn.sock.settimeout(call.timeout)
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                status, data = response.status, response.read()
            except TimeoutError:
                return "DEADLINE_EXCEEDED", "the client's read timeout", None
            finally:
                conn.close()
        else:
            try:  # OIP's deadline is its `timeout` parameter: the transport's is the usual one
                status, data = self.exchange(path, body, headers, max(call.timeout, 30.0))
            except (OSError, http.client.HTTPException) as exc:
                return "CONNECTION_LOST", f"{type(exc).__name__}: {exc}", None
        code, details = http_code(status, data)
        if code != "OK" or call.request is None or isinstance(call.request, bytes):
            return code, details, None
        if door == "rest":
            return code, details, answered_from_rest(call.request, data)
        doc = json.loads(data)
        rows = next(output["data"] for output in doc["outputs"] if output["name"] == ANSWERS)
        return code, details, answered_from_oip(call.request, doc.get("model_version", ""), rows, door)

    def exchange(self, path: str, body: bytes, headers: dict, timeout: float) -> tuple[int, bytes]:
        """One request on the keep-alive connection (a fresh one when the server closed it: once)."""
        for attempt in itertools.count():
            reused = self.conn is not None
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            elif self.conn.sock is not None:
                self.conn.sock.settimeout(timeout)
            try:
                self.conn.request("POST", path, body, headers)
                response = self.conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.drop()
                if reused and attempt == 0:
                    continue
                raise
            except (OSError, http.client.HTTPException):
                self.drop()
                raise
            if response.will_close:
                self.drop()
            return response.status, data
        raise AssertionError("unreachable")


def client_loop(index: int, targets: tuple[str, str], token: str, workload: Workload, seed: int, tally: Tally,
                on_answer: Callable[[SoakAnswer], None], stop: threading.Event) -> None:
    """Send calls of random classes through random doors until `stop`; OK answers go to `on_answer`."""
    client = DoorClient(*targets, token, workload.cap)
    rng = random.Random(seed * 1009 + index)
    try:
        for n in itertools.count():
            if stop.is_set():
                break
            door = rng.choice(DOORS)
            call = replace(workload.make(workload.pick(rng), rng, f"c{index}-{n}"), door=door)
            code, details, answer = client.send(door, call, rng)
            tally.record(call, code, details)
            if answer is not None:
                on_answer(answer)
    finally:
        client.close()
