"""A small tenant used across tests: Canadian company, a few users, numbers and rates."""

from __future__ import annotations

from gateway.billing.provisioning import Provisioning

TENANT = "acme"


async def standard_tenant(admin: Provisioning, *, tenant: str = TENANT, wallet: str | None = None,
                          calling_plan_licences: int = 10, timezone: str = "America/Toronto",
                          prefix: str = "") -> None:
    """Users: alice (Calling Plan), bob (Calling Plan + International), carol (no
    licence), dave (Business Voice without Calling Plan), all located in Canada."""
    p = prefix
    await admin.create_tenant(tenant, "Acme Ltd", "CA", timezone=timezone, currency="USD")
    await admin.set_subscription(tenant, "business_voice_calling_plan", calling_plan_licences)
    await admin.set_subscription(tenant, "business_voice", 2)
    await admin.set_subscription(tenant, "international_calling_plan", 2)
    users = [
        (f"{p}alice", "101", ["business_voice_calling_plan"]),
        (f"{p}bob", "102", ["business_voice_calling_plan", "international_calling_plan"]),
        (f"{p}carol", "103", []),
        (f"{p}dave", "104", ["business_voice"]),
    ]
    for name, ext, skus in users:
        await admin.create_user(name, tenant, sip_endpoint=name, usage_location="CA",
                                extension=ext, display_name=name.title())
        for sku in skus:
            await admin.assign_licence(name, sku)
    if not p:
        await admin.add_number("+15145550100", tenant, "user", user_id="alice")
        await admin.add_number("+18005550199", tenant, "toll_free", target="alice")
        await admin.add_number("+15145550111", tenant, "service", target="bob")
        await admin.set_rates([
            {"kind": "domestic_overage", "prefix": "1", "price_per_minute": "0.02"},
            {"kind": "international", "prefix": "44", "price_per_minute": "0.10"},
            {"kind": "international", "prefix": "4420", "price_per_minute": "0.05"},
            {"kind": "toll_free_inbound", "prefix": "1", "price_per_minute": "0.03"},
        ])
    if wallet is not None:
        await admin.topup(tenant, wallet)
