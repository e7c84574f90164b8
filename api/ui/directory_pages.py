"""Keys, teams and internal users: lists with spend and limits; create (a key's value shown once),
block, delete — each through the management API's own command functions."""

from __future__ import annotations

from typing import Any, Final

from litestar import Request, Response, get, post
from litestar.params import Parameter
from litestar.response import Redirect

from spendledger.api.routes.keys import (
    DeleteKeysRequest,
    GenerateKeyRequest,
    delete_named_keys,
    generate_key,
    set_key_blocked,
)
from spendledger.api.routes.teams import NewTeamRequest, change_team, create_team, remove_teams
from spendledger.api.routes.users import USER_ROLES, NewUserRequest, create_user, remove_users
from spendledger.api.services import services_of
from spendledger.api.ui.forms import REFUSED, notice, posted_form, refusal, refusal_status, to_request
from spendledger.api.ui.render import page
from spendledger.api.ui.sessions import UiSession, current_session
from spendledger.projections.admin_views import keys_page
from spendledger.projections.directory import list_teams, list_users

PAGE_SIZE: Final = 50
KEY_LABELS: Final = {
    "key_alias": "Key Alias", "user_id": "User ID", "team_id": "Team ID", "models": "Models",
    "max_budget": "Max Budget", "budget_duration": "Budget Duration", "duration": "Expires After",
    "rpm_limit": "RPM Limit", "tpm_limit": "TPM Limit", "budget_id": "Budget ID",
}  # fmt: skip
TEAM_LABELS: Final = {
    "team_id": "Team ID", "team_alias": "Team Alias", "models": "Models", "max_budget": "Max Budget",
    "budget_duration": "Budget Duration", "rpm_limit": "RPM Limit", "tpm_limit": "TPM Limit",
}  # fmt: skip
USER_LABELS: Final = {
    "user_id": "User ID", "user_email": "User Email", "user_role": "User Role", "max_budget": "Max Budget",
    "budget_duration": "Budget Duration", "key_alias": "Key Alias",
}  # fmt: skip
PAGE: Final = Parameter(query="page", default=1, ge=1, le=100_000)


def _refused(session: UiSession, tab: str, exc: Exception) -> Response[str]:
    return page("refused.html", session, status_code=refusal_status(exc), tab=tab, title="Not changed",
                message=refusal(exc))


def _form(session: UiSession, kind: str, labels: dict[str, str], values: dict[str, str],
          error: str | None = None, status_code: int = 200) -> Response[str]:
    return page(f"{kind}_form.html", session, status_code=status_code, tab=f"{kind}s", labels=labels,
                values=values, roles=sorted(USER_ROLES), error=error)


# --- keys -----------------------------------------------------------------------------------------


