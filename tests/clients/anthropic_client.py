"""Anthropic's official Python SDK against lm-sandbox's Messages API (tests/clients.rs).

Usage: anthropic_client.py BASE_URL MODEL [API_KEY]
"""

import sys

import anthropic

base, model = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else "unused"
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)

# Claude Code's first system block: a per-request billing line the server must drop, or the
# prefix cache would miss on every turn.
def system(nonce):
    return [
        {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.0.abc; cc_entrypoint=cli; cch={nonce};"},
        {"type": "text", "text": "You are a terse assistant. Answer in a few words.", "cache_control": {"type": "ephemeral"}},
    ]

question = [{"role": "user", "content": "Name a colour."}]
# This SDK release no longer has sampling keywords (newer Claude models fix them); Claude Code and
# older SDKs still send them, and the server honours them.
greedy = dict(extra_body={"temperature": 0, "top_k": 1})

# Plain.
plain = client.messages.create(model=model, max_tokens=24, system=system("aaaaa"), messages=question, **greedy)
assert plain.type == "message" and plain.role == "assistant", plain
assert plain.id.startswith("msg_"), plain.id
assert plain.content and plain.content[0].type == "text", plain.content
assert plain.stop_reason in ("end_turn", "max_tokens"), plain.stop_reason
assert plain.usage.output_tokens > 0, plain.usage
print("plain:", repr(plain.content[0].text), plain.stop_reason, plain.usage)

# Streamed equals unstreamed.
with client.messages.stream(model=model, max_tokens=24, system=system("bbbbb"), messages=question, **greedy) as stream:
    streamed_text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert streamed_text == plain.content[0].text, (streamed_text, plain.content[0].text)
assert final.content[0].text == plain.content[0].text
assert final.stop_reason == plain.stop_reason, (final.stop_reason, plain.stop_reason)
assert final.usage.output_tokens == plain.usage.output_tokens, (final.usage, plain.usage)
print("streamed:", repr(streamed_text))

# count_tokens equals the real request's input tokens (computed plus read from the cache).
counted = client.messages.count_tokens(model=model, system=system("ccccc"), messages=question)
real = final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
assert counted.input_tokens == real, (counted.input_tokens, final.usage)
print("count_tokens:", counted.input_tokens)

# Forced tool use, and its result sent back.
tools = [{
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
forced = client.messages.create(
    model=model, max_tokens=64, messages=ask, tools=tools,
    tool_choice={"type": "tool", "name": "get_weather"}, **greedy,
)
uses = [b for b in forced.content if b.type == "tool_use"]
assert forced.stop_reason == "tool_use", forced
assert len(uses) >= 1 and uses[0].name == "get_weather", forced.content
assert isinstance(uses[0].input, dict) and isinstance(uses[0].input.get("city"), str), uses[0].input
print("tool_use:", uses[0].input)

with client.messages.stream(
    model=model, max_tokens=64, messages=ask, tools=tools,
    tool_choice={"type": "tool", "name": "get_weather"}, **greedy,
) as stream:
    streamed_call = stream.get_final_message()
streamed_uses = [b for b in streamed_call.content if b.type == "tool_use"]
assert streamed_call.stop_reason == "tool_use"
assert [u.input for u in streamed_uses] == [u.input for u in uses], (streamed_uses, uses)

answered = client.messages.create(
    model=model, max_tokens=24, tools=tools, **greedy,
    messages=ask + [
        {"role": "assistant", "content": forced.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                      "content": [{"type": "text", "text": "Sunny, 21 C"}]}]},
    ],
)
assert answered.stop_reason in ("end_turn", "max_tokens", "tool_use"), answered
print("after the result:", answered.content)

# A Claude Code-shaped second turn (a new billing nonce): the conversation's prefix is read from
# the cache.
turn1 = client.messages.create(model=model, max_tokens=16, system=system("11111"), tools=tools,
                               messages=[{"role": "user", "content": "Hello, who are you?"}], **greedy)
turn2 = client.messages.create(model=model, max_tokens=16, system=system("22222"), tools=tools, **greedy,
                               messages=[{"role": "user", "content": "Hello, who are you?"},
                                         {"role": "assistant", "content": turn1.content},
                                         {"role": "user", "content": "And what can you do?"}])
cached = turn2.usage.cache_read_input_tokens
total = turn2.usage.input_tokens + cached
print(f"claude-code turn 2: cache_read_input_tokens={cached} of {total} input tokens")
assert cached > 0 and cached >= turn1.usage.input_tokens + turn1.usage.cache_read_input_tokens - 4, (turn1.usage, turn2.usage)

# output_config.format: JSON constrained to a schema.
schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"],
          "additionalProperties": False}
structured = client.messages.create(model=model, max_tokens=48, messages=question, **greedy,
                                    output_config={"format": {"type": "json_schema", "schema": schema}})
if structured.stop_reason == "end_turn":
    import json
    assert isinstance(json.loads(structured.content[0].text)["colour"], str), structured.content

# Errors, in Anthropic's shape.
def expect(error_type, status, body_type, **kwargs):
    try:
        client.messages.create(**kwargs)
    except error_type as e:
        assert e.status_code == status, (e.status_code, e)
        assert e.body["type"] == "error" and e.body["error"]["type"] == body_type, e.body
        return e.body["error"]["message"]
    raise AssertionError(f"no {error_type.__name__} for {kwargs}")

print(expect(anthropic.BadRequestError, 400, "invalid_request_error", model=model, max_tokens=0, messages=question))
print(expect(anthropic.NotFoundError, 404, "not_found_error", model="no-such-model", max_tokens=8, messages=question))
message = expect(anthropic.BadRequestError, 400, "invalid_request_error", model=model, max_tokens=8,
                 messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
assert "image" in message, message
if len(sys.argv) > 3:
    # The key came as `x-api-key`; a wrong one is Anthropic's 401.
    wrong = anthropic.Anthropic(base_url=base, api_key="wrong-key", max_retries=0)
    try:
        wrong.messages.create(model=model, max_tokens=8, messages=question)
        raise AssertionError("a wrong key was accepted")
    except anthropic.AuthenticationError as e:
        assert e.status_code == 401 and e.body["error"]["type"] == "authentication_error", e.body
print("anthropic: ok")
