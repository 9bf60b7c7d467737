"""The official OpenAI Python SDK's `responses` resource against lm-sandbox (tests/clients.rs).

Usage: openai_responses.py BASE_URL MODEL [API_KEY]
"""

import json
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else "unused"
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
greedy = dict(temperature=0, max_output_tokens=24)

# Plain.
plain = client.responses.create(model=model, input="Name a colour.", instructions="Answer in a few words.", **greedy)
assert plain.object == "response" and plain.id.startswith("resp_"), plain
assert plain.status in ("completed", "incomplete"), plain.status
assert plain.output and plain.output[-1].type == "message", plain.output
assert plain.output_text, plain
assert plain.usage.input_tokens > 0 and plain.usage.output_tokens > 0, plain.usage
print("plain:", repr(plain.output_text), plain.status, plain.usage)

# Streamed equals unstreamed: the raw event sequence, numbered, and the final response.
events = list(client.responses.create(model=model, input="Name a colour.", instructions="Answer in a few words.",
                                      stream=True, **greedy))
kinds = [e.type for e in events]
assert kinds[0] == "response.created" and kinds[1] == "response.in_progress", kinds
assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
assert [e.sequence_number for e in events] == list(range(len(events))), kinds
for kind in ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
             "response.output_text.done", "response.content_part.done", "response.output_item.done"]:
    assert kind in kinds, (kind, kinds)
deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
final = events[-1].response
assert deltas == plain.output_text == final.output_text, (deltas, plain.output_text)
assert final.status == plain.status
assert final.usage.output_tokens == plain.usage.output_tokens
print("streamed:", repr(deltas))

# The SDK's own stream helper accumulates the same text.
if plain.status == "completed":
    with client.responses.stream(model=model, input="Name a colour.", instructions="Answer in a few words.",
                                 **greedy) as stream:
        for _ in stream:
            pass
        assert stream.get_final_response().output_text == plain.output_text

# input_tokens equals the real request's input tokens.
counted = client.responses.input_tokens.count(model=model, input="Name a colour.", instructions="Answer in a few words.")
assert counted.input_tokens == plain.usage.input_tokens, (counted, plain.usage)
print("input_tokens:", counted.input_tokens)

# Forced function call, and its output sent back through previous_response_id.
tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
called = client.responses.create(model=model, input="What is the weather in Paris?", tools=tools,
                                 tool_choice={"type": "function", "name": "get_weather"},
                                 temperature=0, max_output_tokens=64)
calls = [o for o in called.output if o.type == "function_call"]
assert calls and calls[0].name == "get_weather", called.output
arguments = json.loads(calls[0].arguments)
assert isinstance(arguments.get("city"), str), arguments
print("function_call:", arguments)
answered = client.responses.create(model=model, previous_response_id=called.id, tools=tools, **greedy,
                                   input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                           "output": "Sunny, 21 C"}])
assert answered.previous_response_id == called.id and answered.status in ("completed", "incomplete"), answered
# The conversation continued server-side: its prefix came from the cache.
cached = answered.usage.input_tokens_details.cached_tokens
print(f"chained: cached_tokens={cached} of {answered.usage.input_tokens}")
assert cached > 0, answered.usage

# Stored: retrieved, its input items listed, deleted.
got = client.responses.retrieve(called.id)
assert got.id == called.id and got.output[0].type == called.output[0].type
items = client.responses.input_items.list(called.id, order="asc")
assert [i.type for i in items.data] == ["message"], items
client.responses.delete(called.id)
try:
    client.responses.retrieve(called.id)
    raise AssertionError("a deleted response was found")
except openai.NotFoundError:
    pass

# text.format json_schema constrains the output.
schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"],
          "additionalProperties": False}
structured = client.responses.create(model=model, input="Name a colour as JSON.", temperature=0, max_output_tokens=48,
                                     text={"format": {"type": "json_schema", "name": "colour", "schema": schema,
                                                      "strict": True}})
if structured.status == "completed":
    assert isinstance(json.loads(structured.output_text)["colour"], str), structured.output_text

# A truncated response is incomplete, and says why.
short = client.responses.create(model=model, input="Write a long story about the sea.", temperature=0,
                                max_output_tokens=3)
assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens", short

# Errors name the field.
for kwargs, param in [
    (dict(input="hi", max_output_tokens=0), "max_output_tokens"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]),
     "input[0].content[0].type"),
    (dict(input="hi", reasoning={"effort": "huge"}), "reasoning.effort"),
]:
    try:
        client.responses.create(model=model, **kwargs)
        raise AssertionError(f"accepted {kwargs}")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == param, (e.body, param)
try:
    client.responses.create(model=model, input="hi", previous_response_id="resp_nothing")
    raise AssertionError("an unknown previous_response_id was accepted")
except openai.NotFoundError as e:
    assert e.body["param"] == "previous_response_id", e.body
print("responses: ok")
