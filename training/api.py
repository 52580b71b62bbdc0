"""OpenAI-compatible fine-tuning and files endpoints, as a FastAPI router the gateway mounts.

    app.include_router(build_router(JobManager(gateway_url="http://127.0.0.1:8000")))

Bodies are parsed by hand rather than by FastAPI's validation so that every client mistake comes back in
OpenAI's error shape {"error": {"message", "type", "param", "code"}} with a 4xx, never a 422 `detail`.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from training.jobs import JobError, JobManager


def error_response(message: str, *, status: int = 400, param: str | None = None,
                   code: str | None = "invalid_request_error", type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


def _from_job_error(exc: JobError) -> JSONResponse:
    return error_response(exc.message, status=exc.status, param=exc.param, code=exc.code)


def _limit(request: Request) -> int | JSONResponse:
    raw = request.query_params.get("limit", "20")
    try:
        value = int(raw)
    except ValueError:
        return error_response(f"limit must be an integer, got {raw!r}", param="limit")
    if not 1 <= value <= 100:
        return error_response("limit must be between 1 and 100", param="limit")
    return value


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """multipart/form-data with the stdlib email parser (no python-multipart dependency)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    if not msg.is_multipart():
        return fields, files
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = (filename, payload)
        else:
            fields[name] = payload.decode("utf-8", errors="replace")
    return fields, files


def build_router(manager: JobManager | None = None) -> APIRouter:
    """The /v1/files and /v1/fine_tuning/jobs routes over one JobManager (created on first use if None)."""
    router = APIRouter()
    state: dict = {"manager": manager}

    def mgr() -> JobManager:
        if state["manager"] is None:
            state["manager"] = JobManager()
        return state["manager"]

    async def call(fn, *args):
        """Run a blocking manager call off the event loop; JobError -> OpenAI error."""
        try:
            return await asyncio.to_thread(fn, *args)
        except JobError as exc:
            return _from_job_error(exc)

    # ---------------------------------------------------------------- files
    @router.post("/v1/files")
    async def create_file(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return error_response("expected multipart/form-data with fields 'file' and 'purpose'", param="file")
        fields, files = _parse_multipart(ctype, await request.body())
        purpose = fields.get("purpose")
        if "file" not in files:
            return error_response("'file' is required (a multipart file)", param="file")
        if not purpose:
            return error_response("'purpose' is required", param="purpose")
        filename, content = files["file"]
        return await call(mgr().create_file, filename or "upload.jsonl", content, purpose)

    @router.get("/v1/files")
    async def list_files(request: Request):
        data = await call(mgr().list_files, request.query_params.get("purpose"))
        if isinstance(data, JSONResponse):
            return data
        return {"object": "list", "data": data, "has_more": False}

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str):
        return await call(mgr().get_file, file_id)

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        path = await call(mgr().file_path, file_id)
        if isinstance(path, JSONResponse):
            return path
        return PlainTextResponse(path.read_text(errors="replace"))

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        return await call(mgr().delete_file, file_id)

    # ---------------------------------------------------------------- jobs
    @router.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(f"the request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return error_response("the request body must be a JSON object")
        for key in ("model", "training_file", "suffix", "validation_file"):
            if body.get(key) is not None and not isinstance(body[key], str):
                return error_response(f"{key} must be a string", param=key)
        if body.get("hyperparameters") is not None and not isinstance(body["hyperparameters"], dict):
            return error_response("hyperparameters must be an object", param="hyperparameters")
        return await call(mgr().create_job, body)

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request):
        limit = _limit(request)
        if isinstance(limit, JSONResponse):
            return limit
        res = await call(mgr().list_jobs, request.query_params.get("after"), limit)
        if isinstance(res, JSONResponse):
            return res
        data, has_more = res
        return {"object": "list", "data": data, "has_more": has_more}

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(job_id: str):
        return await call(mgr().get_job, job_id)

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        return await call(mgr().cancel, job_id)

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        limit = _limit(request)
        if isinstance(limit, JSONResponse):
            return limit
        res = await call(mgr().events, job_id, request.query_params.get("after"), limit)
        if isinstance(res, JSONResponse):
            return res
        data, has_more = res
        return {"object": "list", "data": data, "has_more": has_more}

    @router.post("/v1/fine_tuning/validate")
    async def validate(request: Request):
        """{"config": YAML text or an object} -> {"valid", "errors": [{"path", "message"}]}, as the job would
        see it (its dataset comes from training_file, so a config without `datasets` is not an error here)."""
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(f"the request body is not valid JSON: {exc}")
        if not isinstance(body, dict) or "config" not in body:
            return error_response("send {\"config\": <YAML text or an object>}", param="config")
        return {"object": "fine_tuning.config_check", **config_errors(body["config"])}

    @router.get("/v1/fine_tuning/template")
    async def template(model: str | None = None):
        """A small, valid config to start from (the portal's editor)."""
        return {"object": "fine_tuning.template", "config": TEMPLATE.format(model=model or "smollm2-135m-instruct")}

    @router.get("/v1/fine_tuning/jobs/{job_id}/config")
    async def job_config(job_id: str):
        """A finished or running job's config (YAML), to start another job from."""
        text = await call(mgr().job_config, job_id)
        return text if isinstance(text, JSONResponse) else {"object": "fine_tuning.template", "config": text}

    @router.get("/v1/fine_tuning/jobs/{job_id}/evaluation")
    async def evaluation(job_id: str):
        """The job's metrics next to the current champion's (models:/<its registered name>@champion)."""
        return await call(_evaluation, mgr(), job_id)

    @router.post("/v1/fine_tuning/jobs/{job_id}/promote")
    async def promote(job_id: str, request: Request):
        """Point an alias (default champion) at the job's registered adapter version (admins only)."""
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(f"the request body is not valid JSON: {exc}")
        alias = body.get("alias", "champion") if isinstance(body, dict) else None
        if not isinstance(alias, str) or not alias:
            return error_response("alias must be a non-empty string", param="alias")
        return await call(_promote, mgr(), job_id, alias)

    return router


