"""The HTTP surface: probes, /status, /metrics, the operator page and the admin API.

``app.build_app(gateway)`` is the factory; ``api`` holds the admin routes,
``openapi`` their description, ``status`` the /status document, ``bodies`` the JSON
encoding and request-shape checks, ``auth`` the bearer tokens.
"""
