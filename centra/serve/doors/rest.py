"""REST: centra.v1's messages as JSON over HTTP (protobuf's JSON mapping: lowerCamelCase field names,
snake_case accepted too), the same two conversions as the gRPC door (doors/v1.py).

    POST /v1/classify   ClassifyRequest in, ClassifyResponse out
    GET  /v1/tasks      ListTasksResponse
    GET  /openapi.json  the OpenAPI document of every HTTP route (serve/openapi.py), open without a token
"""

from __future__ import annotations

from centra.serve.call import Classifier, ServeError, with_headers
from centra.serve.doors import Door
from centra.serve.doors.v1 import call_of, response_of, tasks_of
from centra.serve.http import objects_over, parse_off_loop, strings_over
from centra.serve.status import one_line


def parse_request(body: bytes):
    """The body as a ClassifyRequest (protobuf's JSON mapping), or a one-line refusal."""
    from google.protobuf import json_format

    from centra.serve.v1 import centra_pb2 as pb

    try:
        return json_format.Parse(body, pb.ClassifyRequest())
    except (json_format.ParseError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ServeError(f"the body is not a ClassifyRequest in JSON ({one_line(str(exc))[:200]})") from None


def proto_response(message):
    from aiohttp import web
    from google.protobuf import json_format

    return web.json_response(json_format.MessageToDict(message, always_print_fields_with_no_presence=True))


class RestDoor(Door):
    name = "rest"
    open_prefixes = ("/openapi.json",)

    def http_routes(self, classifier: Classifier, http) -> list:
        from aiohttp import web

        async def classify(request):
            body = await http.read_body(request)
            limits = classifier.limits
            # before parsing: a ClassifyRequest's JSON objects are itself and its inputs
            if objects_over(body, limits.max_inputs + 1):
                raise ServeError(f"more than {limits.max_inputs:,} inputs in one call; the limit is "
                                 f"{limits.max_inputs:,}")
            most = 6 * limits.max_inputs + limits.max_task_names + 64  # 3 fields and their keys per input
            if strings_over(body, most):
                raise ServeError(f"more than {most:,} strings in one call ({limits.max_inputs:,} inputs and "
                                 f"{limits.max_task_names:,} task names at most)")
            message = await parse_off_loop(parse_request, body)
            answered = await classifier.classify(with_headers(call_of(message, limits), request.headers))
            return proto_response(response_of(answered))

        async def tasks(request):
            return proto_response(tasks_of(classifier.engine))

        async def openapi(request):
            from centra.serve.openapi import document

            return web.json_response(document(http.guard.open_prefixes))

        return [web.post("/v1/classify", classify), web.get("/v1/tasks", tasks), web.get("/openapi.json", openapi)]


DOOR = RestDoor()
