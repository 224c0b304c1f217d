"""Install shoal's table with given tokens in the current namespace (lab self-check):
``python -m shoal.lab.install CONFIG TOKENS_FILE [LEASE_MS]``."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from shoal.config import load_config
from shoal.dataplane.nft import Nft
from shoal.dataplane.ruleset import base_ruleset, lease, update
from shoal.protocol.engine import Install
from shoal.protocol.frames import RuleState


def main() -> None:
    cfg = load_config(Path(sys.argv[1]))
    tokens = frozenset(int(x) for x in Path(sys.argv[2]).read_text().split())
    lease_ms = int(sys.argv[3]) if len(sys.argv) > 3 else 3_600_000
    nft = Nft()
    with contextlib.suppress(Exception):
        nft.run("delete table inet shoal")
    nft.run(base_ruleset(cfg))
    states = tuple(RuleState.ENABLED for _ in cfg.cluster.effective_rules)
    nft.json(update(cfg, Install(tokens, True, states, None)))
    nft.run(lease(lease_ms))


if __name__ == "__main__":
    main()
