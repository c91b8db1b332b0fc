"""What each of the ten simulated services does: latency, failures and its piece of the output.

Every service is a pure function of the operation (its input document, the outputs of
earlier stages) and a random source; the worker (``demo.worker``) adds the queue, the
timing and the state reporting around it. The output document is built in the shared
metadata under ``output``: ingest creates it, later stages enrich and change it through
RFC 7386 merge patches, and each stage keeps its own details in its stage namespace.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from demo.orders import BLOCKED_CARD_BIN, COUNTRIES
from kvstate import Operation
from kvstate.model import JSONObject

__all__ = ["SERVICES", "Service", "StageFailure", "StageResult"]


class StageFailure(Exception):
    """One attempt of a stage failed; ``retryable`` says whether another attempt may help."""

    def __init__(self, message: str, *, retryable: bool, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.code = code


@dataclass(frozen=True, slots=True)
class StageResult:
    """What a successful attempt reports: its own metadata and a patch of the shared output."""

    metadata: JSONObject
    shared: JSONObject | None = None


Work = Callable[[Operation, random.Random], StageResult]


def _never_skip(op: Operation) -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class Service:
    """One simulated service: latency distribution (log-normal), transient failures, its work."""

    stage: str
    median: float
    sigma: float
    transient: float
    errors: tuple[tuple[str, str], ...]
    work: Work
    skip: Callable[[Operation], str | None] = field(default=_never_skip)
    cap: float = 4.0

    def latency(self, rng: random.Random, scale: float) -> float:
        """Seconds one attempt takes: log-normal around the median, capped (a timeout)."""
        return min(self.cap, rng.lognormvariate(math.log(self.median), self.sigma)) * scale

    def attempt(self, op: Operation, rng: random.Random, failure_scale: float) -> StageResult:
        """Run one attempt: a transient failure with the service's probability, else the work."""
        if rng.random() < self.transient * failure_scale:
            message, code = rng.choice(self.errors)
            raise StageFailure(message, retryable=True, code=code)
        return self.work(op, rng)


# ------------------------------------------------------------------ reading the document


