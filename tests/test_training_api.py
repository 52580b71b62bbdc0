"""The fine-tuning API over real HTTP (uvicorn on 127.0.0.1) with the official openai client; jobs train a
tiny random Llama in runner subprocesses against a temporary MLflow store."""

import json
import time

import httpx
import openai
import pytest

from training.api import make_app
from serving.router.sim import AppServer, free_port
from training.jobs import JobManager
from training.testing import isolated_home, make_tiny_llama, qa_records


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_HOME", str(isolated_home(tmp_path)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    manager = JobManager(tmp_path / "ft", max_concurrent=2, gateway_url=f"http://127.0.0.1:{free_port()}")
    with AppServer(make_app(manager), "fine-tuning") as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        yield {"client": client, "manager": manager, "url": f"http://127.0.0.1:{srv.port}", "tmp": tmp_path,
               "model": make_tiny_llama(tmp_path / "tiny")}
        manager.shutdown(timeout=30)


def _wait(client, job_id, statuses, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job.status}; events: "
                         f"{[e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=50).data]}")


@pytest.mark.slow
def test_files_and_jobs_through_the_openai_client(server):
    client, model = server["client"], server["model"]
    data = "".join(json.dumps(r) + "\n" for r in qa_records(8)).encode()
    f = client.files.create(file=("qa.jsonl", data), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == len(data) and f.status == "processed"
    assert client.files.retrieve(f.id).filename == "qa.jsonl"
    assert f.id in [x.id for x in client.files.list().data]

    small = {"max_steps": 3, "num_sample_generations": 0, "lora_target_modules": ["q_proj", "v_proj"]}
    ok = client.fine_tuning.jobs.create(model=model, training_file=f.id, suffix="unit",
                                        hyperparameters={"batch_size": 2, "learning_rate_multiplier": 5},
                                        extra_body={"config": small, "auto_deploy": True})
    assert ok.object == "fine_tuning.job" and ok.status in ("queued", "running") and ok.model == model
    assert ok.hyperparameters.batch_size == 2 and ok.hyperparameters.learning_rate_multiplier == pytest.approx(5)
    long = client.fine_tuning.jobs.create(model=model, training_file=f.id,
                                          extra_body={"config": {**small, "max_steps": 100000}})

    # cancel the long job once it is really training
    deadline = time.time() + 300
    while not any("loss" in (e.data or {}) for e in client.fine_tuning.jobs.list_events(long.id).data):
        assert time.time() < deadline, "the long job never reached a training step"
        time.sleep(1)
    cancelled = client.fine_tuning.jobs.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert server["manager"].wait(long.id, timeout=120)["status"] == "cancelled"

    done = _wait(client, ok.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith("unit-") and done.trained_tokens > 0 and done.finished_at
    raw = httpx.get(f"{server['url']}/v1/fine_tuning/jobs/{ok.id}").json()
    assert raw["model_uri"].startswith(f"models:/{done.fine_tuned_model}/") and raw["mlflow_run_id"]
    assert raw["deployed"] is False  # no gateway listens at gateway_url: reported, the job still succeeds

    from training.registry import resolve_adapter_uri

    assert (resolve_adapter_uri(raw["model_uri"]) / "adapter_model.safetensors").exists()

    events = client.fine_tuning.jobs.list_events(ok.id, limit=100).data
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed"  # newest first, like OpenAI
    assert any(e.type == "metrics" and e.data["step"] == 3 for e in events)
    assert any(m.startswith(f"auto_deploy of {done.fine_tuned_model} to http://127.0.0.1:") for m in messages)
    page = client.fine_tuning.jobs.list_events(ok.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    listed = client.fine_tuning.jobs.list(limit=10).data
    assert [j.id for j in listed] == [long.id, ok.id] or [j.id for j in listed] == [ok.id, long.id]


def test_client_mistakes_get_openai_errors(server):
    client, url = server["client"], server["url"]
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("bad.jsonl", b'{"messages": []}\n{oops\n'), purpose="fine-tune")
    assert "bad.jsonl:2: invalid JSON" in err.value.body["message"] and err.value.body["param"] == "file"

    with pytest.raises(openai.NotFoundError) as err:
        client.fine_tuning.jobs.create(model=server["model"], training_file="file-doesnotexist")
    assert err.value.body["param"] == "training_file"

    f = client.files.create(file=("qa.jsonl", json.dumps(qa_records(1)[0]).encode() + b"\n"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=server["model"], training_file=f.id,
                                       extra_body={"config": {"lora_rr": 4, "lora_dropout": 2}})
    msg = err.value.body["message"]
    assert "lora_rr: unknown key" in msg and "lora_dropout: Input should be less than 1" in msg
    with pytest.raises(openai.BadRequestError, match="learning_rate_multiplier must be a positive number"):
        client.fine_tuning.jobs.create(model=server["model"], training_file=f.id,
                                       hyperparameters={"learning_rate_multiplier": -1})
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.cancel("ftjob-nope")

    r = httpx.post(f"{url}/v1/fine_tuning/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{url}/v1/fine_tuning/jobs", json={"model": 3, "training_file": f.id})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.get(f"{url}/v1/fine_tuning/jobs", params={"limit": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    r = httpx.post(f"{url}/v1/files", data={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert client.fine_tuning.jobs.list().data == []  # none of the rejected requests left a job behind
