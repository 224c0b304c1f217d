#!/usr/bin/env bash
# The main job: set-up, then a live 4-host cluster in network namespaces with real clients,
# a crash (SIGKILL + link cut), a rejoin, an application failure (a host's web service
# stops; its health check takes the host out of the web rule) and a drainstop, ending with a
# summary measured by the clients. Needs root; exits non-zero if anything it shows went wrong.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/shoal lab demo --hosts 4
