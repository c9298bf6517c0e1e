"""Shared test tools: helpers, fakes and fixtures that more than one test module uses.

Test modules import from here, never from one another (``tests/test_support.py``
checks it):

- ``ci``: ``need`` (fail in CI, skip elsewhere) and ``IN_CI``;
- ``database``: the test PostgreSQL (``ADMIN_URL``), scratch databases, ``TABLES``,
  ``dump_tables``;
- ``ledger``: billing rules §8 invariants in SQL (``ledger_agrees``) and pool counters;
- ``clock``: ``Clock``, a clock tests can set and move;
- ``tenant``: ``standard_tenant``, the small Canadian tenant most tests start from;
- ``gateway``: ``running_gateway``, a real gateway on free ports, and its tokens;
- ``http``: ``Client``, JSON over HTTP to that gateway, and ``floats_in``;
- ``agi``: ``agi_outbound``, a fake Asterisk placing one FastAGI request;
- ``ami``: ``FakeAmi``, a fake Asterisk Manager Interface server;
- ``waiting``: ``eventually``, wait (bounded) for another task's work;
- ``receiver``: a webhook receiver on loopback that answers, fails or hangs by plan;
- ``pbx``: the real Asterisk 22 and SIPp (``Pbx``, ``Sipp``, SIP traces).
"""
