"""A blocking client of the centra gRPC server: the same answers as `Engine.predict`, from a server.

    with Client("127.0.0.1:50051", timeout=10) as client:
        client.classify(["the delivery was late"], tasks=["sentiment"])

grpc is imported inside the methods (this module is light: no torch). Every grpc failure becomes one
CentraError line (`RemoteError`, with the status code's name).
"""

from __future__ import annotations

from collections.abc import Sequence

from centra.core.answers import Answer, ClassAnswer, LabelsAnswer, ValueAnswer
from centra.errors import CentraError


class RemoteError(CentraError):
    """The server refused the call, or could not be reached; `code` is the gRPC status code's name."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


KEPT_CATALOGS = 8


def model_key(reply) -> tuple[str, str]:
    """What a reply's model is known by: its model_id (content id); its version name only from a server
    that sends no model_id."""
    return ("id", reply.model_id) if reply.model_id else ("version", reply.model_version)


class Client:
    def __init__(self, target: str, timeout: float = 10.0, *, credentials=None,
                 metadata: Sequence[tuple[str, str]] = ()):
        """`credentials`: grpc.ChannelCredentials for TLS (insecure channel if None); `metadata`: sent with
        every call (e.g. an authorization token)."""
        import grpc

        from centra.serve.v1 import centra_pb2_grpc

        if not timeout > 0:
            raise CentraError(f"timeout must be > 0 seconds, not {timeout}")
        self.target = target
        self.timeout = timeout
        self.metadata = tuple(metadata)
        # No receive limit of the client's own: a valid call's answer (hundreds of tasks x 256 inputs) may
        # pass gRPC's 4 MiB default; the server bounds what it sends by what it accepts.
        options = [("grpc.max_receive_message_length", -1)]
        self._channel = (grpc.secure_channel(target, credentials, options=options) if credentials is not None
                         else grpc.insecure_channel(target, options=options))
        self._stub = centra_pb2_grpc.ClassifierStub(self._channel)
        # model (its content id, see model_key) -> its tasks (from ListTasks): a model rebuilt under the
        # same version name has another id, so its answers are never read with the old labels
        self._catalogs: dict[tuple[str, str], dict[str, dict]] = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def list_tasks(self) -> dict:
        """The served model: version, model_id (its content id: a rebuild under the same version name has
        another), backbone, overhead and every task (name, kind, labels, input, ...)."""
        from centra.serve.v1 import centra_pb2 as pb

        reply = self._call(self._stub.ListTasks, pb.ListTasksRequest())
        tasks = [{"name": t.name, "kind": t.kind, "labels": list(t.labels), "input": t.input,
                  "max_length": t.max_length, "attach_layer": t.attach_layer, "task_layers": t.task_layers,
                  **({"has_candidate": True} if t.has_candidate else {})}
                 for t in reply.tasks]
        # one assignment per model: threads sharing this client never see a half-updated catalog; the
        # newest few models are kept (a server reloading for months must not grow this client)
        key = model_key(reply)
        kept = [item for item in self._catalogs.items() if item[0] != key][-(KEPT_CATALOGS - 1):]
        self._catalogs = {**dict(kept), key: {t["name"]: t for t in tasks}}
        return {"model_version": reply.model_version, "model_id": reply.model_id, "backbone_id": reply.backbone_id,
                "backbone_fingerprint": reply.backbone_fingerprint, "overhead_layers": reply.overhead_layers,
                "tasks": tasks}

    def classify(self, texts: Sequence[str], tasks: Sequence[str] | None = None,
                 pairs: Sequence[str] | None = None, ids: Sequence[str] | None = None,
                 max_labels: int | None = None, head: str | None = None, request_id: str | None = None) -> list[dict]:
        """One dict per text and task, as `Engine.predict` gives them (text, pair, task, label | labels |
        value, scores, truncated), plus "id" when ids are given. `pairs`: one second text per text, or None.
        `max_labels`: at most this many labels per multilabel answer (never more than the task's own limit).
        Tasks with a candidate head: `head` ("active" | "candidate"; None: the server's choice) and
        `request_id` (the canary fraction's draw: keep one per caller) choose the head, named in "head"."""
        for what, items in (("pair texts", pairs), ("ids", ids)):
            if items is not None and len(items) != len(texts):
                raise CentraError(f"{len(texts)} texts but {len(items)} {what}: give one per text")
        if max_labels is not None and (isinstance(max_labels, bool) or not isinstance(max_labels, int)
                                       or not 1 <= max_labels < 2**31):
            raise CentraError(f"max_labels must be a positive int, not {max_labels!r}")
        request = self._request(texts, tasks, pairs, ids)
        request.max_labels = max_labels or 0
        try:
            request.head, request.request_id = head or "", request_id or ""
        except (TypeError, ValueError) as exc:
            raise CentraError(f"head and request_id must be text ({' '.join(str(exc).split())})") from None
        for _ in range(2):  # a reload between the answer and ListTasks: ask once more
            reply = self._call(self._stub.Classify, request)
            if model_key(reply) not in self._catalogs:
                self.list_tasks()  # the labels that name the scores, for that model
            catalog = self._catalogs.get(model_key(reply))
            if catalog is not None:
                break
        else:
            raise CentraError(f"{self.target}: the served model changed during the call; retry")
        answers = []
        for i, result in enumerate(reply.results):
            for task in result.tasks:
                answer = self._answer(catalog, task, texts[i], pairs[i] if pairs is not None else None)
                if ids is not None:
                    answer["id"] = result.id
                answers.append(answer)
        return answers

    def _request(self, texts, tasks, pairs, ids):
        from centra.serve.v1 import centra_pb2 as pb

        inputs = []
        for i, text in enumerate(texts):
            try:
                inputs.append(pb.Input(text=text, text_pair=pairs[i] if pairs is not None else "",
                                       id=ids[i] if ids is not None else ""))
            except (TypeError, ValueError) as exc:  # not a str, or a lone surrogate (not UTF-8)
                raise CentraError(f"input {i}: {' '.join(str(exc).split())}") from None
        return pb.ClassifyRequest(inputs=inputs, tasks=list(tasks or []))

    def _answer(self, catalog: dict[str, dict], task, text: str, pair: str | None) -> dict:
        info = catalog.get(task.task)
        if info is None or len(info["labels"]) != len(task.scores):
            raise CentraError(f"{self.target}: the answer for task {task.task!r} does not match the served "
                              "model's task list; retry")
        answer = {"text": text, "pair": pair} if pair is not None and info["input"] == "pair" else {"text": text}
        answer["task"] = task.task
        answer.update(answer_from_v1(info["labels"], task).to_dict())
        answer["truncated"] = task.truncated
        if task.head:  # a task with a candidate head: the head that answered
            answer["head"] = task.head
        return answer

    def _call(self, method, request):
        import grpc

        try:
            return method(request, timeout=self.timeout, metadata=self.metadata or None)
        except grpc.RpcError as exc:
            code = exc.code()
            details = " ".join((exc.details() or "").split())
            if code == grpc.StatusCode.UNAVAILABLE:
                message = f"cannot reach the centra server at {self.target} ({details})"
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                message = f"{self.target} gave no answer within {self.timeout:g} s"
            elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
                # gRPC's own refusal of a message over the server's receive limit: not "busy"
                message = (f"{self.target}: the call is too large for the server ({details}); do not retry it: "
                           "send fewer inputs or shorter texts per call")
            else:
                message = f"{self.target}: {code.name}: {details}"
            raise RemoteError(message, code.name) from None


def answer_from_v1(labels: list[str], task) -> Answer:
    """A centra.v1 TaskResult as the typed answer it carries (`labels`: the task's, from ListTasks)."""
    # Scores travel as float32; the server rounded them to 6 decimals, so rounding again gives its numbers.
    scores = {label: round(score, 6) for label, score in zip(labels, task.scores)}
    if task.HasField("label"):
        return ClassAnswer(scores, task.label)
    if task.HasField("value"):
        return ValueAnswer({labels[0]: task.value}, task.value)  # exact: the value travels as a double
    return LabelsAnswer(scores, list(task.labels))
