#!/usr/bin/env python3
"""Every hostile input of the hardening issue against one binary: `benches/hostile_compare.py
BINARY MODEL`. Starts `serve` on a free port, sends each input (10 s limit), and prints one line
per input: the HTTP status (or `timeout` / `no answer`), then whether the process was still alive
and a normal request still succeeded. Restarts the server when it died. Used for the before/after
table in the hardening issue's closing note."""
import http.client
import os
import json
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import start  # noqa: E402

binary, model = sys.argv[1], sys.argv[2]
MODEL = "SmolLM2-135M-Instruct.Q4_1"


def chat(port, extra, timeout=10):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 8, "temperature": 0}
    body.update(extra)
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        c.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
        r = c.getresponse()
        text = r.read().decode(errors="replace")
        if text.startswith("data:") and '"error"' in text:
            return f"{r.status} (in-band error)"
        return str(r.status)
    except socket.timeout:
        return "timeout"
    except http.client.IncompleteRead:
        return "stream cut off"
    except (OSError, http.client.HTTPException) as e:
        return f"no answer ({type(e).__name__})"


everything = {str(t): -100 for t in range(49152)}
cases = [
    ("grammar: negated class covering all of Unicode", {"grammar": r"root ::= [^\x00-\U0010FFFF]"}),
    ("grammar: empty class midway", {"grammar": r'root ::= "a" [^\x01-\U0010FFFF]'}),
    ("grammar: NUL literal", {"grammar": r'root ::= "\x00"'}),
    ("grammar: no admissible token at the start (<[0]>)", {"grammar": "root ::= <[0]>"}),
    ("grammar: no admissible token midway", {"grammar": 'root ::= "ab" <[0]>'}),
    ("grammar: no admissible token midway, streamed", {"grammar": 'root ::= "ab" <[0]>', "stream": True}),
    ("grammar: {5,2}", {"grammar": 'root ::= "a"{5,2}'}),
    ("grammar: 100 nested groups", {"grammar": "root ::= " + "(" * 100 + '"a"' + ")" * 100}),
    ("grammar: 20000 nested groups", {"grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000}),
    ("grammar: * over a nullable item", {"grammar": 'root ::= ( ws | "a" )*\nws ::= [ ]?'}),
    ("grammar: left recursion", {"grammar": 'root ::= root "a" | "b"'}),
    ("grammar: undefined rule", {"grammar": "root ::= missing"}),
    ("schema: minItems above maxItems",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "minItems": 5, "maxItems": 2}}}}),
    ("schema: minLength 1000000",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 1000000}}}}),
    ("schema: 3000 optional properties",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}}}}),
    ("logit_bias: -100 on every token", {"logit_bias": everything}),
    ("stop: one string of 100000 bytes", {"stop": ["x" * 100000]}),
    ("n: 128 (over the queue of 64)", {"n": 128}),
]
proc, port = start(binary, model)
print(f"binary: {binary}")
for name, extra in cases:
    status = chat(port, extra)
    time.sleep(0.2)
    alive = proc.poll() is None
    after = chat(port, {}, timeout=30) if alive else "-"
    print(f"{name:55} -> {status:22} alive={alive} next_request={after}")
    if not alive or after != "200":
        proc.kill()
        proc.wait()
        proc, port = start(binary, model)
proc.kill()
