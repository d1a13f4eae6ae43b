"""The minimum cost of an HTTP endpoint in this stack: FastAPI on uvicorn validates the
report's body and returns 201, with no key check, no database and none of our middleware.

`bench/api_appends.py --floor` serves it with `uvicorn _floor_app:app` and posts the same
reports to it as to the API, to show how much of the API's CPU per report the framework
alone takes on this machine.
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID, uuid5

from fastapi import FastAPI, Header, Response
from pydantic import BaseModel

app = FastAPI()


class Report(BaseModel):
    description: str
    category: str | None = None
    latitude: float | None = None
    longitude: float | None = None


class Submitted(BaseModel):
    incident_id: UUID
    version: int
    replayed: bool


@app.post("/tenants/{tenant_id}/incidents", status_code=201)
async def submit(
    tenant_id: str,
    report: Report,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Submitted:
    incident_id = uuid5(UUID(int=0), f"{tenant_id}/{idempotency_key}")
    response.headers["ETag"] = '"1"'
    return Submitted(incident_id=incident_id, version=1, replayed=False)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
