"""Install shoal's tables with given tokens in the current namespace (lab self-check,
data-plane bench): ``python -m shoal.lab.install CONFIG TOKENS_FILE [LEASE_MS] [--fresh]
[--keep-all]``. Tables already there are kept and updated in place, as a restarted daemon
does, so existing connections survive; ``--fresh`` makes them anew, ``--keep-all`` first owns
every bucket of the first rule (so the pre-filter keeps them all, as after a long life)."""

from __future__ import annotations

import argparse
from pathlib import Path

from shoal.config import load_config
from shoal.dataplane.backend import NftBackend
from shoal.dataplane.contract import Install, RuleState


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", type=Path)
    ap.add_argument("tokens", type=Path)
    ap.add_argument("lease_ms", type=int, nargs="?", default=3_600_000)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--keep-all", action="store_true")
    args = ap.parse_args()
    cfg = load_config(args.config)
    tokens = frozenset(int(x) for x in args.tokens.read_text().split())
    backend = NftBackend(cfg)
    if args.fresh:
        backend.create()
    else:
        backend.attach()
    states = tuple(RuleState.ENABLED for _ in cfg.cluster.effective_rules)
    if args.keep_all:
        backend.apply(Install(frozenset(range(cfg.cluster.buckets)), True, states))
    backend.apply(Install(tokens, True, states))
    backend.renew(args.lease_ms)


if __name__ == "__main__":
    main()
