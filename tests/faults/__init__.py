"""Fault suite: break the real parts on purpose (database, AMI link, the gateway process,
listeners) while calls are up, then check the billing rules' §8 invariants in SQL."""
