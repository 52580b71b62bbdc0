"""Run a training job as a Ray task with the requested GPUs (`loraplex train --ray`, jobs backend="ray").

Connects to RAY_ADDRESS when set (a cluster), else starts or joins a local instance. The worker gets the
tracking/data-dir environment through runtime_env, so it logs to the same MLflow store as the driver.
"""

from __future__ import annotations

import os
import signal

from training.config import TrainConfig, validate_config

_ENV_KEYS = ("MLFLOW_TRACKING_URI", "LORAPLEX_HOME", "HF_HOME", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_TOKEN",
             "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _train_task(cfg_data: dict, resume: bool, events_dir: str | None) -> dict:
    from pathlib import Path

    from training.trainer import train

    on_event = None
    if events_dir:
        from training.jobs import append_event, update_job

        def on_event(level, message, data):
            append_event(Path(events_dir), level, message, data)
            if data.get("run_id"):
                update_job(Path(events_dir), mlflow_run_id=data["run_id"])

    # paths in cfg_data are already absolute; validate again in the worker (it may be another machine)
    return train(validate_config(cfg_data), resume=resume, on_event=on_event, progress=False).to_dict()


def run_on_ray(cfg: TrainConfig, *, resume: bool = False, num_gpus: float | None = None, num_cpus: float = 1,
               events_dir: str | None = None) -> dict:
    """Submit the training as a Ray task and wait for its result (TrainResult as a dict).

    SIGTERM / Ctrl-C while waiting cancels the task and raises TrainingInterrupted.
    """
    import ray
    import torch
    from ray.exceptions import RayTaskError, TaskCancelledError

    from training.trainer import TrainingInterrupted

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=True,
                 ignore_reinit_error=True)
    gpus = num_gpus if num_gpus is not None else (1 if torch.cuda.is_available() else 0)
    if gpus and ray.cluster_resources().get("GPU", 0) < gpus:
        raise RuntimeError(f"the Ray cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs; {gpus:g} requested")
    env = {k: os.environ[k] for k in _ENV_KEYS if os.environ.get(k)}
    task = ray.remote(_train_task).options(num_gpus=gpus, num_cpus=num_cpus, max_retries=0,
                                           runtime_env={"env_vars": env} if env else None)
    ref = task.remote(cfg.model_dump(mode="json"), resume, events_dir)

    def _cancel(*_):
        ray.cancel(ref)

    try:
        old = signal.signal(signal.SIGTERM, _cancel)
    except ValueError:
        old = None
    try:
        return ray.get(ref)
    except KeyboardInterrupt:
        ray.cancel(ref)
        raise TrainingInterrupted("training cancelled (the Ray task was cancelled)") from None
    except TaskCancelledError:
        raise TrainingInterrupted("training cancelled (the Ray task was cancelled)") from None
    except RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        if isinstance(cause, (KeyboardInterrupt, TaskCancelledError)):
            raise TrainingInterrupted("training cancelled (the Ray task was cancelled)") from None
        raise cause from None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
