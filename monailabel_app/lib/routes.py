"""The app's own versions of MONAI Label's routes that take a body or change state, and `install`,
which puts them and the request guard in place when the server starts.

MONAI Label 0.8.5's handlers write uploads wherever the id or tag points, run inference on any
server path, submit training with any params, and answer a missing image with a 500. These
handlers check everything first (names, params, file contents) and change nothing on refusal.
They are plain `def` or offload their work, so FastAPI runs it off the event loop: /info/ keeps
answering while an inference or an upload check runs.
"""

# No `from __future__ import annotations`: FastAPI reads these handlers' annotations at run time.

import logging
import os
from collections.abc import Callable
from pathlib import Path

from fastapi import BackgroundTasks, Depends, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints import activelearning, datastore, infer, scoring, train
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.task import AsyncTask
from monailabel.utils.others.generic import get_mime_type, remove_file
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware

from msa.errors import MSAError

from .errors import Busy, NotFound
from .guard import RequestGuard
from .imagefiles import suffix_of
from .infers import RESULT_PREFIX
from .params import InferParams, NextSampleParams, TrainParams, check_info, parse_json_object
from .policy import Policy

logger = logging.getLogger(__name__)
USER = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
ANNOTATOR = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))
ADMIN = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))


def _store():
    return app_instance().datastore()


def _with_user(info: dict, user: User | None) -> dict:
    if user is not None and getattr(user, "username", None):
        info["user"] = user.username
    return info


# -- datastore ---------------------------------------------------------------------------------------

def put_image(image: str | None = None, params: str = Form("{}"), file: UploadFile = File(...),
              user: User = ANNOTATOR):
    info = _with_user(check_info(parse_json_object(params, "params"), "image info"), user)
    suffix = suffix_of(file.filename)
    name = os.path.basename(file.filename or "")
    image_id = image or name[:len(name) - len(suffix)]
    return {"image": _store().add_image_upload(image_id, file.file, suffix, info)}


def put_label(image: str, tag: str = "final", params: str = Form("{}"), label: UploadFile = File(...),
              user: User = ANNOTATOR):
    info = _with_user(check_info(parse_json_object(params, "params"), "label info"), user)
    suffix = suffix_of(label.filename or ".nii.gz")
    label_id = _store().save_label_upload(image, label.file, suffix, tag or "final", info)
    answer = app_instance().on_save_label(image, label_id) or {}
    answer.update(image=image, label=label_id)
    return answer


def delete_image(id: str, user: User = ADMIN):
    _store().remove_image(id)
    return {}


def delete_label(id: str, tag: str, user: User = ADMIN):
    _store().remove_label(id, tag)
    return {}


def put_image_info(image: str, info: str = Form("{}"), user: User = ANNOTATOR):
    values = _with_user(check_info(parse_json_object(info, "info"), "image info"), user)
    return _store().update_image_info(image, values)


def put_label_info(label: str, tag: str, info: str = Form("{}"), user: User = ANNOTATOR):
    values = _with_user(check_info(parse_json_object(info, "info"), "label info"), user)
    return _store().update_label_info(label, tag, values)


def put_label_info_deprecated(label: str, tag: str, params: str = Form("{}"), user: User = ANNOTATOR):
    return put_label_info(label, tag, params, user)


def get_dataset(background_tasks: BackgroundTasks, limit_cases: int | None = None, user: User = ANNOTATOR):
    if not _store().datalist():
        raise NotFound("no final labels yet: the dataset archive would be empty")
    path = _store().get_dataset_archive(limit_cases)
    background_tasks.add_task(remove_file, path)  # MONAI Label leaves the archive in the temp folder
    return FileResponse(path, media_type=get_mime_type(path), filename="dataset.zip")


# -- inference -----------------------------------------------------------------------------------------

def run_inference(background_tasks: BackgroundTasks, model: str, image: str = "", session_id: str = "",
                  params: str = Form("{}"), file: UploadFile = File(None), label: UploadFile = File(None),
                  output: infer.ResultType | None = None, user: User = USER):
    if file is not None or label is not None:
        raise MSAError("infer takes datastore ids only: upload the image with PUT /datastore/image, "
                       "then send ?image=<id>")
    if session_id:
        raise MSAError("sessions are not used by this app: infer with ?image=<datastore id>")
    if output == infer.ResultType.dicom_seg:
        raise MSAError("output=dicom_seg needs a DICOMweb datastore; use image, json or all")
    checked = InferParams.parse(parse_json_object(params, "params"))  # before the app looks anything up
    instance = app_instance()
    result = instance.infer_checked(model, image, checked)
    folder = Path(result["file"]).parent if result.get("file") else None
    if folder is not None and folder.name.startswith(RESULT_PREFIX):
        background_tasks.add_task(remove_file, str(folder))  # after the answer is sent
    try:
        return infer.send_response(instance.datastore(), result, output, background_tasks)
    except Exception:
        if folder is not None and folder.name.startswith(RESULT_PREFIX):
            remove_file(str(folder))
        raise


# -- training, active learning, scoring: JSON bodies read and checked here ------------------------------

async def _json_body(request: Request, what: str) -> dict:
    return parse_json_object(await request.body(), what)


def _submit_training(model: str, params: TrainParams, run_sync: bool, enqueue: bool) -> dict:
    instance = app_instance()
    if model not in instance._trainers:
        raise NotFound(f"no train task {model!r}; this app trains {', '.join(instance._trainers)}")
    if not instance.datastore().datalist():
        raise MSAError("no final labels in the datastore yet: save a label, then train")
    result, detail = AsyncTask.run("train", request={"model": model}, params=params.model_dump(),
                                   force_sync=run_sync, enqueue=enqueue)
    if result is None:
        raise Busy(detail or "a training task already runs")
    return result


