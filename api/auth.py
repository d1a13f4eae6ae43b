"""Authentication by API key and the roles each endpoint accepts."""

# No `from __future__ import annotations`: FastAPI reads the dependency's signature.

import asyncio
import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ledger.commands import Actor
from ledger.errors import AuthenticationFailed, Forbidden, TenantNotFound
from ledger.keys import KeyCache, Principal, Role

logger = logging.getLogger(__name__)

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="A tenant API key from `civicpulse key issue` or POST /tenants/{id}/keys, "
    "sent as `Authorization: Bearer cpk_...`.",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


class Allow:
    """A dependency that authenticates the request's key and checks its tenant and role.

    A key used on another tenant's path gets 404 as if the tenant did not exist, so keys
    learn nothing about other tenants. A key of the right tenant with a role not in
    `roles` gets 403.
    """

    def __init__(self, *roles: Role, action: str) -> None:
        self.roles = roles
        self.action = action

    async def __call__(self, request: Request, credentials: Credentials) -> Principal:
        if credentials is None:
            raise AuthenticationFailed(
                "missing API key: send 'Authorization: Bearer cpk_...' with a key that "
                "`civicpulse key issue` printed"
            )
        token = credentials.credentials
        # A cached key is checked on the event loop, and others in a thread of the loop's
        # executor. The thread gets a copy of the request's context, so either way the
        # configuration version the query reads is recorded for the request.
        try:
            principal = await _authenticate_cached(request, token)
            if principal is None:
                principal = await asyncio.to_thread(_authenticate, request, token)
        except AuthenticationFailed as error:
            # The message names the key id at most, never the secret.
            logger.warning(
                "authentication failed on %s %s: %s", request.method, request.url.path, error
            )
            raise
        path_tenant = request.path_params.get("tenant_id")
        if path_tenant is not None and path_tenant != principal.tenant_id:
            # The same response whether or not the tenant exists, so keys learn nothing.
            raise TenantNotFound(
                path_tenant, "check the tenant id in the path: a key works for its own tenant only"
            )
        if principal.role not in self.roles:
            raise Forbidden(principal.role.value, [role.value for role in self.roles], self.action)
        request.state.principal = principal
        return principal


async def _authenticate_cached(request: Request, token: str) -> Principal | None:
    """Check a cached key over the key pool of the running event loop, which costs less
    than a thread's hand-offs of the interpreter lock (see KEY_POOL_SIZE in api.app).

    Returns None, for a thread to decide, when the key is not cached or no key pool runs
    on this loop (an app served without its lifespan).
    """
    keys: KeyCache = request.app.state.keys
    key_pool = request.app.state.key_pools.get(asyncio.get_running_loop())
    if key_pool is None:
        return None
    async with key_pool.connection() as conn:
        return await keys.authenticate_cached(conn, token)


def _authenticate(request: Request, token: str) -> Principal:
    pool = request.app.state.pool
    keys: KeyCache = request.app.state.keys
    with pool.connection() as conn:
        return keys.authenticate(conn, token)


def allow(*roles: Role, action: str) -> Any:
    """Return the dependency marker for a route parameter that takes the Principal."""
    return Depends(Allow(*roles, action=action))


def actor_of(principal: Principal) -> Actor:
    return Actor(
        name=principal.name, role=principal.role.value, channel="api", key_id=principal.key_id
    )


def route_roles(route: APIRoute) -> tuple[Role, ...] | None:
    """Return the roles a route accepts, or None for a route that takes no key."""
    for dependency in route.dependant.dependencies:
        if isinstance(dependency.call, Allow):
            return dependency.call.roles
    return None


def document_roles(app: FastAPI) -> None:
    """Write each route's accepted roles into its OpenAPI operation as `x-roles`."""
    for route in app.routes:
        if isinstance(route, APIRoute):
            roles = route_roles(route)
            extra = dict(route.openapi_extra or {})
            extra["x-roles"] = [role.value for role in roles] if roles is not None else []
            route.openapi_extra = extra
