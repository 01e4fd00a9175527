# Two images of one NGC release (TRITON_VERSION; 26.04 = Triton 2.68, TensorRT 10.16), the project
# installed at build time in both:
#   export  nvcr.io/nvidia/tensorrt:<release>-py3: the TensorRT of the server's tensorrt backend, so the
#           engines it builds load there; writes ONNX files, engines and the latency profile (one-shot)
#   serve   nvcr.io/nvidia/tritonserver:<release>-py3: `triffusion serve` supervises the image's tritonserver
# docker compose builds both (docker-compose.yml); alone: docker build --target serve -t triffusion-serve .
ARG TRITON_VERSION=26.04

FROM nvcr.io/nvidia/tensorrt:${TRITON_VERSION}-py3 AS export
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /opt/triffusion
# Dependencies first (their own layer: a change to the code does not download torch again). The image's
# own tensorrt stays: it is the release's TensorRT.
COPY pyproject.toml ./
RUN python3 -c "import subprocess, sys, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; subprocess.check_call([sys.executable, '-m', 'pip', 'install', *deps])" \
 && python3 -m pip install --no-deps clip-anytorch==2.6.0
COPY . .
# Editable: the export copies the Triton adapters from model_repository/ in this tree.
RUN python3 -m pip install --no-deps -e . \
 && python3 -c "import tensorrt, triffusion.export.build; print('TensorRT', tensorrt.__version__)"
ENTRYPOINT ["python3", "-m", "triffusion.export", "build"]

FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3 AS serve
ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    TRITONSERVER=/opt/tritonserver/bin/tritonserver TRITON_BACKENDS=/opt/tritonserver/backends
WORKDIR /opt/triffusion
COPY pyproject.toml ./
RUN python3 -c "import subprocess, sys, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; subprocess.check_call([sys.executable, '-m', 'pip', 'install', *deps])"
COPY . .
# Into the image's python3, which the python backend stub embeds: the models import triffusion.
RUN python3 -m pip install --no-deps -e . \
 && python3 -c "import triffusion.server, triffusion.orchestrator.engine"
EXPOSE 8000 8001 8002
ENTRYPOINT ["triffusion", "serve"]
CMD ["--repo", "/models/repository", "--host", "0.0.0.0", "--http-port", "8000", "--grpc-port", "8001", \
     "--metrics-port", "8002", "--grace", "30"]
