"""Decode speed with and without a grammar, from the server's own `timings`.

Start a server first (same build and threads for every run you compare), e.g.
    target/release/lm-sandbox serve --port 18122 -c 2048 --parallel 1 -t 2
then: python3 benches/grammar_speed.py [PORT]
Prints the median of 3 runs of predicted tokens/s for an unconstrained answer, a forced tool call
(grammar from the tool's schema) and a json_schema response format.
"""
import sys
import json, urllib.request

PORT = sys.argv[1] if len(sys.argv) > 1 else "18122"
def post(body):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/chat/completions", data=json.dumps(body).encode(), headers={"content-type":"application/json"})
    return json.load(urllib.request.urlopen(req))
tool = {"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string","maxLength":24},"unit":{"enum":["celsius","fahrenheit"]}},"required":["city","unit"]}}}
base = {"model":"SmolLM2-135M-Instruct.Q4_1","messages":[{"role":"user","content":"What is the weather in Paris?"}],"temperature":0,"max_tokens":120}
for name, extra in [("no grammar", {}), ("named tool (grammar)", {"tools":[tool],"tool_choice":{"type":"function","function":{"name":"get_weather"}}}),
                    ("json_schema", {"response_format":{"type":"json_schema","json_schema":{"name":"w","schema":tool["function"]["parameters"]}}})]:
    rates = []
    for _ in range(3):
        r = post({**base, **extra})
        rates.append(r["timings"]["predicted_per_second"])
    print(f"{name}: predicted tok/s {sorted(rates)[1]:.1f} (median of 3; {r['timings']['predicted_n']} tokens)")
