"""The OpenAPI 3 document of centra serve's HTTP routes (served at /openapi.json): REST JSON (protobuf's
JSON mapping of centra.v1, lowerCamelCase field names; snake_case is accepted too) and the Open Inference
Protocol's routes (serve/doors/oip_tensors.py describes the tensors)."""

from __future__ import annotations

from functools import cache


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _array(items: dict) -> dict:
    return {"type": "array", "items": items}


STRING, INTEGER, NUMBER, BOOLEAN = ({"type": t} for t in ("string", "integer", "number", "boolean"))
RETRY = {"Retry-After": {"description": "seconds to wait before retrying", "schema": INTEGER}}
ERRORS = {"400": ("refused: no inputs, an empty or oversized text, a text pair where no task takes pairs...", {}),
          "401": ("missing or wrong bearer token (Authorization: Bearer <token>, with --token-file)",
                  {"WWW-Authenticate": {"description": "Bearer", "schema": STRING}}),
          "404": ("unknown task or model (named in the message)", {}),
          "405": ("the route does not take this method", {"Allow": {"description": "the methods it takes",
                                                                      "schema": STRING}}),
          "408": ("the body did not arrive in time (10 s plus its size at 64 KB/s); the connection is closed", {}),
          "413": ("the body is over the byte limit", {}),
          "429": ("the server is busy (queue full, or too many calls in progress): retry later", RETRY),
          "500": ("server fault (the server log has the details)", {}),
          "503": ("starting, shutting down, or too many bodies being received: retry later", RETRY),
          "504": ("the call's deadline passed while it was queued (OIP's timeout parameter); never computed", {})}
# what a route that reads no body, or needs no token, can answer besides 200
NO_BODY = ("401", "404", "405", "500")
OPEN = ("405", "500")


def _answers(ok: dict, codes=tuple(ERRORS)) -> dict:
    errors = {}
    for code in codes:
        text, headers = ERRORS[code]
        errors[code] = {"description": text, "content": {"application/json": {"schema": _ref("Error")}},
                        **({"headers": headers} if headers else {})}
    return {"200": ok, **errors}


def _json(schema: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


SCHEMAS = {
    "Error": {"type": "object", "properties": {"error": {**STRING, "description": "one line"},
                                               "code": {**STRING, "description": "the gRPC status code's name"}}},
    "Input": {"type": "object", "required": ["text"], "properties": {
        "text": STRING, "textPair": {**STRING, "description": "second text of a pair (pair tasks); empty: none"},
        "id": {**STRING, "description": "echoed in the result"}}},
    "ClassifyRequest": {"type": "object", "required": ["inputs"], "properties": {
        "inputs": _array(_ref("Input")),
        "tasks": {**_array(STRING), "description": "task names; empty: every task that fits the inputs"},
        "maxLabels": {**INTEGER, "minimum": 0,
                      "description": "at most this many labels per multilabel answer (0: each task's own limit)"},
        "topK": {**INTEGER, "minimum": 0, "description": "answer each task's k highest scores with their labels, "
                 "highest first, in `top` (scores left empty); 0: every label's score in `scores`"},
        "rawScores": {**BOOLEAN, "description": "scores are the raw logits (before softmax or sigmoid), not "
                      "probabilities; label, labels and value are unchanged"},
        "head": {**STRING, "enum": ["", "active", "candidate"],
                 "description": "tasks with a candidate head: the head that answers (empty: the server's choice; "
                 "or the X-Centra-Head header)"},
        "requestId": {**STRING, "description": "what the canary fraction is drawn by: one id, one head (or the "
                      "X-Request-Id header)"}}},
    "TaskResult": {"type": "object", "properties": {
        "task": STRING, "label": {**STRING, "description": "multiclass"},
        "labels": {**_array(STRING), "description": "multilabel: labels at or over their threshold"},
        "value": {**NUMBER, "description": "regression"},
        "scores": {**_array(NUMBER), "description": "one per label, in the task's label order (GET /v1/tasks); "
                   "logits with rawScores; empty with topK"},
        "truncated": BOOLEAN,
        "top": {**_array(_ref("LabelScore")), "description": "with topK: the k highest scores, highest first"},
        "head": {**STRING, "description": "tasks with a candidate head only: the head that answered (active, "
                 "candidate)"}}},
    "LabelScore": {"type": "object", "properties": {"label": STRING, "score": NUMBER}},
    "InputResult": {"type": "object", "properties": {"id": STRING, "tasks": _array(_ref("TaskResult"))}},
    "ClassifyResponse": {"type": "object", "properties": {
        "results": _array(_ref("InputResult")), "modelVersion": STRING,
        "modelId": {**STRING, "description": "content id of the model that computed the results"}}},
    "TaskInfo": {"type": "object", "properties": {
        "name": STRING, "kind": STRING, "labels": _array(STRING), "input": STRING, "maxLength": INTEGER,
        "attachLayer": INTEGER, "taskLayers": INTEGER,
        "hasCandidate": {**BOOLEAN, "description": "a candidate head stands beside the active one"}}},
    "ListTasksResponse": {"type": "object", "properties": {
        "tasks": _array(_ref("TaskInfo")), "backboneId": STRING, "backboneFingerprint": STRING,
        "modelVersion": STRING, "overheadLayers": INTEGER, "modelId": STRING}},
    "Tensor": {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": STRING, "datatype": STRING, "shape": _array(INTEGER), "data": _array({}),
        "parameters": {"type": "object"}}},
    "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
        "id": STRING, "parameters": {"type": "object", "properties": {"tasks": {
            **STRING, "description": "comma-separated task names that every row asks for, e.g. "
            "\"sentiment,topic\" (instead of the TASKS input, never with it; absent: TASKS, or every task "
            "that fits)"}, "max_labels": {
            **INTEGER, "minimum": 0, "description": "at most this many labels per multilabel answer in ANSWERS"},
            "timeout": {**INTEGER, "minimum": 0, "description": "microseconds: the call's deadline (0: none)"},
            "binary_data_output": {**BOOLEAN, "description": "outputs as binary tensors after the JSON"}}},
        "inputs": {**_array(_ref("Tensor")), "description": "TEXT, TEXT_PAIR, TASKS: BYTES [rows, 1]"},
        "outputs": _array({"type": "object", "properties": {"name": STRING, "parameters": {
            "type": "object", "properties": {
                "binary_data": {**BOOLEAN, "description": "this output as a binary tensor after the JSON"},
                "classification": {**INTEGER, "minimum": 0, "description": "a LOGITS_<task> output as its top K "
                                   "per row, BYTES \"value:index:label\" (0: the logits)"}}}}})}},
    "InferResponse": {"type": "object", "properties": {
        "model_name": STRING, "model_version": STRING, "id": STRING,
        "outputs": {**_array(_ref("Tensor")), "description": "LOGITS_<task> FP32 [rows, outputs]; ANSWERS BYTES "
                    "[rows, 1], one JSON object per row"}}},
}


