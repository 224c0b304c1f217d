"""Remote control in a 3-host lab whose cluster allows it: a verb sent from host 1 is carried
out on host 3 and logged there with where it came from; ``--all`` reaches every host; the
request frame recorded and sent again changes nothing; a request signed with another key is
dropped. (Off by default: tests/test_daemon.py.)"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.config import load_config
from shoal.daemon.control import call
from shoal.lab import clients as C
from shoal.lab import hostile
from shoal.lab.topology import Lab
from shoal.protocol.codec import Codec, Keys
from shoal.protocol.frames import FrameType, Request, cluster_id
from tests.conftest import needs_root, settle, until
from tests.test_daemon import flag, shoal
from tests.test_hardening import REPLAY, _counters, _python

pytestmark = [needs_root(), pytest.mark.root]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(name="r" + uuid.uuid4().hex[:6], hosts=3)
    try:
        lab.up(service=False)
        for h in (1, 2, 3):
            path = lab.config_path(h)
            text = path.read_text().replace("[cluster]\n", "[cluster]\nremote_control = true\n", 1)
            path.write_text(text)
        lab.start_services()
        yield settle(lab)
    finally:
        lab.down()


def remote_events(lab: Lab, host: int) -> list[dict[str, object]]:
    return [e for e in C.daemon_events(lab, host, 0) if e.get("name") == "remote_command"]


def test_a_verb_runs_on_the_host_it_names_and_says_who_asked(lab: Lab) -> None:
    """``shoal --host 3 disable 80`` on host 1: host 3's kernel drops the web rule, host 3
    logs the command with host 1's address; ``--all query`` answers for all three;
    ``--host 3 enable 80`` puts it back."""
    res = shoal(lab, "h1", "--host", "3", "disable", "80")
    assert res.returncode == 0 and res.stdout.strip() == "host 3: rule web: disabled", res
    assert flag(lab, "h3", "off_0") and not flag(lab, "h2", "off_0")
    [ev] = remote_events(lab, 3)
    assert ev["command"] == "disable" and ev["peer"] == 1 and ev["address"] == "198.18.0.11"
    res = shoal(lab, "h1", "--all", "query")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["host 1", "host 2", "host 3"], lines
    assert all("converged" in ln for ln in lines), lines
    assert shoal(lab, "h1", "--host", "3", "enable", "80").returncode == 0
    assert not flag(lab, "h3", "off_0")
    bad = shoal(lab, "h1", "--host", "9", "stop")
    assert bad.returncode == 1 and "host 9: no answer within 2 s" in bad.stdout


def test_a_recorded_request_sent_again_changes_nothing(lab: Lab, tmp_path: Path) -> None:
    """Host 1's frames are recorded while it asks host 3 to disable the web rule, then to
    enable it again; the disable request, sent again 50 times, is dropped by host 3's replay
    window: the rule stays enabled and host 3 logs no further command."""
    settle(lab)

    def ask() -> None:
        time.sleep(0.5)
        assert shoal(lab, "h1", "--host", "3", "disable", "80").returncode == 0
        assert shoal(lab, "h1", "--host", "3", "enable", "80").returncode == 0

    asker = threading.Thread(target=ask)
    asker.start()
    frames = hostile.record(lab.ns("rt"), [1], 12)  # the asker is done well before
    asker.join(30)
    requests = [f for f in frames if f[3] == FrameType.REQUEST]
    assert len(requests) >= 2, len(frames)
    disable = [f for f in requests if b'"disable"' in f]
    assert disable
    before = (len(remote_events(lab, 3)), _counters(lab, "h3")["replay"])
    capture = tmp_path / "request.frames"
    capture.write_text("\n".join(f.hex() for f in disable))
    out, _ = _python(lab, REPLAY, str(capture), "0.5").communicate(timeout=30)
    assert int(out) >= 40
    time.sleep(0.5)
    assert not flag(lab, "h3", "off_0")
    assert len(remote_events(lab, 3)) == before[0]
    assert _counters(lab, "h3")["replay"] >= before[1] + 40


def test_a_request_signed_with_another_key_is_dropped(lab: Lab, tmp_path: Path) -> None:
    """A request as host 1 would send it, but signed with a key that is not the cluster's:
    host 3 counts it as bad_auth and does nothing."""
    settle(lab)
    cfg = load_config(lab.config_path(1))
    forged = Codec(cluster_id(cfg.cluster.primary_vip), Keys(b"not-the-cluster-key-at-all", ()))
    body = json.dumps({"cmd": "stop"}).encode()
    frame = forged.encode(Request(1, 2**62, 1, 3, 7, body))
    capture = tmp_path / "forged.frames"
    capture.write_text(frame.hex())
    before = (len(remote_events(lab, 3)), _counters(lab, "h3")["bad_auth"])
    out, _ = _python(lab, REPLAY, str(capture), "0.3").communicate(timeout=30)
    assert int(out) >= 10
    until("host 3 counts the forgeries", lambda: _counters(lab, "h3")["bad_auth"] >= before[1] + 10)
    assert len(remote_events(lab, 3)) == before[0]
    assert call(lab.control(3), {"cmd": "query"})["hosts"][2]["state"] == "converged"
