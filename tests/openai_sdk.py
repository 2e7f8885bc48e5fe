"""The official `openai` Python package against a running cocoon gateway, unchanged.

Usage: python3 tests/openai_sdk.py BASE_URL MODEL   (run by crates/cocoon-cli/tests/openai_sdk.rs)
"""

import sys

import json
import typing

import openai
import pydantic

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="not-needed-locally")

models = [m.id for m in client.models.list()]
assert model in models, models
assert client.models.retrieve(model).id == model

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Tell me the capital of France."}],
    max_tokens=20,
    temperature=0,
)
answer = chat.choices[0].message.content
assert "Paris" in answer, answer
assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

# The system turn is templated in, in place of the default one the model's template adds.
long_system = "You are a helpful assistant who answers every question briefly, kindly and in plain English."
hi = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
system = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": long_system}, {"role": "user", "content": "Hi"}],
    max_tokens=1,
)
assert system.usage.prompt_tokens > hi.usage.prompt_tokens, (system.usage, hi.usage)

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Tell me the capital of France."}],
    max_tokens=20,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
parts, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage
assert "".join(parts) == answer, (parts, answer)  # greedy: same text streamed or not
assert usage is not None and usage.completion_tokens > 0

completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, extra_body={"ignore_eos": True})
assert completion.usage.completion_tokens == 5, completion.usage
assert completion.choices[0].text

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=100000)
    raise AssertionError("oversize max_tokens accepted")
except openai.BadRequestError as e:
    assert e.code == "context_length_exceeded", e

# response_format json_object: the answer is one JSON object (the engine's grammar).
as_json = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write a JSON object with a cat's name and age."}],
    max_tokens=160,
    temperature=0,
    response_format={"type": "json_object"},
)
assert as_json.choices[0].finish_reason == "stop", as_json
assert isinstance(json.loads(as_json.choices[0].message.content), dict), as_json

# logit_bias: one token pushed up by 100 is the whole greedy answer.
forced = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Name a fruit."}],
    max_tokens=6,
    temperature=0,
    logit_bias={"1000": 100},
)
text = forced.choices[0].message.content
assert forced.usage.completion_tokens == 6, forced.usage
assert text and text == text[: len(text) // 6] * 6, text

# logprobs: one entry per generated token, the chosen one first among its alternatives under
# greedy decoding; streamed chunk by chunk; and the legacy endpoint's parallel lists.
lp = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Name three colors."}],
    max_tokens=8,
    temperature=0,
    logprobs=True,
    top_logprobs=2,
)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens, (content, lp.usage)
assert "".join(t.token for t in content) == lp.choices[0].message.content
for t in content:
    assert t.logprob <= 0 and len(t.top_logprobs) == 2, t
    assert t.top_logprobs[0].token == t.token and bytes(t.bytes).decode() == t.token, t
streamed = []
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Name three colors."}],
    max_tokens=8,
    temperature=0,
    logprobs=True,
    stream=True,
):
    if chunk.choices and chunk.choices[0].logprobs:
        streamed += [t.token for t in chunk.choices[0].logprobs.content]
assert streamed == [t.token for t in content], (streamed, content)
legacy = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=3)
assert len(legacy.choices[0].logprobs.tokens) == legacy.usage.completion_tokens, legacy
assert "".join(legacy.choices[0].logprobs.tokens) == legacy.choices[0].text
assert all(len(top) == 3 for top in legacy.choices[0].logprobs.top_logprobs), legacy

# n: several choices, each its own request through the network (choice i seeded with seed + i,
# so they differ); usage is their sum; streamed, each choice's chunks carry its index. (Sampled
# answers are not compared across runs: llama.cpp's sums differ in the last bits with how a
# batch is made up, and at temperature 1.5 a near tie can go either way.)
def two(**extra):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a word."}],
        max_tokens=6,
        temperature=1.5,
        seed=11,
        n=2,
        **extra,
    )


pair = two()
assert [c.index for c in pair.choices] == [0, 1], pair
texts = [c.message.content for c in pair.choices]
assert texts[0] != texts[1], texts
per_choice = pair.usage.model_extra["choices"]
assert len(per_choice) == 2 and pair.usage.completion_tokens == sum(u["completion_tokens"] for u in per_choice)
parts = {0: "", 1: ""}
finished = set()
streamed_usage = None
for chunk in two(stream=True, stream_options={"include_usage": True}):
    for c in chunk.choices:
        parts[c.index] += c.delta.content or ""
        if c.finish_reason:
            finished.add(c.index)
    if chunk.usage:
        streamed_usage = chunk.usage
