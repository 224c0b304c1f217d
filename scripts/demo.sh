#!/usr/bin/env bash
# The main job: shoal on the example cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
set -x
shoal check examples/host1.toml examples/host2.toml examples/host3.toml
shoal ip2mac 198.18.0.100 --mode unicast
shoal plan examples/host1.toml examples/host2.toml examples/host3.toml --members 1,2
shoal plan examples/host1.toml examples/host2.toml examples/host3.toml --members 1,2,3 --from 1,2
python -m shoal.sim --seed 7
