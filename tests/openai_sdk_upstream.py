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

print("openai SDK through llama-server: all checks passed")