assert finished == {0, 1} and parts[0] and parts[1], parts
assert streamed_usage.completion_tokens == sum(u["completion_tokens"] for u in streamed_usage.model_extra["choices"])
try:
    two(extra_body={"n": 9})
    raise AssertionError("n = 9 accepted")
except openai.BadRequestError as e:
    assert "n must be between 1 and 8" in str(e), e

# Tools: a forced call, its result given back, an answer; streamed, the call comes as
# tool-call deltas the SDK joins. (One call at a time: this small model, allowed several,
# tends to repeat its call until max_tokens.)
weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
question = [{"role": "user", "content": "What is the weather in Paris?"}]
called = client.chat.completions.create(
    model=model, messages=question, tools=[weather], tool_choice="required", max_tokens=60, temperature=0,
    parallel_tool_calls=False,
)
assert called.choices[0].finish_reason == "tool_calls", called
call = called.choices[0].message.tool_calls[0]
assert call.type == "function" and call.function.name == "get_weather", call
assert isinstance(json.loads(call.function.arguments)["city"], str), call
answered = client.chat.completions.create(
    model=model,
    messages=question
    + [called.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}],
    tools=[weather],
    max_tokens=40,
    temperature=0,
)
final = answered.choices[0]
assert final.message.content or final.message.tool_calls, answered
streamed_calls = {}
stream_finish = None
for chunk in client.chat.completions.create(
    model=model, messages=question, tools=[weather], tool_choice="required", max_tokens=60, temperature=0, stream=True,
    parallel_tool_calls=False,
):
    for c in chunk.choices:
        for piece in c.delta.tool_calls or []:
            entry = streamed_calls.setdefault(piece.index, {"id": piece.id, "name": "", "arguments": ""})
            entry["name"] += piece.function.name or ""
            entry["arguments"] += piece.function.arguments or ""
        stream_finish = c.finish_reason or stream_finish
assert stream_finish == "tool_calls", stream_finish
assert streamed_calls[0]["name"] == "get_weather" and json.loads(streamed_calls[0]["arguments"]) == json.loads(
    call.function.arguments
), (streamed_calls, call)

# Embeddings, as the SDK asks for them (base64, decoded by the SDK) and as floats: one unit
# vector per text, in order, closer for texts that mean alike; billed by their tokens.
texts = ["The cat sat on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today."]
for fmt in [openai.NOT_GIVEN, "float"]:
    embedded = client.embeddings.create(model=model, input=texts, encoding_format=fmt)
    vectors = [d.embedding for d in embedded.data]
    assert [d.index for d in embedded.data] == [0, 1, 2], embedded
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 100, [len(v) for v in vectors]
    assert abs(sum(x * x for x in vectors[0]) - 1) < 1e-3
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
    assert embedded.usage.prompt_tokens > 0 and embedded.usage.total_tokens == embedded.usage.prompt_tokens
one = client.embeddings.create(model=model, input="The cat sat on the mat.")
assert one.data[0].embedding == vectors[0] or max(abs(x - y) for x, y in zip(one.data[0].embedding, vectors[0])) < 1e-6
try:
    client.embeddings.create(model=model, input=[[1, 2, 3]])
    raise AssertionError("token arrays accepted")
except openai.BadRequestError as e:
    assert "token arrays are not supported" in str(e), e

# Structured outputs as apps write them: a pydantic model, sent by the SDK as a strict
# json_schema, answered under the engine's grammar, parsed and validated by the SDK.
class Cat(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int
    color: typing.Literal["black", "white", "orange"]
    toys: list[typing.Annotated[str, pydantic.Field(max_length=10)]] = pydantic.Field(max_length=2)


parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
parsed = parse(
    model=model,
    messages=[{"role": "user", "content": "Describe a cat with its name, age, color and toys."}],
    max_tokens=120,
    temperature=0,
    response_format=Cat,
)
cat = parsed.choices[0].message.parsed
assert isinstance(cat, Cat), parsed
assert Cat.model_validate_json(parsed.choices[0].message.content) == cat

# What the grammar cannot enforce is refused by name, never ignored.
try:
    client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "x"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "p", "schema": {"type": "string", "pattern": "^[a-z]+$"}},
        },
    )
    raise AssertionError("a pattern accepted by the embedded engine")
except openai.BadRequestError as e:
    assert "'pattern'" in str(e), e

print("openai SDK: all checks passed")
