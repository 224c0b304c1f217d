"""Install shoal's tables with given tokens in the current namespace (lab self-check):
``python -m shoal.lab.install CONFIG TOKENS_FILE [LEASE_MS]``. Tables already there are
kept and updated in place, as a restarted daemon does, so existing connections survive."""

from __future__ import annotations

import sys
from pathlib import Path

from shoal.config import load_config
from shoal.dataplane.backend import NftBackend
from shoal.protocol.engine import Install
from shoal.protocol.frames import RuleState


def main() -> None:
    cfg = load_config(Path(sys.argv[1]))
    tokens = frozenset(int(x) for x in Path(sys.argv[2]).read_text().split())
    lease_ms = int(sys.argv[3]) if len(sys.argv) > 3 else 3_600_000
    backend = NftBackend(cfg)
    backend.attach()
    states = tuple(RuleState.ENABLED for _ in cfg.cluster.effective_rules)
    backend.apply(Install(tokens, True, states, None))
    backend.renew(lease_ms)


if __name__ == "__main__":
    main()
