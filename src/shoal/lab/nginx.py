"""A real web server on lab hosts: Debian's nginx, one per host namespace, for the health
checks' tests and benchmark.

Each host's nginx answers ``hN`` on :data:`HTTP_PORT` (plain) and :data:`HTTPS_PORT`
(TLS, a self-signed certificate made with openssl for the lab), on the VIP and the host's
dedicated address; both ports are in the lab's ``web`` rule and free of the lab's own
service. ``/big`` is a download that lasts (:data:`BIG_SIZE` bytes at :data:`BIG_RATE` a second).
It answers 500 while the host's *fail file* exists, so a test can break the
application without touching the server. It runs in the foreground in a session of its
own (master and workers in one process group), recorded in the lab's PIDs, so the lab's
teardown ends it; :func:`pause` stops the whole group (the server hangs: connections are
accepted by the kernel and never answered).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from shoal.lab.topology import Lab, LabError, alive, sh

HTTP_PORT = 88
HTTPS_PORT = 442
BIG_RATE = 65536  # bytes a second of /big, a download that lasts
BIG_SIZE = 1 << 24  # bytes of /big: over four minutes at that rate


def fail_file(lab: Lab, host: int) -> Path:
    return lab.dir / f"h{host}.nginx" / "fail"


def _cert(lab: Lab) -> tuple[Path, Path]:
    key, crt = lab.dir / "nginx.key", lab.dir / "nginx.crt"
    if not crt.exists():
        sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
           "-subj", "/CN=shoal-lab", "-keyout", str(key), "-out", str(crt))  # fmt: skip
    return key, crt


def _conf(lab: Lab, host: int, root: Path) -> str:
    key, crt = _cert(lab)
    addrs = ["198.18.0.100", f"198.18.0.{10 + host}"]
    listen = "".join(
        f"    listen {a}:{HTTP_PORT};\n    listen {a}:{HTTPS_PORT} ssl;\n" for a in addrs
    )
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {root}/tmp;
  proxy_temp_path {root}/tmp;
  fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp;
  scgi_temp_path {root}/tmp;
  server {{
{listen}    ssl_certificate {crt};
    ssl_certificate_key {key};
    location = /big {{
      limit_rate {BIG_RATE};
      default_type application/octet-stream;
      alias {root}/big;
    }}
    location / {{
      default_type text/plain;
      if (-f {root}/fail) {{ return 500 "h{host} failing\\n"; }}
      return 200 "h{host}\\n";
    }}
  }}
}}
"""


def start(lab: Lab, host: int) -> None:
    """nginx on host ``host``, answering before this returns."""
    root = lab.dir / f"h{host}.nginx"
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    with (root / "big").open("wb") as f:
        f.truncate(BIG_SIZE)
    conf = root / "nginx.conf"
    conf.write_text(_conf(lab, host, root))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns(f"h{host}"), "nginx", "-c", str(conf), "-p", str(root)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=(root / "stderr.log").open("a"), start_new_session=True,
    )  # fmt: skip
    lab.pids[f"nginx-h{host}"] = proc.pid
    lab.save()
    url = f"http://198.18.0.{10 + host}:{HTTP_PORT}/"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        res = subprocess.run(
            ["ip", "netns", "exec", lab.ns("rt"), "curl", "-s", "--max-time", "1", url],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        if res.stdout.strip() == f"h{host}":
            return
        time.sleep(0.1)
    raise LabError(f"nginx on h{host} did not answer: {(root / 'error.log').read_text()[-400:]}")


def stop(lab: Lab, host: int) -> None:
    """End host ``host``'s nginx (SIGTERM to its group: master and workers)."""
    pid = lab.pids.pop(f"nginx-h{host}", None)
    if pid is None:
        return
    os.killpg(pid, signal.SIGCONT)  # a paused server must see the TERM
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    lab.save()


def pause(lab: Lab, host: int, paused: bool = True) -> None:
    """Freeze (or thaw) host ``host``'s nginx: a hung application."""
    os.killpg(lab.pids[f"nginx-h{host}"], signal.SIGSTOP if paused else signal.SIGCONT)


def failing(lab: Lab, host: int, fail: bool = True) -> None:
    """Make host ``host``'s nginx answer 500 (or 200 again)."""
    f = fail_file(lab, host)
    if fail:
        f.touch()
    else:
        f.unlink(missing_ok=True)
