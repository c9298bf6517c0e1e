"""Command line: ``python -m gateway serve | migrate | <operator commands>``."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .config import ConfigError, load


async def _serve(config_path: str | None) -> int:
    from .app import Gateway, StartupError

    gw = Gateway(load(config_path))
    try:
        await gw.start()
    except StartupError as exc:
        print(f"gateway: cannot start: {exc}", file=sys.stderr)
        await gw.stop()
        return 2
    try:
        await gw.run_until_signalled()
    finally:
        await gw.stop()
    return 0


async def _migrate(config_path: str | None) -> int:
    from . import logs
    from .app import migrate_database

    cfg = load(config_path)
    logs.configure(cfg.log_format, cfg.log_level, secrets=cfg.secret_values())
    if not cfg.database_url:
        print("gateway: migrate needs GATEWAY_DATABASE_URL (serve migrates the embedded "
              "database itself)", file=sys.stderr)
        return 2
    applied = await migrate_database(cfg.database_url)
    print(f"applied: {', '.join(applied) or 'nothing (up to date)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="gateway", description="Asterisk billing gateway")
    parser.add_argument("--config", help="TOML file (default: $GATEWAY_CONFIG)")
    parser.add_argument("command", nargs="?", default="serve",
                        help="serve | migrate | lab | an operator command (see 'gateway help')")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "serve":
            return asyncio.run(_serve(args.config))
        if args.command == "migrate":
            return asyncio.run(_migrate(args.config))
        if args.command == "lab":
            from .lab import main as lab_main

            return lab_main(rest)
        from .cli import main as cli_main

        return cli_main([args.command, *rest], config_path=args.config)
    except ConfigError as exc:
        print(f"gateway: configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
