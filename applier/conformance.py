"""``abflip-tuf-client``: the TUF client conformance CLI (theupdateframework/tuf-conformance)
on top of the device's own TUF code (:class:`applier.client.UpdateClient` over
:class:`applier.fetch.HttpFetcher`), so the conformance suite exercises what devices run.

    abflip-tuf-client --metadata-dir D init TRUSTED_ROOT
    abflip-tuf-client --metadata-dir D --metadata-url U refresh
    abflip-tuf-client --metadata-dir D --metadata-url U --target-name P [--target-name P2 ...] \\
        --target-base-url T --target-dir TD download

Metadata is kept under unversioned names (``D/root.json``, ``D/timestamp.json`` ...). Targets
are processed in order by one updater and the first failure stops the run; a target already
in ``TD`` with the signed length and hashes is not fetched again. Exit 0 on success, 1 on any
failure (the reason goes to stderr).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from urllib import parse

from metadata.errors import Error

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="abflip-tuf-client", description="TUF conformance client (abflip's device code)")
    p.add_argument("--metadata-dir", required=True, type=Path)
    p.add_argument("--metadata-url")
    p.add_argument("--target-name", action="append", default=[])
    p.add_argument("--target-base-url")
    p.add_argument("--target-dir", type=Path)
    p.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init")
    init.add_argument("trusted_root", type=Path)
    sub.add_parser("refresh")
    sub.add_parser("download")
    return p


def _client(args: argparse.Namespace, targets_url: str | None):
    from .client import UpdateClient
    from .fetch import HttpFetcher

    if not args.metadata_url:
        raise SystemExit("--metadata-url is required")
    return UpdateClient(metadata_url=args.metadata_url, targets_url=targets_url or args.metadata_url,
                        metadata_dir=args.metadata_dir, trusted_root=args.metadata_dir / "root.json",
                        fetcher=HttpFetcher(timeout=args.timeout, deadline=10 * args.timeout))


def run(args: argparse.Namespace) -> None:
    if args.command == "init":
        args.metadata_dir.mkdir(parents=True, exist_ok=True)
        tmp = args.metadata_dir / ".root.json.tmp"
        shutil.copyfile(args.trusted_root, tmp)
        tmp.replace(args.metadata_dir / "root.json")
        return
    if args.command == "refresh":
        _client(args, None).refresh()
        return
    # download
    if not args.target_name or not args.target_base_url or args.target_dir is None:
        raise SystemExit("download needs --target-name, --target-base-url and --target-dir")
    client = _client(args, args.target_base_url)
    client.refresh()
    args.target_dir.mkdir(parents=True, exist_ok=True)
    for name in args.target_name:  # in order; the first failure ends the run
        info = client.target_info(name)
        dest = args.target_dir / parse.quote(info.path, "")
        if not client.cached_target(info, dest):
            client.download_target(info, dest)


def main(argv: list[str] | None = None) -> int:
    try:
        run(_parser().parse_args(argv))
    except Error as e:
        print(e.diagnostics(), file=sys.stderr)
        return 1
    except SystemExit as e:
        if e.code not in (None, 0):  # argparse (usage already printed) or a missing option
            if isinstance(e.code, str):
                print(f"error: {e.code}", file=sys.stderr)
            return 1
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
