# The serving image: the `serve` extra (FastAPI, uvicorn, ONNX Runtime) and one packaged model, nothing else:
# no PyTorch, no fastai, no training data, no params.yaml (the model's serving.json states what photos it accepts).
#   petpark registry fetch prod --dest model      # verified files of the version in prod
#   docker build -t petpark-serve .
#   docker run --network host petpark-serve       # listens on 127.0.0.1:8000 (the park's own machine)
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PETPARK_DB_URL=sqlite:////data/inference.sqlite
COPY pyproject.toml README.md settings.ini ./
COPY petpark/ petpark/
RUN pip install ".[serve]" && useradd --create-home petpark && mkdir /data && chown petpark /data
COPY model/ /model/
USER petpark
VOLUME /data
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready')"
CMD ["petpark", "serve", "--model-dir", "/model"]
