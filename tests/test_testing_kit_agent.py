"""CONTRACT 11: the public agent interface, ``--agent module:factory`` (and ``NAVI_AGENT``),
and the pytest plugin's fixtures, as someone writing their own agent uses them."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import trio
import trio.testing

import navi_trio
from navi_trio.agents import make_agent
from navi_trio.settings import Settings
from navi_trio.testing import Report
from navi_trio.testing.fake_openai import FakeOpenAI, text_reply

from .helpers import assert_grammar, open_server, text_of

NAVI = str(Path(sys.executable).parent / "navi-trio")


class EchoAgent:
    """A user's agent, written against the public names only."""

    def __init__(self, prefix: str = "echo: ") -> None:
        self.prefix = prefix

    async def play(self, ctx: navi_trio.RunContext) -> None:
        ctx.emit_thinking("echoing")
        ctx.emit_thinking_end()
        for word in ctx.content.split():
            await trio.sleep(0.01)
            ctx.emit_text(f"{self.prefix}{word} ")
        if not ctx.content:
            raise navi_trio.AgentError("nothing to echo")


def make_echo() -> EchoAgent:
    return EchoAgent()


class Factories:
    @staticmethod
    def shouting() -> EchoAgent:
        return EchoAgent("ECHO: ")

    @staticmethod
    def broken() -> EchoAgent:
        raise RuntimeError("no model configured")

    @staticmethod
    def not_an_agent() -> object:
        return 42


def test_the_agent_interface_is_the_package_root() -> None:
    agent: navi_trio.Agent = EchoAgent()  # the Protocol accepts a plain class (mypy checks this line)
    assert callable(agent.play)
    assert {"Agent", "RunContext", "AgentError"} <= set(dir(navi_trio))
    assert (Path(navi_trio.__file__).parent / "py.typed").is_file()


def test_module_factory_is_loaded_and_called() -> None:
    settings = Settings.from_env({}, agent=f"{__name__}:make_echo", store="memory")
    agent = make_agent(settings)
    assert isinstance(agent, EchoAgent) and agent.prefix == "echo: "
    dotted = make_agent(Settings.from_env({}, agent=f"{__name__}:Factories.shouting", store="memory"))
    assert isinstance(dotted, EchoAgent) and dotted.prefix == "ECHO: "


def test_navi_agent_in_the_environment_names_the_factory_too() -> None:
    settings = Settings.from_env({"NAVI_AGENT": f"{__name__}:make_echo", "NAVI_STORE": "memory"})
    assert isinstance(make_agent(settings), EchoAgent)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("no_such_module_xyz:make", "cannot import no_such_module_xyz: ModuleNotFoundError"),
        (f"{__name__}:nothing_here", "has no nothing_here"),
        (f"{__name__}:EchoAgent.prefix", "has no EchoAgent.prefix"),
        (":make", "expected module:factory"),
    ],
)
def test_a_factory_that_cannot_be_loaded_is_a_clear_settings_error(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match="--agent") as info:
        Settings.from_env({}, agent=spec, store="memory")
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("factory", "says"), [("broken", "the factory failed: RuntimeError"), ("not_an_agent", "no play")]
)
def test_a_factory_that_fails_or_gives_no_agent_is_a_clear_error(factory: str, says: str) -> None:
    settings = Settings.from_env({}, agent=f"{__name__}:Factories.{factory}", store="memory")
    with pytest.raises(ValueError, match=says):
        make_agent(settings)


async def test_a_users_agent_is_served_end_to_end() -> None:
    async with open_server(agent=f"{__name__}:make_echo") as server:
        sid = await server.new_session()
        async with server.connect(sid) as client:
            await client.send_message("hello world")
            events = await client.until_terminal()
        assert_grammar(events)
        assert events[-1]["type"] == "stream_end"
        assert text_of(events) == "echo: hello echo: world "
        await server.no_run_left()


async def test_navi_trio_serve_exits_with_the_import_error() -> None:
    env = {"PATH": "/usr/bin:/bin", "NAVI_STORE": "memory"}
    with trio.fail_after(60):
        proc = await trio.run_process(
            [NAVI, "serve", "--agent", "no_such_module_xyz:make", "--port", "0"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    assert proc.returncode == 2
    assert b"cannot import no_such_module_xyz" in proc.stderr


# -- the pytest plugin ---------------------------------------------------------------------
def test_the_plugin_is_a_pytest11_entry_point() -> None:
    (ep,) = [ep for ep in entry_points(group="pytest11") if ep.name == "navi_trio"]
    assert ep.value == "navi_trio.testing.pytest_plugin"


async def test_the_check_agent_fixture_passes_a_good_agent(
    check_agent: Callable[..., Awaitable[Report]], autojump_clock: trio.testing.MockClock
) -> None:
    report = await check_agent(EchoAgent(), "one two three")
    assert len(report.cases) > 1 and report.ok


async def test_the_check_agent_fixture_raises_for_a_broken_one(
    check_agent: Callable[..., Awaitable[Report]], autojump_clock: trio.testing.MockClock
) -> None:
    class Stubborn:
        async def play(self, ctx: navi_trio.RunContext) -> None:
            for _ in range(3):
                with trio.CancelScope(shield=True):
                    await trio.sleep(5)
                ctx.emit_text("x")

    with pytest.raises(AssertionError, match="stop_budget"):
        await check_agent(Stubborn(), "hi", paths=["stop"])


async def test_the_fake_model_fixture_serves_a_scripted_reply(fake_model: FakeOpenAI) -> None:
    import httpx2 as httpx

    fake_model.script(text_reply("hi ", "there"))
    async with httpx.AsyncClient(base_url=fake_model.base_url, trust_env=False) as client:
        r = await client.post("/chat/completions", json={"model": "m", "messages": [], "stream": True})
    assert "hi " in r.text and json.loads(fake_model.requests[0].body)["model"] == "m"


async def test_the_readme_example_runs_and_passes(autojump_clock: trio.testing.MockClock) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Your own agent") :]
    code = section[section.index("```python") + len("```python") : section.index("```", section.index("```python") + 9)]
    assert len(code.strip().splitlines()) <= 12  # "in ten lines", give or take the imports
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    test = namespace["test_echo_is_cancellation_correct"]
    assert callable(test)
    await test(autojump_clock)
