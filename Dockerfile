FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bucketsync bucketsync
COPY pipeline pipeline
COPY gateway gateway
RUN pip install --no-cache-dir .
COPY bucketsync.example.yaml bucketsync.yaml
COPY sync-rules.example.yaml sync-rules.example.yaml
