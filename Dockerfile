FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ledger ledger
COPY projections projections
COPY replay replay
COPY api api
COPY migrations migrations
RUN pip install --no-cache-dir . && useradd --system civicpulse

USER civicpulse
ENTRYPOINT ["civicpulse"]
CMD ["serve", "--host", "0.0.0.0"]
