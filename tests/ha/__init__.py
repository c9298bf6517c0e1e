"""PostgreSQL high availability: the gateway on a Patroni-managed primary and replica."""
