FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY ioc_core ./ioc_core
COPY ingest ./ingest
COPY processors ./processors
COPY delivery ./delivery
COPY api ./api
COPY simulators ./simulators
COPY ioc ./ioc
RUN pip install --no-cache-dir -c constraints.txt . && useradd --system --uid 10001 ioc
USER ioc
ENTRYPOINT ["ioc"]
