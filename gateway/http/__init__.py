"""The HTTP surface: probes, /status, /metrics, the operator page and the admin API.

``app.build_app(gateway)`` is the factory; ``api`` holds the admin routes,
``openapi`` their generated description, ``status`` the /status document, ``bodies``
the JSON encoding and strict body reading, ``auth`` the bearer tokens. Bodies are
checked against ``billing.schemas`` and answered from ``billing.views``.
"""
