"""GET /v1/models and /v1/models/{id}: bases, adapters, the embedding model and routes a key may use."""

from __future__ import annotations

from serving.api import governed
from serving.api.errors import not_found_model


async def list_models(core, http=None) -> dict:
    cards = await core.deployments.model_cards()
    if core.routing is not None:
        cards.extend(core.routing.cards())
    principal = governed.principal_of(http)
    if principal is not None:
        cards = [c for c in cards if _allowed(principal, c)]
    return {"object": "list", "data": cards}


def _allowed(principal, card: dict) -> bool:
    if card.get("parent"):
        return governed.allows(principal, card["parent"], card["id"].partition(":")[2] or card["id"])
    return principal.allows("models", card["id"])


async def get_model(core, model_id: str, http=None) -> dict:
    cards = (await list_models(core, http))["data"]
    wanted = {model_id, core.deployments.canonical(model_id)}  # a base may be asked for by its repo id or an alias
    for card in cards:
        if card["id"] in wanted:
            return card
    raise not_found_model(model_id, [c["id"] for c in cards])
