# zerowire: one image for the coordinator and the workers.
#
#   CPU (default):  docker build -t zerowire .
#   CUDA:           docker build -t zerowire:cuda \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The CUDA wheels bring their own CUDA runtime; the host needs the NVIDIA driver and the NVIDIA
# Container Toolkit, and the worker service a `gpus` reservation (see docker-compose.cuda.yml).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# The malloc thresholds keep the per-step tensor buffers in the heap instead of a fresh mmap each time.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=536870912

# torch first and pinned, from the chosen index: an unpinned torch from PyPI pulls CUDA packages.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/zerowire
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY jobspec ./jobspec
COPY coordinator ./coordinator
COPY communication ./communication
COPY protos ./protos
COPY worker ./worker
COPY zerowire ./zerowire
# The image's packages at the versions the project is tested with (requirements/dev.lock).
RUN pip install -c requirements/dev.lock . && zerowire --help > /dev/null

RUN useradd --create-home --uid 10001 zerowire \
    && mkdir -p /state /data \
    && chown zerowire:zerowire /state /data
USER zerowire
WORKDIR /state

# 8765: the coordinator's REST API; 50051: a worker's gRPC tensor streams.
EXPOSE 8765 50051
ENTRYPOINT ["zerowire"]
CMD ["--help"]
