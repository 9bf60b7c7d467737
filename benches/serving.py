"""Starting `lm-sandbox serve` for the bench scripts: a free loopback port, `-t 2`, ready when
`/health` says 200."""
import http.client
import socket
import subprocess
import time


def start(binary, model, *extra):
    """Starts the server; returns (process, port). Exits when it is not ready within 30 s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "serve", "-m", model, "--port", str(port), "-t", "2", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not start")
