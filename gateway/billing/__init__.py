"""The billing layer: the only way into the store for calls, the HTTP surface and the CLI.

- ``rater``: decide, reserve, renew and settle calls (the rules decide, the store reserves);
- ``recovery``: what reconciliation reads (open calls, the PBX's CDR records, live processes);
- ``provisioning``: tenants, users, licences, numbers, rates and wallets, with typed errors;
- ``provisioning_file``: a declarative provisioning file checked and applied in one transaction;
- ``views``: typed read views that the API, the status page and the CLI answer from;
- ``schemas``: the one schema source of request and response bodies (checks and OpenAPI).
"""