@cache
def document(open_prefixes: tuple[str, ...] = ()) -> dict:
    """The document; operations on paths under `open_prefixes` (those the guard lets through without the
    token) are marked `security: []`, the others take the bearer scheme."""
    model = [{"name": "model", "in": "path", "required": True, "schema": STRING}]
    plain = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    busy = {"description": "not serving: starting or draining", "content": plain["content"]}
    paths = {
        "/v1/classify": {"post": {
            "summary": "Classify texts (centra.v1 Classify, JSON)", "operationId": "classify",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ClassifyRequest")}}},
            "responses": _answers(_json("ClassifyResponse", "one result per input, in request order"))}},
        "/v1/tasks": {"get": {"summary": "The served model's tasks (centra.v1 ListTasks)", "operationId": "tasks",
                              "responses": _answers(_json("ListTasksResponse", "the served model"), NO_BODY)}},
        "/v2/health/live": {"get": {"summary": "OIP: server live", "operationId": "serverLive",
                                    "responses": _answers(plain, OPEN)}},
        "/v2/health/ready": {"get": {"summary": "OIP: server ready", "operationId": "serverReady",
                                     "responses": {**_answers(plain, OPEN), "503": busy}}},
        "/v2/models/{model}": {"get": {"summary": "OIP: model metadata (model: centra)", "operationId": "modelMetadata",
                                       "parameters": model, "responses": _answers(plain, NO_BODY)}},
        "/v2/models/{model}/ready": {"get": {"summary": "OIP: model ready", "operationId": "modelReady",
                                             "parameters": model,
                                             "responses": {**_answers(plain, NO_BODY), "503": busy}}},
        "/v2/models/{model}/infer": {"post": {
            "summary": "OIP: inference (JSON tensors, or the binary tensor extension)", "operationId": "modelInfer",
            "parameters": model,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("InferRequest")}}},
            "responses": _answers(_json("InferResponse", "the call's tensors"))}},
        "/v2": {"get": {"summary": "OIP: server metadata (centra's version, the extensions implemented)",
                        "operationId": "serverMetadata", "responses": _answers(plain, NO_BODY)}},
        "/health": {"get": {"summary": "200 while serving, 503 while starting or draining (no token)",
                            "operationId": "health", "responses": {**_answers(plain, OPEN), "503": busy}}},
        "/info": {"get": {"summary": "The served model: version, content id, engine, tasks with kinds and labels, "
                          "limits, doors", "operationId": "info", "responses": _answers(plain, NO_BODY)}},
        "/metrics": {"get": {"summary": "Prometheus metrics (404 when the server keeps none)", "operationId": "metrics",
                             "responses": _answers({"description": "Prometheus text format",
                                                    "content": {"text/plain": {"schema": STRING}}}, NO_BODY)}},
    }
    versioned = [{"name": "version", "in": "path", "required": True, "schema": STRING}]
    for suffix in ("", "/ready", "/infer"):  # the same routes for one version of the model
        entry = paths[f"/v2/models/{{model}}{suffix}"]
        paths[f"/v2/models/{{model}}/versions/{{version}}{suffix}"] = {
            method: {**op, "parameters": model + versioned,
                     "operationId": op["operationId"].replace("model", "modelVersion", 1)}
            for method, op in entry.items()}
    paths["/openapi.json"] = {"get": {"summary": "This document (no token)", "operationId": "openapi",
                                      "responses": _answers(plain, OPEN)}}
    for path, operations in paths.items():
        if path.startswith(open_prefixes):
            for operation in operations.values():
                operation["security"] = []  # open: health and this document, probed without a token
    return {"openapi": "3.0.3",
            "info": {"title": "centra serve", "version": "1",
                     "description": "REST JSON of the centra.v1 API and the Open Inference Protocol (KServe v2). "
                     "Errors: {\"error\": one line, \"code\": gRPC status code name}. The bearer token applies "
                     "when the server was started with --token-file."},
            "security": [{"bearer": []}],
            "paths": paths, "components": {"schemas": SCHEMAS,
                                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
