"""Install shoal's nftables table in the current namespace: ``install CONFIG TOKENS_FILE``.

TOKENS_FILE holds one token per line (see shoal.protocol.epoch); the lease is set long.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.config import load_config
from shoal.dataplane.nft import Nft
from shoal.dataplane.ruleset import base_ruleset, lease, update
from shoal.protocol.engine import Install
from shoal.protocol.frames import RuleState

if __name__ == "__main__":
    cfg = load_config(Path(sys.argv[2]))
    tokens = frozenset(int(x) for x in Path(sys.argv[3]).read_text().split())
    nft = Nft()
    nft.run(base_ruleset(cfg))
    states = tuple(RuleState.ENABLED for _ in cfg.cluster.effective_rules)
    nft.json(update(cfg, Install(tokens, True, states, None)))
    nft.run(lease(int(sys.argv[4]) if len(sys.argv) > 4 else 600_000))
    print("installed", len(tokens))
