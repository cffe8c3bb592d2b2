"""nginx from Debian as a fast origin on loopback: files from a directory, with Range and sendfile, for the ranged-fetch tests and benchmarks.

One stream from it runs at about 1.2-1.4 GB/s on a 2-core machine, far above olah
(which reads each object whole into memory before sending it): a fetch measured
against it shows bakehouse's own ceiling, not the origin's. Hub-shaped paths
(`/<org>/<repo>/resolve/<commit>/<file>`) are served from `<root>/<org>/<repo>/<file>`
with the headers huggingface_hub reads (X-Repo-Commit, X-Linked-Etag, X-Linked-Size,
ETag); anything else (the hub API, a file not on disk) goes to `api` when given (olah).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ops.net import free_port
from ops.runner import stop


@dataclass
class Nginx:
    root: Path  # files served: <root>/<path>
    work: Path  # config, pid, logs, temp
    api: str | None = None  # where hub API requests go (olah's URL)
    repos: dict[str, str] = field(default_factory=dict)  # "org/repo" -> the commit its resolve paths answer with
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log_bytes: bool = False  # an access log of every response's bytes (what the benchmarks count)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _etags(self) -> list[str]:
        """Each hub file's sha256 as its X-Linked-Etag, the way the hub names LFS files."""
        lines = []
        for repo, commit in self.repos.items():
            for f in sorted((self.root / repo).rglob("*")):
                if f.is_file():
                    rel = f.relative_to(self.root / repo).as_posix()
                    sha = hashlib.sha256(f.read_bytes()).hexdigest()
                    lines.append(f'    "/{repo}/resolve/{commit}/{rel}" "\\"{sha}\\"";')
        return lines

    @property
    def access_log(self) -> Path:
        return self.work / "access.log"

    def _access_log(self) -> str:
        return f"log_format sent '$body_bytes_sent $status $request_uri'; access_log {self.access_log} sent;" if self.log_bytes else "access_log off;"

    def served(self) -> tuple[int, int]:
        """Responses and body bytes sent since the start (or the last `reset`), a request cut short included."""
        try:
            lines = self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return 0, 0
        return len(lines), sum(int(line.split()[0]) for line in lines if line.split() and line.split()[0].isdigit())

    def reset(self) -> None:
        self.access_log.write_text("")

    def config(self) -> str:
        api = f"proxy_pass {self.api}; proxy_buffering off;" if self.api else "return 404;"
        # Started as root, nginx's workers would run as nobody, who cannot read a test's private temp directory.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""daemon off;
{user}worker_processes 2;
pid {self.work}/nginx.pid;
error_log {self.work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    {self._access_log()}
    sendfile on;
    map_hash_bucket_size 256;
    tcp_nopush on;
    client_body_temp_path {self.work}/tmp;
    proxy_temp_path {self.work}/tmp;
    default_type application/octet-stream;
    map $uri $linked_etag {{
        default "";
{chr(10).join(self._etags())}
    }}
    server {{
        listen 127.0.0.1:{self.port};
        location ~ "^/(?<repo>[^/]+/[^/]+)/resolve/(?<commit>[0-9a-f]{{40}})/(?<file>.+)$" {{
            root {self.root};
            try_files /$repo/$file @api;
            add_header X-Repo-Commit $commit always;
            add_header X-Linked-Etag $linked_etag always;
            add_header X-Linked-Size $content_length always;
        }}
        location /files/ {{ alias {self.root}/; }}
        location / {{ {api} }}
        location @api {{ {api} }}
    }}
}}
"""

    def start(self) -> Nginx:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        (self.work / "nginx.conf").write_text(self.config())
        self.process = subprocess.Popen([nginx, "-c", str(self.work / "nginx.conf"), "-e", str(self.work / "error.log")], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.process.stderr.read().decode() if self.process.stderr else ''}")
            try:
                httpx.get(self.url + "/files/", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not answer")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
