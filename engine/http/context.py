"""What every handler of the front door shares: the settings, the token verifier and the clients
the app's lifespan opens, and the path parameters every resource route reads the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
from redis.asyncio import Redis
from starlette.requests import Request

from engine.errors import NotFound
from engine.http.auth import TokenVerifier
from engine.ids import is_sale_id, sale_of_order
from engine.payments import PaymentGateway
from engine.settings import Settings

__all__ = ["Services", "order_ids", "sale_id", "services"]


@dataclass
class Services:
    """Made by the app's lifespan once its clients are open, and kept on ``app.state``."""

    settings: Settings
    verifier: TokenVerifier
    store: Redis
    payments: PaymentGateway
    ledger: asyncpg.Pool = field(repr=False)


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


def sale_id(request: Request) -> str:
    """The ``{sale_id}`` of the path, or 404 ``sale-not-found`` when it cannot be a sale id."""
    value: str = request.path_params["sale_id"]
    if not is_sale_id(value):
        raise NotFound("sale-not-found", f"there is no sale {value!r}")
    return value


def order_ids(request: Request) -> tuple[str, str]:
    """The sale id and order id of the path's ``{order_id}``, or 404 ``order-not-found``."""
    order_id: str = request.path_params["order_id"]
    sale = sale_of_order(order_id)
    if sale is None:
        raise NotFound("order-not-found", f"there is no order {order_id!r}")
    return sale, order_id