async def run_training(request: Request, model: str, run_sync: bool = False, enqueue: bool = False,
                       user: User = ADMIN):
    params = TrainParams.from_request(await _json_body(request, "train params"))
    return await run_in_threadpool(_submit_training, model, params, run_sync, enqueue)


async def run_all_training(request: Request, run_sync: bool = False, user: User = ADMIN):
    body = await _json_body(request, "train params")
    trainers = list(app_instance()._trainers)
    unknown = [key for key in body if key not in trainers]
    if unknown:
        raise MSAError(f"train params: unknown train task {unknown[0][:40]!r}; this app trains {', '.join(trainers)}")
    checked = {model: TrainParams.from_request(body.get(model, {})) for model in trainers}
    results = {}
    for model, params in checked.items():
        results[model] = {"result": await run_in_threadpool(_submit_training, model, params, run_sync, True),
                          "detail": None}
    return results


async def next_sample(request: Request, strategy: str, user: User = USER):
    params = NextSampleParams.parse(await _json_body(request, "next-sample params"))
    strategies = app_instance()._strategies
    if strategy not in strategies:
        raise NotFound(f"no strategy {strategy!r}; this app has {', '.join(strategies)}")
    values = params.model_dump(exclude_none=True)
    return await run_in_threadpool(activelearning.sample, strategy, values, user.username)


async def _score(request: Request, method: str | None, run_sync: bool) -> dict:
    if await _json_body(request, "scoring params"):
        raise MSAError("scoring takes no params")
    instance = app_instance()
    methods = list(instance._scoring_methods)
    if method is not None and method not in methods:
        raise NotFound(f"no scoring method {method!r}; this app has {', '.join(methods)}")
    if run_sync:
        chosen = [method] if method else methods
        return {m: await run_in_threadpool(instance.scoring, {"method": m}) for m in chosen}
    return instance.async_scoring(method)


async def run_all_scoring(request: Request, run_sync: bool = False, user: User = ANNOTATOR):
    return await _score(request, None, run_sync)


async def run_scoring_method(request: Request, method: str, run_sync: bool = False, user: User = ANNOTATOR):
    return await _score(request, method, run_sync)


# -- installation ----------------------------------------------------------------------------------------

OVERRIDES: tuple[tuple[object, str, str, Callable], ...] = (
    (datastore, "PUT", "/datastore/image", put_image),
    (datastore, "PUT", "/datastore/", put_image),
    (datastore, "PUT", "/datastore/label", put_label),
    (datastore, "DELETE", "/datastore/image", delete_image),
    (datastore, "DELETE", "/datastore/", delete_image),
    (datastore, "DELETE", "/datastore/label", delete_label),
    (datastore, "PUT", "/datastore/image/info", put_image_info),
    (datastore, "PUT", "/datastore/label/info", put_label_info),
    (datastore, "PUT", "/datastore/updatelabelinfo", put_label_info_deprecated),
    (datastore, "GET", "/datastore/dataset", get_dataset),
    (infer, "POST", "/infer/{model}", run_inference),
    (train, "POST", "/train/", run_all_training),
    (train, "POST", "/train/{model}", run_training),
    (activelearning, "POST", "/activelearning/{strategy}", next_sample),
    (scoring, "POST", "/scoring/", run_all_scoring),
    (scoring, "POST", "/scoring/{method}", run_scoring_method),
)


def _replace_route(routers: list, method: str, path: str, endpoint: Callable) -> bool:
    """Swap the endpoint of MONAI Label's route (same path, name and docs, same place in the list)."""
    replaced = False
    for router in routers:
        for index, route in enumerate(router.routes):
            if isinstance(route, APIRoute) and route.path == path and method in route.methods:
                router.add_api_route(path.removeprefix(router.prefix), endpoint, methods=[method], name=route.name,
                                     summary=route.summary, tags=route.tags, responses=route.responses,
                                     include_in_schema=route.include_in_schema, deprecated=route.deprecated)
                router.routes[index] = router.routes.pop()  # keep the original's matching order
                replaced = True
                break
    return replaced


def install(policy: Policy) -> None:
    """Replace MONAI Label's state-changing routes and put the request guard in front of all of them.
    Called from the app's on_init_complete, inside the server's start-up, before any request."""
    import monailabel.app as server

    for module, method, path, endpoint in OVERRIDES:
        # FastAPI >= 0.16x includes routers lazily (the app reads each router's own list); older
        # releases copied the routes into the app at include time: patch whichever holds them.
        if not _replace_route([module.router, server.app.router], method, path, endpoint):
            raise RuntimeError(f"MONAI Label has no route {method} {path} to replace: is it 0.8.5?")
    # FastAPI's handler answers with a list of errors echoing the input: let the guard say one line.
    server.app.exception_handlers.pop(RequestValidationError, None)
    # MONAI Label's CORSMiddleware (every origin, with credentials) goes; the guard comes in its place.
    # The stack was built for the lifespan call already: the next request builds it again.
    server.app.user_middleware = [Middleware(RequestGuard, policy=policy)]
    server.app.middleware_stack = None
    origins = ", ".join(policy.cors_origins) or "none"
    logger.info(f"MSA: request guard in place; browser origins allowed: {origins}; upload limit "
                f"{policy.max_upload_bytes >> 20} MB")
