"""The official OpenAI Python SDK (pinned in requirements.txt) against a running lm-sandbox:
embeddings (float, base64 decoded by the SDK, dimensions) and logprobs on chat and completions,
streamed and not, every response validated by the SDK's own pydantic models. Then /metrics through
the Prometheus project's own OpenMetrics parser.

Usage: openai_sdk.py BASE_URL MODEL   (run by tests/clients.rs)
"""

import math
import sys
import urllib.request

import openai
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from prometheus_client.openmetrics.parser import text_string_to_metric_families

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def validated(raw, model_type):
    """The raw JSON body, validated by the SDK's model (types, required fields, enums)."""
    return model_type.model_validate(raw.http_response.json())


def norm(v):
    return math.sqrt(sum(x * x for x in v))


# Embeddings: float, the SDK's default (it asks for base64 and decodes it), dimensions.
texts = ["The cat sat on the mat.", "A dog ran in the park."]
raw = client.embeddings.with_raw_response.create(model=model, input=texts, encoding_format="float")
floats = validated(raw, CreateEmbeddingResponse)
assert [d.index for d in floats.data] == [0, 1]
assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens
width = len(floats.data[0].embedding)
assert width > 0 and abs(norm(floats.data[0].embedding) - 1) < 1e-4
decoded = client.embeddings.create(model=model, input=texts)
for a, b in zip(decoded.data, floats.data):
    assert len(a.embedding) == width
    assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) < 1e-6
short = client.embeddings.create(model=model, input="The cat sat on the mat.", dimensions=64)
assert len(short.data[0].embedding) == 64 and abs(norm(short.data[0].embedding) - 1) < 1e-4
try:
    client.embeddings.create(model=model, input="x", dimensions=width + 1)
    raise AssertionError("dimensions over the width must be refused")
except openai.BadRequestError as e:
    assert e.body["param"] == "dimensions", e.body

# Chat logprobs, not streamed and streamed: the same tokens and log-probabilities.
chat = dict(
    model=model,
    messages=[{"role": "user", "content": "Name a color."}],
    max_tokens=12,
    temperature=0,
    logprobs=True,
    top_logprobs=3,
)
raw = client.chat.completions.with_raw_response.create(**chat)
completion = validated(raw, ChatCompletion)
content = completion.choices[0].logprobs.content
assert content and len(content) <= completion.usage.completion_tokens
assert "".join(t.token for t in content) == completion.choices[0].message.content
for t in content:
    assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token and t.logprob <= 0
    assert bytes(t.bytes).decode("utf-8", "replace") == t.token
streamed = []
for chunk in client.chat.completions.create(**chat, stream=True):
    ChatCompletionChunk.model_validate(chunk.model_dump())
    if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
        streamed.extend(chunk.choices[0].logprobs.content)
assert [t.token for t in streamed] == [t.token for t in content]
assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, content))

# Completions logprobs.
raw = client.completions.with_raw_response.create(
    model=model, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2
)
text = validated(raw, Completion)
lp = text.choices[0].logprobs
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
assert "".join(lp.tokens) == text.choices[0].text
assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
assert all(len(top) <= 2 for top in lp.top_logprobs)
streamed_tokens = []
for chunk in client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2, stream=True
):
    if chunk.choices[0].logprobs:
        streamed_tokens.extend(chunk.choices[0].logprobs.tokens)
assert streamed_tokens == lp.tokens
try:
    client.chat.completions.create(**{**chat, "top_logprobs": 21})
    raise AssertionError("top_logprobs 21 must be refused")
except openai.BadRequestError as e:
    assert e.body["param"] == "top_logprobs", e.body

# /metrics through the Prometheus project's strict OpenMetrics parser.
with urllib.request.urlopen(f"{base}/metrics") as response:
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
for name in [
    "llamacpp:prompt_tokens",
    "llamacpp:tokens_predicted",
    "llamacpp:requests_processing",
    "llamacpp:requests_deferred",
    "lmsandbox_time_to_first_token_seconds",
    "lmsandbox_request_duration_seconds",
]:
    assert name in families, (name, sorted(families))
predicted = sum(s.value for s in families["llamacpp:tokens_predicted"].samples)
assert predicted >= completion.usage.completion_tokens, predicted
ttft_count = [s for s in families["lmsandbox_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
assert ttft_count and ttft_count[0].value >= 4, ttft_count
print("openai SDK", openai.__version__, "ok")
