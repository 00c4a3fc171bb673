# One image for workers, migrations and the generator.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dealpulse_pkg ./dealpulse_pkg
COPY pipelines ./pipelines
COPY agents ./agents
COPY models ./models
RUN pip install --no-cache-dir .
ENTRYPOINT ["dealpulse"]
CMD ["worker"]
