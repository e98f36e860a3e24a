# The serving image: the `serve` extra (FastAPI, uvicorn, ONNX Runtime) on Debian bookworm, nothing else: no PyTorch,
# no fastai, no training data, no params.yaml, no model. The model is a run-time volume at /model (one image serves any
# packaged model; its serving.json states what photos it accepts). It needs no image registry: `make image` builds the
# base with debootstrap (`docker import`), the wheels here, and this file's context is build/image, not the checkout:
#   make image                                    # petpark-base:bookworm (once), build/image/{wheels,app}, petpark-serve
#   petpark registry fetch prod --dest model      # verified files of the version in prod
#   docker run -d --network host -v "$PWD/model:/model:ro" -v petpark-data:/data petpark-serve
# It listens on 127.0.0.1:8000 (the park's own machine; PETPARK_SERVE_PORT=... moves it, the health check follows),
# runs as the unprivileged user petpark, logs predictions and kept photos in the /data volume, and is healthy when
# /ready answers 200. Settings are settings.ini's, overridden by PETPARK_* variables (`docker run -e`).
ARG BASE=petpark-base:bookworm

# the runtime: a venv with no pip in it, filled from the wheels with no index by the pip wheel that python3-venv ships
# (run from the wheel file); only the venv goes on, so the wheels take no room in the image and their layers stay
# cached while only petpark's own code changes
FROM ${BASE} AS deps
COPY requirements.txt wheels/ /wheels/
RUN set -- /usr/share/python-wheels/pip-*.whl && python3 -m venv --without-pip /opt/petpark \
 && /opt/petpark/bin/python "$1/pip" install -q --no-cache-dir --disable-pip-version-check --no-index \
      --find-links /wheels -r /wheels/requirements.txt

FROM ${BASE}
ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/petpark/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PETPARK_DB_URL=sqlite:////data/inference.sqlite
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home --shell /usr/sbin/nologin petpark \
 && mkdir /data /model && chown petpark:petpark /data
COPY --from=deps /opt/petpark /opt/petpark
# petpark itself (a small wheel): owned by root, like the rest of the venv
COPY app/ /tmp/app/
RUN set -- /usr/share/python-wheels/pip-*.whl \
 && python3 "$1/pip" install -q --no-cache-dir --disable-pip-version-check --no-index --no-deps /tmp/app/*.whl \
 && rm -rf /tmp/app
# the face detector (CenterFace's ONNX file): photos are kept only with their faces blurred
COPY centerface.onnx /opt/petpark/share/centerface.onnx
ENV PETPARK_FACE_MODEL=/opt/petpark/share/centerface.onnx
# petpark finds its settings in the project folder: pyproject.toml marks it, settings.ini holds them
WORKDIR /app
COPY pyproject.toml settings.ini /app/
USER petpark
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('PETPARK_SERVE_PORT', '8000'), timeout=4)"]
CMD ["petpark", "serve", "--model-dir", "/model"]
