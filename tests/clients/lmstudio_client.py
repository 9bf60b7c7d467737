"""LM Studio's official Python SDK (`lmstudio`, pinned in requirements.txt) against a running
lm-sandbox on the default model, over the SDK's own websocket protocol: the greeting and the
passkey, listings, `model()`, `respond` (whole and streamed, a chat history, structured output,
stop strings), `complete`, `tokenize`, `count_tokens`, `apply_prompt_template`,
`get_context_length`, `get_info`, embeddings, unload and load, and a missing model.

Usage: lmstudio_client.py BASE_URL MODEL [API_KEY]   (run by tests/clients.rs)
"""

import json
import sys
import time

import httpx
import lmstudio as lms

base, model = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else None
host = base.removeprefix("http://")

assert httpx.get(f"{base}/lmstudio-greeting").json() == {"lmstudio": True}


class KeyedClient(lms.Client):
    """The SDK's client with the server's API key as its passkey."""

    def _create_auth_message(self):
        return self._format_auth_message(client_key=key)


if key:
    # The SDK's own random passkey is refused when the server has keys.
    try:
        with lms.Client(host) as stranger:
            stranger.llm.list_loaded()
        raise AssertionError("a random passkey was accepted")
    except lms.LMStudioError as e:
        assert "API key" in str(e) or "not reachable" in str(e), e
    client = KeyedClient(host)
else:
    client = lms.Client(host)

with client:
    loaded = client.list_loaded_models()
    assert model in [m.identifier for m in loaded], loaded
    downloaded = client.list_downloaded_models()
    entry = next(m for m in downloaded if m.model_key == model)
    assert entry.info.format == "gguf" and entry.info.max_context_length == 8192, entry.info

    llm = client.llm.model(model)
    context = llm.get_context_length()
    assert context > 0, context
    info = llm.get_info()
    assert info.identifier == model and info.architecture == "llama" and info.context_length == context
    tokens = llm.tokenize("Hello world")
    assert tokens and llm.count_tokens("Hello world") == len(tokens)
    formatted = llm.apply_prompt_template(lms.Chat("You are terse."))
    assert formatted.startswith("<|im_start|>system\nYou are terse.<|im_end|>"), formatted

    chat = lms.Chat("You are a helpful assistant.")
    chat.add_user_message("What is the capital of France?")
    config = {"maxTokens": 16, "temperature": 0}
    result = llm.respond(chat, config=config)
    assert result.content, result
    stats = result.stats
    assert stats.stop_reason in ("eosFound", "maxPredictedTokensReached"), stats
    assert stats.predicted_tokens_count > 0 and stats.prompt_tokens_count > 5, stats
    assert stats.time_to_first_token_sec is not None and stats.tokens_per_second > 0, stats
    assert result.model_info.model_key == model

    stream = llm.respond_stream(chat, config=config)
    fragments = [f.content for f in stream]
    assert "".join(fragments) == result.content, (fragments, result.content)
    assert stream.result().stats.predicted_tokens_count == stats.predicted_tokens_count

    words = result.content.split()
    if len(words) > 1:
        stopped = llm.respond(chat, config={**config, "stopStrings": [words[1]]})
        assert stopped.stats.stop_reason == "stopStringFound", stopped.stats
        assert words[1] not in stopped.content

    completed = llm.complete("Once upon a time", config={"maxTokens": 8, "temperature": 0})
    assert completed.content and completed.stats.predicted_tokens_count == 8, completed

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    structured = llm.respond("Name a city.", response_format=schema,
                             config={"maxTokens": 48, "temperature": 0})
    assert isinstance(json.loads(structured.content)["city"], str), structured.content
    assert isinstance(structured.parsed["city"], str)

    vector = client.embedding.model(model).embed("The cat sat.")
    assert len(vector) == 576, len(vector)

    # Unload and load again.
    client.llm.unload(model)
    assert model not in [m.identifier for m in client.llm.list_loaded()]
    client.llm.load_new_instance(model)
    assert model in [m.identifier for m in client.llm.list_loaded()]
    assert client.llm.model(model).respond(chat, config=config).content == result.content

    # act(): the server produces the call (a preset forces one on a user turn with tools), the
    # SDK runs the Python tool, and the next round answers with its result.
    cities = []

    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        cities.append(city)
        return "sunny"

    acted = llm.act("What is the weather in Paris?", [get_weather],
                    config={"temperature": 0, "maxTokens": 160}, max_prediction_rounds=2)
    assert cities and all(isinstance(c, str) and c for c in cities), (cities, acted)
    assert acted.rounds == 2, acted

    # A socket closed mid-prediction frees its sequence within a step.
    def processing():
        for line in httpx.get(f"{base}/metrics", headers=headers).text.splitlines():
            if line.startswith("llamacpp:requests_processing"):
                return float(line.split()[-1])
        raise AssertionError("no requests_processing gauge")

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    leaving = KeyedClient(host) if key else lms.Client(host)
    long_stream = leaving.llm.model(model).respond_stream(
        "Write a very long story about a dragon.", config={"maxTokens": 1500, "temperature": 0})
    next(iter(long_stream))
    assert processing() == 1, processing()
    leaving.close()
    for _ in range(100):
        if processing() == 0:
            break
        time.sleep(0.05)
    assert processing() == 0, "the sequence was not freed"

    # What this server does not offer is the SDK's own error naming the call; the socket stays.
    try:
        client.repository.search_models("llama")
        raise AssertionError("a model search answered")
    except lms.LMStudioServerError as e:
        assert "searchModels" in str(e), e
    assert client.llm.list_loaded()

    try:
        client.llm.model("no-such-model")
        raise AssertionError("a missing model loaded")
    except lms.LMStudioModelNotFoundError as e:
        assert "no-such-model" in str(e), e

print("lmstudio", lms.__version__, "ok")
