"""Two fixes to how MONAI Label 0.8.5 serves inference, applied once when the app starts.

1. Its POST /infer/{model} endpoint is `async def` and runs the model inside it, so the whole
   server (even /info/) stalls for the length of an inference. We re-register the same endpoint
   as a plain `def`, which FastAPI runs in its worker thread pool.
2. Errors in requests become 4xx with a message (MSAError -> 422), not 500s: done in the app's
   infer() override; this module only moves the work off the event loop.
"""

import logging

from fastapi import BackgroundTasks, Depends, File, Form, UploadFile
from fastapi.routing import APIRoute

logger = logging.getLogger(__name__)
# No `from __future__ import annotations` here: FastAPI reads run_inference's annotations, and as
# strings they would name `infer`, a local import it cannot resolve (a 500 whenever ?output= is given).


def move_inference_off_event_loop() -> bool:
    """Replace the async infer route with a threaded one; True when done (False: nothing to patch)."""
    import monailabel.app as server
    from monailabel.config import settings
    from monailabel.endpoints import infer
    from monailabel.endpoints.user.auth import RBAC, User

    def run_inference(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: infer.ResultType | None = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ):
        return infer.run_inference(background_tasks, model, image, session_id, params, file, label, output)

    # FastAPI >= 0.16x includes routers lazily (the app consults infer.router's own route list);
    # older releases copied the routes into the app at include time. Patch whichever holds it.
    patched = False
    for router in (infer.router, server.app.router):
        for index, route in enumerate(router.routes):
            if isinstance(route, APIRoute) and route.path.endswith("/infer/{model}") and "POST" in route.methods:
                del router.routes[index]
                router.add_api_route(route.path.removeprefix(router.prefix), run_inference, methods=["POST"], name=route.name, summary=route.summary,
                                     tags=route.tags, responses=route.responses)
                logger.info(f"MSA: POST {route.path} now runs in the worker thread pool")
                patched = True
                break
    return patched