def _obj(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _input(op: Operation) -> dict[str, object]:
    return _obj(op.metadata.get("input"))


def _output(op: Operation) -> dict[str, object]:
    return _obj(op.metadata.get("output"))


def _stage_output(op: Operation, stage: str) -> dict[str, object]:
    return dict(op.stage(stage).metadata)


# ------------------------------------------------------------------ the ten services


def _ingest(op: Operation, rng: random.Random) -> StageResult:
    doc = _input(op)
    lines = [_obj(item) for item in _list(doc.get("items"))]
    subtotal = sum(_int(line.get("quantity")) * _int(line.get("unit_price_cents")) for line in lines)
    customer = _obj(doc.get("customer"))
    email = customer.get("email")
    output: JSONObject = {
        "order_number": doc.get("order_number"),
        "status": "received",
        "currency": doc.get("currency"),
        "lines": lines,
        "subtotal_cents": subtotal,
        "customer": {"id": customer.get("id"), "email": email.lower() if isinstance(email, str) else None},
    }
    return StageResult({"lines": len(lines), "bytes": len(json.dumps(doc))}, {"output": output})


def _validate(op: Operation, rng: random.Random) -> StageResult:
    doc = _input(op)
    problems = []
    for line in (_obj(item) for item in _list(doc.get("items"))):
        if _int(line.get("quantity")) <= 0:
            problems.append(f"{line.get('sku')}: quantity {line.get('quantity')} is not positive")
    if not _obj(doc.get("shipping")).get("country"):
        problems.append("shipping country missing")
    if problems:
        raise StageFailure("invalid order: " + "; ".join(problems), retryable=False, code="invalid-input")
    return StageResult({"checks": 7, "problems": 0}, {"output": {"status": "validated"}})


def _geo(op: Operation, rng: random.Random) -> StageResult:
    shipping = _obj(_input(op).get("shipping"))
    country = str(shipping.get("country"))
    if country not in COUNTRIES:
        raise StageFailure(f"geocoder timed out resolving country {country!r}", retryable=True, code="timeout")
    lat, lon, zone = COUNTRIES[country]
    return StageResult(
        {
            "lat": round(lat + rng.uniform(-0.2, 0.2), 4),
            "lon": round(lon + rng.uniform(-0.2, 0.2), 4),
            "timezone": zone,
            "precision": rng.choice(["rooftop", "street", "postcode"]),
        }
    )


def _fraud(op: Operation, rng: random.Random) -> StageResult:
    doc = _input(op)
    payment = _obj(doc.get("payment"))
    if payment.get("card_bin") == BLOCKED_CARD_BIN:
        raise StageFailure("fraud model error: feature vector contains NaN", retryable=True, code="model-error")
    signals = []
    if doc.get("customer") is None:
        signals.append("guest-checkout")
    if _int(_output(op).get("subtotal_cents")) > 20000:
        signals.append("high-value")
    if rng.random() < 0.1:
        signals.append("new-device")
    return StageResult(
        {"signals": signals, "score": round(min(1.0, 0.05 + 0.2 * len(signals) + rng.random() * 0.1), 3)}
    )


def _skip_guest(op: Operation) -> str | None:
    return "guest checkout: no customer profile" if _input(op).get("customer") is None else None


def _profile(op: Operation, rng: random.Random) -> StageResult:
    customer = _obj(_input(op).get("customer"))
    orders = rng.randint(0, 60)
    tier = "gold" if orders > 40 else "silver" if orders > 10 else "bronze"
    return StageResult({"customer": customer.get("id"), "lifetime_orders": orders, "tier": tier})


def _merge(op: Operation, rng: random.Random) -> StageResult:
    geo = _stage_output(op, "geo")
    fraud = _stage_output(op, "fraud")
    profile = _stage_output(op, "profile")
    shipping = dict(_obj(_input(op).get("shipping")))
    shipping["geo"] = {"lat": geo.get("lat"), "lon": geo.get("lon"), "timezone": geo.get("timezone")}
    patch: JSONObject = {
        "status": "enriched",
        "shipping": shipping,
        "risk_signals": fraud.get("signals", []),
        "customer": {"tier": profile.get("tier", "unknown")},
    }
    sources = ["geo", "fraud"] + (["profile"] if profile else [])
    return StageResult({"sources": sources}, {"output": patch})


def _score(op: Operation, rng: random.Random) -> StageResult:
    fraud_score = _stage_output(op, "fraud").get("score")
    base = fraud_score if isinstance(fraud_score, float) else 0.5
    tier = _obj(_output(op).get("customer")).get("tier")
    risk = round(max(0.0, base - (0.1 if tier == "gold" else 0.0)), 3)
    decision = "review" if risk >= 0.5 else "accept"
    return StageResult({"model": "risk-v3", "risk": risk}, {"output": {"risk": {"score": risk, "decision": decision}}})


def _persist(op: Operation, rng: random.Random) -> StageResult:
    row_id = int(hashlib.sha256(op.id.encode()).hexdigest()[:8], 16)
    return StageResult({"table": "orders", "row_id": row_id}, {"output": {"status": "stored", "row_id": row_id}})


def _skip_no_email(op: Operation) -> str | None:
    email = _obj(_output(op).get("customer")).get("email")
    return None if email else "no e-mail address (guest checkout)"


def _notify(op: Operation, rng: random.Random) -> StageResult:
    email = _obj(_output(op).get("customer")).get("email")
    return StageResult({"channel": "email", "to": email, "template": "order-confirmation"})


def _audit(op: Operation, rng: random.Random) -> StageResult:
    digest = hashlib.sha256(json.dumps(_output(op), sort_keys=True).encode()).hexdigest()
    return StageResult({"digest": digest[:16]}, {"output": {"audit_digest": digest[:16]}})


_NET = (("connection reset by peer", "network"), ("upstream returned 503", "unavailable"))

SERVICES: dict[str, Service] = {
    s.stage: s
    for s in (
        Service("ingest", 0.02, 0.5, 0.005, _NET, _ingest),
        Service("validate", 0.03, 0.4, 0.005, _NET, _validate),
        Service("geo", 0.15, 0.8, 0.08, (("geocoder rate limited", "rate-limited"), *_NET), _geo),
        Service("fraud", 0.25, 0.6, 0.05, (("fraud model timed out", "timeout"), *_NET), _fraud),
        Service("profile", 0.08, 0.7, 0.10, (("profile store unavailable", "unavailable"),), _profile, _skip_guest),
        Service("merge", 0.02, 0.4, 0.005, _NET, _merge),
        Service("score", 0.12, 0.5, 0.03, (("scoring service overloaded", "overloaded"),), _score),
        Service("persist", 0.06, 0.6, 0.06, (("database deadlock detected", "deadlock"), *_NET), _persist),
        Service("notify", 0.20, 0.7, 0.10, (("smtp 451 try again later", "smtp-451"),), _notify, _skip_no_email),
        Service("audit", 0.04, 0.5, 0.02, _NET, _audit),
    )
}
"""The service behind each stage of ``demo/pipeline.toml``."""
