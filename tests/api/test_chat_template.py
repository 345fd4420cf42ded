"""Our chat template rendering against transformers' own, on real-world templates and random conversations.

The templates are the ones their models ship in tokenizer_config.json (Llama 3 Instruct, Mistral Instruct v0.1,
Qwen2 Instruct, ChatML), plus one written to use what the others do not: {% break %}, transformers' `tojson` with
indent and non-ASCII, namespace(), {% generation %} blocks and whitespace control."""

import random

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from lora_server.api.chat_template import ChatTemplate, ChatTemplateError, Message

LLAMA_3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
QWEN_2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LOOP_CONTROLS_AND_TOJSON = """\
{%- set ns = namespace(users=0) %}
{%- for message in messages %}
    {%- if loop.index > 5 %}{% break %}{% endif %}
    {%- if message.role == 'system' %}
<<SYS>>{{ message.content | tojson }}<</SYS>>
    {%- elif message.role == 'user' %}
        {%- set ns.users = ns.users + 1 %}
[USER {{ ns.users }}] {{ message.content }}
    {%- else %}
{% generation %}[ASSISTANT] {{ message.content }}{% endgeneration %}{{ eos_token }}
    {%- endif %}
{%- endfor %}
{{ {"turns": messages | length, "roles": messages | map(attribute="role") | list, "note": "<&> ü"} | tojson(indent=2) }}
{%- if add_generation_prompt %}
[ASSISTANT] {% endif %}"""

TEMPLATES = {"llama-3": LLAMA_3, "mistral": MISTRAL, "qwen-2": QWEN_2, "chatml": CHATML,
             "loopcontrols-tojson": LOOP_CONTROLS_AND_TOJSON}
WORDS = ["hello", "  padded  ", "<b>tag</b>", "a & b", "'quoted'", "ünïcödé", "日本語", "line\nbreak", "{{ x }}", "😀"]


def conversation(rng: random.Random, alternate: bool) -> list[Message]:
    messages = [Message("system", " ".join(rng.choices(WORDS, k=3)))] if not alternate and rng.random() < 0.5 else []
    for turn in range(rng.randint(1, 8)):
        messages.append(Message("user" if turn % 2 == 0 else "assistant", " ".join(rng.choices(WORDS, k=4))))
    return messages


@pytest.mark.parametrize("name", TEMPLATES)
def test_renders_as_transformers_does(name, rng):
    source = TEMPLATES[name]
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    for _ in range(20):
        messages = conversation(rng, alternate=name == "mistral")
        add_generation_prompt = rng.random() < 0.5
        expected, _ = render_jinja_template([[{"role": m.role, "content": m.content} for m in messages]],
                                            chat_template=source, add_generation_prompt=add_generation_prompt,
                                            bos_token="<s>", eos_token="</s>")
        assert template.render(messages, add_generation_prompt) == expected[0], messages


def test_a_template_refusal_is_a_chat_template_error():
    template = ChatTemplate(MISTRAL, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ChatTemplateError, match="alternate"):
        template.render([Message("assistant", "first")])


def test_namespace_refuses_underscore_names():
    template = ChatTemplate("{% set ns = namespace(_secret=1) %}x")
    with pytest.raises(ChatTemplateError, match="underscore"):
        template.render([Message("user", "hi")])
