# spendledger as a container: the wheel (one package, `spendledger`, with its SQL and migrations),
# installed in a slim Python image, run as a user of its own. The config is mounted at
# /etc/spendledger/config.yaml; DATABASE_URL, LITELLM_MASTER_KEY and the LAGO_* / WEBHOOK_* variables
# come from the environment (docker-compose.yml shows them all).

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api/ api/
COPY ledger/ ledger/
COPY projections/ projections/
COPY alembic/ alembic/
# spendledger/ holds the four folders by symlink: the wheel gets them as its subpackages.
COPY spendledger/ spendledger/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM python:3.11-slim
RUN groupadd --gid 10001 spendledger \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin spendledger
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist
USER 10001:10001
WORKDIR /home/spendledger
# Without DATABASE_URL the embedded PostgreSQL keeps its data here (mount a volume to keep it).
ENV SPENDLEDGER_DATA_DIR=/home/spendledger/data \
    PYTHONUNBUFFERED=1
EXPOSE 4000
# Ready: the database reachable and migrated (a 503 otherwise).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:4000/health/readiness', timeout=2).status != 200)"]
ENTRYPOINT ["spendledger", "serve", "--config", "/etc/spendledger/config.yaml", "--host", "0.0.0.0", "--port", "4000"]
