"""kvstate dashboard: live pipeline progress in the browser (Litestar + Jinja2 + htmx).

``create_app(DashboardSettings.from_env(os.environ))`` builds the ASGI app; ``kvstate
dashboard`` (or ``python -m dashboard``) serves it with uvicorn.
"""
