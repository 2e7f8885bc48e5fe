"""The official `openai` Python package against a cocoon gateway whose worker relays to
llama.cpp's own server (`llama-server --jinja`): what the embedded engine serves itself, a real
upstream server answers through the whole network too.

Usage: python3 tests/openai_sdk_upstream.py BASE_URL MODEL
(run by crates/cocoon-cli/tests/system/llama_server.rs, which starts the server)
"""

import json
import sys
import typing

import openai
import pydantic

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="not-needed-locally")


def ask(**kw):
    kw.setdefault("model", model)
    kw.setdefault("messages", [{"role": "user", "content": "Tell me the capital of France."}])
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(**kw)


plain = ask(max_tokens=20)
assert "Paris" in plain.choices[0].message.content, plain

# JSON mode and a schema, enforced by the server's own grammar.
as_json = ask(
    messages=[{"role": "user", "content": "Write a JSON object with a cat's name and age."}],
    max_tokens=120,
    response_format={"type": "json_object"},
)
assert isinstance(json.loads(as_json.choices[0].message.content), dict), as_json


class Cat(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int
    color: typing.Literal["black", "white", "orange"]


parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
parsed = parse(
    model=model,
    messages=[{"role": "user", "content": "Describe a cat with its name, age and color."}],
    max_tokens=120,
    temperature=0,
    response_format=Cat,
)
assert isinstance(parsed.choices[0].message.parsed, Cat), parsed

# Log-probabilities, with two alternatives each.
lp = ask(max_tokens=8, logprobs=True, top_logprobs=2)
content = lp.choices[0].logprobs.content
assert content and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content), content

# n: two choices, two requests through the network.
pair = ask(max_tokens=6, temperature=1.5, seed=5, n=2)
assert [c.index for c in pair.choices] == [0, 1], pair

# A penalty changes a greedy answer.
count = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]
free = ask(messages=count, max_tokens=40).choices[0].message.content
penalised = ask(messages=count, max_tokens=40, frequency_penalty=2.0).choices[0].message.content
assert free != penalised, (free, penalised)

# Tools, a round trip: a forced call, then its result given back and an answer, streamed and
# not. The server runs tests/chatml-tools.jinja (SmolLM2's own template has no place for
# tools, so llama-server would offer it none); one worked example in the conversation is what
# brings a 135M model to call rather than talk, since this llama-server's "required" grammar
# lets text come before the call.
weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
example = [
    {"role": "user", "content": "What is the weather in Rome?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Rome."},
]
question = example + [{"role": "user", "content": "What is the weather in Paris?"}]
called = ask(messages=question, tools=[weather], tool_choice="required", max_tokens=60)
assert called.choices[0].finish_reason == "tool_calls", called
call = called.choices[0].message.tool_calls[0]
assert call.type == "function" and call.function.name == "get_weather", call
assert json.loads(call.function.arguments) == {"city": "Paris"}, call
streamed_calls = {}
stream_finish = None
for chunk in ask(messages=question, tools=[weather], tool_choice="required", max_tokens=60, stream=True):
    for c in chunk.choices:
        for piece in c.delta.tool_calls or []:
            entry = streamed_calls.setdefault(piece.index, {"id": piece.id, "name": "", "arguments": ""})
            entry["name"] += piece.function.name or ""
            entry["arguments"] += piece.function.arguments or ""
        stream_finish = c.finish_reason or stream_finish
assert stream_finish == "tool_calls", stream_finish
assert streamed_calls[0]["name"] == "get_weather", streamed_calls
assert json.loads(streamed_calls[0]["arguments"]) == {"city": "Paris"}, streamed_calls
result = [called.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}]
answered = ask(messages=question + result, tools=[weather], max_tokens=30)
assert answered.choices[0].finish_reason == "stop", answered
assert "18" in answered.choices[0].message.content, answered
streamed_answer = "".join(
    c.delta.content or ""
    for chunk in ask(messages=question + result, tools=[weather], max_tokens=30, stream=True)
    for c in chunk.choices
)
assert streamed_answer == answered.choices[0].message.content, (streamed_answer, answered)

print("openai SDK through llama-server: all checks passed")
