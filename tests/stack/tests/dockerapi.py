"""A few calls of the Docker Engine API over its unix socket, with the
standard library only: list, inspect, kill, stop and start containers.

The stack's tests use it to find the worker replicas of their own compose
project and to kill or stop one of them, as `docker kill -s KILL` and
`docker stop` (or `docker-compose kill/stop`) would.
"""

import http.client
import json
import socket
import urllib.parse

SOCKET = "/var/run/docker.sock"
API = "/v1.41"  # Docker 20.10; newer engines still serve it.


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class DockerError(Exception):
    pass


class Docker:
    def __init__(self, path=SOCKET):
        self.path = path

    def _call(self, method, url, params=None, timeout=30):
        if params:
            url += "?" + urllib.parse.urlencode(params)
        conn = _UnixConnection(self.path, timeout)
        try:
            conn.request(method, API + url)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status >= 300 and resp.status != 304:
            raise DockerError("%s %s: %d %s" % (method, url, resp.status,
                                                 body.decode(errors="replace")))
        return json.loads(body) if body else None

    def containers(self, labels, all=False):
        """Containers carrying every label in `labels` (dict)."""
        filters = {"label": ["%s=%s" % kv for kv in labels.items()]}
        return self._call("GET", "/containers/json",
                          {"filters": json.dumps(filters),
                           "all": "1" if all else "0"})

    def inspect(self, cid):
        return self._call("GET", "/containers/%s/json" % cid)

    def kill(self, cid, signal="KILL"):
        self._call("POST", "/containers/%s/kill" % cid, {"signal": signal})

    def stop(self, cid, timeout_s):
        """Sends the image's STOPSIGNAL, waits up to timeout_s for the exit,
        then SIGKILL; returns when the container has stopped."""
        self._call("POST", "/containers/%s/stop" % cid, {"t": str(timeout_s)},
                   timeout=timeout_s + 30)

    def start(self, cid):
        self._call("POST", "/containers/%s/start" % cid)
