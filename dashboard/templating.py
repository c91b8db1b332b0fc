"""The template renderer: the one Jinja2 environment (autoescape on) and ``Renderer``, which handlers render with.

The environment's filters are the display functions of ``dashboard.formatting``
(``show`` for every untrusted value, durations, ages, times) and ``segment`` for URL
path segments; its globals are the vendored htmx versions. Handlers render through
``Renderer.response`` (rather than returning Litestar ``Template`` responses) so the
time of context building plus rendering is measured for /metrics and the benchmark,
and so one environment serves pages, fragments and error pages alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from litestar import MediaType, Request, Response
from litestar.utils.scope.state import ScopeState

import dashboard
from dashboard.formatting import clip, format_age, format_duration, format_time, show

__all__ = ["HTMX_VERSION", "SSE_VERSION", "Renderer", "template_directory"]

HTMX_VERSION = "2.0.11"
SSE_VERSION = "2.2.4"


def template_directory() -> Path:
    """``templates/``: inside the installed package (wheel) or at the repository root (checkout)."""
    package = Path(dashboard.__file__).parent
    inside = package / "templates"
    return inside if inside.is_dir() else package.parent / "templates"


def make_environment(directory: Path | None = None) -> jinja2.Environment:
    """The dashboard's Jinja2 environment, autoescape on for every template.

    Set here because an environment built by hand (or handed to Litestar's engine) keeps
    Jinja2's default, autoescape off.
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory or template_directory()),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        show=show,
        clip=clip,
        duration=format_duration,
        age=format_age,
        time=format_time,
        segment=lambda value: quote(str(value), safe=""),
    )
    env.globals.update(htmx_version=HTMX_VERSION, sse_version=SSE_VERSION)
    return env


class Renderer:
    """Renders templates into HTML responses and records how long each took."""

    def __init__(
        self,
        environment: jinja2.Environment,
        observe: Callable[[str, float], None] | None = None,
        globals_: dict[str, Any] | None = None,
    ) -> None:
        self.environment = environment
        self.observe = observe
        self.globals = globals_ or {}

    def html(self, template: str, context: dict[str, Any], csrf_token: str = "") -> str:
        """The rendered template (for tests and the benchmark as much as for handlers)."""
        return self.environment.get_template(template).render({**self.globals, **context, "csrf_token": csrf_token})

    def response(
        self,
        request: Request[Any, Any, Any],
        template: str,
        context: dict[str, Any],
        *,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        started: float | None = None,
    ) -> Response[str]:
        """An HTML response; ``started`` (perf_counter) lets the caller include context building in the timing."""
        began = time.perf_counter() if started is None else started
        token = ScopeState.from_scope(request.scope).csrf_token
        body = self.html(template, {**context, "path": request.scope["path"]}, token if isinstance(token, str) else "")
        if self.observe is not None:
            self.observe(template, time.perf_counter() - began)
        return Response(body, status_code=status_code, media_type=MediaType.HTML, headers=headers)
