"""Chats with a Tessera server through the official OpenAI Python client.

Usage: python openai_client.py BASE_URL   (e.g. http://127.0.0.1:3000/v1)

Run by tests/tests/serve_api.rs with .deps/venv-client/bin/python (made by
scripts/setup.sh). Checks what the client parses, and prints one JSON line
with what the Rust test compares: the models, the answer and the streamed one.
"""

import json
import sys

import openai


def main() -> None:
    client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", timeout=120, max_retries=0)
    models = [m.id for m in client.models.list()]
    assert models, "no models listed"
    assert client.models.retrieve(models[0]).id == models[0]
    messages = [{"role": "user", "content": "What is the capital of France?"}]

    answer = client.chat.completions.create(
        model=models[0], messages=messages, max_tokens=16, temperature=0
    )
    assert answer.object == "chat.completion", answer
    assert len(answer.choices) == 1, answer
    choice = answer.choices[0]
    assert choice.message.role == "assistant", answer
    assert choice.finish_reason in ("stop", "length"), answer
    assert answer.usage.completion_tokens > 0, answer
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    text = choice.message.content

    stream = client.chat.completions.create(
        model=models[0],
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason is not None:
                finish = c.finish_reason
    assert finish == choice.finish_reason, (finish, choice.finish_reason)
    assert usage is not None and usage.completion_tokens == answer.usage.completion_tokens, usage

    print(json.dumps({"models": models, "text": text, "stream_text": "".join(pieces)}))


if __name__ == "__main__":
    main()
