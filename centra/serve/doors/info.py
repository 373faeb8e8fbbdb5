"""What TEI and Triton users look for on the HTTP port, beside the protocol doors:

    GET /health   200 while serving, 503 while starting or draining (no token needed, like gRPC health)
    GET /info     the served model: version, content id, backbone, engine, tasks (kind, input, labels),
                  the call limits and the doors open
    GET /metrics  the Prometheus metrics (the same registry as the dedicated --metrics-port), when kept
"""

from __future__ import annotations

from centra.serve.call import Classifier, ServeError
from centra.serve.doors import Door


def info_of(classifier: Classifier, doors: list[str]) -> dict:
    engine, limits = classifier.engine, classifier.limits
    manifest = engine.manifest
    backbone = manifest.backbone if manifest is not None else None
    return {"model_version": engine.version, "model_id": engine.content_id, "engine": engine.runtime,
            "backbone": backbone.id if backbone else "", "ready": classifier.ready,
            "tasks": [{"name": s.name, "kind": s.kind, "input": s.input, "labels": s.labels,
                       "max_length": s.max_length} for s in engine.specs.values()],
            "limits": {"max_inputs_per_call": limits.max_inputs, "max_call_bytes": limits.max_bytes,
                       "max_task_names": limits.max_task_names},
            "doors": doors}


class InfoDoor(Door):
    name = "info"
    open_prefixes = ("/health",)

    def http_routes(self, classifier: Classifier, http) -> list:
        from aiohttp import web

        async def health(request):
            return web.json_response({"status": "serving" if classifier.ready else "not serving"},
                                     status=200 if classifier.ready else 503)

        async def info(request):
            return web.json_response(info_of(classifier, [door.name for door in http.doors]))

        async def metrics(request):
            if http.guard.metrics is None:
                raise ServeError("this server keeps no metrics", "NOT_FOUND")
            return web.Response(body=http.guard.metrics.render(), content_type="text/plain", charset="utf-8")

        return [web.get("/health", health), web.get("/info", info), web.get("/metrics", metrics)]


DOOR = InfoDoor()