@get("/keys", include_in_schema=False)
async def keys_list(request: Request[Any, Any, Any], page_number: int = PAGE) -> Response[str]:
    session = await current_session(request)
    rows, total = await keys_page(services_of(request).pool, page_number, PAGE_SIZE)
    return page("keys.html", session, tab="keys", rows=rows, total=total, page_number=page_number,
                pages=max(1, -(-total // PAGE_SIZE)), notice=notice(request, "Key", ("created", "blocked", "unblocked", "deleted")))


@get("/keys/new", include_in_schema=False)
async def new_key_form(request: Request[Any, Any, Any]) -> Response[str]:
    return _form(await current_session(request), "key", KEY_LABELS, {})


@post("/keys/new", include_in_schema=False, status_code=200)
async def generate_key_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    try:
        data = to_request(fields, GenerateKeyRequest, KEY_LABELS)
        created = await generate_key(services_of(request), session.caller, data)
    except REFUSED as exc:
        return _form(session, "key", KEY_LABELS, fields, refusal(exc), refusal_status(exc))
    # Answered here, not redirected: the plaintext must never sit in a URL or the history.
    return page("key_created.html", session, tab="keys", key=created["key"], name=created["key_alias"] or created["key_name"], what="key")


@post("/keys/block", include_in_schema=False, status_code=303)
async def block_key_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    blocked = fields.get("blocked") == "true"
    try:
        await set_key_blocked(services_of(request), session.caller.actor, fields.get("key", ""), blocked)
    except REFUSED as exc:
        return _refused(session, "keys", exc)
    return Redirect("/ui/keys", query_params={"blocked" if blocked else "unblocked": fields.get("name", "")}, status_code=303)


@post("/keys/delete", include_in_schema=False, status_code=303)
async def delete_key_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    try:
        await delete_named_keys(services_of(request), session.caller, DeleteKeysRequest(keys=[fields.get("key", "")]))
    except REFUSED as exc:
        return _refused(session, "keys", exc)
    return Redirect("/ui/keys", query_params={"deleted": fields.get("name", "")}, status_code=303)


# --- teams ----------------------------------------------------------------------------------------


@get("/teams", include_in_schema=False)
async def teams_list(request: Request[Any, Any, Any]) -> Response[str]:
    session = await current_session(request)
    return page("teams.html", session, tab="teams", rows=await list_teams(services_of(request).pool),
                notice=notice(request, "Team", ("created", "blocked", "unblocked", "deleted")))


@get("/teams/new", include_in_schema=False)
async def new_team_form(request: Request[Any, Any, Any]) -> Response[str]:
    return _form(await current_session(request), "team", TEAM_LABELS, {})


@post("/teams/new", include_in_schema=False, status_code=303)
async def create_team_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    try:
        data = to_request(fields, NewTeamRequest, TEAM_LABELS)
        view = await create_team(services_of(request), session.caller.actor, data)
    except REFUSED as exc:
        return _form(session, "team", TEAM_LABELS, fields, refusal(exc), refusal_status(exc))
    return Redirect("/ui/teams", query_params={"created": view["team_id"]}, status_code=303)


@post("/teams/block", include_in_schema=False, status_code=303)
async def block_team_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    team_id, blocked = fields.get("team_id", ""), fields.get("blocked") == "true"
    try:
        await change_team(services_of(request), session.caller.actor, team_id, {"blocked": blocked})
    except REFUSED as exc:
        return _refused(session, "teams", exc)
    return Redirect("/ui/teams", query_params={"blocked" if blocked else "unblocked": team_id}, status_code=303)


@post("/teams/delete", include_in_schema=False, status_code=303)
async def delete_team_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    team_id = fields.get("team_id", "")
    try:
        await remove_teams(services_of(request), session.caller.actor, [team_id])
    except REFUSED as exc:
        return _refused(session, "teams", exc)
    return Redirect("/ui/teams", query_params={"deleted": team_id}, status_code=303)


# --- internal users -------------------------------------------------------------------------------


@get("/users", include_in_schema=False)
async def users_list(request: Request[Any, Any, Any], page_number: int = PAGE) -> Response[str]:
    session = await current_session(request)
    rows, total = await list_users(services_of(request).pool, page_number, PAGE_SIZE)
    return page("users.html", session, tab="users", rows=rows, total=total, page_number=page_number,
                pages=max(1, -(-total // PAGE_SIZE)), notice=notice(request, "User", ("created", "blocked", "unblocked", "deleted")))


@get("/users/new", include_in_schema=False)
async def new_user_form(request: Request[Any, Any, Any]) -> Response[str]:
    return _form(await current_session(request), "user", USER_LABELS, {})


@post("/users/new", include_in_schema=False, status_code=200)
async def create_user_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    try:
        data = to_request(fields, NewUserRequest, USER_LABELS)
        created = await create_user(services_of(request), session.caller.actor, data)
    except REFUSED as exc:
        return _form(session, "user", USER_LABELS, fields, refusal(exc), refusal_status(exc))
    return page("key_created.html", session, tab="users", key=created["key"], name=created["user_id"], what="user")


@post("/users/delete", include_in_schema=False, status_code=303)
async def delete_user_from_form(request: Request[Any, Any, Any]) -> Response[str]:
    session, fields = await posted_form(request)
    user_id = fields.get("user_id", "")
    try:
        await remove_users(services_of(request), session.caller.actor, [user_id])
    except REFUSED as exc:
        return _refused(session, "users", exc)
    return Redirect("/ui/users", query_params={"deleted": user_id}, status_code=303)


route_handlers = [
    keys_list, new_key_form, generate_key_from_form, block_key_from_form, delete_key_from_form,
    teams_list, new_team_form, create_team_from_form, block_team_from_form, delete_team_from_form,
    users_list, new_user_form, create_user_from_form, delete_user_from_form,
]
