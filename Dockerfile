# syntax=docker/dockerfile:1
# CPU-only image of the voice-embed service: one uvicorn process, the shipped weights baked in.
#   docker build -t voice-embed .
#   docker run -p 8000:8000 voice-embed
#   docker run -p 8000:8000 -v /path/to/my_weights:/weights:ro -e WEIGHTS_DIR=/weights voice-embed

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.9.1
ARG TORCHAUDIO_VERSION=2.9.1
# 1 when the index's torchaudio was built against CUDA torch (PyPI's wheels are): its compiled ops
# cannot load next to CPU torch, and the service needs none of them (it uses torchaudio's
# pure-PyTorch MelSpectrogram and resample), so they are removed. The check below proves it imports.
ARG TORCHAUDIO_PURE_PYTHON=0
# A CA bundle for pip behind a TLS-intercepting proxy (mount it with --volume); build stage only.
ARG PIP_CERT=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU wheels of torch and torchaudio first: the biggest layer, rebuilt only when these change.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install --no-deps --index-url "${TORCH_INDEX_URL}" "torchaudio==${TORCHAUDIO_VERSION}" \
 && if [ "${TORCHAUDIO_PURE_PYTHON}" = 1 ]; then rm -f /opt/venv/lib/python3*/site-packages/torchaudio/lib/*.so; fi \
 && python3 -c "import torch, torchaudio.functional, torchaudio.transforms; print('torch', torch.__version__, 'torchaudio', torchaudio.__version__)"
# The other dependencies, from pyproject.toml, before any code is copied.
COPY pyproject.toml README.md /src/
RUN python3 -c "import tomllib; deps = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith(('torch', 'torchaudio'))))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY model /src/model
COPY app /src/app
RUN pip install --no-deps /src
# Weights readable by the unprivileged user whatever the modes in the build context.
COPY weights /opt/voice-embed/weights
RUN chmod -R a+rX,go-w /opt/voice-embed/weights

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    WEIGHTS_DIR=/opt/voice-embed/weights \
    DATA_DIR=/var/lib/voice-embed \
    OPENVINO_CACHE_DIR=/var/lib/voice-embed/openvino
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --home-dir /nonexistent app \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/voice-embed
# The default speaker store (SQLite) lives here (DATABASE_URL=postgresql://... replaces it), and the
# network converted for OpenVINO, so that a restart with the same volume skips the conversion.
VOLUME /var/lib/voice-embed
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/voice-embed/weights /opt/voice-embed/weights
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/readyz\", timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["python3", "-m", "app"]
