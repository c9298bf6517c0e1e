"""The billing layer: the only way into the store for calls, the HTTP surface and the CLI.

- ``rater``: decide, reserve, renew and settle calls (rules + store);
- ``provisioning``: tenants, users, licences, numbers, rates, wallets, with typed errors.
- ``provisioning_file``: check and apply a provisioning file, one transaction per file.
"""
