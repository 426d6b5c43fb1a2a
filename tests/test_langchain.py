"""LangChain's ChatOpenAI (langchain-openai) against a real `nanochat serve` on 127.0.0.1: it invokes
and streams, and what the server cannot do (tool calling, structured output) is a clear error
naming the field rather than an answer that silently ignored it."""

import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.support.serving import serving

pytest_plugins = ["tests.support.serving"]


class Weather(BaseModel):
    """The weather in a city."""
    city: str
    celsius: float


@pytest.fixture(scope="module")
def chat(run):
    with serving(run) as url:
        yield ChatOpenAI(base_url=url + "/v1", api_key="unused", model="nanochat", max_tokens=8, temperature=0,
                         max_retries=0, timeout=60)


def test_invoke_and_stream(chat):
    message = chat.invoke("Hello there!")
    assert message.content and message.response_metadata["finish_reason"] in ("stop", "length")
    assert message.response_metadata["model_name"] == "nanochat-base"
    chunks = list(chat.stream("Hello there!"))
    assert "".join(chunk.content for chunk in chunks) == message.content


@pytest.mark.parametrize("refused, field", [
    (lambda chat: chat.bind_tools([Weather]), "tools"),
    (lambda chat: chat.with_structured_output(Weather), "response_format"),
    (lambda chat: chat.with_structured_output(Weather, method="function_calling"), "tools"),
])
def test_tools_and_structured_output_are_refused_by_name(chat, refused, field):
    with pytest.raises(openai.BadRequestError) as raised:
        refused(chat).invoke("What's the weather in Paris?")
    assert raised.value.status_code == 400 and raised.value.body["param"] == field
    assert field in raised.value.body["message"] and "not supported" in raised.value.body["message"]
