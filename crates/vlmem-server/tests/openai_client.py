"""vlmem serve through the official `openai` Python client.

Usage: python openai_client.py BASE_URL API_KEY IMAGE_PNG

Text chat, image chat with a data URL, a streamed chat whose deltas add up to the whole
reply, a text completion, and the errors the client raises for a wrong model, a bad
max_tokens and a wrong key. Prints one line per check; exits non-zero on the first failure.
"""

import base64
import sys

import openai
from openai import OpenAI


def main() -> int:
    base_url, api_key, image_path = sys.argv[1], sys.argv[2], sys.argv[3]
    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=120)
    passed = 0

    models = client.models.list()
    model = models.data[0].id
    assert model == "qwen3-vl-tiny", models
    passed += 1
    print(f"models: {model}")

    text = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe this image."}],
        max_tokens=12,
        temperature=0,
    )
    choice = text.choices[0]
    assert choice.message.role == "assistant", text
    assert choice.finish_reason in ("stop", "length"), text
    assert text.usage.completion_tokens >= 1, text
    assert text.usage.total_tokens == text.usage.prompt_tokens + text.usage.completion_tokens
    passed += 1
    print(f"text chat: {choice.message.content!r} ({text.usage.completion_tokens} tokens)")

    with open(image_path, "rb") as f:
        data_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    image = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": "Describe this image."},
                ],
            }
        ],
        max_tokens=12,
        temperature=0,
    )
    assert image.usage.prompt_tokens > text.usage.prompt_tokens + 50, image.usage
    passed += 1
    print(f"image chat: {image.choices[0].message.content!r} ({image.usage.prompt_tokens} prompt tokens)")

    deltas, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe this image."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.choices:
            if chunk.choices[0].delta.content:
                deltas.append(chunk.choices[0].delta.content)
            if chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        if chunk.usage:
            usage = chunk.usage
    assert "".join(deltas) == choice.message.content, (deltas, choice.message.content)
    assert finish == choice.finish_reason, finish
    assert usage is not None and usage.completion_tokens == text.usage.completion_tokens, usage
    passed += 1
    print(f"streamed chat: {len(deltas)} chunks add up to the whole reply")

    completion = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=6, temperature=0
    )
    assert completion.object == "text_completion", completion
    assert completion.usage.completion_tokens >= 1, completion
    passed += 1
    print(f"completion: {completion.choices[0].text!r}")

    try:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        raise AssertionError("a wrong model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.code == "model_not_found", e
    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=0
        )
        raise AssertionError("max_tokens 0 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
    try:
        OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e
    passed += 1
    print("errors: 404 for a wrong model, 400 for max_tokens 0, 401 for a wrong key")

    print(f"{passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