def make_app(manager: JobManager | None = None):
    """A standalone app with just these routes (tests; `uvicorn --factory training.api:make_app`)."""
    from fastapi import FastAPI

    app = FastAPI(title="loraplex fine-tuning")
    app.include_router(build_router(manager))
    return app


TEMPLATE = """\
# A LoRA fine-tune; the dataset is the uploaded training file.
base_model: {model}
lora_r: 8
lora_alpha: 16
lora_target_modules: [q_proj, v_proj]
max_steps: 20
val_set_size: 0.2            # held out for the eval the portal compares with the champion's
micro_batch_size: 2
learning_rate: 0.0002
sequence_len: 512
num_sample_generations: 0
"""


def config_errors(config) -> dict:
    """{"valid", "errors": [{"path": "lora_r", "message": ...}], "config": the parsed mapping when valid} for a
    YAML text or a mapping."""
    import yaml
    from pydantic import ValidationError

    from training.config import TrainConfig, error_list

    if isinstance(config, str):
        try:
            config = yaml.safe_load(config) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            return {"valid": False, "config": None, "errors": [{"path": "(yaml)", "message": f"{where}not valid "
                                                                f"YAML: {getattr(exc, 'problem', None) or exc}"}]}
    if not isinstance(config, dict):
        return {"valid": False, "config": None,
                "errors": [{"path": "(config)", "message": "the config must be a mapping of keys to values"}]}
    data = dict(config)
    data.setdefault("datasets", [{"path": "training_file.jsonl"}])
    try:
        TrainConfig.model_validate(data)
    except ValidationError as exc:
        return {"valid": False, "config": None,
                "errors": [{"path": path, "message": msg} for path, msg in error_list(exc)]}
    return {"valid": True, "errors": [], "config": config}


def _run_metrics(run_id: str | None) -> dict:
    from training.tracking import client, tracking_uri

    if not run_id:
        return {}
    return dict(client(tracking_uri()).get_run(run_id).data.metrics)


def _registered(manager: JobManager, job_id: str) -> tuple[dict, str, str]:
    """(job, registered model name, version) of a succeeded job; 409 before its adapter is registered."""
    job = manager.get_job(job_id)
    if job["status"] != "succeeded" or not job.get("model_uri"):
        raise JobError(f"job {job_id} has no registered adapter yet (status {job['status']})",
                       param="fine_tuning_job_id", code="job_not_succeeded", status=409)
    return job, job["fine_tuned_model"], job["model_uri"].rsplit("/", 1)[-1]


def _evaluation(manager: JobManager, job_id: str) -> dict:
    from mlflow.exceptions import MlflowException

    from training.tracking import client, tracking_uri

    job, name, version = _registered(manager, job_id)
    candidate = {"model_uri": job["model_uri"], "version": version, "metrics": _run_metrics(job.get("mlflow_run_id"))}
    champion = None
    try:
        mv = client(tracking_uri()).get_model_version_by_alias(name, "champion")
        champion = {"model_uri": f"models:/{name}@champion", "version": str(mv.version),
                    "metrics": _run_metrics(mv.run_id)}
    except MlflowException:
        pass  # no champion yet: this job's adapter would be the first
    return {"object": "fine_tuning.evaluation", "job_id": job_id, "registered_model": name,
            "candidate": candidate, "champion": champion}


def _promote(manager: JobManager, job_id: str, alias: str) -> dict:
    from training.config import check_alias
    from training.tracking import client, tracking_uri

    job, name, version = _registered(manager, job_id)
    try:
        check_alias(alias)
    except ValueError as exc:
        raise JobError(f"alias: {exc}", param="alias") from None
    client(tracking_uri()).set_registered_model_alias(name, alias, version)
    return {"object": "fine_tuning.promotion", "job_id": job_id, "registered_model": name, "version": version,
            "alias": alias, "model_uri": f"models:/{name}@{alias}", "base_model": job["model"]}
