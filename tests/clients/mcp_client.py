"""The official MCP Python SDK against lm-sandbox's /mcp, with real sandbox containers
(tests/sandbox.rs).

Usage: mcp_client.py BASE_URL SANDBOX_KEY OTHER_SANDBOX_KEY PLAIN_KEY
Prints one line per check, and `request:` / `answer:` lines for one shell call as a client sees it.
"""

import asyncio
import json
import sys
import time

import anyio
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

base, key, other, plain = sys.argv[1:5]
url = base + "/mcp"


def session_for(api_key, headers=None):
    all_headers = {"Authorization": f"Bearer {api_key}", **(headers or {})}
    return create_mcp_http_client(headers=all_headers)


async def with_session(api_key, work, headers=None):
    async with session_for(api_key, headers) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)


async def main():
    # Initialize and list the tools.
    async def listing(session):
        tools = (await session.list_tools()).tools
        return {t.name: t for t in tools}

    tools = await with_session(key, listing)
    assert set(tools) == {"shell", "read_file", "write_file", "list_dir"}, tools
    assert tools["shell"].input_schema["required"] == ["command"], tools["shell"].input_schema
    assert tools["read_file"].annotations.read_only_hint is True
    assert tools["write_file"].annotations.destructive_hint is True
    print("tools:", sorted(tools))

    async def calls(session):
        arguments = {"command": "echo out; echo err >&2; exit 3"}
        print("request:", json.dumps({"method": "tools/call", "params": {"name": "shell", "arguments": arguments}}))
        shell = await session.call_tool("shell", arguments)
        print("answer:", json.dumps(shell.model_dump(mode="json", exclude_none=True)))
        assert shell.structured_content["stdout"] == "out\n", shell
        assert shell.structured_content["stderr"] == "err\n", shell
        assert shell.structured_content["exit_code"] == 3, shell
        assert "[exit code 3]" in shell.content[0].text, shell.content

        wrote = await session.call_tool("write_file", {"path": "notes/a.txt", "content": "hello\nworld\n"})
        assert not wrote.is_error and wrote.structured_content["bytes"] == 12, wrote
        read = await session.call_tool("read_file", {"path": "/workspace/notes/a.txt"})
        assert read.structured_content["content"] == "hello\nworld\n", read
        listed = await session.call_tool("list_dir", {"path": "notes"})
        assert listed.structured_content["entries"] == [{"name": "a.txt", "type": "file", "size": 12}], listed
        stdin = await session.call_tool("shell", {"command": "tr a-z A-Z", "stdin": "abc", "cwd": "notes"})
        assert stdin.structured_content["stdout"] == "ABC", stdin

        # Bad input is a tool error naming the argument; the session goes on.
        bad = await session.call_tool("read_file", {"path": "../../etc/passwd"})
        assert bad.is_error and bad.structured_content["argument"] == "path", bad
        missing = await session.call_tool("read_file", {"path": "nope.txt"})
        assert missing.is_error and "not a file" in missing.structured_content["error"], missing
        typed = await session.call_tool("shell", {"command": 5})
        assert typed.is_error and typed.structured_content["argument"] == "command", typed
        try:
            await session.call_tool("rm_everything", {})
            raise AssertionError("an unknown tool was called")
        except Exception as e:  # a JSON-RPC error
            assert "rm_everything" in str(e), e

        # A deadline stops a command.
        began = time.monotonic()
        slow = await session.call_tool("shell", {"command": "sleep 30", "timeout_s": 1})
        assert slow.structured_content["timed_out"] is True, slow
        assert time.monotonic() - began < 15, "the deadline held"

        # A call the client cancels (`notifications/cancelled`) stops its command: the audit's
        # end line for it says so, long before its 60 s deadline (tests/sandbox.rs checks).
        with anyio.move_on_after(2):
            await session.call_tool("shell", {"command": "sleep 45; echo never", "timeout_s": 60})
            raise AssertionError("the call was not cancelled")

        # A long command reports progress, with its output so far, to a client that asks.
        seen = []

        async def progress(value, total, message):
            seen.append((value, message))

        await session.call_tool("shell", {"command": "for i in 1 2 3; do echo tick$i; sleep 1; done"},
                                progress_callback=progress)
        said = "".join(message or "" for _, message in seen)
        assert "tick1" in said, seen
        assert [v for v, _ in seen] == sorted(v for v, _ in seen), seen
        print("progress notifications:", seen)
        return True

    await with_session(key, calls)

    # The overhead of an MCP `shell` call over /v1/sandbox/exec, for `true` (median of 50 each,
    # one connection each, after a warm-up).
    async def timed_mcp(session):
        times = []
        for _ in range(51):
            began = time.perf_counter()
            await session.call_tool("shell", {"command": "true"})
            times.append(time.perf_counter() - began)
        return sorted(times[1:])[25]

    mcp_median = await with_session(key, timed_mcp)
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        times = []
        for _ in range(51):
            began = time.perf_counter()
            answer = await http.post(base + "/v1/sandbox/exec", json={"command": "true"})
            assert answer.status_code == 200, answer.text
            times.append(time.perf_counter() - began)
        exec_median = sorted(times[1:])[25]
    print(f"overhead: MCP shell `true` median {mcp_median * 1e3:.1f} ms, /v1/sandbox/exec "
          f"{exec_median * 1e3:.1f} ms, +{(mcp_median - exec_median) * 1e3:.1f} ms "
          f"({mcp_median / exec_median:.2f}x)")

    # Another key's tenant sees none of it; a session within a key is a tenant of its own.
    async def look(session):
        return await session.call_tool("read_file", {"path": "notes/a.txt"})

    theirs = await with_session(other, look)
    assert theirs.is_error, theirs
    apart = await with_session(key, look, headers={"x-sandbox-session": "second"})
    assert apart.is_error, apart
    print("tenants apart")

    # A key without the sandbox permission is refused before any work.
    async with httpx2.AsyncClient() as http:
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}}
        headers = {"Accept": "application/json, text/event-stream"}
        refused = await http.post(url, json=body, headers={**headers, "Authorization": f"Bearer {plain}"})
        assert refused.status_code == 403, refused.status_code
        anonymous = await http.post(url, json=body, headers=headers)
        assert anonymous.status_code == 401, anonymous.status_code
    print("mcp: ok")


anyio.run(main)
