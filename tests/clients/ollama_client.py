"""The official `ollama` Python library (pinned in requirements.txt) against a running
lm-sandbox on the default model: list, show, ps, chat streamed and not, generate, embed, `format`
with a JSON schema, Open WebUI's and Continue's connection sequences (Open WebUI's unload with
`keep_alive: 0` included), and errors raised as `ResponseError` with the server's message.

Usage: ollama_client.py BASE_URL MODEL   (run by tests/clients.rs)
"""

import json
import sys

import httpx
import ollama

base, model = sys.argv[1], sys.argv[2]
client = ollama.Client(host=base)
tagged = f"{model}:latest"

# Open WebUI connects with /api/version, /api/tags, /api/ps.
version = httpx.get(f"{base}/api/version").json()["version"]
assert version.count(".") == 2, version
assert httpx.get(f"{base}/").text == "Ollama is running"
assert httpx.head(f"{base}/").status_code == 200
listed = client.list()
assert tagged in [m.model for m in listed.models], listed
entry = next(m for m in listed.models if m.model == tagged)
assert entry.size > 0 and entry.details.format == "gguf" and entry.details.family == "llama"
assert entry.details.quantization_level == "Q4_1" and entry.modified_at is not None
running = client.ps()
assert running.models and running.models[0].context_length > 0, running
assert running.models[0].expires_at is not None

# Continue: /api/show, then /api/chat with keep_alive.
shown = client.show(model)
assert shown.details.format == "gguf" and "completion" in shown.capabilities, shown.capabilities
assert shown.modelinfo["general.architecture"] == "llama"
assert shown.modelinfo["tokenizer.ggml.tokens"] is None, "arrays are elided"
assert "<|im_start|>" in shown.template

messages = [{"role": "user", "content": "What is the capital of France?"}]
options = {"temperature": 0, "num_predict": 24, "seed": 1}
answer = client.chat(model=model, messages=messages, options=options, keep_alive=1800, stream=False)
assert answer.done and answer.message.role == "assistant" and answer.message.content, answer
assert answer.done_reason in ("stop", "length")
assert answer.eval_count > 0 and answer.prompt_eval_count > 5
assert answer.eval_duration > 0 and answer.total_duration >= answer.eval_duration
parts = list(client.chat(model=tagged, messages=messages, options=options, stream=True))
assert parts[-1].done and not any(p.done for p in parts[:-1])
assert "".join(p.message.content for p in parts) == answer.message.content
assert parts[-1].eval_count == answer.eval_count

generated = client.generate(model=model, prompt="Once upon a time", options=options)
assert generated.done and generated.response and generated.eval_count > 0
streamed = "".join(p.response for p in client.generate(model=model, prompt="Once upon a time",
                                                         options=options, stream=True))
assert streamed == generated.response
raw = client.generate(model=model, prompt="<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                      raw=True, options=options)
assert raw.response
# An empty prompt loads the model (it already is).
assert client.generate(model=model, prompt="").done_reason == "load"

# format: a JSON schema through the grammar path.
schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
formatted = client.chat(model=model, messages=messages, format=schema, options=options)
assert isinstance(json.loads(formatted.message.content)["city"], str), formatted.message.content

# Tools: one call forced with lm-sandbox's `tool_choice` and `parallel_tool_calls` (in `options`,
# which the library passes as it is), arguments as an object that fits the tool's schema; the result goes back as role
# tool with tool_name.
weather = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
asked = [{"role": "user", "content": "What is the weather in Paris?"}]
called = client.chat(model=model, messages=asked, tools=[weather],
                     options={**options, "num_predict": 96, "tool_choice": "required",
                              "parallel_tool_calls": False}, stream=False)
call = called.message.tool_calls[0]
assert call.function.name == "get_weather", called
assert isinstance(call.function.arguments, dict) and isinstance(call.function.arguments["city"], str)
replied = client.chat(model=model, tools=[weather], options=options, stream=False, messages=[
    *asked, called.message, {"role": "tool", "content": "sunny", "tool_name": "get_weather"}])
assert replied.done
streamed_call = [p for p in client.chat(model=model, messages=asked, tools=[weather], stream=True,
                                        options={**options, "num_predict": 96, "tool_choice": "required",
                              "parallel_tool_calls": False})
                 if p.message.tool_calls]
assert streamed_call[0].message.tool_calls[0].function.name == "get_weather"

embedded = client.embed(model=model, input=["The cat sat.", "A dog ran."])
assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 576
legacy = client.embeddings(model=model, prompt="The cat sat.")
assert max(abs(a - b) for a, b in zip(legacy.embedding, embedded.embeddings[0])) < 1e-6

# Errors: ResponseError with the server's message and status.
for call, status, words in [
    (lambda: client.chat(model="no-such-model", messages=messages), 404, "does not exist"),
    (lambda: client.pull("llama3.2"), 400, "does not download"),
    (lambda: client.chat(model=model, messages=messages, options={"num_ctx": "big"}), 400, "num_ctx"),
    (lambda: client.chat(model=model, messages=[{"role": "user", "content": "x", "images": ["aGk="]}]), 400, "images"),
    (lambda: client.chat(model=model, messages=messages, think=True), 400, "thinking"),
    (lambda: client.delete(model), 400, "not supported"),
]:
    try:
        call()
        raise AssertionError(f"expected an error containing {words!r}")
    except ollama.ResponseError as e:
        assert e.status_code == status and words in e.error, (e.status_code, e.error)
assert client.pull(model).status == "success"

# num_ctx larger than the model has per sequence: it is reloaded with that context (capped at
# its trained 8192), as Ollama does.
before = next(m for m in client.ps().models if m.model == tagged).context_length
grown = client.chat(model=model, messages=messages, options={**options, "num_ctx": 10**7}, stream=False)
assert grown.message.content == answer.message.content
after = next(m for m in client.ps().models if m.model == tagged).context_length
assert before < after == 8192, (before, after)

# Open WebUI's unload: keep_alive 0 with an empty prompt frees the model; ps no longer lists it,
# and the next request loads it again (load_duration says how long that took).
unloaded = client.generate(model=model, prompt="", keep_alive=0)
assert unloaded.done_reason == "unload", unloaded
assert not [m for m in client.ps().models if m.model == tagged], client.ps()
again = client.chat(model=model, messages=messages, options=options, stream=False)
assert again.message.content == answer.message.content
assert again.load_duration > 0, again
assert [m for m in client.ps().models if m.model == tagged]
print("ollama", ollama.__version__ if hasattr(ollama, "__version__") else "0.6.3", "ok")
