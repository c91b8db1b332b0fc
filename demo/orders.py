"""The demo's input: random JSON orders, a few of them poison.

An order is what a web shop would post: customer (absent for guest checkouts), items,
shipping address and payment. ``Poison`` inputs are valid JSON that a stage rejects
every time, so their operations fail for good:

- ``negative-quantity``: validate rejects it at once (not retryable);
- ``unknown-country``: the geocoder times out on every attempt until none are left;
- ``card-bin-blocked``: the fraud service errors on every attempt until none are left.
"""

from __future__ import annotations

import random
from enum import StrEnum

from kvstate.model import JSONObject

__all__ = ["COUNTRIES", "Poison", "poison_of", "random_order"]


class Poison(StrEnum):
    """Kinds of input that fail for good, and where."""

    NEGATIVE_QUANTITY = "negative-quantity"
    UNKNOWN_COUNTRY = "unknown-country"
    CARD_BIN_BLOCKED = "card-bin-blocked"


COUNTRIES: dict[str, tuple[float, float, str]] = {
    "DE": (52.52, 13.40, "Europe/Berlin"),
    "FR": (48.86, 2.35, "Europe/Paris"),
    "NL": (52.37, 4.90, "Europe/Amsterdam"),
    "US": (40.71, -74.01, "America/New_York"),
    "JP": (35.68, 139.69, "Asia/Tokyo"),
    "BR": (-23.55, -46.63, "America/Sao_Paulo"),
}
"""Countries the geocoder knows: capital latitude, longitude and time zone."""

BLOCKED_CARD_BIN = "999999"

_SKUS = {"BOOK-1": 1299, "MUG-2": 899, "LAMP-3": 3450, "DESK-4": 21900, "PEN-5": 150, "BAG-6": 4999}
_CITIES = ["Springfield", "Riverside", "Fairview", "Lakeside", "Hillcrest", "Oakdale"]
_STREETS = ["Main St", "High St", "Station Rd", "Church Ln", "Park Ave", "Mill Rd"]


def random_order(rng: random.Random, number: int, poison: Poison | None = None) -> JSONObject:
    """Order ``number`` as a JSON object; ``poison`` makes it one that fails for good."""
    items = [
        {"sku": sku, "quantity": rng.randint(1, 4), "unit_price_cents": _SKUS[sku]}
        for sku in rng.sample(sorted(_SKUS), rng.randint(1, 3))
    ]
    country = rng.choice(sorted(COUNTRIES))
    card_bin = f"{rng.randint(400000, 559999)}"
    if poison is Poison.NEGATIVE_QUANTITY:
        items[0]["quantity"] = -rng.randint(1, 5)
    elif poison is Poison.UNKNOWN_COUNTRY:
        country = "ZZ"
    elif poison is Poison.CARD_BIN_BLOCKED:
        card_bin = BLOCKED_CARD_BIN
    guest = rng.random() < 0.2
    customer = (
        None
        if guest
        else {
            "id": f"C{rng.randint(1000, 9999)}",
            "email": f"Customer{rng.randint(1, 999)}@Example.COM",
            "marketing_opt_in": rng.random() < 0.6,
        }
    )
    return {
        "order_number": f"SO-{number:07d}",
        "customer": customer,
        "items": items,
        "currency": rng.choice(["EUR", "EUR", "USD", "JPY"]),
        "shipping": {
            "street": f"{rng.randint(1, 200)} {rng.choice(_STREETS)}",
            "city": rng.choice(_CITIES),
            "postcode": f"{rng.randint(10000, 99999)}",
            "country": country,
        },
        "payment": {"method": rng.choice(["card", "card", "paypal"]), "card_bin": card_bin},
    }


def poison_of(order: JSONObject) -> Poison | None:
    """Which poison ``order`` carries, if any (how tests and operators recognise one)."""
    items = order.get("items")
    if isinstance(items, list) and any(
        isinstance(item, dict) and isinstance(item.get("quantity"), int) and item["quantity"] <= 0 for item in items
    ):
        return Poison.NEGATIVE_QUANTITY
    shipping = order.get("shipping")
    if isinstance(shipping, dict) and shipping.get("country") not in COUNTRIES:
        return Poison.UNKNOWN_COUNTRY
    payment = order.get("payment")
    if isinstance(payment, dict) and payment.get("card_bin") == BLOCKED_CARD_BIN:
        return Poison.CARD_BIN_BLOCKED
    return None
