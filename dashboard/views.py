"""Old name of ``dashboard.contexts`` (the page context builders); import that module instead.

Kept only because ``bench/dashboard.py`` still imports these names from here; delete this
module once it imports ``dashboard.contexts``.
"""

from dashboard.contexts import DashboardState, banner_context, operations_context, overview_context

__all__ = ["DashboardState", "banner_context", "operations_context", "overview_context"]
